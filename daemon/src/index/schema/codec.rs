//! How each record type is encoded: private serde forms (JSON payloads) converted to and
//! from the plain records in `records.rs`, with every inconsistency a [`Corrupt`] error.

use std::collections::BTreeMap;

use moerge_library::{AdapterState, ContentHash};
use serde::{Deserialize, Serialize};

use super::{utf8, TreeId};
use crate::index::error::Corrupt;
use crate::index::records::*;

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
