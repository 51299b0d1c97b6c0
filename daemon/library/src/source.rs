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

use std::collections::BTreeSet;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, Metadata};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

/// The default hub.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";
/// The revision used when a hub id names none.
pub const DEFAULT_REVISION: &str = "main";

const MAX_REPO_ID_LEN: usize = 96;
const MAX_REVISION_LEN: usize = 255;

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
        if spec.is_empty() {
            return Err(invalid(spec, "it is empty"));
        }
        let path = Path::new(spec);
        if path.exists() {
            return Ok(Source::Local(path.to_path_buf()));
        }
        if spec.contains("://") {
            return Err(invalid(spec, "a URL; give the id alone, as org/name"));
        }
        if path.is_absolute() || spec.starts_with(['.', '~']) || spec.contains('\\') {
            return Err(invalid(
                spec,
                "it looks like a path, and nothing exists there",
            ));
        }
        let (repo, revision) = match spec.split_once('@') {
            Some((repo, revision)) => (repo, revision),
            None => (spec, DEFAULT_REVISION),
        };
        validate_repo_id(repo).map_err(|reason| invalid(spec, &reason))?;
        validate_revision(revision).map_err(|reason| invalid(spec, &reason))?;
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

/// How to reach the hub and where its cache lives.
#[derive(Clone, PartialEq, Eq)]
pub struct HubSettings {
    /// Base URL of the hub, without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// The hub cache folder, holding `models--org--name` folders (`HF_HUB_CACHE`).
    pub cache_dir: PathBuf,
    /// Use the cache only; never touch the network (`HF_HUB_OFFLINE`).
    pub offline: bool,
    /// Sent as `Authorization: Bearer <token>` (`HF_TOKEN` or the saved token file).
    pub token: Option<String>,
}

