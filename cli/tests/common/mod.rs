//! Shared by the CLI's end-to-end tests: where the fixtures are, and running the binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use safetensors::SafeTensors;

/// The shared PEFT fixtures (`$MOERGE_FIXTURES` or the workspace's `../shared/fixtures`).
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

/// The embedded tiny library.
pub fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-library")
}

/// Runs `moerge` with the built-in policies taken from the test binary's own folder, where
/// cargo built them for this test (the dev-dependencies on the policy crates).
pub fn moerge_with_plugins(args: &[&str]) -> Output {
    let plugins = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf();
    Command::new(env!("CARGO_BIN_EXE_moerge"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .env("MOERGE_BUILTIN_POLICIES", plugins)
        .env("XDG_DATA_HOME", "/nonexistent")
        .output()
        .unwrap()
}

/// Asserts two losses agree to 2e-4 (f32 scoring on two paths); `what` names the pair.
pub fn close(a: f64, b: f64, what: &str) {
    assert!((a - b).abs() < 2e-4, "{what}: {a} vs {b}");
}

/// Runs `moerge` (offline, so no test ever reaches the network).
pub fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_moerge"))
        .args(args)
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .expect("run moerge")
}

/// Runs `moerge`, asserts success, returns stdout.
pub fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(
        out.status.success(),
        "moerge {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `moerge` and parses its stdout as JSON.
pub fn json(args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(args)).unwrap()
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The f32 values of tensor `key` in a safetensors file, read independently of moerge.
pub fn f32_tensor(file: &Path, key: &str) -> Vec<f32> {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32);
    t.data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

pub fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
