//! The index's errors. Bad bytes are always a typed [`Corrupt`], never a panic.

use std::path::PathBuf;

/// A record that does not decode, a checksum that does not match, or trees that disagree
/// with each other or with the index's own bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt index: tree `{tree}`, key {key}: {reason}")]
pub struct Corrupt {
    pub tree: &'static str,
    /// The key, printable (UTF-8 where it is, hex otherwise).
    pub key: String,
    pub reason: String,
}

impl Corrupt {
    pub(crate) fn new(tree: &'static str, key: &[u8], reason: impl Into<String>) -> Corrupt {
        Corrupt {
            tree,
            key: printable_key(key),
            reason: reason.into(),
        }
    }
}

/// Keys are shown as text when they are, so a log line names the expert or plan.
pub(crate) fn printable_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(s) if s.chars().all(|c| !c.is_control()) => format!("{s:?}"),
        _ => key.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IndexError {
    #[error(transparent)]
    Corrupt(#[from] Corrupt),
    /// The store could not be opened. `damaged` says whether the files themselves are at fault
    /// (then the index is moved aside and rebuilt) rather than, say, permissions.
    #[error("cannot open the index database at {path}: {message}")]
    Open {
        path: PathBuf,
        message: String,
        damaged: bool,
    },
    #[error(
        "index at {path} has schema version {found}; this moerged reads versions 1 to {supported}"
    )]
    WrongSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    /// A read or write failed in the store itself.
    #[error("index database at {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A record names a blob that is not in the blob folder.
    #[error("blob {blob} referenced by {owner} is missing from {path}")]
    MissingBlob {
        blob: String,
        owner: String,
        path: PathBuf,
    },
}

impl IndexError {
    /// Whether the database files are damaged (so moving them aside and rebuilding is right),
    /// as opposed to an environment problem that a rebuild would not fix.
    pub fn is_damage(&self) -> bool {
        match self {
            IndexError::Corrupt(_) | IndexError::WrongSchema { .. } => true,
            IndexError::MissingBlob { .. } => true,
            IndexError::Open { damaged, .. } => *damaged,
            IndexError::Store { .. } | IndexError::Io { .. } => false,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> IndexError {
        IndexError::Io {
            path: path.into(),
            source,
        }
    }
}