impl fmt::Debug for HubSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubSettings")
            .field("endpoint", &self.endpoint)
            .field("cache_dir", &self.cache_dir)
            .field("offline", &self.offline)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl HubSettings {
    /// Reads the settings the way `huggingface_hub` does:
    /// - `HF_ENDPOINT` (default `https://huggingface.co`);
    /// - cache: `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, where
    ///   `HF_HOME` defaults to `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// - `HF_HUB_OFFLINE` set to `1`, `true`, `yes` or `on` (any case);
    /// - token: `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the file `HF_TOKEN_PATH`,
    ///   else `$HF_HOME/token` (what `huggingface-cli login` writes).
    pub fn from_env() -> HubSettings {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`HubSettings::from_env`] with the variables read through `lookup` (for tests and
    /// for callers with their own environment).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> HubSettings {
        let var = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let home = var("HOME")
            .or_else(|| var("USERPROFILE"))
            .map(PathBuf::from);
        let expand = |value: String| -> PathBuf {
            match (value.strip_prefix("~/"), &home) {
                (Some(rest), Some(home)) => home.join(rest),
                _ if value == "~" => home.clone().unwrap_or_else(|| PathBuf::from(&value)),
                _ => PathBuf::from(value),
            }
        };

        let endpoint = var("HF_ENDPOINT")
            .map(|e| e.trim().trim_end_matches('/').to_string())
            .unwrap_or_else(|| DEFAULT_ENDPOINT.to_string());

        let hf_home = var("HF_HOME").map(&expand).unwrap_or_else(|| {
            let cache = var("XDG_CACHE_HOME")
                .map(&expand)
                .unwrap_or_else(|| home.clone().unwrap_or_default().join(".cache"));
            cache.join("huggingface")
        });
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(&expand)
            .unwrap_or_else(|| hf_home.join("hub"));

        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_lowercase().as_str(),
                "1" | "true" | "yes" | "on"
            )
        });

        let token = var("HF_TOKEN")
            .or_else(|| var("HUGGING_FACE_HUB_TOKEN"))
            .map(|t| t.trim().to_string())
            .or_else(|| {
                let path = var("HF_TOKEN_PATH")
                    .map(&expand)
                    .unwrap_or_else(|| hf_home.join("token"));
                let text = std::fs::read_to_string(path).ok()?;
                let text = text.trim();
                (!text.is_empty()).then(|| text.to_string())
            });

        HubSettings {
            endpoint,
            cache_dir,
            offline,
            token,
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

/// Why a location could not be resolved. Messages name the repo, revision, file and
/// endpoint (or cache) involved, and say what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// Neither an existing path nor a well-formed hub id.
    #[error(
        "'{spec}' is not an existing folder, and not a Hugging Face hub id ({reason}); \
         hub ids look like org/name or org/name@revision"
    )]
    InvalidSpec {
        /// What was given.
        spec: String,
        /// Why it is not a hub id.
        reason: String,
    },
    /// A local path that no longer exists.
    #[error("folder {} does not exist", path.display())]
    LocalMissing {
        /// The path.
        path: PathBuf,
    },
    /// A local path that is not a folder.
    #[error("{} is not a folder", path.display())]
    NotAFolder {
        /// The path.
        path: PathBuf,
    },
    /// The endpoint is not an http(s) URL.
    #[error("hub endpoint '{endpoint}' is not an http:// or https:// URL; check HF_ENDPOINT")]
    InvalidEndpoint {
        /// The endpoint.
        endpoint: String,
    },
    /// Offline mode, and the file is not in the cache.
    #[error(
        "{file} of {repo}@{revision} is not in the Hugging Face cache {}: HF_HUB_OFFLINE is set, \
         so nothing is downloaded; run once online (or unset HF_HUB_OFFLINE) to fetch it",
        cache.display()
    )]
    NotInCache {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The missing file.
        file: String,
        /// The cache folder searched.
        cache: PathBuf,
    },
    /// The hub answered 404 for a file.
    #[error(
        "{repo}@{revision} on {endpoint} has no file {file} (HTTP 404){}",
        if *first_request {
            "; check the repo id and the revision (no local folder of that name exists either)"
        } else {
            ""
        }
    )]
    FileNotFound {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The missing file.
        file: String,
        /// The hub asked.
        endpoint: String,
        /// Whether this was the first file asked for (so the repo or revision may be
        /// what is missing).
        first_request: bool,
    },
    /// The hub answered 401 or 403.
    #[error(
        "{endpoint} refused {file} of {repo}@{revision} (HTTP {status}): the repo does not exist, \
         or it is private or gated; {}",
        if *token_sent {
            "the token sent (HF_TOKEN or the saved token) was refused or lacks access"
        } else {
            "check the repo id, or set HF_TOKEN to a token with access"
        }
    )]
    Unauthorized {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The file asked for.
        file: String,
        /// The hub asked.
        endpoint: String,
        /// 401 or 403.
        status: u16,
        /// Whether a token was sent.
        token_sent: bool,
    },
    /// Any other HTTP error status.
    #[error(
        "{endpoint} answered HTTP {status} for {file} of {repo}@{revision}; try again later, \
         check HF_ENDPOINT, or set HF_HUB_OFFLINE=1 to use the cache"
    )]
    Http {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The file asked for.
        file: String,
        /// The hub asked.
        endpoint: String,
        /// The status.
        status: u16,
    },
    /// The hub could not be reached (and the cache had no complete copy).
    #[error(
        "could not reach {endpoint} for {file} of {repo}@{revision} ({detail}); check HF_ENDPOINT \
         and the network, or set HF_HUB_OFFLINE=1 to use files already in the cache"
    )]
    Network {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The file asked for.
        file: String,
        /// The hub asked.
        endpoint: String,
        /// The transport error.
        detail: String,
    },
    /// The hub answered something this client does not understand.
    #[error("unexpected answer from {endpoint} for {file} of {repo}@{revision}: {detail}")]
    Protocol {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The file asked for.
        file: String,
        /// The hub asked.
        endpoint: String,
        /// What was wrong.
        detail: String,
    },
    /// The repo has the weights only as a pickle file.
    #[error(
        "{repo}@{revision} has {file}, a pickle file, but not {wanted}: moerge only loads \
         safetensors (pickle is unsafe and unsupported); convert the weights to safetensors"
    )]
    PickleOnly {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The pickle file found.
        file: String,
        /// The safetensors file expected instead.
        wanted: String,
    },
    /// A base repo with no safetensors weights.
    #[error(
        "{repo}@{revision} on {endpoint} has neither model.safetensors nor \
         model.safetensors.index.json"
    )]
    NoWeights {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The hub asked.
        endpoint: String,
    },
    /// A sharded-weights index that cannot be used.
    #[error("{file} of {repo}@{revision} is not a usable safetensors index: {reason}")]
    BadIndex {
        /// `org/name`.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// The index file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// Reading or writing the cache failed.
    #[error("Hugging Face cache {}: {error}", path.display())]
    Cache {
        /// The path involved.
        path: PathBuf,
        /// The I/O error.
        error: io::Error,
    },
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

fn invalid(spec: &str, reason: &str) -> SourceError {
    SourceError::InvalidSpec {
        spec: spec.to_string(),
        reason: reason.to_string(),
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// The hub's rules (`huggingface_hub.utils.validate_repo_id`), with the namespace
/// required: `org/name`, each part of `[A-Za-z0-9._-]` starting and ending with a letter,
/// digit or `_`, no `--` or `..`, not ending in `.git`, at most 96 characters.
fn validate_repo_id(repo: &str) -> Result<(), String> {
    let Some((org, name)) = repo.split_once('/') else {
        return Err("a hub id needs an owner: org/name".to_string());
    };
    if name.contains('/') {
        return Err("a hub id has exactly one '/'".to_string());
    }
    if repo.len() > MAX_REPO_ID_LEN {
        return Err(format!("longer than {MAX_REPO_ID_LEN} characters"));
    }
    for (what, part) in [("owner", org), ("name", name)] {
        if part.is_empty() {
            return Err(format!("the {what} is empty"));
        }
        if let Some(c) = part.chars().find(|&c| !is_name_char(c)) {
            return Err(format!(
                "the {what} contains '{c}'; only letters, digits, '-', '_' and '.' are allowed"
            ));
        }
        let edge_ok = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if !edge_ok(part.chars().next()) || !edge_ok(part.chars().last()) {
            return Err(format!(
                "the {what} must start and end with a letter, a digit or '_'"
            ));
        }
    }
    if repo.contains("--") || repo.contains("..") {
        return Err("'--' and '..' are not allowed".to_string());
    }
    if repo.ends_with(".git") {
        return Err("a hub id cannot end in .git".to_string());
    }
    Ok(())
}

/// A branch, tag or commit: git-ref-like, and safe as a path under `refs/` in the cache.
fn validate_revision(revision: &str) -> Result<(), String> {
    if revision.is_empty() {
        return Err("the revision after '@' is empty".to_string());
    }
    if revision.len() > MAX_REVISION_LEN {
        return Err(format!(
            "the revision is longer than {MAX_REVISION_LEN} characters"
        ));
    }
    if let Some(c) = revision.chars().find(|&c| !(is_name_char(c) || c == '/')) {
        return Err(format!(
            "the revision contains '{c}'; only letters, digits, '-', '_', '.' and '/' are allowed"
        ));
    }
    if revision
        .split('/')
        .any(|part| part.is_empty() || part.starts_with('.'))
        || revision.ends_with(".lock")
        || revision.contains("..")
    {
        return Err(format!("'{revision}' is not a valid revision name"));
    }
    Ok(())
}

/// A file name inside a repo (for shard names read from an index): relative, `/`
/// separated, no `.`/`..` parts, URL- and path-safe characters only.
fn validate_repo_file(file: &str) -> Result<(), String> {
    if file.is_empty() {
        return Err("empty file name".to_string());
    }
    if let Some(c) = file.chars().find(|&c| !(is_name_char(c) || c == '/')) {
        return Err(format!("file name '{file}' contains '{c}'"));
    }
    if file
        .split('/')
        .any(|part| part.is_empty() || part == "." || part == "..")
    {
        return Err(format!("file name '{file}' is not a plain relative path"));
    }
    Ok(())
}

fn is_commit_hash(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Commit hashes and etags become path components in the cache: keep them boring.
fn is_safe_component(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
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
            if let Some(commit) = &online.commit {
                cached.write_ref(commit)?;
            }
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

/// One way of getting files of one repo revision into a snapshot folder.
trait Fetch {
    /// The file's local path, or `None` if the repo (or cache) does not have it.
    fn fetch(&mut self, file: &str) -> Result<Option<PathBuf>, SourceError>;
    /// Whether the repo (or cache) has the file, without downloading it.
    fn probe(&mut self, file: &str) -> Result<bool, SourceError>;
    /// The error for a required file that is absent.
    fn missing(&self, file: &str) -> SourceError;
    /// The error for base weights that are absent.
    fn no_weights(&self) -> SourceError;
    /// The snapshot folder the fetched files are in (after a first successful fetch).
    fn snapshot(&self) -> Option<PathBuf>;
    fn repo(&self) -> &str;
    fn revision(&self) -> &str;
}

fn require(fetch: &mut dyn Fetch, file: &str) -> Result<PathBuf, SourceError> {
    fetch.fetch(file)?.ok_or_else(|| fetch.missing(file))
}

fn collect(kind: ModelKind, fetch: &mut dyn Fetch) -> Result<PathBuf, SourceError> {
    match kind {
        ModelKind::Adapter => {
            require(fetch, "adapter_config.json")?;
            if fetch.fetch("adapter_model.safetensors")?.is_none() {
                return Err(pickle_or_missing(
                    fetch,
                    "adapter_model.bin",
                    "adapter_model.safetensors",
                    None,
                ));
            }
        }
        ModelKind::Base => {
            require(fetch, "config.json")?;
            require(fetch, "tokenizer.json")?;
            if fetch.fetch("model.safetensors")?.is_none() {
                const INDEX: &str = "model.safetensors.index.json";
                match fetch.fetch(INDEX)? {
                    Some(index) => {
                        for shard in shards(fetch, &index, INDEX)? {
                            require(fetch, &shard)?;
                        }
                    }
                    None => {
                        let no_weights = fetch.no_weights();
                        return Err(pickle_or_missing(
                            fetch,
                            "pytorch_model.bin",
                            "model.safetensors",
                            Some(no_weights),
                        ));
                    }
                }
            }
        }
    }
    // Every successful path above fetched at least one file.
    fetch.snapshot().ok_or_else(|| fetch.missing("(any file)"))
}

/// The error for absent safetensors weights: pickle-only if the repo has `pickle`,
/// else `otherwise`, else the plain missing-file error for `wanted`.
fn pickle_or_missing(
    fetch: &mut dyn Fetch,
    pickle: &str,
    wanted: &str,
    otherwise: Option<SourceError>,
) -> SourceError {
    match fetch.probe(pickle) {
        Ok(true) => SourceError::PickleOnly {
            repo: fetch.repo().to_string(),
            revision: fetch.revision().to_string(),
            file: pickle.to_string(),
            wanted: wanted.to_string(),
        },
        Err(err) => err,
        Ok(false) => otherwise.unwrap_or_else(|| fetch.missing(wanted)),
    }
}

/// The shard files named by a `model.safetensors.index.json`, sorted and deduplicated.
fn shards(fetch: &dyn Fetch, index: &Path, file: &str) -> Result<BTreeSet<String>, SourceError> {
    let bad = |reason: String| SourceError::BadIndex {
        repo: fetch.repo().to_string(),
        revision: fetch.revision().to_string(),
        file: file.to_string(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| SourceError::Cache {
        path: index.to_path_buf(),
        error: e,
    })?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no \"weight_map\" object".to_string()))?;
    let mut shards = BTreeSet::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| bad(format!("the shard of tensor {tensor} is not a string")))?;
        validate_repo_file(shard).map_err(bad)?;
        shards.insert(shard.to_string());
    }
    if shards.is_empty() {
        return Err(bad("\"weight_map\" is empty".to_string()));
    }
    Ok(shards)
}

/// Cache-only lookups, as `huggingface_hub` does offline.
struct CacheFetch<'a> {
    repo: &'a str,
    revision: &'a str,
    settings: &'a HubSettings,
    cache: hf_hub::CacheRepo,
    commit: Option<String>,
}

impl<'a> CacheFetch<'a> {
    fn new(repo: &'a str, revision: &'a str, settings: &'a HubSettings) -> Self {
        let cache = Cache::new(settings.cache_dir.clone()).repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ));
        let ref_path = settings
            .cache_dir
            .join(Repo::model(repo.to_string()).folder_name())
            .join("refs")
            .join(revision);
        let commit = std::fs::read_to_string(ref_path)
            .ok()
            .map(|c| c.trim().to_string())
            .filter(|c| is_safe_component(c))
            .or_else(|| {
                (is_commit_hash(revision) && cache.pointer_path(revision).is_dir())
                    .then(|| revision.to_string())
            });
        CacheFetch {
            repo,
            revision,
            settings,
            cache,
            commit,
        }
    }

    /// Points `refs/<revision>` at `commit` (what later offline lookups read).
    fn write_ref(&self, commit: &str) -> Result<(), SourceError> {
        if commit == self.revision {
            return Ok(());
        }
        self.cache
            .create_ref(commit)
            .map_err(|error| SourceError::Cache {
                path: self.settings.cache_dir.clone(),
                error,
            })
    }
}

