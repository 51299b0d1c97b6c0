//! Changing the library on a caller's behalf: `AddExpert` and `RemoveExpert`. Both are
//! atomic as the watcher sees them: an adapter is copied into a hidden staging folder inside
//! the library (hidden names are never indexed) and renamed into place; a removal renames
//! the folder to a hidden name first, then deletes it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use moerge_library::{inspect_adapter, AdapterState, BaseModelInfo, ContentHash, METADATA_FILE};

use super::error::ServeError;

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";

static STAGING_COUNTER: AtomicU64 = AtomicU64::new(0);

fn staging_dir(library: &Path, what: &str) -> PathBuf {
    let n = STAGING_COUNTER.fetch_add(1, Ordering::Relaxed);
    library.join(format!(".moerge-{what}-{}-{n}", std::process::id()))
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> ServeError {
    ServeError::Internal(format!("{what} {}: {e}", path.display()))
}

/// Validates the adapter folder `source`, then copies it into `library` under its folder
/// name. Returns the name and the content hash. Blocking.
pub(crate) fn add_expert(
    library: &Path,
    base: &BaseModelInfo,
    source: &Path,
) -> Result<(String, ContentHash), ServeError> {
    let invalid = |message: String| ServeError::invalid("path", message);
    if !source.is_absolute() {
        return Err(invalid(format!(
            "{} is not an absolute path (the daemon does not know your working directory)",
            source.display()
        )));
    }
    // Symbolic links are followed once, here: what is checked below is where they lead.
    let resolved = source
        .canonicalize()
        .map_err(|e| invalid(format!("{}: {e}", source.display())))?;
    if !resolved.is_dir() {
        return Err(invalid(format!("{} is not a folder", source.display())));
    }
    for file in [CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE] {
        let path = resolved.join(file);
        // A link to a device or a pipe would make the copy read forever.
        if std::fs::metadata(&path).is_ok_and(|meta| !meta.is_file()) {
            return Err(invalid(format!(
                "{} is not a regular file",
                source.join(file).display()
            )));
        }
    }
    let name = match source.file_name().and_then(|n| n.to_str()) {
        Some(n) if !n.starts_with('.') => n.to_string(),
        _ => {
            return Err(invalid(format!(
                "{}: the folder name names the expert, and must be visible UTF-8 (not starting with '.')",
                source.display()
            )))
        }
    };
    let dest = library.join(&name);
    if dest.exists() {
        return Err(invalid(format!(
            "the library already has an expert named {name:?}; remove it first"
        )));
    }
    if resolved.starts_with(library) {
        let place = if resolved == library {
            "the library itself"
        } else {
            "inside the library"
        };
        return Err(invalid(format!(
            "{} is {place} ({}); AddExpert copies an adapter from outside it",
            source.display(),
            library.display()
        )));
    }
    let report = inspect_adapter(&resolved, Some(base));
    let hash = match (&report.state, report.hash) {
        (AdapterState::Ready, Some(hash)) => hash,
        (AdapterState::Rejected { reason }, _) => return Err(invalid(reason.clone())),
        (AdapterState::Incompatible { reason }, _) => {
            return Err(invalid(format!(
                "{} does not fit the base model {}: {reason}",
                source.display(),
                base.name()
            )))
        }
        (AdapterState::Ready, None) => {
            return Err(ServeError::Internal(format!(
                "{}: inspect found a ready adapter without a hash",
                source.display()
            )))
        }
    };
    let staging = staging_dir(library, "add");
    let staged = staging.join(&name);
    let result = copy_and_check(&resolved, &staged, hash).and_then(|()| {
        std::fs::rename(&staged, &dest).map_err(|e| io_error("cannot move the copy to", &dest, e))
    });
    let _ = std::fs::remove_dir_all(&staging);
    result.map(|()| (name, hash))
}

fn copy_and_check(source: &Path, staged: &Path, hash: ContentHash) -> Result<(), ServeError> {
    std::fs::create_dir_all(staged).map_err(|e| io_error("cannot create", staged, e))?;
    for file in [CONFIG_FILE, WEIGHTS_FILE, METADATA_FILE] {
        let from = source.join(file);
        if file == METADATA_FILE && !from.exists() {
            continue;
        }
        let to = staged.join(file);
        std::fs::copy(&from, &to).map_err(|e| io_error("cannot copy", &from, e))?;
        std::fs::File::open(&to)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_error("cannot sync", &to, e))?;
    }
    // The source may have changed between validation and copy: what lands is what was checked.
    match inspect_adapter(staged, None).hash {
        Some(h) if h == hash => Ok(()),
        _ => Err(ServeError::invalid(
            "path",
            format!(
                "{} changed while it was being copied; try again",
                source.display()
            ),
        )),
    }
}

/// Moves expert `name`'s folder to a hidden name inside the library (the watcher no longer
/// sees it there) and returns that folder, for [`delete_moved`] once the index has dropped
/// the expert. Blocking.
pub(crate) fn move_out(library: &Path, name: &str) -> Result<PathBuf, ServeError> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') {
        return Err(ServeError::invalid(
            "name",
            format!("{name:?} is not an expert name"),
        ));
    }
    let dir = library.join(name);
    if !dir.is_dir() {
        return Err(ServeError::NoSuchExpert(format!(
            "name: no expert named {name:?} in the library"
        )));
    }
    let trash = staging_dir(library, "remove");
    std::fs::rename(&dir, &trash).map_err(|e| io_error("cannot move away", &dir, e))?;
    Ok(trash)
}

/// Deletes a folder [`move_out`] made. Blocking.
pub(crate) fn delete_moved(trash: &Path) -> Result<(), ServeError> {
    std::fs::remove_dir_all(trash).map_err(|e| io_error("cannot delete", trash, e))
}
