//! The demo's private `moerged`: found, started on a temporary folder with a private socket,
//! waited for, and stopped (SIGTERM, then SIGKILL) when dropped — on success, error or Ctrl-C.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How long the daemon may take to open its socket (a hang guard).
const START_PATIENCE: Duration = Duration::from_secs(60);

/// The folder of the running `moerge` executable.
fn exe_dir() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(Path::to_path_buf))
}

fn is_tiny_library(dir: &Path) -> bool {
    ["base", "experts", "data"]
        .iter()
        .all(|sub| dir.join(sub).is_dir())
}

/// The tiny library: `--tiny`, else `$MOERGE_TINY_LIBRARY`, else the repository's (for a
/// cargo build), else `<prefix>/share/moerge/tiny-library` (for an install).
pub fn tiny_library(flag: Option<&Path>) -> Result<PathBuf> {
    let named = flag.map(|p| (p.to_path_buf(), "--tiny")).or_else(|| {
        std::env::var_os("MOERGE_TINY_LIBRARY")
            .filter(|v| !v.is_empty())
            .map(|v| (PathBuf::from(v), "MOERGE_TINY_LIBRARY"))
    });
    if let Some((dir, source)) = named {
        if !is_tiny_library(&dir) {
            crate::exit::invalid!(
                "{source} {}: not a tiny library (needs base/, experts/ and data/)",
                dir.display()
            );
        }
        return Ok(dir);
    }
    let mut candidates = Vec::new();
    if let Some(exe) = exe_dir() {
        candidates.push(exe.join("../../examples/tiny-library"));
        candidates.push(exe.join("../share/moerge/tiny-library"));
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-library"));
    candidates
        .into_iter()
        .find(|c| is_tiny_library(c))
        .map(|c| std::path::absolute(&c).unwrap_or(c))
        .context(
            "cannot find the tiny library; pass --tiny DIR (the repository's \
             examples/tiny-library) or set MOERGE_TINY_LIBRARY",
        )
}

/// The `moerged` to run: `--moerged`, else the one next to this `moerge`, else `PATH`'s.
pub fn moerged_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    exe_dir()
        .map(|d| d.join("moerged"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("moerged"))
}

/// A running private daemon.
pub struct PrivateDaemon {
    child: Child,
    pub socket: PathBuf,
    log: PathBuf,
}

impl PrivateDaemon {
    /// Starts `moerged` on `library` with its state and socket under `dir`, and waits until
    /// its socket exists (it is bound right before the daemon serves).
    pub fn start(moerged: &Path, library: &Path, base: &Path, dir: &Path) -> Result<Self> {
        let socket = dir.join("moerged.sock");
        let log = dir.join("moerged.log");
        let log_file = std::fs::File::create(&log)
            .with_context(|| format!("cannot write {}", log.display()))?;
        let child = Command::new(moerged)
            .arg("--library")
            .arg(library)
            .arg("--base")
            .arg(base)
            .arg("--state")
            .arg(dir.join("state"))
            .arg("--address")
            .arg(format!("unix:path={}", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .with_context(|| {
                format!(
                    "--moerged {}: cannot start it (build it with `cargo build --release -p \
                     moerge-daemon`, or pass --moerged FILE)",
                    moerged.display()
                )
            })?;
        let mut daemon = PrivateDaemon { child, socket, log };
        let deadline = Instant::now() + START_PATIENCE;
        loop {
            if daemon.socket.exists() {
                return Ok(daemon);
            }
            if let Some(status) = daemon.child.try_wait()? {
                bail!(
                    "moerged exited ({status}) before serving; its log:\n{}",
                    daemon.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "moerged did not open {} within {:?}; its log:\n{}",
                    daemon.socket.display(),
                    START_PATIENCE,
                    daemon.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last lines of the daemon's log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for PrivateDaemon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            if let Some(pid) = rustix::process::Pid::from_raw(self.child.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
