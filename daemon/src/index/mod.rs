//! The index: what the daemon knows about its library, in sled, behind one [`Index`] type.
//! This is the only module that knows sled; [`schema`] says how each record is stored.
//!
//! The adapter folder is the source of truth for experts: the service reconciles the index
//! with it. The index adds what cannot be seen in the folder: generations, data derived from
//! experts (cached by content hash), learned plans, clusterings, evaluation rows and
//! selections. Big tensors live in a content-addressed blob folder beside the database.
//!
//! ```no_run
//! use moerge_daemon::index::Index;
//! let (index, recovery) = Index::open_or_rebuild(std::path::Path::new("/tmp/state/index"))?;
//! if let Some(r) = recovery {
//!     eprintln!("index was damaged ({}), moved to {}", r.reason, r.moved_to.display());
//! }
//! for expert in index.experts()? {
//!     println!("{} generation {}", expert.name, expert.generation);
//! }
//! # Ok::<(), moerge_daemon::index::IndexError>(())
//! ```

mod batch;
mod blobs;
mod error;
mod open;
mod records;
pub mod schema;
#[cfg(test)]
mod tests;
mod update;

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use moerge_library::ContentHash;

pub use error::{Corrupt, IndexError};
pub use open::{CheckReport, Recovery};
pub use records::*;
pub use update::{AppliedChange, GcReport, LibraryUpdate};

use blobs::BlobStore;
use schema::{meta, TreeId, ALL_TREES};

/// Keys and payloads (or framed values) as read from a tree.
pub(crate) type Entries = Vec<(Vec<u8>, Vec<u8>)>;

/// Derived values larger than this go to the blob folder rather than into sled.
pub const INLINE_LIMIT: usize = 1024;

pub struct Index {
    dir: PathBuf,
    db: sled::Db,
    trees: Vec<sled::Tree>,
    blobs: BlobStore,
    /// Held by every [`batch::Batch`] and by garbage collection; see `batch.rs`.
    write_lock: Mutex<()>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Index {
    /// The folder holding the database (`db/`), the blobs (`blobs/`) and the seal.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Every expert, by name.
    pub fn experts(&self) -> Result<Vec<ExpertRecord>, IndexError> {
        self.decode_all(TreeId::Experts, b"", schema::decode_expert)
    }

    pub fn expert(&self, name: &str) -> Result<Option<ExpertRecord>, IndexError> {
        let key = name.as_bytes();
        self.raw_get(TreeId::Experts, key)?
            .map(|v| {
                Ok(schema::decode_expert(
                    key,
                    schema::unframe(TreeId::Experts, key, &v)?,
                )?)
            })
            .transpose()
    }

    /// Bumped by every library change; survives restarts so clients never see it go back.
    pub fn library_generation(&self) -> Result<u64, IndexError> {
        Ok(self.read_u64(meta::LIBRARY_GENERATION)?.unwrap_or(0))
    }

    /// The base model identity the expert states were computed against.
    pub fn base(&self) -> Result<Option<String>, IndexError> {
        let Some(bytes) = self.read_meta(meta::BASE)? else {
            return Ok(None);
        };
        let s = schema::utf8(TreeId::Meta, meta::BASE, &bytes)?;
        Ok(Some(s.to_owned()))
    }

    /// A derived value's bytes (read from its blob when it has one).
    pub fn derived(&self, hash: &ContentHash, kind: &str) -> Result<Option<Vec<u8>>, IndexError> {
        match self.derived_entry(hash, kind)? {
            None => Ok(None),
            Some(DerivedValue::Inline(bytes)) => Ok(Some(bytes)),
            Some(DerivedValue::Blob(id)) => Ok(Some(self.blobs.read(&id)?)),
        }
    }

    /// How a derived value is stored, without reading a blob.
    pub fn derived_entry(
        &self,
        hash: &ContentHash,
        kind: &str,
    ) -> Result<Option<DerivedValue>, IndexError> {
        let key = schema::hash_name_key(hash, kind);
        self.raw_get(TreeId::Derived, &key)?
            .map(|v| {
                Ok(schema::decode_derived(
                    &key,
                    schema::unframe(TreeId::Derived, &key, &v)?,
                )?)
            })
            .transpose()
    }

    pub fn plans(&self) -> Result<Vec<PlanRecord>, IndexError> {
        self.decode_all(TreeId::Plans, b"", schema::decode_plan)
    }

    pub fn plan(&self, name: &str) -> Result<Option<PlanRecord>, IndexError> {
        let key = name.as_bytes();
        self.raw_get(TreeId::Plans, key)?
            .map(|v| {
                Ok(schema::decode_plan(
                    key,
                    schema::unframe(TreeId::Plans, key, &v)?,
                )?)
            })
            .transpose()
    }

    /// The bytes of one of a plan's tensors.
    pub fn blob(&self, id: &BlobId) -> Result<Vec<u8>, IndexError> {
        self.blobs.read(id)
    }

    pub fn clusters(&self) -> Result<Vec<ClusterRecord>, IndexError> {
        self.decode_all(TreeId::Clusters, b"", schema::decode_clusters)
    }

    /// The evaluation rows of one data set, in expert-hash order.
    pub fn eval_rows(&self, dataset: &DatasetId) -> Result<Vec<EvalRow>, IndexError> {
        self.decode_all(TreeId::EvalRows, &dataset.0, schema::decode_eval_row)
    }

    pub fn selections(&self) -> Result<Vec<SelectionRecord>, IndexError> {
        self.decode_all(TreeId::Selections, b"", schema::decode_selection)
    }

    /// Every blob file in the blob folder (for checks and tests).
    pub fn blob_files(&self) -> Result<Vec<BlobId>, IndexError> {
        Ok(self.blobs.list()?.0)
    }

    // ---- raw access, for the submodules -------------------------------------------------

    fn tree(&self, tree: TreeId) -> &sled::Tree {
        &self.trees[tree.index()]
    }

    pub(crate) fn raw_get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, IndexError> {
        let value = self.tree(tree).get(key).map_err(|e| self.store_error(e))?;
        Ok(value.map(|v| v.to_vec()))
    }

    pub(crate) fn raw_scan(&self, tree: TreeId, prefix: &[u8]) -> Result<Entries, IndexError> {
        self.tree(tree)
            .scan_prefix(prefix)
            .map(|kv| {
                let (k, v) = kv.map_err(|e| self.store_error(e))?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    fn store_error(&self, e: impl std::fmt::Display) -> IndexError {
        IndexError::Store {
            path: self.dir.clone(),
            message: e.to_string(),
        }
    }

    /// Makes a commit durable, then records it in the seal (see `open.rs`).
    fn flush_and_seal(&self, commit: u64) -> Result<(), IndexError> {
        self.db.flush().map_err(|e| self.store_error(e))?;
        open::write_seal(&self.dir, commit)
    }

    fn all_trees(&self) -> impl Iterator<Item = TreeId> {
        ALL_TREES.into_iter()
    }
}
