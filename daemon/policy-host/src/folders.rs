//! Where plugins are looked for, in priority order (the first policy of a name wins):
//!
//! 1. the built-ins folder: `$MOERGE_BUILTIN_POLICIES` if set; else
//!    `<exe dir>/../lib/moerge/policies` if it exists (an installed layout); else the
//!    executable's own folder, where only `libmoerge_policy_*.so` files count (in a cargo
//!    target dir the built-ins sit next to `moerge` and `moerged`, among other libraries);
//! 2. the user's folder: `$XDG_DATA_HOME/moerge/policies`, default
//!    `~/.local/share/moerge/policies`;
//! 3. folders the caller adds (daemon configuration, `--policies`).
//!
//! In every folder but the executable's own, every `*.so` file is a plugin candidate.

use std::path::{Path, PathBuf};

/// Environment variable naming the built-in policies' folder.
pub const BUILTIN_ENV: &str = "MOERGE_BUILTIN_POLICIES";

/// The file-name prefix of built-in policies (`libmoerge_policy_<name>.so`).
pub const BUILTIN_PREFIX: &str = "libmoerge_policy_";

/// Which files of a folder are plugin candidates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFilter {
    /// Every `*.so` file.
    AllLibraries,
    /// Only `libmoerge_policy_*.so` (a folder that holds other libraries too).
    BuiltinNames,
}

impl FileFilter {
    pub fn accepts(self, file_name: &str) -> bool {
        let so = file_name.ends_with(".so");
        match self {
            FileFilter::AllLibraries => so,
            FileFilter::BuiltinNames => so && file_name.starts_with(BUILTIN_PREFIX),
        }
    }
}

/// One folder to search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyFolder {
    pub path: PathBuf,
    pub filter: FileFilter,
}

impl PolicyFolder {
    /// A folder whose every `*.so` is a candidate.
    pub fn new(path: impl Into<PathBuf>) -> PolicyFolder {
        PolicyFolder {
            path: path.into(),
            filter: FileFilter::AllLibraries,
        }
    }
}

/// The standard folders (built-ins, then the user's), then `extra`, in priority order.
pub fn standard_folders(extra: &[PathBuf]) -> Vec<PolicyFolder> {
    let exe_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let env = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let mut folders = Vec::new();
    folders.extend(builtin_folder(env(BUILTIN_ENV), exe_dir.as_deref()));
    folders.extend(user_folder(env("XDG_DATA_HOME"), env("HOME")).map(PolicyFolder::new));
    folders.extend(extra.iter().cloned().map(PolicyFolder::new));
    folders
}

/// The built-ins folder from the environment variable's value and the executable's folder.
pub fn builtin_folder(env: Option<PathBuf>, exe_dir: Option<&Path>) -> Option<PolicyFolder> {
    if let Some(dir) = env {
        return Some(PolicyFolder::new(dir));
    }
    let exe_dir = exe_dir?;
    let installed = exe_dir.join("../lib/moerge/policies");
    if installed.is_dir() {
        return Some(PolicyFolder::new(installed));
    }
    Some(PolicyFolder {
        path: exe_dir.to_path_buf(),
        filter: FileFilter::BuiltinNames,
    })
}

/// The user's folder from `$XDG_DATA_HOME` and `$HOME`.
pub fn user_folder(xdg_data_home: Option<PathBuf>, home: Option<PathBuf>) -> Option<PathBuf> {
    let data = xdg_data_home.or_else(|| home.map(|h| h.join(".local/share")))?;
    Some(data.join("moerge/policies"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_follow_the_documented_order() {
        let tmp = tempfile::tempdir().unwrap();
        let bin = tmp.path().join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        // No variable, no installed layout: the executable's folder, built-in names only.
        assert_eq!(
            builtin_folder(None, Some(&bin)),
            Some(PolicyFolder {
                path: bin.clone(),
                filter: FileFilter::BuiltinNames
            })
        );
        let installed = tmp.path().join("lib/moerge/policies");
        std::fs::create_dir_all(&installed).unwrap();
        assert_eq!(
            builtin_folder(None, Some(&bin)).unwrap().path,
            bin.join("../lib/moerge/policies")
        );
        assert_eq!(
            builtin_folder(Some("/opt/p".into()), Some(&bin)),
            Some(PolicyFolder::new("/opt/p"))
        );
        assert_eq!(
            user_folder(Some("/x".into()), Some("/home/u".into())),
            Some(PathBuf::from("/x/moerge/policies"))
        );
        assert_eq!(
            user_folder(None, Some("/home/u".into())),
            Some(PathBuf::from("/home/u/.local/share/moerge/policies"))
        );
        assert!(FileFilter::BuiltinNames.accepts("libmoerge_policy_arrow.so"));
        assert!(!FileFilter::BuiltinNames.accepts("libstd-1234.so"));
        assert!(FileFilter::AllLibraries.accepts("libties_merge.so"));
        assert!(!FileFilter::AllLibraries.accepts("README.md"));
    }
}
