//! Exactly how each record goes in and out of sled: trees, key layout, value framing.
//!
//! # Trees and keys
//!
//! One tree per record type. Keys are raw bytes, compared bytewise by sled, so every integer
//! in a key is big-endian and every variable-length part that is followed by another is
//! length-prefixed (a prefix scan for expert `ab` must not match expert `abc`).
//!
//! | tree            | key                                              | value                  |
//! |-----------------|--------------------------------------------------|------------------------|
//! | `meta`          | ASCII name (see below)                           | per key                |
//! | `experts`       | folder name (UTF-8)                              | JSON [`StoredExpert`]  |
//! | `expert_hashes` | content hash (32) ‖ folder name                  | empty                  |
//! | `derived`       | content hash (32) ‖ kind (UTF-8, e.g. `sketch/v1`)| tag 0 ‖ bytes, or tag 1 ‖ blob id (32) |
//! | `plans`         | plan name (UTF-8)                                | JSON [`StoredPlan`]    |
//! | `plan_experts`  | u16 BE length ‖ expert name ‖ plan name          | empty                  |
//! | `clusters`      | clustering name (UTF-8)                          | JSON [`StoredClusters`]|
//! | `eval_rows`     | dataset id (32) ‖ expert content hash (32)       | JSON task → loss       |
//! | `selections`    | selection name (UTF-8)                           | JSON [`StoredSelection`]|
//!
//! `meta` keys: `schema_version` (u32 BE), `commit` (u64 BE, bumped by every write
//! transaction), `library_generation` (u64 BE), `base` (UTF-8: the base model the states
//! were computed against) and `digest/<tree>` (u64 BE record count ‖ 16-byte XOR of the
//! records' hashes), which lets [`super::Index::open`] notice records that vanished.
//!
//! # Values
//!
//! Every value, in every tree, is framed as `check (8) ‖ payload`, where `check` is the
//! first 8 bytes of blake3(`"moerge index v1\0"` ‖ tree name ‖ `\0` ‖ key length (u32 BE) ‖
//! key ‖ payload). sled checksums its log too, but on a damaged file it silently stops
//! replaying at the first bad entry; this frame and the digests are how moerge notices.
//!
//! # Versions
//!
//! [`SCHEMA_VERSION`] is written when the database is created. An older version is brought
//! forward by [`MIGRATIONS`], one step at a time; a newer one is refused as the wrong schema.

use std::collections::BTreeMap;

use moerge_library::{AdapterState, ContentHash};
use serde::{Deserialize, Serialize};

use super::error::Corrupt;
use super::records::*;

pub(crate) const SCHEMA_VERSION: u32 = 1;

pub(crate) type Migration = fn(&sled::Db) -> Result<(), sled::Error>;

/// Steps from version `i + 1` to `i + 2`. Version 1 is the first, so there are none yet.
pub(crate) const MIGRATIONS: &[Migration] = &[];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum TreeId {
    Meta,
    Experts,
    ExpertHashes,
    Derived,
    Plans,
    PlanExperts,
    Clusters,
    EvalRows,
    Selections,
}

pub(crate) const ALL_TREES: [TreeId; 9] = [
    TreeId::Meta,
    TreeId::Experts,
    TreeId::ExpertHashes,
    TreeId::Derived,
    TreeId::Plans,
    TreeId::PlanExperts,
    TreeId::Clusters,
    TreeId::EvalRows,
    TreeId::Selections,
];