impl Fetch for CacheFetch<'_> {
    fn fetch(&mut self, file: &str) -> Result<Option<PathBuf>, SourceError> {
        let Some(commit) = &self.commit else {
            return Ok(None);
        };
        let path = self.cache.pointer_path(commit).join(file);
        Ok(path.is_file().then_some(path))
    }

    fn probe(&mut self, file: &str) -> Result<bool, SourceError> {
        Ok(self.fetch(file)?.is_some())
    }

    fn missing(&self, file: &str) -> SourceError {
        SourceError::NotInCache {
            repo: self.repo.to_string(),
            revision: self.revision.to_string(),
            file: file.to_string(),
            cache: self.settings.cache_dir.clone(),
        }
    }

    fn no_weights(&self) -> SourceError {
        self.missing("model.safetensors")
    }

    fn snapshot(&self) -> Option<PathBuf> {
        self.commit.as_ref().map(|c| self.cache.pointer_path(c))
    }

    fn repo(&self) -> &str {
        self.repo
    }

    fn revision(&self) -> &str {
        self.revision
    }
}

/// Fetching through `hf-hub`, pinned to the commit the first file resolved to.
struct HubFetch<'a> {
    repo: &'a str,
    revision: &'a str,
    settings: &'a HubSettings,
    api: Api,
    commit: Option<String>,
}

