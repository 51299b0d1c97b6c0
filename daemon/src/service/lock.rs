//! The state directory's lock file: two daemons never share one state directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use super::ServiceError;

pub(crate) const LOCK_FILE: &str = "moerged.lock";

/// Holds an exclusive `flock` on `<state>/moerged.lock` for as long as it lives. The kernel
/// drops the lock when the process dies, however it dies, so a stale file never blocks.
#[derive(Debug)]
pub(crate) struct StateLock {
    _file: File,
}

impl StateLock {
    pub(crate) fn acquire(state: &Path) -> Result<StateLock, ServiceError> {
        let path = state.join(LOCK_FILE);
        let io = |source| ServiceError::Io {
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        // Through the trait, not `File::try_lock`, which needs a newer Rust than our MSRV.
        match fs4::FileExt::try_lock(&file) {
            Ok(()) => {}
            Err(fs4::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = file.read_to_string(&mut pid);
                return Err(ServiceError::StateInUse {
                    state: state.to_owned(),
                    lock: path,
                    pid: pid.trim().parse().ok(),
                });
            }
            Err(fs4::TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(StateLock { _file: file })
    }
}

/// Where the daemon keeps its state when not told: `$XDG_STATE_HOME/moerge`, else
/// `~/.local/state/moerge`.
pub fn default_state_dir() -> Option<PathBuf> {
    let non_empty = |v: std::ffi::OsString| (!v.is_empty()).then(|| PathBuf::from(v));
    if let Some(dir) = std::env::var_os("XDG_STATE_HOME").and_then(non_empty) {
        return Some(dir.join("moerge"));
    }
    let home = std::env::var_os("HOME").and_then(non_empty)?;
    Some(home.join(".local/state/moerge"))
}
