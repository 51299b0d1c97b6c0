//! Pinned copies of experts, so that what a lease reads never changes under it.
//!
//! `moerge-library` memory-maps adapter files. Tools that update an adapter usually rewrite
//! it in place (`cp`, `save_pretrained`), and a mapping of a file rewritten in place shows
//! the new bytes, or raises SIGBUS past a truncation: a torn request. So a lease never maps
//! the library's files: the first time a generation's expert is opened, its two files are
//! copied into `<state>/pins/`, loaded from there, and checked against the hash the
//! generation recorded. A pin is shared by every lease that opens the same name and content,
//! and its folder is deleted when the last of them lets go.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use moerge_library::{Adapter, ContentHash};

use super::examine::{CONFIG_FILE, WEIGHTS_FILE};
use super::generations::LeaseError;

/// A loaded expert whose files the daemon owns. Derefs to the [`Adapter`].
pub struct PinnedAdapter {
    adapter: Adapter,
    folder: PathBuf,
}

impl std::ops::Deref for PinnedAdapter {
    type Target = Adapter;
    fn deref(&self) -> &Adapter {
        &self.adapter
    }
}

impl std::fmt::Debug for PinnedAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.adapter.fmt(f)
    }
}

impl Drop for PinnedAdapter {
    fn drop(&mut self) {
        // Unlinking a mapped file is safe: the mapping keeps the inode until it is unmapped,
        // which happens right after, when `adapter` drops.
        if let Err(e) = fs::remove_dir_all(&self.folder) {
            tracing::warn!(folder = %self.folder.display(), "could not remove a pinned copy: {e}");
        }
    }
}

pub(crate) struct PinStore {
    dir: PathBuf,
    counter: AtomicU64,
    cache: Mutex<HashMap<(ContentHash, String), Weak<PinnedAdapter>>>,
}

impl PinStore {
    /// Starts with an empty pin folder: no lease outlives the process that gave it.
    pub(crate) fn open(dir: &Path) -> std::io::Result<PinStore> {
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        fs::create_dir_all(dir)?;
        Ok(PinStore {
            dir: dir.to_owned(),
            counter: AtomicU64::new(0),
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The pinned copy of expert `name` with content `hash`, copying it from `source` if no
    /// live lease holds one.
    pub(crate) fn pin(
        &self,
        name: &str,
        hash: ContentHash,
        source: &Path,
    ) -> Result<Arc<PinnedAdapter>, LeaseError> {
        // Held while copying, so two leases opening the same expert copy it once.
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.retain(|_, weak| weak.strong_count() > 0);
        let key = (hash, name.to_owned());
        if let Some(pinned) = cache.get(&key).and_then(Weak::upgrade) {
            return Ok(pinned);
        }
        // A fresh folder per pin: an old pin of the same content may still be deleting itself.
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let folder = self.dir.join(format!("{}.{n}", hash.short()));
        let pinned = copy_and_load(name, source, &folder).and_then(|adapter| {
            let pinned = PinnedAdapter {
                adapter,
                folder: folder.clone(),
            };
            if pinned.hash() == hash {
                Ok(pinned)
            } else {
                Err(LeaseError::Changed {
                    name: name.to_owned(),
                    expected: hash,
                    found: pinned.hash(),
                })
            }
        });
        let pinned = match pinned {
            Ok(p) => Arc::new(p),
            Err(e) => {
                let _ = fs::remove_dir_all(&folder);
                return Err(e);
            }
        };
        cache.insert(key, Arc::downgrade(&pinned));
        Ok(pinned)
    }
}

fn copy_and_load(name: &str, source: &Path, folder: &Path) -> Result<Adapter, LeaseError> {
    // The copy keeps the folder name, so the adapter is named as in the library.
    let dest = folder.join(name);
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| LeaseError::Io { path, source }
    };
    fs::create_dir_all(&dest).map_err(io(&dest))?;
    for file in [CONFIG_FILE, WEIGHTS_FILE] {
        let from = source.join(file);
        fs::copy(&from, dest.join(file)).map_err(io(&from))?;
    }
    Adapter::load(&dest).map_err(|e| LeaseError::Load {
        name: name.to_owned(),
        message: e.to_string(),
    })
}
