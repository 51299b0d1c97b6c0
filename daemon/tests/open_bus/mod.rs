//! Support for tests with clients of other uids: a private dbus-daemon that lets any user
//! connect (`<allow user="*"/>`, its folder open to all), the daemon on it or on a
//! peer-to-peer socket, clients run as uid 65534 through `setpriv`, and a small Python
//! (`/usr/bin/python3` with `dbus`) client that reports each reply or error name as JSON.
//! Used next to `bus_support` (for the library copy and the plans), never instead of it.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;

use moerge_daemon::bus::{self, BusConfig, BusHandle, BusTarget};
use moerge_daemon::serving::{Serving, ServingConfig};
use serde_json::{json, Value};
use zbus::Connection;

use crate::bus_support::{copy_adapter, start_serving, tiny_expert, EXPERTS};

/// The uid (and gid) of the unprivileged clients: `nobody`.
pub const NOBODY: u32 = 65534;

/// Fails the test unless it runs as root: only root can start clients of another uid.
pub fn require_root() {
    let uid = rustix::process::getuid().as_raw();
    assert_eq!(
        uid, 0,
        "these tests run clients as uid {NOBODY} through setpriv, which needs root; \
         this test runs as uid {uid} (run it as root, as CI does)"
    );
}

/// `program` run as uid/gid [`NOBODY`] with no supplementary groups.
pub fn as_nobody(program: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args([
        &format!("--reuid={NOBODY}"),
        &format!("--regid={NOBODY}"),
        "--clear-groups",
        program,
    ]);
    c
}

/// A temporary folder every user may enter (tempdirs are 0700).
pub fn open_tempdir() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// A private bus daemon any user may connect to, killed on drop.
pub struct OpenBus {
    child: Child,
    pub address: String,
}

const BUS_CONFIG: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path=SOCKET</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"#;

impl OpenBus {
    /// Starts it with its socket in `dir` (which must be open to all: [`open_tempdir`]).
    pub fn start(dir: &Path) -> OpenBus {
        let config = dir.join("open-bus.conf");
        let socket = dir.join("open-bus.sock");
        std::fs::write(
            &config,
            BUS_CONFIG.replace("SOCKET", socket.to_str().unwrap()),
        )
        .unwrap();
        let mut child = Command::new("dbus-daemon")
            .args(["--nofork", "--nopidfile", "--print-address=1"])
            .arg(format!("--config-file={}", config.display()))
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
        // Connecting needs write permission on the socket file.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o777)).unwrap();
        OpenBus { child, address }
    }

    pub async fn connect(&self) -> Connection {
        zbus::connection::Builder::address(self.address.as_str())
            .build()
            .await
            .expect("connects to the open bus")
    }
}

impl Drop for OpenBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where the daemon under test listens.
pub enum Reach {
    /// The open bus daemon.
    Bus(OpenBus),
    /// A private peer-to-peer socket (`moerged --address`).
    Socket(PathBuf),
}

/// The daemon (service + serving + bus layer) over a copy of the tiny library, reachable by
/// any uid, on the open bus or on a private socket.
pub struct OpenSetup {
    pub handle: BusHandle,
    pub serving: Arc<Serving>,
    pub library: PathBuf,
    pub reach: Reach,
    pub tmp: tempfile::TempDir,
}

impl OpenSetup {
    pub async fn on_bus(edit: impl FnOnce(&mut ServingConfig)) -> OpenSetup {
        OpenSetup::start(false, edit).await
    }

    pub async fn on_socket(edit: impl FnOnce(&mut ServingConfig)) -> OpenSetup {
        OpenSetup::start(true, edit).await
    }

    async fn start(socket: bool, edit: impl FnOnce(&mut ServingConfig)) -> OpenSetup {
        let tmp = open_tempdir();
        let library = tmp.path().join("library");
        for name in EXPERTS {
            copy_adapter(&tiny_expert(name), &library.join(name));
        }
        let serving = start_serving(&library, &tmp.path().join("state"), edit);
        let (reach, target) = if socket {
            let path = tmp.path().join("moerged.sock");
            (Reach::Socket(path.clone()), BusTarget::Listen(path))
        } else {
            let bus = OpenBus::start(tmp.path());
            let target = BusTarget::Bus(bus.address.clone());
            (Reach::Bus(bus), target)
        };
        let handle = bus::serve(serving.clone(), BusConfig::new(target))
            .await
            .expect("the daemon serves");
        OpenSetup {
            handle,
            serving,
            library,
            reach,
            tmp,
        }
    }

    /// The D-Bus address clients use.
    pub fn address(&self) -> String {
        match &self.reach {
            Reach::Bus(bus) => bus.address.clone(),
            Reach::Socket(path) => format!("unix:path={}", path.display()),
        }
    }

    /// A connection of this (root) process.
    pub async fn connect(&self) -> Connection {
        match &self.reach {
            Reach::Bus(bus) => bus.connect().await,
            Reach::Socket(path) => {
                let stream = std::os::unix::net::UnixStream::connect(path).unwrap();
                zbus::connection::Builder::unix_stream(stream)
                    .p2p()
                    .build()
                    .await
                    .expect("connects to the socket")
            }
        }
    }

    /// A Python client of uid [`NOBODY`] (or of this process's uid, root).
    pub fn python(&self, nobody: bool) -> PyClient {
        let p2p = matches!(self.reach, Reach::Socket(_));
        PyClient::start(&self.address(), p2p, nobody)
    }
}

