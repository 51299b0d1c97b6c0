//! Test support: the shared PEFT fixtures, adapter variants made by editing real files, the
//! service with short timings, waiting for change events, and comparing index and folder.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moerge_daemon::index::Index;
use moerge_daemon::service::{ExpertChange, LibraryEvent, Service, ServiceConfig};
use moerge_library::{inspect_adapter, AdapterState, BaseModelInfo, ContentHash};
use serde_json::Value;
use tokio::sync::broadcast::error::TryRecvError;
use tokio::sync::broadcast::Receiver;

/// How long to wait for something that should happen in well under a second. Only a hang
/// guard: no test asserts on time.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// `$MOERGE_FIXTURES`, else `<workspace root>/../shared/fixtures`.
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("MOERGE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    };
    assert!(
        dir.join("dev-phi").is_dir(),
        "PEFT fixtures not found at {} (set MOERGE_FIXTURES)",
        dir.display()
    );
    dir
}

pub fn base() -> PathBuf {
    fixtures().join("dev-phi")
}

pub fn fixture_adapter(task: &str) -> PathBuf {
    fixtures().join("dev-phi/adapters").join(task)
}

pub const TASKS: [&str; 5] = ["length", "minus", "rot13", "swapcase", "twice"];

/// Copies an adapter folder's two files (the fixtures are read-only).
pub fn copy_adapter(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::write(dest.join(file), std::fs::read(src.join(file)).unwrap()).unwrap();
    }
}

/// A copy of `src` whose `lora_alpha` is `alpha`: a valid adapter with a new content hash.
pub fn variant(src: &Path, dest: &Path, alpha: u32) {
    copy_adapter(src, dest);
    edit_config(dest, |c| c["lora_alpha"] = alpha.into());
}

pub fn edit_config(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("adapter_config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec_pretty(&config).unwrap()).unwrap();
}

pub fn hash_of(dir: &Path) -> ContentHash {
    inspect_adapter(dir, None).hash.expect("readable adapter")
}

pub struct Harness {
    pub tmp: tempfile::TempDir,
    pub library: PathBuf,
    pub state: PathBuf,
}

impl Harness {
    pub fn new() -> Harness {
        let tmp = tempfile::tempdir().unwrap();
        let library = tmp.path().join("library");
        let state = tmp.path().join("state");
        std::fs::create_dir_all(&library).unwrap();
        Harness {
            tmp,
            library,
            state,
        }
    }

    pub fn config(&self) -> ServiceConfig {
        let mut config = ServiceConfig::new(self.library.clone(), base(), self.state.clone());
        config.debounce = Duration::from_millis(50);
        // Margin for a slow CI machine: a copy in progress must not look settled.
        config.settle = Duration::from_secs(1);
        config
    }

    pub fn start(&self) -> Service {
        Service::start(self.config()).expect("service starts")
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.library.join(name)
    }

    /// Builds an adapter folder outside the library, then moves it in whole, so the watcher
    /// never sees the steps of its making (a copy, then an edit) as separate versions.
    pub fn drop_in(&self, name: &str, build: impl FnOnce(&Path)) {
        let staging = self.tmp.path().join("staging").join(name);
        build(&staging);
        std::fs::rename(&staging, self.dir(name)).unwrap();
    }
}

/// Collects events until `done` says the collection is complete; panics (showing what came)
/// if that takes longer than [`PATIENCE`].
pub fn wait_for(
    rx: &mut Receiver<LibraryEvent>,
    mut done: impl FnMut(&[LibraryEvent]) -> bool,
) -> Vec<LibraryEvent> {
    let deadline = Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    while !done(&seen) {
        match rx.try_recv() {
            Ok(event) => seen.push(event),
            Err(TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            Err(e) => panic!("no complete set of events ({e:?}); got {seen:#?}"),
        }
    }
    seen
}

/// Every change in a list of events, flattened.
pub fn changes(events: &[LibraryEvent]) -> Vec<&ExpertChange> {
    events.iter().flat_map(|e| &e.changes).collect()
}

/// Waits until a change to `name` matching `pred` has been seen.
pub fn wait_change(
    rx: &mut Receiver<LibraryEvent>,
    name: &str,
    pred: impl Fn(&ExpertChange) -> bool,
) -> Vec<LibraryEvent> {
    wait_for(rx, |seen| {
        changes(seen).iter().any(|c| c.name() == name && pred(c))
    })
}

/// What the folder holds, computed independently of the index: name → (hash, state).
pub fn folder_truth(library: &Path) -> BTreeMap<String, (Option<ContentHash>, AdapterState)> {
    let base = BaseModelInfo::from_dir(&base()).unwrap();
    let mut truth = BTreeMap::new();
    for entry in std::fs::read_dir(library).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let weights =
            ["adapter_model.safetensors", "adapter_model.bin"].map(|f| path.join(f).is_file());
        if name.starts_with('.')
            || !path.join("adapter_config.json").is_file()
            || weights == [false; 2]
        {
            continue;
        }
        let report = inspect_adapter(&path, Some(&base));
        truth.insert(name, (report.hash, report.state));
    }
    truth
}

/// The index's view of the library in the same shape.
pub fn index_view(index: &Index) -> BTreeMap<String, (Option<ContentHash>, AdapterState)> {
    index
        .experts()
        .unwrap()
        .into_iter()
        .map(|e| (e.name, (e.hash, e.state)))
        .collect()
}
