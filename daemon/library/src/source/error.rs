//! [`SourceError`]: every way resolving a location can fail, each message naming what to fix.

use std::io;
use std::path::PathBuf;

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

impl SourceError {
    /// A failure reading or writing the cache at `path`.
    pub(super) fn cache(path: impl Into<PathBuf>, error: io::Error) -> SourceError {
        SourceError::Cache {
            path: path.into(),
            error,
        }
    }
}
