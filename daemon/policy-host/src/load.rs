//! Loading one plugin file: permission checks, `dlopen`, the entry symbol, the declaration.
//! Libraries are never unloaded: a plan, a thread or a reply may still point into them.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use moerge_sdk::abi::{DeclarationError, DeclaredPolicy, EntryFn, ENTRY_SYMBOL};

use crate::LoadedPolicy;

/// Why a plugin file was refused; every message names the file and says what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a regular file")]
    NotAFile { path: PathBuf },
    #[error("{path}: refused: the file is group- or world-writable (mode {mode:04o}); run `chmod go-w` on it")]
    Writable { path: PathBuf, mode: u32 },
    #[error("{path}: refused: the file is owned by uid {owner}, not by this user (uid {user}) or root; chown it or remove it")]
    Owner {
        path: PathBuf,
        owner: u32,
        user: u32,
    },
    #[error("{path}: cannot be loaded as a library: {message}")]
    Open { path: PathBuf, message: String },
    #[error("{path}: not a moerge policy plugin: it has no `{ENTRY_SYMBOL}` symbol (build it with moerge_sdk::export_policy!)")]
    NoEntry { path: PathBuf },
    #[error("{path}: {source}")]
    Declaration {
        path: PathBuf,
        source: DeclarationError,
    },
    #[error("{path}: refused: a policy named {name:?} is already loaded from {first}; rename or remove one of them")]
    Duplicate {
        path: PathBuf,
        name: String,
        first: PathBuf,
    },
}

impl LoadError {
    /// The file the refusal is about.
    pub fn path(&self) -> &Path {
        match self {
            LoadError::Io { path, .. }
            | LoadError::NotAFile { path }
            | LoadError::Writable { path, .. }
            | LoadError::Owner { path, .. }
            | LoadError::Open { path, .. }
            | LoadError::NoEntry { path }
            | LoadError::Declaration { path, .. }
            | LoadError::Duplicate { path, .. } => path,
        }
    }
}

/// Checks and loads one plugin file.
pub fn load_policy(path: &Path) -> Result<LoadedPolicy, LoadError> {
    check_file(path)?;
    let open_error = |e: libloading::Error| LoadError::Open {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    // SAFETY: loading a library runs its initialisers. That is the trust decision the
    // permission checks above guard: only files this user or root controls get here.
    let library = unsafe { libloading::Library::new(path) }.map_err(open_error)?;
    // SAFETY: the symbol's type is fixed by the ABI; a library that exports the name with
    // another type is not a moerge plugin, and the declaration check below reads only its
    // version field before trusting anything else.
    let entry: EntryFn = match unsafe { library.get::<EntryFn>(ENTRY_SYMBOL.as_bytes()) } {
        Ok(symbol) => *symbol,
        Err(_) => return Err(LoadError::NoEntry { path: path.into() }),
    };
    // Never unloaded: the declaration and everything it points to must live forever.
    std::mem::forget(library);
    // SAFETY: the entry returns null or a declaration whose first field is its ABI version,
    // and the library stays loaded for the rest of the process.
    let declared =
        unsafe { DeclaredPolicy::from_raw(entry()) }.map_err(|source| LoadError::Declaration {
            path: path.into(),
            source,
        })?;
    Ok(LoadedPolicy {
        declared,
        path: path.to_path_buf(),
    })
}

/// Refuses files that someone other than this user or root could have written.
fn check_file(path: &Path) -> Result<(), LoadError> {
    let meta = std::fs::metadata(path).map_err(|source| LoadError::Io {
        path: path.into(),
        source,
    })?;
    if !meta.is_file() {
        return Err(LoadError::NotAFile { path: path.into() });
    }
    let user = rustix::process::geteuid().as_raw();
    file_trust(path, meta.mode(), meta.uid(), user)
}

/// The decision of [`check_file`], from a file's mode and owner and the current user.
pub(crate) fn file_trust(path: &Path, mode: u32, owner: u32, user: u32) -> Result<(), LoadError> {
    if mode & 0o022 != 0 {
        return Err(LoadError::Writable {
            path: path.into(),
            mode: mode & 0o7777,
        });
    }
    if owner != user && owner != 0 {
        return Err(LoadError::Owner {
            path: path.into(),
            owner,
            user,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(mode: u32, owner: u32, user: u32, expected: Result<(), &str>) {
        let got = file_trust(Path::new("/p/x.so"), mode, owner, user);
        match (got, expected) {
            (Ok(()), Ok(())) => {}
            (Err(e), Err(words)) => {
                let msg = e.to_string();
                assert!(
                    msg.starts_with("/p/x.so: refused") && msg.contains(words),
                    "{msg}"
                );
            }
            (got, want) => panic!("mode {mode:o} owner {owner} user {user}: {got:?} vs {want:?}"),
        }
    }

    #[test]
    fn only_files_the_user_or_root_controls_are_trusted() {
        check(0o100755, 1000, 1000, Ok(()));
        check(0o100644, 0, 1000, Ok(()));
        check(0o100700, 0, 0, Ok(()));
        check(
            0o100775,
            1000,
            1000,
            Err("group- or world-writable (mode 0775)"),
        );
        check(0o100757, 1000, 1000, Err("mode 0757"));
        check(
            0o100755,
            1001,
            1000,
            Err("owned by uid 1001, not by this user (uid 1000)"),
        );
        check(0o100755, 1001, 0, Err("uid 1001"));
    }
}