impl TreeId {
    pub(crate) fn name(self) -> &'static str {
        match self {
            TreeId::Meta => "meta",
            TreeId::Experts => "experts",
            TreeId::ExpertHashes => "expert_hashes",
            TreeId::Derived => "derived",
            TreeId::Plans => "plans",
            TreeId::PlanExperts => "plan_experts",
            TreeId::Clusters => "clusters",
            TreeId::EvalRows => "eval_rows",
            TreeId::Selections => "selections",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

pub(crate) mod meta {
    pub(crate) const SCHEMA_VERSION: &[u8] = b"schema_version";
    pub(crate) const COMMIT: &[u8] = b"commit";
    pub(crate) const LIBRARY_GENERATION: &[u8] = b"library_generation";
    pub(crate) const BASE: &[u8] = b"base";

    pub(crate) fn digest(tree: super::TreeId) -> Vec<u8> {
        format!("digest/{}", tree.name()).into_bytes()
    }
}

// ---- keys -------------------------------------------------------------------------------

pub(crate) fn hash_name_key(hash: &ContentHash, name: &str) -> Vec<u8> {
    [&hash.0[..], name.as_bytes()].concat()
}

pub(crate) fn split_hash_key(tree: TreeId, key: &[u8]) -> Result<(ContentHash, &[u8]), Corrupt> {
    if key.len() < 32 {
        return Err(Corrupt::new(tree.name(), key, "key shorter than a hash"));
    }
    let (hash, rest) = key.split_at(32);
    Ok((ContentHash(hash.try_into().expect("32 bytes")), rest))
}

/// `plan_experts` key; the expert part alone (without a plan name) is the scan prefix.
pub(crate) fn plan_expert_key(expert: &str, plan: &str) -> Vec<u8> {
    let mut key = plan_expert_prefix(expert);
    key.extend_from_slice(plan.as_bytes());
    key
}

pub(crate) fn plan_expert_prefix(expert: &str) -> Vec<u8> {
    // Folder names are far shorter than 64 KiB on every file system moerge runs on.
    let len = u16::try_from(expert.len()).unwrap_or(u16::MAX);
    [&len.to_be_bytes()[..], expert.as_bytes()].concat()
}

pub(crate) fn split_plan_expert_key(key: &[u8]) -> Result<(&str, &str), Corrupt> {
    let bad = |why: &str| Corrupt::new(TreeId::PlanExperts.name(), key, why);
    let len = u16::from_be_bytes(
        key.get(..2)
            .ok_or_else(|| bad("short key"))?
            .try_into()
            .expect("2"),
    ) as usize;
    let expert = key
        .get(2..2 + len)
        .ok_or_else(|| bad("length prefix past the end"))?;
    let plan = &key[2 + len..];
    Ok((
        utf8(TreeId::PlanExperts, key, expert)?,
        utf8(TreeId::PlanExperts, key, plan)?,
    ))
}

pub(crate) fn eval_key(dataset: &DatasetId, expert: &ContentHash) -> Vec<u8> {
    [&dataset.0[..], &expert.0[..]].concat()
}

pub(crate) fn utf8<'a>(tree: TreeId, key: &[u8], bytes: &'a [u8]) -> Result<&'a str, Corrupt> {
    std::str::from_utf8(bytes).map_err(|_| Corrupt::new(tree.name(), key, "name is not UTF-8"))
}

// ---- value frame ------------------------------------------------------------------------

fn check(tree: TreeId, key: &[u8], payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(b"moerge index v1\0");
    h.update(tree.name().as_bytes());
    h.update(b"\0");
    h.update(&(key.len() as u32).to_be_bytes());
    h.update(key);
    h.update(payload);
    h.finalize().as_bytes()[..8].try_into().expect("8 bytes")
}

pub(crate) fn frame(tree: TreeId, key: &[u8], payload: &[u8]) -> Vec<u8> {
    [&check(tree, key, payload)[..], payload].concat()
}

pub(crate) fn unframe<'a>(tree: TreeId, key: &[u8], value: &'a [u8]) -> Result<&'a [u8], Corrupt> {
    if value.len() < 8 {
        return Err(Corrupt::new(
            tree.name(),
            key,
            "value shorter than its checksum",
        ));
    }
    let (stored, payload) = value.split_at(8);
    if stored != check(tree, key, payload) {
        return Err(Corrupt::new(tree.name(), key, "checksum mismatch"));
    }
    Ok(payload)
}

/// A record's contribution to its tree's digest.
pub(crate) fn entry_hash(key: &[u8], framed: &[u8]) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(&(key.len() as u32).to_be_bytes());
    h.update(key);
    h.update(framed);
    h.finalize().as_bytes()[..16].try_into().expect("16 bytes")
}

/// Record count and XOR of entry hashes: order-independent, so it can be updated per write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct Digest {
    pub(crate) count: u64,
    pub(crate) xor: [u8; 16],
}

impl Digest {
    pub(crate) fn toggle(&mut self, entry: [u8; 16], added: bool) {
        self.count = if added {
            self.count.wrapping_add(1)
        } else {
            self.count.wrapping_sub(1)
        };
        self.xor.iter_mut().zip(entry).for_each(|(a, b)| *a ^= b);
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        [&self.count.to_be_bytes()[..], &self.xor[..]].concat()
    }