/// Reads JSON commands, one a line, calls each, and prints `{"ok": reply}` or
/// `{"error": name, "message": text}`. `$name` in a path or an argument stands for the reply
/// of an earlier command saved with `"save": "name"`.
const PY_CLIENT: &str = r#"
import json, sys
import dbus
address, mode = sys.argv[1], sys.argv[2]
if mode == "p2p":
    conn, dest = dbus.connection.Connection(address), None
else:
    conn, dest = dbus.bus.BusConnection(address), "org.moerge.Daemon1"
print(json.dumps({"ready": True}), flush=True)
saved = {}
def sub(x):
    if isinstance(x, str) and x.startswith("$"):
        return saved[x[1:]]
    if isinstance(x, list):
        return [sub(v) for v in x]
    return x
def typed(sig, args):
    # Only what the tests send with a type Python would not guess.
    return [dbus.Int32(a["i"]) if isinstance(a, dict) and "i" in a else a for a in args]
for line in sys.stdin:
    c = json.loads(line)
    try:
        reply = conn.call_blocking(dest, sub(c["path"]), c["iface"], c["method"],
                                   c.get("sig", ""), typed(c.get("sig", ""), sub(c.get("args", []))),
                                   timeout=60)
        if "save" in c:
            saved[c["save"]] = reply
        out = {"ok": reply}
    except dbus.exceptions.DBusException as e:
        out = {"error": e.get_dbus_name(), "message": e.get_dbus_message()}
    print(json.dumps(out, default=str), flush=True)
"#;

/// A Python D-Bus client process, one connection for its whole life.
pub struct PyClient {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl PyClient {
    pub fn start(address: &str, p2p: bool, nobody: bool) -> PyClient {
        let mut command = if nobody {
            as_nobody("/usr/bin/python3")
        } else {
            Command::new("/usr/bin/python3")
        };
        let mut child = command
            .args(["-c", PY_CLIENT, address, if p2p { "p2p" } else { "bus" }])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("/usr/bin/python3 and setpriv run (CI: apt-get install python3-dbus)");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert_eq!(
            line.trim(),
            r#"{"ready": true}"#,
            "the Python client did not connect to {address}"
        );
        PyClient {
            child,
            stdin,
            stdout,
        }
    }

    /// Its process id (to kill it).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends one command and waits for its answer. Blocking: call it from
    /// `tokio::task::block_in_place` when the daemon runs on the same runtime.
    pub fn send(&mut self, command: Value) -> Value {
        writeln!(self.stdin, "{command}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("the Python client answered {line:?} to {command}: {e}"))
    }

    /// Calls `method` of the daemon object.
    pub fn daemon(&mut self, method: &str, sig: &str, args: Value) -> Value {
        self.send(json!({
            "path": moerge_bus::DAEMON_PATH,
            "iface": "org.moerge.Daemon1",
            "method": method,
            "sig": sig,
            "args": args,
        }))
    }

    /// Calls `method` of the model object at `path`.
    pub fn model(&mut self, path: &str, method: &str, sig: &str, args: Value) -> Value {
        self.send(json!({
            "path": path,
            "iface": "org.moerge.Model1",
            "method": method,
            "sig": sig,
            "args": args,
        }))
    }

    /// Kills the process at once (no goodbye on the bus).
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for PyClient {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The error name of a reply, or panics with the reply if it succeeded.
pub fn error_of(reply: &Value) -> (String, String) {
    match (reply.get("error"), reply.get("message")) {
        (Some(Value::String(name)), Some(Value::String(message))) => {
            (name.clone(), message.clone())
        }
        _ => panic!("expected an error, got {reply}"),
    }
}

/// Asserts `reply` is the error `name` with a message containing every fragment.
pub fn assert_py_error(reply: &Value, name: &str, fragments: &[&str]) {
    let (got, message) = error_of(reply);
    assert_eq!(got, name, "{reply}");
    for f in fragments {
        assert!(message.contains(f), "{message:?} lacks {f:?}");
    }
}

/// The successful reply's value, or panics with the error.
pub fn ok_of(reply: &Value) -> &Value {
    reply
        .get("ok")
        .unwrap_or_else(|| panic!("expected success, got {reply}"))
}

/// Runs `busctl --address=<address> -- <args>`; returns (success, stdout, stderr).
pub fn busctl(address: &str, args: &[&str]) -> (bool, String, String) {
    busctl_command(Command::new("busctl"), address, args)
}

/// As [`busctl`], with options (`--json=short`) before the `--`.
pub fn busctl_with(address: &str, options: &[&str], args: &[&str]) -> (bool, String, String) {
    let mut command = Command::new("busctl");
    command.args(options);
    busctl_command(command, address, args)
}

/// As [`busctl`], as uid [`NOBODY`].
pub fn busctl_as_nobody(address: &str, args: &[&str]) -> (bool, String, String) {
    busctl_command(as_nobody("busctl"), address, args)
}

fn busctl_command(mut command: Command, address: &str, args: &[&str]) -> (bool, String, String) {
    let out = command
        .arg(format!("--address={address}"))
        // Options end here: negative numbers are arguments.
        .arg("--")
        .args(args)
        .output()
        .expect("busctl runs (apt-get install systemd)");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}
