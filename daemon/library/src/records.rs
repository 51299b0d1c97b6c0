//! Evaluation and training data: JSONL records `{"task": ..., "prompt": ..., "completion": ...}`
//! (`task` optional for training, required for per-task reports).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub prompt: String,
    pub completion: String,
}

/// Why a data file cannot be used; names the file and the line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message} (expected {{\"task\": ..., \"prompt\": ..., \"completion\": ...}})")]
    Record {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: no records")]
    Empty { path: PathBuf },
}

/// Reads every record of a JSONL file (blank lines skipped).
pub fn read_jsonl(path: &Path) -> Result<Vec<Record>, DataError> {
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let record: Record = serde_json::from_str(line).map_err(|e| DataError::Record {
            path: path.to_path_buf(),
            line: i + 1,
            message: e.to_string(),
        })?;
        out.push(record);
    }
    if out.is_empty() {
        return Err(DataError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(out)
}

/// The JSONL text of `records`, one per line.
pub fn to_jsonl(records: &[Record]) -> String {
    records
        .iter()
        .map(|r| serde_json::to_string(r).expect("records serialise") + "\n")
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Result<usize, &str>) {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("d.jsonl");
        std::fs::write(&path, text).unwrap();
        match (read_jsonl(&path), expected) {
            (Ok(records), Ok(n)) => assert_eq!(records.len(), n),
            (Err(e), Err(word)) => {
                let msg = e.to_string();
                assert!(msg.contains("d.jsonl") && msg.contains(word), "{msg}");
            }
            (got, want) => panic!("{text:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn reads_and_refuses() {
        check("{\"task\":\"a\",\"prompt\":\"x\",\"completion\":\"y\"}\n\n{\"prompt\":\"x\",\"completion\":\"y\"}\n", Ok(2));
        check("{\"prompt\":\"x\"}\n", Err(":1:"));
        check(
            "{\"prompt\":\"x\",\"completion\":\"y\"}\nnot json\n",
            Err(":2:"),
        );
        check(
            "{\"prompt\":\"x\",\"completion\":\"y\",\"answer\":1}\n",
            Err("answer"),
        );
        check("\n", Err("no records"));
        let r = Record {
            task: Some("t".into()),
            prompt: "p".into(),
            completion: "c".into(),
        };
        assert_eq!(
            to_jsonl(&[r]),
            "{\"task\":\"t\",\"prompt\":\"p\",\"completion\":\"c\"}\n"
        );
    }
}