    pub(crate) fn decode(key: &[u8], bytes: &[u8]) -> Result<Digest, Corrupt> {
        if bytes.len() != 24 {
            return Err(Corrupt::new("meta", key, "digest is not 24 bytes"));
        }
        Ok(Digest {
            count: u64::from_be_bytes(bytes[..8].try_into().expect("8")),
            xor: bytes[8..].try_into().expect("16"),
        })
    }
}

pub(crate) fn decode_u64(key: &[u8], bytes: &[u8]) -> Result<u64, Corrupt> {
    Ok(u64::from_be_bytes(
        bytes
            .try_into()
            .map_err(|_| Corrupt::new("meta", key, "not a u64"))?,
    ))
}

pub(crate) fn decode_u32(key: &[u8], bytes: &[u8]) -> Result<u32, Corrupt> {
    Ok(u32::from_be_bytes(
        bytes
            .try_into()
            .map_err(|_| Corrupt::new("meta", key, "not a u32"))?,
    ))
}

// ---- records ----------------------------------------------------------------------------

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredStamp {
    len: u64,
    inode: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredExpert {
    hash: Option<ContentHash>,
    generation: u64,
    /// `ready`, `rejected` or `incompatible`.
    state: String,
    reason: Option<String>,
    size_bytes: u64,
    config: StoredStamp,
    weights: StoredStamp,
    trusted: bool,
}

fn stamp_out(s: &FileStamp) -> StoredStamp {
    StoredStamp {
        len: s.len,
        inode: s.inode,
        mtime_ns: s.mtime_ns,
        ctime_ns: s.ctime_ns,
    }
}

fn stamp_in(s: StoredStamp) -> FileStamp {
    FileStamp {
        len: s.len,
        inode: s.inode,
        mtime_ns: s.mtime_ns,
        ctime_ns: s.ctime_ns,
    }
}

fn json_out<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("stored records always serialise")
}

fn json_in<T: for<'de> Deserialize<'de>>(
    tree: TreeId,
    key: &[u8],
    payload: &[u8],
) -> Result<T, Corrupt> {
    serde_json::from_slice(payload)
        .map_err(|e| Corrupt::new(tree.name(), key, format!("bad record: {e}")))
}

pub(crate) fn encode_expert(r: &ExpertRecord) -> Vec<u8> {
    let (state, reason) = match &r.state {
        AdapterState::Ready => ("ready", None),
        AdapterState::Rejected { reason } => ("rejected", Some(reason.clone())),
        AdapterState::Incompatible { reason } => ("incompatible", Some(reason.clone())),
    };
    json_out(&StoredExpert {
        hash: r.hash,
        generation: r.generation,
        state: state.to_owned(),
        reason,
        size_bytes: r.size_bytes,
        config: stamp_out(&r.stamp.config),
        weights: stamp_out(&r.stamp.weights),
        trusted: r.stamp.trusted,
    })
}

pub(crate) fn decode_expert(key: &[u8], payload: &[u8]) -> Result<ExpertRecord, Corrupt> {
    let tree = TreeId::Experts;
    let s: StoredExpert = json_in(tree, key, payload)?;
    let bad = |why: &str| Corrupt::new(tree.name(), key, why);
    let state = match (s.state.as_str(), s.reason) {
        ("ready", None) => AdapterState::Ready,
        ("rejected", Some(reason)) => AdapterState::Rejected { reason },
        ("incompatible", Some(reason)) => AdapterState::Incompatible { reason },
        _ => return Err(bad("unknown state or reason missing")),
    };
    if s.generation == 0 {
        return Err(bad("generation 0"));
    }
    if s.hash.is_none() && state == AdapterState::Ready {
        return Err(bad("ready expert without a hash"));
    }
    Ok(ExpertRecord {
        name: utf8(tree, key, key)?.to_owned(),
        hash: s.hash,
        generation: s.generation,
        state,
        size_bytes: s.size_bytes,
        stamp: FolderStamp {
            config: stamp_in(s.config),
            weights: stamp_in(s.weights),
            trusted: s.trusted,
        },
    })
}

pub(crate) fn encode_derived(v: &DerivedValue) -> Vec<u8> {
    match v {
        DerivedValue::Inline(bytes) => [&[0u8][..], bytes].concat(),
        DerivedValue::Blob(id) => [&[1u8][..], &id.0[..]].concat(),
    }
}

