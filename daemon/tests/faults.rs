//! Fault tests on the real `moerged` binary: SIGKILL at random moments during bursts of
//! library changes, a database file with overwritten bytes, a second daemon on the same
//! state directory, and a clean SIGTERM.

mod support;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use moerge_daemon::index::{DerivedValue, Index};
use moerge_daemon::service::sketch::SKETCH_KIND;
use support::*;

/// A private peer-to-peer socket, so these tests need no bus daemon.
fn socket_address(h: &Harness) -> String {
    format!("unix:path={}", h.tmp.path().join("moerged.sock").display())
}

struct Daemon {
    child: Child,
    lines: Receiver<String>,
    log: Vec<String>,
}

impl Daemon {
    fn start(h: &Harness) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_moerged"))
            .arg("--library")
            .arg(&h.library)
            .arg("--base")
            .arg(base())
            .arg("--state")
            .arg(&h.state)
            .arg("--address")
            .arg(socket_address(h))
            .args(["--debounce-ms", "50", "--settle-ms", "300"])
            .env("RUST_LOG", "info")
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
        Daemon {
            child,
            lines,
            log: Vec::new(),
        }
    }

    /// Waits for a log line containing `needle`; panics with the log if the daemon exits or
    /// takes longer than [`PATIENCE`].
    fn wait_line(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if line.contains(needle) {
                        return line;
                    }
                }
                Err(e) => panic!("no line with {needle:?} ({e:?}); log: {:#?}", self.log),
            }
        }
    }

    /// SIGKILL: `Child::kill` sends exactly that on Unix.
    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM, then the exit status and the whole log.
    fn terminate(mut self) -> (ExitStatus, Vec<String>) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let status = self.child.wait().unwrap();
        self.log.extend(self.lines.try_iter());
        // The reader thread may still hold the last lines for a moment after the exit.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.log.push(line);
        }
        (status, self.log)
    }
}

/// The index (opened by the test, the daemon being stopped) equals the folder; every
/// record decodes, every blob exists with the right bytes, every ready expert has its
/// sketch, and the blob folder holds exactly the blobs the records name.
fn assert_consistent(h: &Harness) {
    let index = Index::open(&h.state.join("index")).expect("the index opens cleanly");
    index.check().expect("every record and blob verifies");
    assert_eq!(index_view(&index), folder_truth(&h.library));
    let mut referenced = BTreeSet::new();
    for expert in index.experts().unwrap().iter().filter(|e| e.is_ready()) {
        match index
            .derived_entry(&expert.hash.unwrap(), SKETCH_KIND)
            .unwrap()
        {
            Some(DerivedValue::Blob(id)) => referenced.insert(id),
            other => panic!("{}: sketch {other:?}", expert.name),
        };
    }
    let blobs: BTreeSet<_> = index.blob_files().unwrap().into_iter().collect();
    assert_eq!(blobs, referenced, "no blob missing or orphaned");
}

/// A small deterministic generator, so a failing round can be replayed.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A burst of library changes: adds, in-place rewrites, config edits, removals, renames.
fn burst(library: &Path, seed: u64, round: usize) {
    let mut rng = XorShift(seed | 1);
    for i in 0..12 {
        // Spread the burst out, so kills land while the daemon is indexing part of it.
        std::thread::sleep(Duration::from_millis(rng.below(20)));
        let mut names: Vec<_> = std::fs::read_dir(library)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let fresh = format!("r{round}-{i}");
        let task = TASKS[rng.below(TASKS.len() as u64) as usize];
        let pick = (!names.is_empty())
            .then(|| library.join(&names[rng.below(names.len() as u64) as usize]));
        match (rng.below(5), pick) {
            (0, _) | (_, None) => variant(
                &fixture_adapter(task),
                &library.join(fresh),
                1 + rng.below(64) as u32,
            ),
            (1, Some(dir)) => copy_adapter(&fixture_adapter(task), &dir),
            (2, Some(dir)) => edit_config(&dir, |c| c["lora_alpha"] = (1 + rng.below(64)).into()),
            (3, Some(dir)) if names.len() > 4 => std::fs::remove_dir_all(dir).unwrap(),
            (_, Some(dir)) => std::fs::rename(dir, library.join(fresh)).unwrap(),
        }
    }
}

