//! Hub ids resolved through `hf-hub` against a local fake of the Hugging Face hub
//! (`fake_hub`): what is downloaded, where it lands in the cache, which commit it comes
//! from, and what is reused offline or when the hub is gone.

mod fake_hub;
mod support;

use std::path::Path;

use fake_hub::{
    assert_same_files, commit_of, offline, settings, FakeHub, Seen, ADAPTER_FILES, BASE_FILES,
};
use moerge_library::source::{resolve, HubSettings, ModelKind, SourceError};
use serde_json::json;

/// Writes the dev-phi weights into `dir` as two valid shards and the index naming them.
fn write_shards(dir: &Path) {
    let weights = support::base_dir("dev-phi").join("model.safetensors");
    let tensors = support::read_tensors(&weights);
    assert!(
        tensors.len() >= 2,
        "the fixture has too few tensors to shard"
    );
    let (first, second) = tensors.split_at(tensors.len() / 2);
    let shard_names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    std::fs::create_dir_all(dir).unwrap();
    let mut weight_map = serde_json::Map::new();
    for (shard, name) in [first, second].into_iter().zip(shard_names) {
        support::write_tensors(&dir.join(name), shard);
        for tensor in shard {
            weight_map.insert(tensor.name.clone(), name.into());
        }
    }
    let total_size: usize = tensors.iter().map(|t| t.data.len()).sum();
    support::write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {"total_size": total_size}, "weight_map": weight_map}),
    );
}

#[test]
fn adapter_online_then_from_cache_offline() {
    let hub = FakeHub::start();
    let source = support::adapter_dir("dev-phi", "swapcase");
    hub.add_files("moerge-test/swapcase", "main", &source, &ADAPTER_FILES);
    let cache = tempfile::tempdir().unwrap();

    let online = settings(&hub.endpoint(), cache.path());
    let dir = resolve("moerge-test/swapcase", ModelKind::Adapter, &online).unwrap();
    assert_same_files(&dir, &source, &ADAPTER_FILES);

    // The standard cache layout, shared with huggingface_hub.
    let commit = commit_of("moerge-test/swapcase", "main");
    let repo_dir = cache.path().join("models--moerge-test--swapcase");
    assert_eq!(dir, repo_dir.join("snapshots").join(&commit));
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/main")).unwrap(),
        commit
    );
    let config = dir.join("adapter_config.json");
    assert!(std::fs::symlink_metadata(&config)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::canonicalize(&config)
        .unwrap()
        .starts_with(repo_dir.join("blobs").canonicalize().unwrap()));
    let downloads = hub.seen().iter().filter(|s| s.is_download()).count();
    assert_eq!(downloads, 2, "{:#?}", hub.seen());

    // Online again: checked with the hub, nothing downloaded twice.
    let again = resolve("moerge-test/swapcase", ModelKind::Adapter, &online).unwrap();
    assert_eq!(again, dir);
    let downloads = hub.seen().iter().filter(|s| s.is_download()).count();
    assert_eq!(downloads, 2, "{:#?}", hub.seen());

    // The hub is gone: offline mode serves the same folder from the cache.
    let endpoint = hub.endpoint();
    drop(hub);
    let from_cache = resolve(
        "moerge-test/swapcase",
        ModelKind::Adapter,
        &HubSettings {
            offline: true,
            ..settings(&endpoint, cache.path())
        },
    )
    .unwrap();
    assert_eq!(from_cache, dir);
    assert_same_files(&from_cache, &source, &ADAPTER_FILES);

    // Not offline, but the hub cannot be reached: the complete cached copy is used.
    let fallback = resolve(
        "moerge-test/swapcase",
        ModelKind::Adapter,
        &settings(&endpoint, cache.path()),
    )
    .unwrap();
    assert_eq!(fallback, dir);
}

