//! What each failure to resolve a hub id says: files missing from the hub or the cache, an
//! unknown repo or revision, pickle-only weights, an unreachable hub, a bad endpoint. The
//! messages name the repo, revision and file, and what to do.

mod fake_hub;
mod support;

use fake_hub::{
    assert_same_files, commit_of, dead_endpoint, offline, settings, FakeHub, ADAPTER_FILES,
};
use moerge_library::source::{resolve, ModelKind, SourceError};

#[test]
fn offline_with_empty_cache_names_repo_revision_and_file() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve(
        "moerge-test/absent@v3",
        ModelKind::Adapter,
        &offline(cache.path()),
    )
    .unwrap_err();
    assert!(matches!(err, SourceError::NotInCache { .. }), "{err:?}");
    let message = err.to_string();
    for needle in [
        "moerge-test/absent",
        "v3",
        "adapter_config.json",
        "HF_HUB_OFFLINE",
        "online",
        &cache.path().display().to_string(),
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }
}

#[test]
fn offline_with_partial_cache_names_the_missing_file() {
    let hub = FakeHub::start();
    let source = support::adapter_dir("dev-phi", "swapcase");
    hub.add_files("moerge-test/swapcase", "main", &source, &ADAPTER_FILES);
    let cache = tempfile::tempdir().unwrap();
    resolve(
        "moerge-test/swapcase",
        ModelKind::Adapter,
        &settings(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    let snapshot = cache
        .path()
        .join("models--moerge-test--swapcase/snapshots")
        .join(commit_of("moerge-test/swapcase", "main"));
    std::fs::remove_file(snapshot.join("adapter_model.safetensors")).unwrap();

    let err = resolve(
        "moerge-test/swapcase",
        ModelKind::Adapter,
        &offline(cache.path()),
    )
    .unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("adapter_model.safetensors")
            && message.contains("moerge-test/swapcase@main"),
        "{message}"
    );

    // Online, the missing snapshot entry is restored from the blob without a download.
    let before = hub.seen().iter().filter(|s| s.is_download()).count();
    let dir = resolve(
        "moerge-test/swapcase",
        ModelKind::Adapter,
        &settings(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    assert_same_files(&dir, &source, &ADAPTER_FILES);
    assert_eq!(
        hub.seen().iter().filter(|s| s.is_download()).count(),
        before
    );
}

#[test]
fn missing_files_are_named() {
    let hub = FakeHub::start();
    let source = support::adapter_dir("dev-phi", "swapcase");
    hub.add_files(
        "moerge-test/half",
        "main",
        &source,
        &["adapter_config.json"],
    );
    hub.add_files(
        "moerge-test/nobase",
        "main",
        &support::base_dir("dev-phi"),
        &["config.json"],
    );
    let cache = tempfile::tempdir().unwrap();
    let online = settings(&hub.endpoint(), cache.path());

    let err = resolve("moerge-test/half", ModelKind::Adapter, &online).unwrap_err();
    assert!(
        matches!(err, SourceError::FileNotFound { ref file, .. } if file == "adapter_model.safetensors"),
        "{err:?}"
    );
    let message = err.to_string();
    for needle in [
        "moerge-test/half",
        "main",
        "adapter_model.safetensors",
        &hub.endpoint(),
        "404",
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }

    let err = resolve("moerge-test/nobase", ModelKind::Base, &online).unwrap_err();
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    // An unknown revision: the first file is missing, and the message says to check it.
    let err = resolve("moerge-test/half@nope", ModelKind::Adapter, &online).unwrap_err();
    let message = err.to_string();
    assert!(
        message.contains("adapter_config.json") && message.contains("revision"),
        "{message}"
    );

    // An unknown repo: the hub says 401, and the message says what to do.
    let err = resolve("moerge-test/unknown", ModelKind::Adapter, &online).unwrap_err();
    assert!(
        matches!(err, SourceError::Unauthorized { status: 401, .. }),
        "{err:?}"
    );
    assert!(err.to_string().contains("HF_TOKEN"), "{err}");
}

#[test]
fn pickle_only_adapter_is_refused_without_downloading_it() {
    let hub = FakeHub::start();
    let source = support::adapter_dir("dev-phi", "swapcase");
    hub.add_files(
        "moerge-test/pickle",
        "main",
        &source,
        &["adapter_config.json"],
    );
    hub.add_file(
        "moerge-test/pickle",
        "main",
        "adapter_model.bin",
        b"not really a pickle",
    );
    let cache = tempfile::tempdir().unwrap();

    let err = resolve(
        "moerge-test/pickle",
        ModelKind::Adapter,
        &settings(&hub.endpoint(), cache.path()),
    )
    .unwrap_err();
    assert!(matches!(err, SourceError::PickleOnly { .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("adapter_model.bin")
            && message.contains("pickle")
            && message.contains("moerge-test/pickle"),
        "{message}"
    );
    assert!(
        !hub.seen()
            .iter()
            .any(|s| s.is_download() && s.path.contains("adapter_model.bin")),
        "{:#?}",
        hub.seen()
    );
}

#[test]
fn unreachable_hub_with_empty_cache_says_what_to_do() {
    let cache = tempfile::tempdir().unwrap();
    let endpoint = dead_endpoint();
    let err = resolve(
        "moerge-test/swapcase",
        ModelKind::Adapter,
        &settings(&endpoint, cache.path()),
    )
    .unwrap_err();
    assert!(matches!(err, SourceError::Network { .. }), "{err:?}");
    let message = err.to_string();
    for needle in [
        endpoint.as_str(),
        "moerge-test/swapcase",
        "adapter_config.json",
        "HF_ENDPOINT",
        "HF_HUB_OFFLINE=1",
    ] {
        assert!(message.contains(needle), "{needle:?} not in: {message}");
    }

    let err = resolve(
        "moerge-test/swapcase",
        ModelKind::Adapter,
        &settings("huggingface.co", cache.path()),
    )
    .unwrap_err();
    assert!(
        matches!(err, SourceError::InvalidEndpoint { .. }),
        "{err:?}"
    );
}
