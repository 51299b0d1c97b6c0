//! Support for the bus tests: a private dbus-daemon on a temporary socket, the daemon
//! (service + serving + bus) on it over a small library copied from the committed tiny
//! library, client connections, and plans built from the live expert list.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moerge_bus::{Daemon1Proxy, ErrorKind, ExpertInfo, MoergeError};
use moerge_daemon::bus::{self, BusConfig, BusHandle, BusTarget};
use moerge_daemon::service::{Service, ServiceConfig};
use moerge_daemon::serving::{Serving, ServingConfig};
use zbus::Connection;

/// Only a hang guard: no test asserts on time.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// The committed tiny library (`examples/tiny-library`).
pub fn tiny_library() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-library")
}

pub fn tiny_base() -> PathBuf {
    tiny_library().join("base")
}

pub fn tiny_expert(name: &str) -> PathBuf {
    tiny_library().join("experts").join(name)
}

/// Copies an adapter folder's files.
pub fn copy_adapter(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(file), dest.join(file)).unwrap();
    }
}

/// A private bus daemon, killed on drop.
pub struct PrivateBus {
    child: Child,
    pub address: String,
}

impl PrivateBus {
    pub fn start(dir: &Path) -> PrivateBus {
        let socket = dir.join("bus.sock");
        let mut child = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile", "--print-address=1"])
            .arg(format!("--address=unix:path={}", socket.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("dbus-daemon runs (apt-get install dbus)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let address = line.trim().to_string();
        assert!(address.starts_with("unix:"), "dbus-daemon printed {line:?}");
        PrivateBus { child, address }
    }

    pub async fn connect(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("connects to the private bus")
    }
}

impl Drop for PrivateBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The experts every test library starts with.
pub const EXPERTS: [&str; 3] = ["upper", "reverse", "rot13"];

/// A daemon on a private bus, over a library of [`EXPERTS`] in a temporary folder.
pub struct Setup {
    pub handle: Option<BusHandle>,
    pub serving: Arc<Serving>,
    pub library: PathBuf,
    pub bus: PrivateBus,
    pub tmp: tempfile::TempDir,
}

impl Setup {
    pub async fn start() -> Setup {
        Setup::start_with(|_| {}).await
    }

    pub async fn start_with(edit: impl FnOnce(&mut ServingConfig)) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let library = tmp.path().join("library");
        for name in EXPERTS {
            copy_adapter(&tiny_expert(name), &library.join(name));
        }
        let bus = PrivateBus::start(tmp.path());
        let serving = start_serving(&library, &tmp.path().join("state"), edit);
        let handle = bus::serve(
            serving.clone(),
            BusConfig::new(BusTarget::Bus(bus.address.clone())),
        )
        .await
        .expect("the daemon serves on the private bus");
        Setup {
            handle: Some(handle),
            serving,
            library,
            bus,
            tmp,
        }
    }

    pub async fn client(&self) -> (Connection, Daemon1Proxy<'static>) {
        let conn = self.bus.connect().await;
        let daemon = Daemon1Proxy::new(&conn).await.unwrap();
        (conn, daemon)
    }
}

/// Service and serving over `library`, with short watcher timings and two compute threads.
pub fn start_serving(
    library: &Path,
    state: &Path,
    edit: impl FnOnce(&mut ServingConfig),
) -> Arc<Serving> {
    let mut config = ServiceConfig::new(library.to_owned(), tiny_base(), state.to_owned());
    config.debounce = Duration::from_millis(50);
    config.settle = Duration::from_millis(500);
    let mut serving = ServingConfig::new(&config);
    serving.compute_threads = 2;
    edit(&mut serving);
    let service = Arc::new(Service::start(config).expect("service starts"));
    Arc::new(Serving::new(service, serving).expect("serving starts"))
}

/// `{"name": .., "hash": ..}` of the named experts, from the live list.
pub fn refs(experts: &[ExpertInfo], names: &[&str]) -> serde_json::Value {
    names
        .iter()
        .map(|n| {
            let e = experts
                .iter()
                .find(|e| e.name == *n)
                .unwrap_or_else(|| panic!("no expert {n} in {experts:?}"));
            serde_json::json!({"name": e.name, "hash": e.hash})
        })
        .collect()
}

/// A uniform low-rank merge of `names`.
pub fn merge_plan(experts: &[ExpertInfo], names: &[&str]) -> String {
    let w = 1.0 / names.len() as f64;
    serde_json::json!({
        "moerge_plan": 1,
        "experts": refs(experts, names),
        "default": {"static": {"weights": vec![w; names.len()], "space": "lowrank"}},
    })
    .to_string()
}

/// Arrow routing over `names`, top-`k` per token.
pub fn arrow_plan(experts: &[ExpertInfo], names: &[&str], k: usize) -> String {
    serde_json::json!({
        "moerge_plan": 1,
        "experts": refs(experts, names),
        "default": {"routed": {"router": "arrow", "top_k": k}},
    })
    .to_string()
}

/// Asserts `result` failed with `kind` and a message containing every fragment.
pub fn assert_error<T: std::fmt::Debug>(
    result: Result<T, MoergeError>,
    kind: ErrorKind,
    fragments: &[&str],
) {
    let e = result.expect_err("the call should fail");
    let message = e.message();
    assert_eq!(e.kind(), kind, "{e:?}");
    for f in fragments {
        assert!(message.contains(f), "{message:?} lacks {f:?}");
    }
}

/// Polls `check` until it is true; panics after [`PATIENCE`].
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + PATIENCE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
