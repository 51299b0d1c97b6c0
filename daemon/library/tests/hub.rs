//! Hub ids resolved through `hf-hub` against a local fake of the Hugging Face hub.
//!
//! The fake speaks the hub's file-resolution protocol as `hf-hub` 0.5 uses it:
//! `GET /<org>/<name>/resolve/<revision>/<file>` with a `Range` header, answered with
//! `206`, `Content-Range`, `ETag` and `X-Repo-Commit`; `*.safetensors` files are "LFS"
//! files answered with a `302` to a CDN-like URL plus `X-Linked-Etag`, as the real hub
//! does; `404` for unknown revisions and files, `401` for unknown repos. Repos live in a
//! temp folder as `<org>/<name>/<revision>/<files>`. Nothing leaves 127.0.0.1, and every
//! test passes explicit `HubSettings` (no process environment is read or written).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use moerge_library::source::{resolve, HubSettings, ModelKind, Source, SourceError};
use tempfile::TempDir;

// ---------------------------------------------------------------------------------------
// Fixtures

fn fixtures() -> PathBuf {
    match std::env::var_os("MOERGE_FIXTURES") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    }
}

fn dev_phi() -> PathBuf {
    fixtures().join("dev-phi")
}

fn adapter_fixture(name: &str) -> PathBuf {
    dev_phi().join("adapters").join(name)
}

const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
const BASE_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// The commit hash the fake hub gives a revision of a repo (40 hex digits, like git's).
fn commit_of(repo: &str, revision: &str) -> String {
    blake3::hash(format!("{repo}@{revision}").as_bytes()).to_hex()[..40].to_string()
}

fn assert_same_files(resolved: &Path, source: &Path, files: &[&str]) {
    for file in files {
        let got = std::fs::read(resolved.join(file))
            .unwrap_or_else(|e| panic!("{}: {e}", resolved.join(file).display()));
        let want = std::fs::read(source.join(file)).unwrap();
        assert!(got == want, "{file} differs from {}", source.display());
    }
}

fn settings(endpoint: &str, cache: &Path) -> HubSettings {
    HubSettings {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        offline: false,
        token: None,
    }
}

fn offline(cache: &Path) -> HubSettings {
    HubSettings {
        offline: true,
        ..settings(&dead_endpoint(), cache)
    }
}

/// An address where nothing listens.
fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// Splits a safetensors file into two valid shards and the index naming them.
fn split_safetensors(bytes: &[u8]) -> (Vec<u8>, Vec<u8>, String) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let data = &bytes[8 + n..];
    let names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    assert!(names.len() >= 2, "the fixture has too few tensors to shard");
    let (first, second) = names.split_at(names.len() / 2);
    let shard_names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    let mut weight_map = serde_json::Map::new();
    let mut shards = Vec::new();
    for (names, shard_name) in [first, second].into_iter().zip(shard_names) {
        let mut out_header = serde_json::Map::new();
        let mut out_data = Vec::new();
        for name in names {
            let mut info = header[*name].clone();
            let offsets = info["data_offsets"].as_array().unwrap();
            let (start, end) = (
                offsets[0].as_u64().unwrap() as usize,
                offsets[1].as_u64().unwrap() as usize,
            );
            let new_start = out_data.len();
            out_data.extend_from_slice(&data[start..end]);
            info["data_offsets"] = serde_json::json!([new_start, out_data.len()]);
            out_header.insert((*name).clone(), info);
            weight_map.insert((*name).clone(), shard_name.into());
        }
        let mut header_bytes = serde_json::to_vec(&out_header).unwrap();
        let padded = header_bytes.len().div_ceil(8) * 8;
        header_bytes.resize(padded, b' ');
        let mut shard = (header_bytes.len() as u64).to_le_bytes().to_vec();
        shard.extend_from_slice(&header_bytes);
        shard.extend_from_slice(&out_data);
        shards.push(shard);
    }
    let index = serde_json::json!({
        "metadata": {"total_size": data.len()},
        "weight_map": weight_map,
    });
    let second = shards.pop().unwrap();
    let first = shards.pop().unwrap();
    (first, second, serde_json::to_string_pretty(&index).unwrap())
}

// ---------------------------------------------------------------------------------------
// The fake hub

#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A file download by hf-hub, as asked of the hub (metadata requests ask for
    /// `bytes=0-0`; an LFS download is then redirected to the CDN, not counted again).
    fn is_download(&self) -> bool {
        self.path.contains("/resolve/") && self.header("range").is_some_and(|r| r != "bytes=0-0")
    }
}

