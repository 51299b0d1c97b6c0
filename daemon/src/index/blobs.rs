//! The content-addressed blob folder beside the database: big tensors (sketches, router
//! matrices) that would bloat sled's log.
//!
//! A blob is written to `tmp/` and renamed to `<2 hex>/<64 hex>`; [`BlobStore::sync`] makes
//! every blob written so far durable, and writers call it *before* committing the records
//! that name them, so a committed record never points at a missing or partial blob. Syncing
//! once per batch rather than once per blob matters: a cold start writes a sketch per expert.
//! A crash can leave a blob no record names; [`BlobStore::collect_garbage`] removes those
//! (and stray temporary files) while no writer runs.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use super::error::IndexError;
use super::records::BlobId;

const DOMAIN: &[u8] = b"moerge blob v1\0";
const TMP: &str = "tmp";

pub(crate) struct BlobStore {
    dir: PathBuf,
    counter: AtomicU64,
    /// Blobs written since the last [`BlobStore::sync`].
    unsynced: Mutex<Vec<PathBuf>>,
    /// Blobs written ahead of the commit that will name them; garbage collection spares them.
    staged: Mutex<HashSet<BlobId>>,
}

impl BlobStore {
    pub(crate) fn open(dir: &Path) -> Result<BlobStore, IndexError> {
        fs::create_dir_all(dir.join(TMP)).map_err(|e| IndexError::io(dir, e))?;
        Ok(BlobStore {
            dir: dir.to_owned(),
            counter: AtomicU64::new(0),
            unsynced: Mutex::new(Vec::new()),
            staged: Mutex::new(HashSet::new()),
        })
    }

    pub(crate) fn id_of(bytes: &[u8]) -> BlobId {
        let mut h = blake3::Hasher::new();
        h.update(DOMAIN);
        h.update(bytes);
        BlobId(*h.finalize().as_bytes())
    }

    pub(crate) fn path(&self, id: &BlobId) -> PathBuf {
        let hex = id.to_string();
        self.dir.join(&hex[..2]).join(hex)
    }

    /// Stores `bytes` and returns their id; durable after the next [`BlobStore::sync`].
    /// Idempotent.
    pub(crate) fn put(&self, bytes: &[u8]) -> Result<BlobId, IndexError> {
        let id = Self::id_of(bytes);
        let path = self.path(&id);
        // An orphan left by a crash before its sync may be short; such a file is rewritten.
        if fs::metadata(&path).is_ok_and(|m| m.len() == bytes.len() as u64) {
            return Ok(id);
        }
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let tmp = self
            .dir
            .join(TMP)
            .join(format!("{}-{n}", std::process::id()));
        let io = |p: &Path| {
            let p = p.to_owned();
            move |e| IndexError::io(p, e)
        };
        let mut file = File::create(&tmp).map_err(io(&tmp))?;
        file.write_all(bytes).map_err(io(&tmp))?;
        let parent = path.parent().expect("blob paths have a parent");
        fs::create_dir_all(parent).map_err(io(parent))?;
        fs::rename(&tmp, &path).map_err(io(&path))?;
        self.unsynced
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(path);
        Ok(id)
    }

    /// Like [`BlobStore::put`], and spared by garbage collection until [`BlobStore::unstage`].
    pub(crate) fn put_staged(&self, bytes: &[u8]) -> Result<BlobId, IndexError> {
        let id = self.put(bytes)?;
        self.staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id);
        Ok(id)
    }

    pub(crate) fn unstage(&self, ids: &[BlobId]) {
        let mut staged = self.staged.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            staged.remove(id);
        }
    }

    /// Makes every blob written so far durable: contents and names.
    pub(crate) fn sync(&self) -> Result<(), IndexError> {
        let mut unsynced = self.unsynced.lock().unwrap_or_else(|p| p.into_inner());
        if unsynced.is_empty() {
            return Ok(());
        }
        // One syncfs flushes every file and folder of the file system at once.
        #[cfg(target_os = "linux")]
        {
            let dir = File::open(&self.dir).map_err(|e| IndexError::io(&self.dir, e))?;
            rustix::fs::syncfs(&dir).map_err(|e| IndexError::io(&self.dir, e.into()))?;
        }
        #[cfg(not(target_os = "linux"))]
        {
            let mut dirs = std::collections::BTreeSet::new();
            for path in unsynced.iter() {
                File::open(path)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| IndexError::io(path, e))?;
                dirs.insert(path.parent().expect("blob paths have a parent").to_owned());
            }
            dirs.iter().try_for_each(|d| sync_dir(d))?;
        }
        unsynced.clear();
        Ok(())
    }

    pub(crate) fn read(&self, id: &BlobId) -> Result<Vec<u8>, IndexError> {
        let path = self.path(id);
        fs::read(&path).map_err(|e| IndexError::io(path, e))
    }

    pub(crate) fn exists(&self, id: &BlobId) -> bool {
        self.path(id).is_file()
    }

    /// Every blob in the folder, by id; files whose names are not blob ids are listed apart.
    pub(crate) fn list(&self) -> Result<(Vec<BlobId>, Vec<PathBuf>), IndexError> {
        let (mut blobs, mut strays) = (Vec::new(), Vec::new());
        for shard in read_dir(&self.dir)? {
            let name = shard.file_name().map(|n| n.to_string_lossy().into_owned());
            if name.as_deref() == Some(TMP) || !shard.is_dir() {
                continue;
            }
            for file in read_dir(&shard)? {
                let id = file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(super::schema::parse_blob_id);
                match id {
                    Some(id) if self.path(&id) == file => blobs.push(id),
                    _ => strays.push(file),
                }
            }
        }
        Ok((blobs, strays))
    }

    /// Removes blobs not in `referenced` and leftover temporary files. The caller holds the
    /// index's write lock, so no blob is between its write and its record's commit.
    pub(crate) fn collect_garbage(
        &self,
        referenced: &HashSet<BlobId>,
    ) -> Result<usize, IndexError> {
        let mut removed = 0;
        for tmp in read_dir(&self.dir.join(TMP))? {
            remove(&tmp)?;
        }
        let (blobs, strays) = self.list()?;
        let staged = self
            .staged
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for id in blobs
            .iter()
            .filter(|id| !referenced.contains(id) && !staged.contains(id))
        {
            remove(&self.path(id))?;
            removed += 1;
        }
        for stray in strays {
            tracing::warn!(path = %stray.display(), "removing a file that is not a blob");
            remove(&stray)?;
        }
        Ok(removed)
    }

    /// Whether the blob's bytes still hash to its id.
    pub(crate) fn verify(&self, id: &BlobId) -> Result<bool, IndexError> {
        Ok(Self::id_of(&self.read(id)?) == *id)
    }
}

fn read_dir(dir: &Path) -> Result<Vec<PathBuf>, IndexError> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(IndexError::io(dir, e)),
    };
    entries
        .map(|e| e.map(|e| e.path()).map_err(|err| IndexError::io(dir, err)))
        .collect()
}

fn remove(path: &Path) -> Result<(), IndexError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(IndexError::io(path, e)),
        _ => Ok(()),
    }
}

pub(crate) fn sync_dir(dir: &Path) -> Result<(), IndexError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| IndexError::io(dir, e))
}
