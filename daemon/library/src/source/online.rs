//! Fetching from the hub through `hf-hub`, every file pinned to the commit the first one
//! resolved to, and `hf-hub`'s errors (and panics) turned into [`SourceError`]s.

use std::io;
use std::path::PathBuf;

use hf_hub::api::sync::{Api, ApiBuilder, ApiError, Metadata};
use hf_hub::api::Progress;
use hf_hub::{Cache, Repo, RepoType};

use super::cache::{file_len, reuse_or_clear};
use super::fetch::{Fetch, Target};
use super::spec::is_safe_component;
use super::{HubSettings, SourceError};

/// Fetching through `hf-hub`, pinned to the commit the first file resolved to.
pub(super) struct HubFetch<'a> {
    target: Target<'a>,
    api: Api,
}

impl<'a> HubFetch<'a> {
    pub(super) fn new(
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
        let target = Target::new(repo, revision, settings);
        let api = ApiBuilder::from_cache(Cache::new(settings.cache_dir.clone()))
            .with_endpoint(endpoint)
            // `from_cache` read a token file next to the cache; the settings decide.
            .with_token(settings.token.clone())
            .with_progress(false)
            .with_retries(3)
            .with_user_agent("moerge", env!("CARGO_PKG_VERSION"))
            .build()
            .map_err(|e| protocol(&target, "", format!("cannot build the HTTP client: {e}")))?;
        Ok(HubFetch { target, api })
    }

    fn pinned(&self, revision: &str) -> Repo {
        Repo::with_revision(
            self.target.repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        )
    }

    fn protocol(&self, file: &str, detail: String) -> SourceError {
        protocol(&self.target, file, detail)
    }

    /// The file's metadata (`None` on 404), pinning the commit on the first call.
    fn metadata(&mut self, file: &str) -> Result<Option<Metadata>, SourceError> {
        let asked = self
            .target
            .commit
            .as_deref()
            .unwrap_or(self.target.revision);
        let url = self.api.repo(self.pinned(asked)).url(file);
        tracing::debug!(%url, "resolving");
        let meta = match guard(|| self.api.metadata(&url)).map_err(|p| self.protocol(file, p))? {
            Ok(meta) => meta,
            Err(err) => return self.api_error(file, err).map_or(Ok(None), Err),
        };
        let commit = meta.commit_hash().trim().to_string();
        if !is_safe_component(&commit) {
            return Err(self.protocol(file, format!("bad x-repo-commit header '{commit}'")));
        }
        if !is_safe_component(meta.etag()) {
            return Err(self.protocol(file, format!("bad etag '{}'", meta.etag())));
        }
        match &self.target.commit {
            Some(pinned) if *pinned != commit => {
                return Err(self.protocol(
                    file,
                    format!("asked for commit {pinned}, the answer is for commit {commit}"),
                ))
            }
            Some(_) => {}
            None => self.target.commit = Some(commit),
        }
        Ok(Some(meta))
    }

    /// Maps an `hf-hub` error; `None` for a 404 (the file is absent).
    fn api_error(&self, file: &str, err: ApiError) -> Option<SourceError> {
        let repo = self.target.repo.to_string();
        let revision = self.target.revision.to_string();
        let file = file.to_string();
        let settings = self.target.settings;
        let endpoint = settings.endpoint.clone();
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
                        token_sent: settings.token.is_some(),
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
            ApiError::IoError(error) => SourceError::cache(&settings.cache_dir, error),
            ApiError::LockAcquisition(path) => SourceError::cache(
                path,
                io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "another process is downloading this file; try again when it is done",
                ),
            ),
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

impl Fetch for HubFetch<'_> {
    fn target(&self) -> &Target<'_> {
        &self.target
    }

    fn probe(&mut self, file: &str) -> Result<bool, SourceError> {
        Ok(self.metadata(file)?.is_some())
    }

    fn fetch(&mut self, file: &str) -> Result<Option<PathBuf>, SourceError> {
        let Some(meta) = self.metadata(file)? else {
            return Ok(None);
        };
        let commit = meta.commit_hash().trim().to_string();
        let size = meta.size() as u64;
        if let Some(path) = reuse_or_clear(&self.target.cache, &commit, file, meta.etag(), size)? {
            return Ok(Some(path));
        }
        let progress = LogProgress {
            repo: self.target.repo.to_string(),
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
                let _ = std::fs::remove_file(self.target.cache.blob_path(meta.etag()));
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
            repo: self.target.repo.to_string(),
            revision: self.target.revision.to_string(),
            file: file.to_string(),
            endpoint: self.target.settings.endpoint.clone(),
            first_request: self.target.commit.is_none(),
        }
    }

    fn no_weights(&self) -> SourceError {
        SourceError::NoWeights {
            repo: self.target.repo.to_string(),
            revision: self.target.revision.to_string(),
            endpoint: self.target.settings.endpoint.clone(),
        }
    }
}

/// An answer from the hub (or `hf-hub`) that this client does not understand.
fn protocol(target: &Target<'_>, file: &str, detail: String) -> SourceError {
    SourceError::Protocol {
        repo: target.repo.to_string(),
        revision: target.revision.to_string(),
        file: file.to_string(),
        endpoint: target.settings.endpoint.clone(),
        detail,
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