impl<'a> HubFetch<'a> {
    fn new(
        repo: &'a str,
        revision: &'a str,
        settings: &'a HubSettings,
    ) -> Result<Self, SourceError> {
        let endpoint = settings.endpoint.trim_end_matches('/').to_string();
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            return Err(SourceError::InvalidEndpoint {
                endpoint: settings.endpoint.clone(),
            });
        }
        let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
            .with_endpoint(endpoint)
            // `from_cache` read a token file next to the cache; the settings decide.
            .with_token(settings.token.clone())
            .with_progress(false)
            .with_retries(3)
            .with_user_agent("moerge", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| SourceError::Protocol {
                repo: repo.to_string(),
                revision: revision.to_string(),
                file: String::new(),
                endpoint: settings.endpoint.clone(),
                detail: format!("cannot build the HTTP client: {e}"),
            })?;
        Ok(HubFetch {
            repo,
            revision,
            settings,
            api,
            commit: None,
        })
    }

    fn pinned(&self, revision: &str) -> Repo {
        Repo::with_revision(self.repo.to_string(), RepoType::Model, revision.to_string())
    }

    fn protocol(&self, file: &str, detail: String) -> SourceError {
        SourceError::Protocol {
            repo: self.repo.to_string(),
            revision: self.revision.to_string(),
            file: file.to_string(),
            endpoint: self.settings.endpoint.clone(),
            detail,
        }
    }

    fn cache_error(path: &Path, error: io::Error) -> SourceError {
        SourceError::Cache {
            path: path.to_path_buf(),
            error,
        }
    }

    /// Maps an `hf-hub` error; `None` for a 404 (the file is absent).
    fn api_error(&self, file: &str, err: ApiError) -> Option<SourceError> {
        let repo = self.repo.to_string();
        let revision = self.revision.to_string();
        let file = file.to_string();
        let endpoint = self.settings.endpoint.clone();
        let err = match err {
            ApiError::TooManyRetries(inner) => *inner,
            other => other,
        };
        Some(match err {
            ApiError::RequestError(request) => {
                let text = request.to_string();
                // ureq 3 renders `Error::StatusCode(n)` as "http status: n"; hf-hub does not
                // re-export ureq, so the status is read back from that text.
                match text
                    .strip_prefix("http status: ")
                    .and_then(|s| s.trim().parse::<u16>().ok())
                {
                    Some(404) => return None,
                    Some(status @ (401 | 403)) => SourceError::Unauthorized {
                        repo,
                        revision,
                        file,
                        endpoint,
                        status,
                        token_sent: self.settings.token.is_some(),
                    },
                    Some(status) => SourceError::Http {
                        repo,
                        revision,
                        file,
                        endpoint,
                        status,
                    },
                    None => SourceError::Network {
                        repo,
                        revision,
                        file,
                        endpoint,
                        detail: text,
                    },
                }
            }
            ApiError::IoError(error) => SourceError::Cache {
                path: self.settings.cache_dir.clone(),
                error,
            },
            ApiError::LockAcquisition(path) => SourceError::Cache {
                path,
                error: io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another process is downloading this file; try again when it is done",
                ),
            },
            other => SourceError::Protocol {
                repo,
                revision,
                file,
                endpoint,
                detail: other.to_string(),
            },
        })
    }
}

