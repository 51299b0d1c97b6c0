//! A local fake of the Hugging Face hub for the hub tests, and the helpers they share.
//!
//! The fake speaks the hub's file-resolution protocol as `hf-hub` 0.5 uses it
//! (see `protocol.rs`). Repos live in a temp folder as `<org>/<name>/<revision>/<files>`.
//! Nothing leaves 127.0.0.1, and every test passes explicit `HubSettings` (no process
//! environment is read or written).
#![allow(dead_code)] // Each test binary uses a different part of this module.

mod protocol;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use moerge_library::source::HubSettings;
use tempfile::TempDir;

pub const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
pub const BASE_FILES: [&str; 3] = ["config.json", "tokenizer.json", "model.safetensors"];

/// The commit hash the fake hub gives a revision of a repo (40 hex digits, like git's).
pub fn commit_of(repo: &str, revision: &str) -> String {
    blake3::hash(format!("{repo}@{revision}").as_bytes()).to_hex()[..40].to_string()
}

pub fn settings(endpoint: &str, cache: &Path) -> HubSettings {
    HubSettings {
        endpoint: endpoint.to_string(),
        cache_dir: cache.to_path_buf(),
        offline: false,
        token: None,
    }
}

pub fn offline(cache: &Path) -> HubSettings {
    HubSettings {
        offline: true,
        ..settings(&dead_endpoint(), cache)
    }
}

/// An address where nothing listens.
pub fn dead_endpoint() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

pub fn assert_same_files(resolved: &Path, source: &Path, files: &[&str]) {
    for file in files {
        let got = std::fs::read(resolved.join(file))
            .unwrap_or_else(|e| panic!("{}: {e}", resolved.join(file).display()));
        let want = std::fs::read(source.join(file)).unwrap();
        assert!(got == want, "{file} differs from {}", source.display());
    }
}

/// A request the fake hub received (header names in lower case).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A file download by hf-hub, as asked of the hub (metadata requests ask for
    /// `bytes=0-0`; an LFS download is then redirected to the CDN, not counted again).
    pub fn is_download(&self) -> bool {
        self.path.contains("/resolve/") && self.header("range").is_some_and(|r| r != "bytes=0-0")
    }
}

/// The fake hub, answering on 127.0.0.1 until dropped.
pub struct FakeHub {
    repos: TempDir,
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeHub {
    /// Starts a hub with no repos; one thread accepts, one thread answers each request.
    pub fn start() -> FakeHub {
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
                        let _ = protocol::serve(stream, &root, addr, &seen);
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

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where the files of a revision are served from (a '/' in it becomes `%2F`, as
    /// hf-hub sends it in URLs).
    pub fn revision_dir(&self, repo: &str, revision: &str) -> PathBuf {
        self.repos
            .path()
            .join(repo)
            .join(revision.replace('/', "%2F"))
    }

    pub fn add_file(&self, repo: &str, revision: &str, file: &str, bytes: &[u8]) {
        let path = self.revision_dir(repo, revision).join(file);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    pub fn add_files(&self, repo: &str, revision: &str, from: &Path, files: &[&str]) {
        for file in files {
            self.add_file(
                repo,
                revision,
                file,
                &std::fs::read(from.join(file)).unwrap(),
            );
        }
    }

    /// Every request received so far, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `stop`.
        let _ = TcpStream::connect(self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