#[test]
fn sigkill_at_random_moments_never_leaves_an_index_a_restart_does_not_repair() {
    let h = Harness::new();
    for (i, task) in TASKS.iter().enumerate() {
        variant(&fixture_adapter(task), &h.dir(&format!("start-{i}")), 8);
    }
    let mut rng = XorShift(0x5eed_cafe);
    for round in 0..20 {
        let mut daemon = Daemon::start(&h);
        daemon.wait_line("serving");
        let (library, seed) = (h.library.clone(), rng.below(u64::MAX));
        let changes = std::thread::spawn(move || burst(&library, seed, round));
        std::thread::sleep(Duration::from_millis(rng.below(300)));
        daemon.kill();
        changes.join().unwrap();

        let mut daemon = Daemon::start(&h);
        daemon.wait_line("serving");
        let (status, log) = daemon.terminate();
        assert!(status.success(), "round {round}: {status}; log: {log:#?}");
        assert!(
            !log.iter().any(|l| l.contains("damaged")),
            "round {round}: a SIGKILL is not damage: {log:#?}"
        );
        assert_consistent(&h);
    }
}

#[test]
fn a_database_with_overwritten_bytes_is_moved_aside_and_rebuilt() {
    // Each case overwrites 64 bytes of the sled file: where an expert's key is stored, and
    // the very start of the file.
    let at_record = |bytes: &[u8]| {
        bytes
            .windows(5)
            .position(|w| w == b"rot13")
            .expect("record in the file")
    };
    let at_start = |_: &[u8]| 0;
    for (case, offset) in [
        ("record", &at_record as &dyn Fn(&[u8]) -> usize),
        ("start", &at_start),
    ] {
        let h = Harness::new();
        for task in ["rot13", "twice", "minus"] {
            copy_adapter(&fixture_adapter(task), &h.dir(task));
        }
        let mut daemon = Daemon::start(&h);
        daemon.wait_line("serving");
        assert!(daemon.terminate().0.success());

        let db = h.state.join("index/db/db");
        let mut bytes = std::fs::read(&db).unwrap();
        let at = offset(&bytes);
        bytes[at..at + 64].fill(0xAB);
        std::fs::write(&db, bytes).unwrap();

        let mut daemon = Daemon::start(&h);
        let warning = daemon.wait_line("index damaged");
        assert!(warning.contains("moved aside"), "{case}: {warning}");
        daemon.wait_line("serving");
        copy_adapter(&fixture_adapter("length"), &h.dir("after"));
        daemon.wait_line("name: \"after\"");
        let (status, log) = daemon.terminate();
        assert!(status.success(), "{case}: {log:#?}");
        assert_consistent(&h);
        let aside: Vec<_> = std::fs::read_dir(&h.state)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("index.damaged-"))
            .collect();
        assert_eq!(aside.len(), 1, "{case}: {aside:?}");
    }
}

#[test]
fn a_second_daemon_on_the_same_state_exits_with_a_clear_message() {
    let h = Harness::new();
    copy_adapter(&fixture_adapter("rot13"), &h.dir("rot13"));
    let mut first = Daemon::start(&h);
    first.wait_line("serving");
    let pid = first.child.id();

    let second = Command::new(env!("CARGO_BIN_EXE_moerged"))
        .arg("--library")
        .arg(&h.library)
        .arg("--base")
        .arg(base())
        .arg("--state")
        .arg(&h.state)
        .arg("--address")
        .arg(socket_address(&h))
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    let expected = format!("is in use by another moerged (pid {pid})");
    assert!(
        stderr.contains(&expected) && stderr.contains(&h.state.display().to_string()),
        "{stderr}"
    );

    // The first one is unharmed and stops cleanly on SIGTERM.
    copy_adapter(&fixture_adapter("twice"), &h.dir("twice"));
    first.wait_line("name: \"twice\"");
    let (status, log) = first.terminate();
    assert!(status.success(), "{log:#?}");
    assert!(
        log.iter()
            .any(|l| l.contains("shutting down") && l.contains("SIGTERM")),
        "{log:#?}"
    );
    assert!(log.last().unwrap().contains("stopped"), "{log:#?}");
    assert_consistent(&h);
}