/// Runs an `hf-hub` call, turning a panic (it has `expect`s on what servers send) into
/// an error message.
fn guard<T>(call: impl FnOnce() -> T) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).map_err(|payload| {
        let text = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown".to_string());
        format!("the hub client panicked: {text}")
    })
}

fn file_len(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.len())
}

/// Removes a snapshot entry (possibly a dangling symlink) so it can be recreated.
fn remove_entry(path: &Path) -> Result<(), SourceError> {
    if std::fs::symlink_metadata(path).is_ok() {
        std::fs::remove_file(path).map_err(|e| HubFetch::cache_error(path, e))?;
    }
    Ok(())
}

/// Links `snapshots/<commit>/<file>` to an already downloaded blob, relatively, as
/// `hf-hub` and `huggingface_hub` do.
#[cfg(unix)]
fn link_blob(blob: &Path, pointer: &Path, file: &str) -> Result<bool, SourceError> {
    let parent = pointer.parent().expect("a snapshot file has a parent");
    std::fs::create_dir_all(parent).map_err(|e| HubFetch::cache_error(parent, e))?;
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
        Err(e) => Err(HubFetch::cache_error(pointer, e)),
    }
}

#[cfg(not(unix))]
fn link_blob(_blob: &Path, _pointer: &Path, _file: &str) -> Result<bool, SourceError> {
    Ok(false)
}

