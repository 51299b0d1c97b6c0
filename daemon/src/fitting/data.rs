//! The data a `Fit` trains and validates on: a JSONL file of `{task, prompt, completion}`
//! records, or a folder with `train.jsonl` and optionally `valid.jsonl` (the tiny library's
//! `data/` layout). From a single file, every fifth record of each task is held out for
//! validation, deterministically.

use std::collections::BTreeMap;
use std::path::Path;

use moerge_library::records::{read_jsonl, Record};

/// Training and validation records.
#[derive(Debug, Clone, PartialEq)]
pub struct FitData {
    pub train: Vec<Record>,
    pub valid: Vec<Record>,
}

/// Every `HOLD_OUT`-th record of a task (counting from 1) is validation data.
pub const HOLD_OUT: usize = 5;

/// Reads `path` (see the module docs). Errors name the file and the line.
pub fn read_fit_data(path: &Path) -> Result<FitData, String> {
    if path.is_dir() {
        let train = read_jsonl(&path.join("train.jsonl")).map_err(|e| e.to_string())?;
        let valid_path = path.join("valid.jsonl");
        let valid = if valid_path.exists() {
            read_jsonl(&valid_path).map_err(|e| e.to_string())?
        } else {
            Vec::new()
        };
        return Ok(FitData { train, valid });
    }
    Ok(hold_out(read_jsonl(path).map_err(|e| e.to_string())?))
}

/// Splits records: within each task, records 5, 10, 15... go to validation.
pub fn hold_out(records: Vec<Record>) -> FitData {
    let mut seen: BTreeMap<Option<String>, usize> = BTreeMap::new();
    let (mut train, mut valid) = (Vec::new(), Vec::new());
    for r in records {
        let n = seen.entry(r.task.clone()).or_default();
        *n += 1;
        if (*n).is_multiple_of(HOLD_OUT) {
            valid.push(r);
        } else {
            train.push(r);
        }
    }
    FitData { train, valid }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(task: &str, i: usize) -> Record {
        Record {
            task: Some(task.into()),
            prompt: format!("{task} {i}>"),
            completion: format!("{i}\n"),
        }
    }

    #[test]
    fn every_fifth_record_of_each_task_is_held_out() {
        let mut records = Vec::new();
        for i in 1..=10 {
            records.push(record("a", i));
            if i <= 4 {
                records.push(record("b", i));
            }
        }
        let data = hold_out(records);
        let held: Vec<String> = data.valid.iter().map(|r| r.prompt.clone()).collect();
        assert_eq!(held, ["a 5>", "a 10>"]);
        assert_eq!(data.train.len(), 12);
    }

    #[test]
    fn a_folder_gives_its_two_files_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let line =
            |t: &str| format!("{{\"task\":\"{t}\",\"prompt\":\"p\",\"completion\":\"c\"}}\n");
        std::fs::write(dir.path().join("train.jsonl"), line("x") + &line("y")).unwrap();
        std::fs::write(dir.path().join("valid.jsonl"), line("x")).unwrap();
        let data = read_fit_data(dir.path()).unwrap();
        assert_eq!((data.train.len(), data.valid.len()), (2, 1));

        let bad = dir.path().join("bad.jsonl");
        std::fs::write(&bad, line("x") + "{\"prompt\": 3}\n").unwrap();
        let e = read_fit_data(&bad).unwrap_err();
        assert!(e.contains("bad.jsonl:2"), "{e}");
    }
}