struct FakeHub {
    repos: TempDir,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    fn start() -> FakeHub {
        let repos = tempfile::tempdir().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let root = repos.path().to_path_buf();
            let seen = Arc::clone(&seen);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let root = root.clone();
                    let seen = Arc::clone(&seen);
                    std::thread::spawn(move || {
                        let _ = serve(stream, &root, addr, &seen);
                    });
                }
            })
        };
        FakeHub {
            repos,
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn revision_dir(&self, repo: &str, revision: &str) -> PathBuf {
        self.repos
            .path()
            .join(repo)
            .join(revision.replace('/', "%2F"))
    }

    fn add_file(&self, repo: &str, revision: &str, file: &str, bytes: &[u8]) {
        let path = self.revision_dir(repo, revision).join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn add_files(&self, repo: &str, revision: &str, from: &Path, files: &[&str]) {
        for file in files {
            self.add_file(
                repo,
                revision,
                file,
                &std::fs::read(from.join(file)).unwrap(),
            );
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

type Response = (u16, Vec<(String, String)>, Vec<u8>);

fn serve(
    stream: TcpStream,
    root: &Path,
    addr: SocketAddr,
    seen: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let request = Seen {
        method,
        path,
        headers,
    };
    seen.lock().unwrap().push(request.clone());

    let (status, headers, body) = route(&request, root, addr);
    let reason = match status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Whatever",
    };
    let mut out = format!("HTTP/1.1 {status} {reason}\r\n");
    for (name, value) in &headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    out.push_str(&format!(
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    ));
    let mut stream = stream;
    stream.write_all(out.as_bytes())?;
    if request.method != "HEAD" {
        stream.write_all(&body)?;
    }
    stream.flush()
}

fn error(status: u16, code: &str) -> Response {
    (
        status,
        vec![("X-Error-Code".into(), code.into())],
        code.as_bytes().to_vec(),
    )
}

/// The bytes of `data` that a `Range` header asks for.
fn ranged(range: Option<&str>, data: &[u8], mut headers: Vec<(String, String)>) -> Response {
    headers.push(("Accept-Ranges".into(), "bytes".into()));
    let Some(spec) = range.and_then(|r| r.strip_prefix("bytes=")) else {
        return (200, headers, data.to_vec());
    };
    let (start, end) = spec.split_once('-').unwrap();
    let start: usize = start.parse().unwrap();
    let end: usize = if end.is_empty() {
        data.len().saturating_sub(1)
    } else {
        end.parse::<usize>().unwrap().min(data.len() - 1)
    };
    if start >= data.len() || start > end {
        return error(416, "RangeNotSatisfiable");
    }
    headers.push((
        "Content-Range".into(),
        format!("bytes {start}-{end}/{}", data.len()),
    ));
    (206, headers, data[start..=end].to_vec())
}

fn route(request: &Seen, root: &Path, addr: SocketAddr) -> Response {
    if request.method != "GET" && request.method != "HEAD" {
        return error(405, "MethodNotAllowed");
    }
    let path = request.path.split('?').next().unwrap_or_default();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let range = request.header("range");

    // The "CDN" that LFS files redirect to: /cdn/<org>/<name>/<revision dir>/<file>.
    if segments.first() == Some(&"cdn") && segments.len() >= 5 {
        let file = root.join(segments[1..].join("/"));
        return match std::fs::read(file) {
            Ok(data) => ranged(range, &data, vec![]),
            Err(_) => error(404, "NoSuchKey"),
        };
    }

    // /<org>/<name>/resolve/<revision>/<file>
    if segments.len() < 5 || segments[2] != "resolve" {
        return error(404, "NotFound");
    }
    let repo = format!("{}/{}", segments[0], segments[1]);
    let repo_dir = root.join(&repo);
    if segments[0].contains("..") || segments[1].contains("..") || !repo_dir.is_dir() {
        // The hub answers 401 for repos it does not know (they might be private).
        return error(401, "RepositoryNotFound");
    }
    // A revision is a folder (named with %2F for '/', as hf-hub sends it) or its commit.
    let asked = segments[3];
    let revision_dir = std::fs::read_dir(&repo_dir)
        .unwrap()
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .find(|dir| dir == asked || commit_of(&repo, &dir.replace("%2F", "/")) == asked);
    let Some(revision_dir) = revision_dir else {
        return error(404, "RevisionNotFound");
    };
    let commit = commit_of(&repo, &revision_dir.replace("%2F", "/"));
    let file = segments[4..].join("/");
    if file.split('/').any(|part| part == ".." || part.is_empty()) {
        return error(404, "EntryNotFound");
    }
    let Ok(data) = std::fs::read(repo_dir.join(&revision_dir).join(&file)) else {
        let (status, mut headers, body) = error(404, "EntryNotFound");
        headers.push(("X-Repo-Commit".into(), commit));
        return (status, headers, body);
    };
    let hash = blake3::hash(&data).to_hex().to_string();
    if file.ends_with(".safetensors") {
        // LFS: the hub redirects to storage elsewhere and names the blob in X-Linked-Etag.
        let location = format!("http://{addr}/cdn/{repo}/{revision_dir}/{file}");
        let headers = vec![
            ("Location".into(), location),
            ("X-Repo-Commit".into(), commit),
            ("X-Linked-Etag".into(), format!("\"{hash}\"")),
            ("X-Linked-Size".into(), data.len().to_string()),
            ("ETag".into(), format!("\"{}\"", &hash[..40])),
        ];
        return (302, headers, Vec::new());
    }
    let headers = vec![
        ("X-Repo-Commit".into(), commit),
        ("ETag".into(), format!("\"{}\"", &hash[..40])),
    ];
    ranged(range, &data, headers)
}

// ---------------------------------------------------------------------------------------
// Tests

#[test]
fn adapter_online_then_from_cache_offline() {
    let hub = FakeHub::start();
    let source = adapter_fixture("swapcase");
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
    let source = adapter_fixture("swapcase");
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
fn revision_is_pinned() {
    let hub = FakeHub::start();
    hub.add_files(
        "moerge-test/adapter",
        "main",
        &adapter_fixture("swapcase"),
        &ADAPTER_FILES,
    );
    let rot13 = adapter_fixture("rot13");
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
fn missing_files_are_named() {
    let hub = FakeHub::start();
    let source = adapter_fixture("swapcase");
    hub.add_files(
        "moerge-test/half",
        "main",
        &source,
        &["adapter_config.json"],
    );
    hub.add_files("moerge-test/nobase", "main", &dev_phi(), &["config.json"]);
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
    let source = adapter_fixture("swapcase");
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
fn single_file_base() {
    let hub = FakeHub::start();
    hub.add_files("moerge-test/dev-phi", "main", &dev_phi(), &BASE_FILES);
    let cache = tempfile::tempdir().unwrap();
    let dir = resolve(
        "moerge-test/dev-phi",
        ModelKind::Base,
        &settings(&hub.endpoint(), cache.path()),
    )
    .unwrap();
    assert_same_files(&dir, &dev_phi(), &BASE_FILES);
    assert!(!hub
        .seen()
        .iter()
        .any(|s| s.path.ends_with("model.safetensors.index.json")));
}

#[test]
fn sharded_base_fetches_every_shard() {
    let hub = FakeHub::start();
    let repo = "moerge-test/dev-phi-sharded";
    hub.add_files(repo, "main", &dev_phi(), &["config.json", "tokenizer.json"]);
    let (first, second, index) =
        split_safetensors(&std::fs::read(dev_phi().join("model.safetensors")).unwrap());
    hub.add_file(repo, "main", "model-00001-of-00002.safetensors", &first);
    hub.add_file(repo, "main", "model-00002-of-00002.safetensors", &second);
    hub.add_file(
        repo,
        "main",
        "model.safetensors.index.json",
        index.as_bytes(),
    );
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
    let source = adapter_fixture("swapcase");
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

#[test]
fn local_path_wins_over_hub_id() {
    // A folder whose relative path is also a well-formed hub id.
    let here = std::env::current_dir().unwrap();
    let parent = tempfile::Builder::new()
        .prefix("moerge-hubtest-")
        .tempdir_in(&here)
        .unwrap();
    let folder = parent.path().join("adapter");
    std::fs::create_dir(&folder).unwrap();
    let spec = format!(
        "{}/adapter",
        parent.path().file_name().unwrap().to_str().unwrap()
    );

    let cache = tempfile::tempdir().unwrap();
    let unreachable = settings(&dead_endpoint(), cache.path());
    assert_eq!(
        Source::parse(&spec).unwrap(),
        Source::Local(PathBuf::from(&spec))
    );
    let dir = resolve(&spec, ModelKind::Adapter, &unreachable).unwrap();
    assert_eq!(dir, PathBuf::from(&spec));

    // Absolute paths, and a local file where a folder is expected.
    let abs = resolve(
        folder.to_str().unwrap(),
        ModelKind::Base,
        &offline(cache.path()),
    )
    .unwrap();
    assert_eq!(abs, folder);
    let file = adapter_fixture("swapcase").join("adapter_config.json");
    let err = resolve(file.to_str().unwrap(), ModelKind::Adapter, &unreachable).unwrap_err();
    assert!(matches!(err, SourceError::NotAFolder { .. }), "{err:?}");

    drop(parent);
    assert_eq!(
        Source::parse(&spec).unwrap(),
        Source::Hub {
            repo: spec.clone(),
            revision: "main".to_string()
        }
    );
}

#[test]
fn hub_ids_are_parsed_and_malformed_ones_rejected() {
    assert_eq!(
        Source::parse("org-1/name_2.x@v1.0").unwrap(),
        Source::Hub {
            repo: "org-1/name_2.x".into(),
            revision: "v1.0".into()
        }
    );
    assert_eq!(
        Source::parse("org/name@refs/pr/3").unwrap(),
        Source::Hub {
            repo: "org/name".into(),
            revision: "refs/pr/3".into()
        }
    );
    assert_eq!(
        Source::parse("org/name").unwrap().to_string(),
        "org/name@main"
    );

    for bad in [
        "",
        "name-without-org",
        "org/",
        "/org",
        "/definitely/not/a/folder",
        "org/name/extra",
        "org/na me",
        "org/name@",
        "org/name@a..b",
        "org/name@v1@v2",
        "org//name",
        "org/-name",
        "org/name.git",
        "org--x/name",
        "https://huggingface.co/org/name",
        "./not-here",
    ] {
        let err = Source::parse(bad).unwrap_err();
        assert!(
            matches!(err, SourceError::InvalidSpec { .. }),
            "{bad}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("not an existing folder") && message.contains("hub id"),
            "{bad}: {message}"
        );
    }
    let long = format!("org/{}", "x".repeat(100));
    assert!(Source::parse(&long).is_err());
}

#[test]
fn settings_from_variables() {
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().join("hf");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_from_file\n").unwrap();

    let vars = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let from =
        |map: BTreeMap<String, String>| HubSettings::from_lookup(|name| map.get(name).cloned());
    let home_str = home.path().to_str().unwrap();

    let defaults = from(vars(&[("HOME", home_str)]));
    assert_eq!(defaults.endpoint, "https://huggingface.co");
    assert_eq!(
        defaults.cache_dir,
        home.path().join(".cache/huggingface/hub")
    );
    assert!(!defaults.offline);
    assert_eq!(defaults.token, None);

    let hf_home_str = hf_home.to_str().unwrap();
    let set = from(vars(&[
        ("HOME", home_str),
        ("HF_HOME", hf_home_str),
        ("HF_ENDPOINT", "http://mirror.example/"),
        ("HF_HUB_OFFLINE", "True"),
    ]));
    assert_eq!(set.endpoint, "http://mirror.example");
    assert_eq!(set.cache_dir, hf_home.join("hub"));
    assert!(set.offline);
    assert_eq!(set.token.as_deref(), Some("hf_from_file"));
    assert!(!format!("{set:?}").contains("hf_from_file"));

    let explicit = from(vars(&[
        ("HOME", home_str),
        ("HF_HOME", hf_home_str),
        ("HF_HUB_CACHE", "~/elsewhere"),
        ("HF_TOKEN", "hf_from_env"),
        ("HF_HUB_OFFLINE", "0"),
    ]));
    assert_eq!(explicit.cache_dir, home.path().join("elsewhere"));
    assert_eq!(explicit.token.as_deref(), Some("hf_from_env"));
    assert!(!explicit.offline);

    let xdg = from(vars(&[("HOME", home_str), ("XDG_CACHE_HOME", "/xdg")]));
    assert_eq!(xdg.cache_dir, Path::new("/xdg/huggingface/hub"));
    for on in ["1", "yes", "ON", "true"] {
        assert!(from(vars(&[("HOME", home_str), ("HF_HUB_OFFLINE", on)])).offline);
    }
}
