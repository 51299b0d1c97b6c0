//! The Hugging Face cache on disk (`models--org--name/{refs,blobs,snapshots}`): cache-only
//! lookups, as `huggingface_hub` does offline, and the reuse of files and blobs already
//! there before anything is downloaded.

use std::io;
use std::path::{Path, PathBuf};

use hf_hub::{CacheRepo, Repo};

use super::fetch::{Fetch, Target};
use super::spec::{is_commit_hash, is_safe_component};
use super::{HubSettings, SourceError};

/// Cache-only lookups: `refs/<revision>` → `snapshots/<commit>/<file>`.
pub(super) struct CacheFetch<'a> {
    target: Target<'a>,
}

impl<'a> CacheFetch<'a> {
    pub(super) fn new(repo: &'a str, revision: &'a str, settings: &'a HubSettings) -> Self {
        let mut target = Target::new(repo, revision, settings);
        let ref_path = settings
            .cache_dir
            .join(Repo::model(repo.to_string()).folder_name())
            .join("refs")
            .join(revision);
        // A revision that is a commit hash is found without a ref, if its snapshot exists.
        target.commit = std::fs::read_to_string(ref_path)
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| is_safe_component(c))
            .or_else(|| {
                (is_commit_hash(revision) && target.cache.pointer_path(revision).is_dir())
                    .then(|| revision.to_string())
            });
        CacheFetch { target }
    }
}

impl Fetch for CacheFetch<'_> {
    fn target(&self) -> &Target<'_> {
        &self.target
    }

    fn fetch(&mut self, file: &str) -> Result<Option<PathBuf>, SourceError> {
        let Some(snapshot) = self.target.snapshot() else {
            return Ok(None);
        };
        let path = snapshot.join(file);
        Ok(path.is_file().then_some(path))
    }

    fn probe(&mut self, file: &str) -> Result<bool, SourceError> {
        Ok(self.fetch(file)?.is_some())
    }

    fn missing(&self, file: &str) -> SourceError {
        SourceError::NotInCache {
            repo: self.target.repo.to_string(),
            revision: self.target.revision.to_string(),
            file: file.to_string(),
            cache: self.target.settings.cache_dir.clone(),
        }
    }

    fn no_weights(&self) -> SourceError {
        self.missing("model.safetensors")
    }
}

/// `snapshots/<commit>/<file>` if the cache already holds the file's `size` bytes, linking
/// the blob named `etag` into the snapshot if only the blob is there. Otherwise clears what
/// would get in the way of `hf-hub` downloading it (a stale or dangling snapshot entry, a
/// partial download longer than the file) and returns `None`.
pub(super) fn reuse_or_clear(
    cache: &CacheRepo,
    commit: &str,
    file: &str,
    etag: &str,
    size: u64,
) -> Result<Option<PathBuf>, SourceError> {
    let pointer = cache.pointer_path(commit).join(file);
    if file_len(&pointer) == Some(size) {
        tracing::debug!(file, %commit, "already in the cache");
        return Ok(Some(pointer));
    }
    remove_entry(&pointer)?;
    let blob = cache.blob_path(etag);
    if file_len(&blob) == Some(size) && link_blob(&blob, &pointer, file)? {
        tracing::debug!(file, %commit, "blob already in the cache");
        return Ok(Some(pointer));
    }
    // hf-hub resumes a `.part` file, and fails on one longer than the file.
    let part = blob.with_extension("part");
    if file_len(&part).is_some_and(|len| len > size) {
        std::fs::remove_file(&part).map_err(|e| SourceError::cache(&part, e))?;
    }
    Ok(None)
}

pub(super) fn file_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// Removes a snapshot entry (possibly a dangling symlink) so it can be recreated.
fn remove_entry(path: &Path) -> Result<(), SourceError> {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(|e| SourceError::cache(path, e))?;
    }
    Ok(())
}

/// Links `snapshots/<commit>/<file>` to an already downloaded blob, relatively, as
/// `hf-hub` and `huggingface_hub` do. `false` if the entry could not be made a link to it.
#[cfg(unix)]
fn link_blob(blob: &Path, pointer: &Path, file: &str) -> Result<bool, SourceError> {
    let parent = pointer.parent().expect("a snapshot file has a parent");
    std::fs::create_dir_all(parent).map_err(|e| SourceError::cache(parent, e))?;
    // From snapshots/<commit>/<dirs of file>/ up to the repo folder.
    let ups = file.split('/').count() + 1;
    let mut target = PathBuf::new();
    for _ in 0..ups {
        target.push("..");
    }
    target.push("blobs");
    target.push(blob.file_name().expect("a blob has a name"));
    match std::os::unix::fs::symlink(&target, pointer) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(pointer.is_file()),
        Err(e) => Err(SourceError::cache(pointer, e)),
    }
}

#[cfg(not(unix))]
fn link_blob(_blob: &Path, _pointer: &Path, _file: &str) -> Result<bool, SourceError> {
    Ok(false)
}
