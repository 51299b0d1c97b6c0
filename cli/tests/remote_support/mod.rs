//! Support for the daemon tests: the real `moerged` binary on a private socket (or a private
//! dbus-daemon) over a temporary copy of three tiny experts, and the real `moerge` binary
//! pointed at it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Only a hang guard: no test asserts on time.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// The experts every test library starts with.
pub const EXPERTS: [&str; 3] = ["upper", "reverse", "rot13"];

pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-library")
}

/// The folder cargo built this test into (`target/<profile>/deps`), where the policy
/// plugins' `.so` files are too.
pub fn deps_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// `target/<profile>/moerged`, built once by cargo if this test run has not built it yet
/// (a dev-dependency's binaries are not built for a package's tests).
pub fn moerged() -> &'static Path {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let profile_dir = deps_dir().parent().unwrap().to_path_buf();
        let exe = profile_dir.join("moerged");
        if !exe.is_file() {
            let release = profile_dir.file_name().is_some_and(|n| n == "release");
            let mut build = Command::new(env!("CARGO"));
            build.args(["build", "-p", "moerge-daemon", "--bin", "moerged"]);
            if release {
                build.arg("--release");
            }
            let status = build
                .env("CARGO_TARGET_DIR", profile_dir.parent().unwrap())
                .status()
                .expect("cargo runs");
            assert!(status.success(), "cargo build of moerged failed");
        }
        assert!(exe.is_file(), "no moerged at {}", exe.display());
        exe
    })
}

pub fn copy_adapter(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(src.join(file), dest.join(file)).unwrap();
    }
}

/// A running `moerged`; SIGTERM and wait on drop.
pub struct Daemon {
    child: Child,
    lines: Receiver<String>,
    pub library: PathBuf,
    pub tmp: tempfile::TempDir,
    /// `--address` (private socket) or `--bus-address` and the value, for `moerge`.
    pub connect: [String; 2],
    bus: Option<Child>,
}

impl Daemon {
    /// A daemon on a private socket.
    pub fn start() -> Daemon {
        Daemon::start_on(false, &[])
    }

    /// A daemon on a private dbus-daemon, reached with `--bus-address`.
    pub fn start_on_bus() -> Daemon {
        Daemon::start_on(true, &[])
    }

    /// A daemon on a private socket, with more `moerged` arguments.
    pub fn start_with(extra: &[&str]) -> Daemon {
        Daemon::start_on(false, extra)
    }

    fn start_on(bus: bool, extra: &[&str]) -> Daemon {
        let tmp = tempfile::tempdir().unwrap();
        let library = tmp.path().join("library");
        for name in EXPERTS {
            copy_adapter(&tiny().join("experts").join(name), &library.join(name));
        }
        let (bus_child, connect) = if bus {
            let (child, address) = private_bus(tmp.path());
            (Some(child), ["--bus-address".to_string(), address])
        } else {
            let socket = tmp.path().join("moerged.sock");
            (
                None,
                [
                    "--address".to_string(),
                    format!("unix:path={}", socket.display()),
                ],
            )
        };
        let mut child = Command::new(moerged())
            .arg("--library")
            .arg(&library)
            .arg("--base")
            .arg(tiny().join("base"))
            .arg("--state")
            .arg(tmp.path().join("state"))
            .args(&connect)
            .args([
                "--debounce-ms",
                "50",
                "--settle-ms",
                "300",
                "--compute-threads",
                "2",
            ])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("MOERGE_BUILTIN_POLICIES", deps_dir())
            .env("XDG_DATA_HOME", "/nonexistent")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("moerged starts");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut daemon = Daemon {
            child,
            lines,
            library,
            tmp,
            connect,
            bus: bus_child,
        };
        daemon.wait_line("serving");
        daemon
    }

    /// Waits for a log line containing `needle` (panics after [`PATIENCE`]).
    pub fn wait_line(&mut self, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        let mut log = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => return,
                Ok(line) => log.push(line),
                Err(e) => panic!("moerged never logged {needle:?} ({e:?}); log: {log:#?}"),
            }
        }
    }

    /// Runs `moerge` against this daemon (the connection flags appended).
    pub fn moerge(&self, args: &[&str]) -> Output {
        moerge_command(args).args(&self.connect).output().unwrap()
    }

    /// Runs `moerge` against this daemon, asserts success, parses stdout as JSON.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        json_of(self.moerge(args), args)
    }

    /// Runs `moerge`, asserts success, returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        stdout_of(self.moerge(args), args)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon's clean shutdown.
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
        if let Some(bus) = &mut self.bus {
            let _ = bus.kill();
            let _ = bus.wait();
        }
    }
}

fn private_bus(dir: &Path) -> (Child, String) {
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
    (child, address)
}

/// `moerge` with a clean environment: offline hub, the test's plugins, no ambient daemon.
pub fn moerge_command(args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_moerge"));
    cmd.args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("MOERGE_BUILTIN_POLICIES", deps_dir())
        .env("XDG_DATA_HOME", "/nonexistent")
        .env_remove("MOERGE_ADDRESS")
        .env_remove("DBUS_SESSION_BUS_ADDRESS");
    cmd
}

/// Runs `moerge` offline (no daemon flags).
pub fn offline(args: &[&str]) -> Output {
    moerge_command(args).output().unwrap()
}

pub fn stdout_of(out: Output, args: &[&str]) -> String {
    assert!(
        out.status.success(),
        "moerge {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

pub fn json_of(out: Output, args: &[&str]) -> serde_json::Value {
    let text = stdout_of(out, args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("moerge {args:?}: {e}: {text}"))
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The first `n` records of each of `tasks` in `file`, written to `out`.
pub fn subset(file: &Path, tasks: &[&str], n: usize, out: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut lines = Vec::new();
    for t in tasks {
        let needle = format!("\"task\":\"{t}\"");
        lines.extend(text.lines().filter(|l| l.contains(&needle)).take(n));
    }
    assert!(
        !lines.is_empty(),
        "no records of {tasks:?} in {}",
        file.display()
    );
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
}
