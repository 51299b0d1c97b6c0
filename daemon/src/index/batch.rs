//! Writes: a [`Batch`] collects puts and deletes over several trees (reading its own
//! writes), then commits them in one sled transaction together with the trees' digests and
//! the commit counter, flushes, and seals.
//!
//! Every write goes through a batch, and a batch holds the index's write lock from start to
//! commit. That makes read-modify-write safe without sled's conflict retries, and keeps the
//! blob garbage collector from running between a blob's write and its record's commit.

use std::collections::BTreeMap;
use std::sync::MutexGuard;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::error::{Corrupt, IndexError};
use super::schema::{self, meta, Digest, TreeId, ALL_TREES};
use super::{Entries, Index};

pub(crate) struct Batch<'a> {
    index: &'a Index,
    _guard: MutexGuard<'a, ()>,
    /// Framed values to write (`None` deletes), by tree and key.
    overlay: BTreeMap<(TreeId, Vec<u8>), Option<Vec<u8>>>,
}

impl<'a> Batch<'a> {
    pub(crate) fn new(index: &'a Index) -> Batch<'a> {
        // A panic while holding the lock leaves nothing half-written in sled (the batch was
        // never committed), so a poisoned lock is safe to take over.
        let guard = index.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        Batch {
            index,
            _guard: guard,
            overlay: BTreeMap::new(),
        }
    }

    /// The payload under `key`, seeing this batch's own writes.
    pub(crate) fn get(&self, tree: TreeId, key: &[u8]) -> Result<Option<Vec<u8>>, IndexError> {
        let framed = match self.overlay.get(&(tree, key.to_vec())) {
            Some(v) => v.clone(),
            None => self.index.raw_get(tree, key)?,
        };
        framed
            .map(|v| Ok(schema::unframe(tree, key, &v)?.to_vec()))
            .transpose()
    }

    /// Keys and payloads starting with `prefix`, seeing this batch's own writes.
    pub(crate) fn scan(&self, tree: TreeId, prefix: &[u8]) -> Result<Entries, IndexError> {
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for kv in self.index.raw_scan(tree, prefix)? {
            merged.insert(kv.0, Some(kv.1));
        }
        let start = (tree, prefix.to_vec());
        for ((t, k), v) in self.overlay.range(start..) {
            if *t != tree || !k.starts_with(prefix) {
                break;
            }
            merged.insert(k.clone(), v.clone());
        }
        merged
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k, v)))
            .map(|(k, v)| {
                let payload = schema::unframe(tree, &k, &v)?.to_vec();
                Ok((k, payload))
            })
            .collect()
    }

    pub(crate) fn put(&mut self, tree: TreeId, key: Vec<u8>, payload: &[u8]) {
        let framed = schema::frame(tree, &key, payload);
        self.overlay.insert((tree, key), Some(framed));
    }

    pub(crate) fn delete(&mut self, tree: TreeId, key: Vec<u8>) {
        self.overlay.insert((tree, key), None);
    }

    pub(crate) fn put_u64(&mut self, key: &[u8], value: u64) {
        self.put(TreeId::Meta, key.to_vec(), &value.to_be_bytes());
    }

    /// Commits everything in one transaction, then flushes and seals. Returns the commit
    /// number.
    pub(crate) fn commit(mut self) -> Result<u64, IndexError> {
        let commit = self.index.read_u64(meta::COMMIT)?.unwrap_or(0) + 1;
        self.put_u64(meta::COMMIT, commit);
        self.update_digests()?;
        let ops: Vec<(usize, Vec<u8>, Option<Vec<u8>>)> = std::mem::take(&mut self.overlay)
            .into_iter()
            .map(|((tree, key), value)| (tree.index(), key, value))
            .collect();
        let trees: Vec<&sled::Tree> = ALL_TREES.iter().map(|t| self.index.tree(*t)).collect();
        let result: Result<(), TransactionError<()>> = trees.as_slice().transaction(|view| {
            for (tree, key, value) in &ops {
                match value {
                    Some(v) => view[*tree].insert(key.as_slice(), v.as_slice())?,
                    None => view[*tree].remove(key.as_slice())?,
                };
            }
            Ok::<(), ConflictableTransactionError<()>>(())
        });
        result.map_err(|e| match e {
            TransactionError::Storage(e) => self.index.store_error(e),
            // The closure never aborts.
            TransactionError::Abort(()) => self.index.store_error("transaction aborted"),
        })?;
        self.index.flush_and_seal(commit)?;
        Ok(commit)
    }

    /// Folds this batch's changes into each touched tree's digest (in `meta`).
    fn update_digests(&mut self) -> Result<(), IndexError> {
        let mut digests: BTreeMap<TreeId, Digest> = BTreeMap::new();
        for ((tree, key), new) in &self.overlay {
            if *tree == TreeId::Meta {
                continue;
            }
            let old = self.index.raw_get(*tree, key)?;
            if old == *new {
                continue;
            }
            let digest = match digests.get_mut(tree) {
                Some(d) => d,
                None => {
                    let d = self.index.read_digest(*tree)?;
                    digests.entry(*tree).or_insert(d)
                }
            };
            if let Some(old) = old {
                digest.toggle(schema::entry_hash(key, &old), false);
            }
            if let Some(new) = new {
                digest.toggle(schema::entry_hash(key, new), true);
            }
        }
        for (tree, digest) in digests {
            self.put(TreeId::Meta, meta::digest(tree), &digest.encode());
        }
        Ok(())
    }
}

impl Index {
    pub(crate) fn read_digest(&self, tree: TreeId) -> Result<Digest, IndexError> {
        let key = meta::digest(tree);
        match self.read_meta(&key)? {
            Some(bytes) => Ok(Digest::decode(&key, &bytes)?),
            None => Ok(Digest::default()),
        }
    }

    pub(crate) fn read_meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>, IndexError> {
        let Some(framed) = self.raw_get(TreeId::Meta, key)? else {
            return Ok(None);
        };
        Ok(Some(schema::unframe(TreeId::Meta, key, &framed)?.to_vec()))
    }

    pub(crate) fn read_u64(&self, key: &[u8]) -> Result<Option<u64>, IndexError> {
        self.read_meta(key)?
            .map(|b| schema::decode_u64(key, &b).map_err(IndexError::from))
            .transpose()
    }

    /// Decodes every payload of a tree with `decode`, checking frames on the way.
    pub(crate) fn decode_all<T>(
        &self,
        tree: TreeId,
        prefix: &[u8],
        decode: impl Fn(&[u8], &[u8]) -> Result<T, Corrupt>,
    ) -> Result<Vec<T>, IndexError> {
        self.raw_scan(tree, prefix)?
            .into_iter()
            .map(|(k, v)| Ok(decode(&k, schema::unframe(tree, &k, &v)?)?))
            .collect()
    }
}
