//! Looking at one adapter folder: is it there, complete, settled, and what does it hold?
//!
//! The rules (DESIGN "Watching"): a folder is an adapter only once `adapter_config.json` and
//! its weights file both exist. If it then loads, and its files did not change while it
//! loaded, it is indexed at once: a complete safetensors file cannot be mistaken for a
//! partial one, because its header states every tensor's extent. If it does not load, it
//! may still be being written, so it is declared rejected only after its files have been
//! quiet for the settle time; until then it stays out of the index.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use moerge_library::{inspect_adapter, Adapter, AdapterState, BaseModelInfo, ContentHash};

use crate::index::{FileStamp, FolderStamp};

pub(crate) const CONFIG_FILE: &str = "adapter_config.json";
pub(crate) const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Pickle weights are never opened, but their presence makes the folder an adapter, so it
/// is rejected with the library's reason instead of being ignored.
const PICKLE_FILE: &str = "adapter_model.bin";

/// A file modified this recently may be modified again within the same timestamp tick, so
/// its stamp cannot prove later that it did not change (git's "racy" entries).
const RACY_WINDOW: Duration = Duration::from_secs(2);

pub(crate) enum Examined {
    /// Not an adapter folder (any more): missing, or lacking one of its two files.
    Absent,
    /// Still being written, or just written and not loading yet: look again after this long.
    Unsettled(Duration),
    Found(Box<Found>),
}

pub(crate) struct Found {
    pub(crate) hash: Option<ContentHash>,
    pub(crate) state: AdapterState,
    pub(crate) size_bytes: u64,
    pub(crate) stamp: FolderStamp,
    /// The loaded adapter when it is ready, for deriving data from it.
    pub(crate) adapter: Option<Adapter>,
}

pub(crate) fn examine(dir: &Path, base: &BaseModelInfo, settle: Duration) -> Examined {
    let Some(before) = stamp_folder(dir) else {
        return Examined::Absent;
    };
    let loaded = Adapter::load(dir);
    let Some(after) = stamp_folder(dir) else {
        return Examined::Absent;
    };
    if after != before {
        return Examined::Unsettled(settle);
    }
    let now = SystemTime::now();
    match loaded {
        Ok(adapter) => {
            let state = match adapter.check_compatible(base) {
                Ok(()) => AdapterState::Ready,
                Err(why) => AdapterState::Incompatible {
                    reason: why.to_string(),
                },
            };
            Examined::Found(Box::new(Found {
                hash: Some(adapter.hash()),
                state,
                size_bytes: adapter.size_bytes(),
                stamp: folder_stamp(after, now),
                adapter: Some(adapter),
            }))
        }
        Err(err) => {
            let quiet = now
                .duration_since(newest_change(&after))
                .unwrap_or_default();
            if quiet < settle {
                return Examined::Unsettled(settle - quiet);
            }
            // The salvage reads both files whole; only rejected folders pay for it.
            let report = inspect_adapter(dir, None);
            Examined::Found(Box::new(Found {
                hash: report.hash,
                state: AdapterState::Rejected {
                    reason: err.to_string(),
                },
                size_bytes: report.size_bytes.unwrap_or(after.0.len + after.1.len),
                stamp: folder_stamp(after, now),
                adapter: None,
            }))
        }
    }
}

/// Whether a folder is exactly as it was when `stamp` was taken, as far as can be told
/// without reading it.
pub(crate) fn unchanged_since(dir: &Path, stamp: &FolderStamp) -> bool {
    stamp.trusted && stamp_folder(dir) == Some((stamp.config, stamp.weights))
}

/// Stamps of the config and weights files, or `None` if either is missing.
fn stamp_folder(dir: &Path) -> Option<(FileStamp, FileStamp)> {
    let config = file_stamp(&dir.join(CONFIG_FILE))?;
    let weights =
        file_stamp(&dir.join(WEIGHTS_FILE)).or_else(|| file_stamp(&dir.join(PICKLE_FILE)))?;
    Some((config, weights))
}

fn file_stamp(path: &Path) -> Option<FileStamp> {
    let meta = fs::metadata(path).ok().filter(|m| m.is_file())?;
    Some(FileStamp {
        len: meta.len(),
        inode: meta.ino(),
        mtime_ns: meta
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.mtime_nsec()),
        ctime_ns: meta
            .ctime()
            .saturating_mul(1_000_000_000)
            .saturating_add(meta.ctime_nsec()),
    })
}

fn newest_change((config, weights): &(FileStamp, FileStamp)) -> SystemTime {
    let ns = [
        config.mtime_ns,
        config.ctime_ns,
        weights.mtime_ns,
        weights.ctime_ns,
    ]
    .into_iter()
    .max()
    .unwrap_or(0);
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

fn folder_stamp((config, weights): (FileStamp, FileStamp), now: SystemTime) -> FolderStamp {
    let age = now
        .duration_since(newest_change(&(config, weights)))
        .unwrap_or_default();
    FolderStamp {
        config,
        weights,
        trusted: age >= RACY_WINDOW,
    }
}