#[test]
fn revision_is_pinned() {
    let hub = FakeHub::start();
    hub.add_files(
        "moerge-test/adapter",
        "main",
        &support::adapter_dir("dev-phi", "swapcase"),
        &ADAPTER_FILES,
    );
    let rot13 = support::adapter_dir("dev-phi", "rot13");
    hub.add_files("moerge-test/adapter", "v2", &rot13, &ADAPTER_FILES);
    let cache = tempfile::tempdir().unwrap();

    let dir = resolve(
        "moerge-test/adapter@v2",
        ModelKind::Adapter,
        &settings(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    assert_same_files(&dir, &rot13, &ADAPTER_FILES);
    let commit = commit_of("moerge-test/adapter", "v2");
    assert_eq!(dir.file_name().unwrap().to_str().unwrap(), commit);
    let repo_dir = cache.path().join("models--moerge-test--adapter");
    assert_eq!(
        std::fs::read_to_string(repo_dir.join("refs/v2")).unwrap(),
        commit
    );
    assert!(!repo_dir.join("refs/main").exists());

    // The hub saw the revision; the other files were fetched at the commit it resolved to.
    let paths: Vec<String> = hub.seen().into_iter().map(|s| s.path).collect();
    assert!(
        paths.contains(&"/moerge-test/adapter/resolve/v2/adapter_config.json".to_string()),
        "{paths:#?}"
    );
    assert!(
        paths.contains(&format!(
            "/moerge-test/adapter/resolve/{commit}/adapter_model.safetensors"
        )),
        "{paths:#?}"
    );
    assert!(
        !paths.iter().any(|p| p.contains("/resolve/main/")),
        "{paths:#?}"
    );

    // Offline: v2 is cached, main is not.
    let cached = resolve(
        "moerge-test/adapter@v2",
        ModelKind::Adapter,
        &offline(cache.path()),
    )
    .unwrap();
    assert_eq!(cached, dir);
    let err = resolve(
        "moerge-test/adapter",
        ModelKind::Adapter,
        &offline(cache.path()),
    )
    .unwrap_err();
    assert!(matches!(err, SourceError::NotInCache { .. }), "{err:?}");

    // A commit hash is a revision too, and works offline once cached.
    let by_commit = format!("moerge-test/adapter@{commit}");
    let pinned = resolve(&by_commit, ModelKind::Adapter, &offline(cache.path())).unwrap();
    assert_eq!(pinned, dir);
}

#[test]
fn single_file_base() {
    let hub = FakeHub::start();
    hub.add_files(
        "moerge-test/dev-phi",
        "main",
        &support::base_dir("dev-phi"),
        &BASE_FILES,
    );
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve(
        "moerge-test/dev-phi",
        ModelKind::Base,
        &settings(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    assert_same_files(&dir, &support::base_dir("dev-phi"), &BASE_FILES);
    assert!(!hub
        .seen()
        .iter()
        .any(|s| s.path.ends_with("model.safetensors.index.json")));
}

#[test]
fn sharded_base_fetches_every_shard() {
    let hub = FakeHub::start();
    let repo = "moerge-test/dev-phi-sharded";
    hub.add_files(
        repo,
        "main",
        &support::base_dir("dev-phi"),
        &["config.json", "tokenizer.json"],
    );
    write_shards(&hub.revision_dir(repo, "main"));
    let cache = tempfile::tempdir().unwrap();

    let dir = resolve(
        repo,
        ModelKind::Base,
        &settings(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    let served = hub.revision_dir(repo, "main");
    assert_same_files(
        &dir,
        &served,
        &[
            "config.json",
            "tokenizer.json",
            "model.safetensors.index.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
        ],
    );
    assert!(!dir.join("model.safetensors").exists());

    // And offline, the index read from the cache names shards that are all there.
    let cached = resolve(repo, ModelKind::Base, &offline(cache.path())).unwrap();
    assert_eq!(cached, dir);
    std::fs::remove_file(dir.join("model-00002-of-00002.safetensors")).unwrap();
    let err = resolve(repo, ModelKind::Base, &offline(cache.path())).unwrap_err();
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );
}

#[test]
fn token_is_sent_as_bearer() {
    let hub = FakeHub::start();
    let source = support::adapter_dir("dev-phi", "swapcase");
    hub.add_files("moerge-test/private", "main", &source, &ADAPTER_FILES);
    let cache = tempfile::tempdir().unwrap();

    let with_token = HubSettings {
        token: Some("hf_test_token".to_string()),
        ..settings(&hub.endpoint(), cache.path())
    };
    resolve("moerge-test/private", ModelKind::Adapter, &with_token).unwrap();
    let seen = hub.seen();
    let hub_requests: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.path.contains("/resolve/"))
        .collect();
    assert!(!hub_requests.is_empty());
    for request in hub_requests {
        assert_eq!(
            request.header("authorization"),
            Some("Bearer hf_test_token"),
            "{request:?}"
        );
    }

    let hub2 = FakeHub::start();
    hub2.add_files("moerge-test/public", "main", &source, &ADAPTER_FILES);
    resolve(
        "moerge-test/public",
        ModelKind::Adapter,
        &settings(&hub2.endpoint(), cache.path()),
    )
    .unwrap();
    assert!(hub2
        .seen()
        .iter()
        .all(|s| s.header("authorization").is_none()));
}