pub(crate) fn decode_derived(key: &[u8], payload: &[u8]) -> Result<DerivedValue, Corrupt> {
    match payload.split_first() {
        Some((0, bytes)) => Ok(DerivedValue::Inline(bytes.to_vec())),
        Some((1, id)) if id.len() == 32 => {
            Ok(DerivedValue::Blob(BlobId(id.try_into().expect("32"))))
        }
        _ => Err(Corrupt::new(
            TreeId::Derived.name(),
            key,
            "unknown derived value tag",
        )),
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredPlan {
    experts: Vec<(String, ContentHash)>,
    body: String,
    tensors: BTreeMap<String, String>,
    stale: Option<String>,
}

pub(crate) fn encode_plan(p: &PlanRecord) -> Vec<u8> {
    json_out(&StoredPlan {
        experts: p.experts.iter().map(|e| (e.name.clone(), e.hash)).collect(),
        body: p.body.clone(),
        tensors: p
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect(),
        stale: p.stale.clone(),
    })
}

pub(crate) fn decode_plan(key: &[u8], payload: &[u8]) -> Result<PlanRecord, Corrupt> {
    let tree = TreeId::Plans;
    let s: StoredPlan = json_in(tree, key, payload)?;
    let mut tensors = BTreeMap::new();
    for (name, hex) in s.tensors {
        let id =
            parse_blob_id(&hex).ok_or_else(|| Corrupt::new(tree.name(), key, "bad blob id"))?;
        tensors.insert(name, id);
    }
    Ok(PlanRecord {
        name: utf8(tree, key, key)?.to_owned(),
        experts: s
            .experts
            .into_iter()
            .map(|(name, hash)| PlanExpert { name, hash })
            .collect(),
        body: s.body,
        tensors,
        stale: s.stale,
    })
}

pub(crate) fn parse_blob_id(hex: &str) -> Option<BlobId> {
    // A blob id is written exactly like a content hash: 64 lowercase hex digits.
    hex.parse::<ContentHash>().ok().map(|h| BlobId(h.0))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredClusters {
    clusters: Vec<Vec<ContentHash>>,
    stale: bool,
}

pub(crate) fn encode_clusters(c: &ClusterRecord) -> Vec<u8> {
    json_out(&StoredClusters {
        clusters: c.clusters.clone(),
        stale: c.stale,
    })
}

pub(crate) fn decode_clusters(key: &[u8], payload: &[u8]) -> Result<ClusterRecord, Corrupt> {
    let s: StoredClusters = json_in(TreeId::Clusters, key, payload)?;
    let name = utf8(TreeId::Clusters, key, key)?.to_owned();
    Ok(ClusterRecord {
        name,
        clusters: s.clusters,
        stale: s.stale,
    })
}

pub(crate) fn encode_eval_row(r: &EvalRow) -> Vec<u8> {
    json_out(&r.losses)
}

pub(crate) fn decode_eval_row(key: &[u8], payload: &[u8]) -> Result<EvalRow, Corrupt> {
    let tree = TreeId::EvalRows;
    if key.len() != 64 {
        return Err(Corrupt::new(tree.name(), key, "eval key is not 64 bytes"));
    }
    Ok(EvalRow {
        dataset: DatasetId(key[..32].try_into().expect("32")),
        expert: ContentHash(key[32..].try_into().expect("32")),
        losses: json_in(tree, key, payload)?,
    })
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StoredSelection {
    dataset: ContentHash,
    order: Vec<ContentHash>,
    curve: Vec<f64>,
    active: usize,
    stale: bool,
}

pub(crate) fn encode_selection(s: &SelectionRecord) -> Vec<u8> {
    json_out(&StoredSelection {
        dataset: ContentHash(s.dataset.0),
        order: s.order.clone(),
        curve: s.curve.clone(),
        active: s.active,
        stale: s.stale,
    })
}

pub(crate) fn decode_selection(key: &[u8], payload: &[u8]) -> Result<SelectionRecord, Corrupt> {
    let s: StoredSelection = json_in(TreeId::Selections, key, payload)?;
    if s.active > s.order.len() {
        return Err(Corrupt::new(
            TreeId::Selections.name(),
            key,
            "active prefix longer than the order",
        ));
    }
    Ok(SelectionRecord {
        name: utf8(TreeId::Selections, key, key)?.to_owned(),
        dataset: DatasetId(s.dataset.0),
        order: s.order,
        curve: s.curve,
        active: s.active,
        stale: s.stale,
    })
}
