//! `moerge train` and `moerge eval` end to end: a trained adapter is a valid PEFT folder that
//! lowers the loss, and eval's per-task means equal the mean of `moerge score` per record.

mod common;

use common::*;

use std::process::Command;

#[test]
fn train_then_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    // Two tiny tasks: the next letter, and the same letter twice.
    let mut lines = String::new();
    for c in b'a'..=b't' {
        let (c, n) = (c as char, (c + 1) as char);
        lines +=
            &format!("{{\"task\":\"next\",\"prompt\":\"n {c}>\",\"completion\":\"{n}\\n\"}}\n");
        lines +=
            &format!("{{\"task\":\"dup\",\"prompt\":\"d {c}>\",\"completion\":\"{c}{c}\\n\"}}\n");
    }
    std::fs::write(&data, lines).unwrap();
    let base = fixtures().join("dev-phi");
    let (base, data) = (base.to_str().unwrap(), data.to_str().unwrap());
    let out = tmp.path().join("next-expert");
    let out_s = out.to_str().unwrap();
    let summary = json(&[
        "train", "--base", base, "--data", data, "--task", "next", "--out", out_s, "--steps", "40",
        "--json",
    ]);
    assert_eq!(summary["examples"], 20);
    assert_eq!(summary["steps"], 40);
    assert!(summary["final_loss"].as_f64().unwrap() < summary["first_loss"].as_f64().unwrap());
    let report = json(&["inspect", out_s, "--base", base, "--json"]);
    assert_eq!(report["state"], "ready");
    assert_eq!(report["hash"], summary["hash"]);

    let before = json(&["eval", "--base", base, "--data", data, "--json"]);
    let after = json(&[
        "eval",
        "--base",
        base,
        "--adapter",
        out_s,
        "--data",
        data,
        "--json",
    ]);
    let loss = |r: &serde_json::Value, t: &str| r["tasks"][t]["mean_loss"].as_f64().unwrap();
    assert!(
        loss(&after, "next") < loss(&before, "next"),
        "training did not help its own task"
    );
    let mean = (loss(&after, "next") + loss(&after, "dup")) / 2.0;
    assert!((after["mean_over_tasks"].as_f64().unwrap() - mean).abs() < 1e-9);
    assert!(after["standard_error"].as_f64().unwrap() > 0.0);

    // The same number through the scoring path, record by record.
    let mut total = 0.0;
    for c in b'a'..=b't' {
        let (c, n) = (c as char, (c + 1) as char);
        let s = json(&[
            "score",
            "--base",
            base,
            "--adapter",
            out_s,
            "--prompt",
            &format!("n {c}>"),
            "--completion",
            &format!("{n}\n"),
            "--json",
        ]);
        total += s["mean_nll"].as_f64().unwrap();
    }
    assert!((total / 20.0 - loss(&after, "next")).abs() < 1e-4);

    // A second run into the same folder is refused, naming it.
    let again = Command::new(env!("CARGO_BIN_EXE_moerge"))
        .args([
            "train", "--base", base, "--data", data, "--out", out_s, "--steps", "1",
        ])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn eval_needs_tasks_and_names_the_bad_line() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &data,
        "{\"prompt\":\"a\",\"completion\":\"b\"}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    let base = fixtures().join("dev-phi");
    let out = Command::new(env!("CARGO_BIN_EXE_moerge"))
        .args([
            "eval",
            "--base",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("bad.jsonl:2"), "{err}");
}
