//! Resolving base-model and adapter locations (local folders or Hugging Face hub ids).
//!
//! Wherever moerge expects a base-model folder or an adapter folder, a hub id
//! (`org/name` or `org/name@revision`) works too. [`resolve`] turns either into a local
//! folder: a local path is returned as is; a hub id is fetched through `hf-hub` (sync
//! API) into the standard Hugging Face cache (`<cache>/models--org--name/{refs,blobs,
//! snapshots}`, shared with Python's `huggingface_hub`) and the snapshot folder of the
//! resolved commit is returned.
//!
//! What `hf-hub` 0.5 does by itself, and what this module adds:
//! - `hf-hub` makes the requests (`GET` with `Range: bytes=0-0` for metadata, following
//!   relative redirects; then a ranged `GET` for the body, resuming `.part` files), lays
//!   out blobs / snapshots / refs, and locks blobs while downloading.
//! - It does not read `HF_HUB_CACHE`, `HF_TOKEN`, `HF_HUB_OFFLINE` or `XDG_CACHE_HOME`:
//!   [`HubSettings::from_env`] reads them all and passes explicit values.
//! - Offline mode is ours: files are looked up in the cache only (`refs/<revision>` →
//!   `snapshots/<commit>/<file>`), never over the network.
//! - All files of one model come from one commit: the first file is resolved at the
//!   requested revision, the others are fetched pinned to the commit it answered.
//! - A file already cached for that commit (or whose blob is already there) is not
//!   downloaded again; a download is checked against the size the hub announced.
//! - If the hub cannot be reached at all, a complete copy of the same revision already in
//!   the cache is used (with a warning), as `huggingface_hub` does.
//!
//! The parts: `spec` checks hub ids, `settings` reads the environment, `fetch` knows which
//! files a [`ModelKind`] needs and gets them through either `online` (`hf-hub`) or `cache`
//! (cache-only lookups), and `error` holds [`SourceError`].

mod cache;
mod error;
mod fetch;
mod online;
mod settings;
mod spec;

use std::fmt;
use std::path::{Path, PathBuf};

pub use error::SourceError;
pub use settings::HubSettings;

use cache::CacheFetch;
use fetch::{collect, Fetch};
use online::HubFetch;

/// The default hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision used when a hub id names none.
pub const DEFAULT_REVISION: &str = "main";

/// Where a base model or an adapter comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// An existing local path.
    Local(PathBuf),
    /// A Hugging Face hub model repository at a revision (branch, tag or commit).
    Hub {
        /// `org/name`.
        repo: String,
        /// `main` unless the spec said `@revision`.
        revision: String,
    },
}

impl Source {
    /// Parses a location given by a user.
    ///
    /// An existing local path always wins. Otherwise `org/name` or `org/name@revision`
    /// (with the characters the hub allows) is a hub id. Anything else is an error saying
    /// that the folder does not exist and that the text is not a hub id.
    pub fn parse(spec: &str) -> Result<Source, SourceError> {
        // An empty spec names no path, so it falls through to `split_hub_id`, which refuses it.
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Source::Local(path.to_path_buf()));
        }
        let (repo, revision) =
            spec::split_hub_id(spec).map_err(|reason| SourceError::InvalidSpec {
                spec: spec.to_string(),
                reason,
            })?;
        Ok(Source::Hub {
            repo: repo.to_string(),
            revision: revision.to_string(),
        })
    }

    /// Returns a local folder holding the files of `kind`; see [`resolve`].
    pub fn resolve(&self, kind: ModelKind, settings: &HubSettings) -> Result<PathBuf, SourceError> {
        match self {
            Source::Local(path) => resolve_local(path),
            Source::Hub { repo, revision } => resolve_hub(repo, revision, kind, settings),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Local(path) => write!(f, "{}", path.display()),
            Source::Hub { repo, revision } => write!(f, "{repo}@{revision}"),
        }
    }
}

/// Which files a resolved folder must hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// `config.json`, `tokenizer.json`, and `model.safetensors` or
    /// `model.safetensors.index.json` plus every shard it names.
    Base,
    /// `adapter_config.json` and `adapter_model.safetensors` (PEFT).
    Adapter,
}

/// Returns a local folder holding the files of `kind` for `spec` (see [`Source::parse`]).
///
/// For a local path: the path itself, checked to be an existing folder (its contents are
/// checked by whoever loads it). For a hub id: the cache snapshot folder of the resolved
/// commit, after fetching what is missing (nothing is fetched when `settings.offline`):
/// for [`ModelKind::Base`] `config.json`, `tokenizer.json` and either `model.safetensors`
/// or `model.safetensors.index.json` plus every shard it names; for
/// [`ModelKind::Adapter`] `adapter_config.json` and `adapter_model.safetensors` (a repo
/// with only `adapter_model.bin` is refused: pickle is unsupported).
pub fn resolve(
    spec: &str,
    kind: ModelKind,
    settings: &HubSettings,
) -> Result<PathBuf, SourceError> {
    Source::parse(spec)?.resolve(kind, settings)
}

fn resolve_local(path: &Path) -> Result<PathBuf, SourceError> {
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_dir() => Ok(path.to_path_buf()),
        Ok(_) => Err(SourceError::NotAFolder {
            path: path.to_path_buf(),
        }),
        Err(_) => Err(SourceError::LocalMissing {
            path: path.to_path_buf(),
        }),
    }
}

fn resolve_hub(
    repo: &str,
    revision: &str,
    kind: ModelKind,
    settings: &HubSettings,
) -> Result<PathBuf, SourceError> {
    let mut cached = CacheFetch::new(repo, revision, settings);
    if settings.offline {
        tracing::debug!(
            repo,
            revision,
            "HF_HUB_OFFLINE: resolving from the cache only"
        );
        return collect(kind, &mut cached);
    }
    let mut online = HubFetch::new(repo, revision, settings)?;
    match collect(kind, &mut online) {
        Ok(dir) => {
            online.target().write_ref()?;
            Ok(dir)
        }
        Err(err @ SourceError::Network { .. }) => match collect(kind, &mut cached) {
            Ok(dir) => {
                tracing::warn!(
                    repo,
                    revision,
                    endpoint = %settings.endpoint,
                    "{err}; using the copy in the cache {}",
                    dir.display()
                );
                Ok(dir)
            }
            Err(_) => Err(err),
        },
        Err(err) => Err(err),
    }
}