impl HubFetch<'_> {
    /// The file's metadata (`None` on 404), pinning the commit on the first call.
    fn metadata(&mut self, file: &str) -> Result<Option<Metadata>, SourceError> {
        let asked = self
            .commit
            .clone()
            .unwrap_or_else(|| self.revision.to_string());
        let api_repo = self.api.repo(self.pinned(&asked));
        let url = api_repo.url(file);
        tracing::debug!(%url, "resolving");
        let meta = match guard(|| self.api.metadata(&url)).map_err(|p| self.protocol(file, p))? {
            Ok(meta) => meta,
            Err(err) => {
                return match self.api_error(file, err) {
                    None => Ok(None),
                    Some(err) => Err(err),
                }
            }
        };
        let commit = meta.commit_hash().trim().to_string();
        if !is_safe_component(&commit) {
            return Err(self.protocol(file, format!("bad x-repo-commit header '{commit}'")));
        }
        if !is_safe_component(meta.etag()) {
            return Err(self.protocol(file, format!("bad etag '{}'", meta.etag())));
        }
        match &self.commit {
            Some(pinned) if *pinned != commit => {
                return Err(self.protocol(
                    file,
                    format!("asked for commit {pinned}, the answer is for commit {commit}"),
                ))
            }
            Some(_) => {}
            None => self.commit = Some(commit),
        }
        Ok(Some(meta))
    }
}

