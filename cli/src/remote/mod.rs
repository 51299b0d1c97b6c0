//! The daemon front end: every command that talks to `moerged` over D-Bus. Only this module
//! (and `demo`) knows zbus; it runs on a current-thread tokio runtime, blocking the main
//! thread until the command's future is done.

pub mod connect;
pub mod jobs;
pub mod library;
pub mod model;
pub mod output;
pub mod use_model;

use std::future::Future;
use std::process::ExitCode;

use anyhow::{Context, Result};

use crate::exit::invalid;

/// Runs a command's future to completion on a fresh current-thread runtime.
pub fn block_on<T>(future: impl Future<Output = Result<T>>) -> Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(future)
}

/// [`block_on`] for commands: success is exit code 0.
pub fn run(future: impl Future<Output = Result<()>>) -> Result<ExitCode> {
    block_on(future).map(|()| ExitCode::SUCCESS)
}

/// `--param KEY=VALUE` pairs as the JSON object the daemon takes: values that parse as JSON
/// numbers or booleans are sent as such, everything else as strings.
pub fn params_json(params: &[String]) -> Result<String> {
    let mut object = serde_json::Map::new();
    for kv in params {
        let Some((key, value)) = kv.split_once('=') else {
            invalid!("--param {kv}: expected KEY=VALUE, e.g. --param top_k=2");
        };
        let (key, value) = (key.trim(), value.trim());
        if key.is_empty() {
            invalid!("--param {kv}: the key is empty");
        }
        let value = match serde_json::from_str::<serde_json::Value>(value) {
            Ok(v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_))) => v,
            _ => serde_json::Value::String(value.to_string()),
        };
        if object.insert(key.to_string(), value).is_some() {
            invalid!("--param {key}: given twice");
        }
    }
    Ok(serde_json::Value::Object(object).to_string())
}

/// `path` made absolute against the current directory (the daemon has its own).
pub fn absolute(path: &std::path::Path, flag: &str) -> Result<String> {
    let abs = std::path::absolute(path).with_context(|| format!("{flag} {}", path.display()))?;
    abs.to_str()
        .map(str::to_string)
        .with_context(|| format!("{flag} {}: not valid UTF-8", path.display()))
}

#[cfg(test)]
mod tests {
    use super::params_json;

    #[test]
    fn params_become_typed_json() {
        let p = |v: &[&str]| params_json(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(
            p(&["top_k=2", "temperature=0.5", "exact=true", "space=lowrank"]).unwrap(),
            r#"{"exact":true,"space":"lowrank","temperature":0.5,"top_k":2}"#
        );
        assert_eq!(p(&[]).unwrap(), "{}");
        assert!(p(&["top_k"])
            .unwrap_err()
            .to_string()
            .contains("--param top_k"));
        assert!(p(&["a=1", "a=2"])
            .unwrap_err()
            .to_string()
            .contains("twice"));
    }
}
