//! The files a [`ModelKind`] needs, gathered through one [`Fetch`]: online through `hf-hub`
//! or from the cache only. Both ways share a [`Target`]: the repo revision asked for, its
//! folder in the cache, and the commit the files come from once it is known.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use hf_hub::{Cache, CacheRepo, Repo, RepoType};

use super::spec::validate_repo_file;
use super::{HubSettings, ModelKind, SourceError};

const INDEX: &str = "model.safetensors.index.json";

/// One repo revision being resolved.
pub(super) struct Target<'a> {
    /// `org/name`.
    pub(super) repo: &'a str,
    /// The revision asked for.
    pub(super) revision: &'a str,
    pub(super) settings: &'a HubSettings,
    /// `models--org--name` in the cache; its ref is the one named `revision`.
    pub(super) cache: CacheRepo,
    /// The commit every file comes from, once the first one is found.
    pub(super) commit: Option<String>,
}

impl<'a> Target<'a> {
    pub(super) fn new(repo: &'a str, revision: &'a str, settings: &'a HubSettings) -> Self {
        let cache = Cache::new(settings.cache_dir.clone()).repo(Repo::with_revision(
            repo.to_string(),
            RepoType::Model,
            revision.to_string(),
        ));
        Target {
            repo,
            revision,
            settings,
            cache,
            commit: None,
        }
    }

    /// The snapshot folder of the commit, once known.
    pub(super) fn snapshot(&self) -> Option<PathBuf> {
        self.commit.as_ref().map(|c| self.cache.pointer_path(c))
    }

    /// Points `refs/<revision>` at the commit (what later offline lookups read).
    pub(super) fn write_ref(&self) -> Result<(), SourceError> {
        match &self.commit {
            // A revision that is the commit itself needs no ref pointing at it.
            Some(commit) if commit != self.revision => self
                .cache
                .create_ref(commit)
                .map_err(|error| SourceError::cache(&self.settings.cache_dir, error)),
            _ => Ok(()),
        }
    }
}

/// One way of getting files of one repo revision into a snapshot folder.
pub(super) trait Fetch {
    fn target(&self) -> &Target<'_>;
    /// The file's local path, or `None` if the repo (or cache) does not have it.
    fn fetch(&mut self, file: &str) -> Result<Option<PathBuf>, SourceError>;
    /// Whether the repo (or cache) has the file, without downloading it.
    fn probe(&mut self, file: &str) -> Result<bool, SourceError>;
    /// The error for a required file that is absent.
    fn missing(&self, file: &str) -> SourceError;
    /// The error for base weights that are absent.
    fn no_weights(&self) -> SourceError;
}

/// Gets every file `kind` needs and returns the snapshot folder holding them.
pub(super) fn collect(kind: ModelKind, fetch: &mut dyn Fetch) -> Result<PathBuf, SourceError> {
    match kind {
        ModelKind::Adapter => {
            require(fetch, "adapter_config.json")?;
            if fetch.fetch("adapter_model.safetensors")?.is_none() {
                let missing = fetch.missing("adapter_model.safetensors");
                return Err(pickle_or(
                    fetch,
                    "adapter_model.bin",
                    "adapter_model.safetensors",
                    missing,
                ));
            }
        }
        ModelKind::Base => {
            require(fetch, "config.json")?;
            require(fetch, "tokenizer.json")?;
            if fetch.fetch("model.safetensors")?.is_none() {
                let Some(index) = fetch.fetch(INDEX)? else {
                    let no_weights = fetch.no_weights();
                    return Err(pickle_or(
                        fetch,
                        "pytorch_model.bin",
                        "model.safetensors",
                        no_weights,
                    ));
                };
                for shard in shards(fetch.target(), &index)? {
                    require(fetch, &shard)?;
                }
            }
        }
    }
    // Every successful path above fetched at least one file.
    fetch
        .target()
        .snapshot()
        .ok_or_else(|| fetch.missing("(any file)"))
}

fn require(fetch: &mut dyn Fetch, file: &str) -> Result<PathBuf, SourceError> {
    fetch.fetch(file)?.ok_or_else(|| fetch.missing(file))
}

/// The error for absent safetensors weights: pickle-only if the repo has `pickle` (which
/// is only probed, never downloaded), else `otherwise`.
fn pickle_or(
    fetch: &mut dyn Fetch,
    pickle: &str,
    wanted: &str,
    otherwise: SourceError,
) -> SourceError {
    match fetch.probe(pickle) {
        Ok(true) => SourceError::PickleOnly {
            repo: fetch.target().repo.to_string(),
            revision: fetch.target().revision.to_string(),
            file: pickle.to_string(),
            wanted: wanted.to_string(),
        },
        Ok(false) => otherwise,
        Err(err) => err,
    }
}

/// The shard files named by the `model.safetensors.index.json` at `index`, sorted and
/// deduplicated.
fn shards(target: &Target<'_>, index: &Path) -> Result<BTreeSet<String>, SourceError> {
    let bad = |reason: String| SourceError::BadIndex {
        repo: target.repo.to_string(),
        revision: target.revision.to_string(),
        file: INDEX.to_string(),
        reason,
    };
    let text = std::fs::read_to_string(index).map_err(|e| SourceError::cache(index, e))?;
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