impl Fetch for HubFetch<'_> {
    fn probe(&mut self, file: &str) -> Result<bool, SourceError> {
        Ok(self.metadata(file)?.is_some())
    }

    fn fetch(&mut self, file: &str) -> Result<Option<PathBuf>, SourceError> {
        let Some(meta) = self.metadata(file)? else {
            return Ok(None);
        };
        let commit = meta.commit_hash().trim().to_string();
        let size = meta.size() as u64;
        let cache = Cache::new(self.settings.cache_dir.clone()).repo(self.pinned(&commit));
        let pointer = cache.pointer_path(&commit).join(file);
        if file_len(&pointer) == Some(size) {
            tracing::debug!(file, %commit, "already in the cache");
            return Ok(Some(pointer));
        }
        remove_entry(&pointer)?;
        let blob = cache.blob_path(meta.etag());
        if file_len(&blob) == Some(size) && link_blob(&blob, &pointer, file)? {
            tracing::debug!(file, %commit, "blob already in the cache");
            return Ok(Some(pointer));
        }
        // A leftover partial download longer than the file would make hf-hub fail.
        let mut part = blob.clone();
        part.set_extension("part");
        if file_len(&part).is_some_and(|len| len > size) {
            std::fs::remove_file(&part).map_err(|e| HubFetch::cache_error(&part, e))?;
        }
        let progress = LogProgress {
            repo: self.repo.to_string(),
            commit: commit.clone(),
        };
        let download = guard(|| {
            self.api
                .repo(self.pinned(&commit))
                .download_with_progress(file, progress)
        })
        .map_err(|p| self.protocol(file, p))?;
        let path = download.map_err(|err| {
            self.api_error(file, err).unwrap_or_else(|| {
                self.protocol(
                    file,
                    "the file vanished during the download (HTTP 404)".into(),
                )
            })
        })?;
        match file_len(&path) {
            Some(len) if len == size => Ok(Some(path)),
            len => {
                let _ = std::fs::remove_file(&blob);
                let _ = std::fs::remove_file(&path);
                Err(self.protocol(
                    file,
                    format!(
                        "downloaded {} bytes, the hub announced {size}",
                        len.unwrap_or_default()
                    ),
                ))
            }
        }
    }

    fn missing(&self, file: &str) -> SourceError {
        SourceError::FileNotFound {
            repo: self.repo.to_string(),
            revision: self.revision.to_string(),
            file: file.to_string(),
            endpoint: self.settings.endpoint.clone(),
            first_request: self.commit.is_none(),
        }
    }

    fn no_weights(&self) -> SourceError {
        SourceError::NoWeights {
            repo: self.repo.to_string(),
            revision: self.revision.to_string(),
            endpoint: self.settings.endpoint.clone(),
        }
    }

    fn snapshot(&self) -> Option<PathBuf> {
        let commit = self.commit.as_ref()?;
        Some(
            Cache::new(self.settings.cache_dir.clone())
                .repo(self.pinned(commit))
                .pointer_path(commit),
        )
    }

    fn repo(&self) -> &str {
        self.repo
    }

    fn revision(&self) -> &str {
        self.revision
    }
}

/// Reports downloads through `tracing` (the library never draws progress bars).
struct LogProgress {
    repo: String,
    commit: String,
}

impl Progress for LogProgress {
    fn init(&mut self, size: usize, filename: &str) {
        tracing::info!(repo = %self.repo, commit = %self.commit, file = filename, bytes = size, "downloading");
    }

    fn update(&mut self, _size: usize) {}

    fn finish(&mut self) {
        tracing::debug!(repo = %self.repo, commit = %self.commit, "download finished");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids() {
        for ok in ["org/name", "a/b", "Org_1/na.me-2", "_x/y_"] {
            assert!(validate_repo_id(ok).is_ok(), "{ok}");
        }
        for bad in [
            "name",
            "/name",
            "org/",
            "a/b/c",
            "org/na me",
            "org/-x",
            "org/x.",
            "o--g/x",
            "org/a..b",
            "org/x.git",
            "örg/x",
        ] {
            assert!(validate_repo_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn revisions() {
        for ok in [
            "main",
            "v1.0",
            "refs/pr/1",
            "0123456789abcdef0123456789abcdef01234567",
        ] {
            assert!(validate_revision(ok).is_ok(), "{ok}");
        }
        for bad in [
            "", "a b", "../x", "a//b", "x/", "/x", ".hidden", "x.lock", "a..b", "a?b",
        ] {
            assert!(validate_revision(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn repo_files() {
        assert!(validate_repo_file("model-00001-of-00002.safetensors").is_ok());
        assert!(validate_repo_file("sub/model.safetensors").is_ok());
        for bad in ["", "../x", "/abs", "a//b", "./x", "a b", "a\\b", "x?y"] {
            assert!(validate_repo_file(bad).is_err(), "{bad}");
        }
    }
}
