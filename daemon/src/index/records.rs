//! The plain domain records the index stores. How each one is laid out in sled lives in
//! [`super::schema`]; these types know nothing about bytes.

use std::collections::BTreeMap;
use std::fmt;

use moerge_library::{AdapterState, ContentHash};

/// What the index remembers of one file, to tell on the next start whether it changed
/// without reading it (the "warm" reconcile).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    pub len: u64,
    pub inode: u64,
    /// Modification and status-change times, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// The stamps of an adapter folder's two files, and whether they can be trusted later.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FolderStamp {
    pub config: FileStamp,
    pub weights: FileStamp,
    /// False when a file was modified so shortly before it was read that a later write in the
    /// same timestamp tick could go unseen ("racy" in git's words): such a folder is always
    /// re-read.
    pub trusted: bool,
}

/// One adapter folder of the library, as last indexed.
#[derive(Debug, Clone, PartialEq)]
pub struct ExpertRecord {
    /// The folder name.
    pub name: String,
    /// The content hash; `None` only for a rejected folder whose files could not be read.
    pub hash: Option<ContentHash>,
    /// Bumped each time the content or the state under this name changes; starts at 1.
    pub generation: u64,
    pub state: AdapterState,
    pub size_bytes: u64,
    pub stamp: FolderStamp,
}

impl ExpertRecord {
    pub fn is_ready(&self) -> bool {
        self.state == AdapterState::Ready
    }
}

/// A content-addressed blob: blake3 of its bytes (domain-separated, see `blobs.rs`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BlobId(pub [u8; 32]);

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &self.to_string()[..12])
    }
}

/// A value derived from an expert's content (a parameter sketch, Arrow prototypes...),
/// cached by content hash so a renamed folder reuses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivedValue {
    Inline(Vec<u8>),
    Blob(BlobId),
}

/// An expert a plan names, by name and by the hash it had when the plan was made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanExpert {
    pub name: String,
    pub hash: ContentHash,
}

/// A learned or configured fusion plan. The plan IR itself belongs to the SDK (a later
/// issue); the index keeps its serialised body opaque and its big tensors in blobs.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanRecord {
    pub name: String,
    pub experts: Vec<PlanExpert>,
    pub body: String,
    pub tensors: BTreeMap<String, BlobId>,
    /// Why the plan no longer matches the library, if it does not: an expert it names was
    /// removed, changed or is not ready. Recomputed on every library change.
    pub stale: Option<String>,
}

/// A clustering of the library's experts (model-based clustering, in a later issue).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterRecord {
    pub name: String,
    pub clusters: Vec<Vec<ContentHash>>,
    /// Set when the library changed after the clustering was computed.
    pub stale: bool,
}

/// Identifies an evaluation data set by the hash of its contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DatasetId(pub [u8; 32]);

/// One row of the expert × task validation-loss matrix, cached by the expert's content.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalRow {
    pub dataset: DatasetId,
    pub expert: ContentHash,
    /// Mean loss per task.
    pub losses: BTreeMap<String, f64>,
}

/// A greedy selection's result: the order experts were added in and the loss curve.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectionRecord {
    pub name: String,
    pub dataset: DatasetId,
    pub order: Vec<ContentHash>,
    pub curve: Vec<f64>,
    /// Length of the smallest prefix within tolerance of the full set.
    pub active: usize,
    pub stale: bool,
}
