//! Exactly how each record goes in and out of sled: trees, key layout, value framing.
//!
//! # Trees and keys
//!
//! One tree per record type. Keys are raw bytes, compared bytewise by sled, so every integer
//! in a key is big-endian and every variable-length part that is followed by another is
//! length-prefixed (a prefix scan for expert `ab` must not match expert `abc`).
//!
//! The JSON forms (`Stored*`) are in `codec.rs`, beside their conversions.
//!
//! | tree            | key                                              | value                  |
//! |-----------------|--------------------------------------------------|------------------------|
//! | `meta`          | ASCII name (see below)                           | per key                |
//! | `experts`       | folder name (UTF-8)                              | JSON `StoredExpert`  |
//! | `expert_hashes` | content hash (32) ‖ folder name                  | empty                  |
//! | `derived`       | content hash (32) ‖ kind (UTF-8, e.g. `sketch/v1`)| tag 0 ‖ bytes, or tag 1 ‖ blob id (32) |
//! | `plans`         | plan name (UTF-8)                                | JSON `StoredPlan`    |
//! | `plan_experts`  | u16 BE length ‖ expert name ‖ plan name          | empty                  |
//! | `clusters`      | clustering name (UTF-8)                          | JSON `StoredClusters`|
//! | `eval_rows`     | dataset id (32) ‖ expert content hash (32)       | JSON task → loss       |
//! | `selections`    | selection name (UTF-8)                           | JSON `StoredSelection`|
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
//! `SCHEMA_VERSION` is written when the database is created. An older version is brought
//! forward by `MIGRATIONS`, one step at a time; a newer (or unknown) one is the wrong schema,
//! which [`super::Index::open_or_rebuild`] treats as damage: moved aside, rebuilt.

use moerge_library::ContentHash;

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

mod codec;
pub(crate) use codec::*;
