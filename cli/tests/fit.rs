//! `moerge policies` and `moerge fit` end to end: real plugin `.so` files found by the host,
//! a real fit on the tiny library through the engine's host services, and the plan it
//! writes (with its tensor file) served back by the model commands.

mod common;

use std::path::Path;
use std::process::Output;

use common::*;

fn stdout_json(out: Output, what: &str) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The first `n` records of `file` whose task is one of `tasks`, written to `out`.
fn subset(file: &Path, tasks: &[&str], n: usize, out: &Path) {
    let text = std::fs::read_to_string(file).unwrap();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            tasks
                .iter()
                .any(|t| l.contains(&format!("\"task\":\"{t}\"")))
        })
        .take(n)
        .collect();
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
}

#[test]
fn policies_are_listed_and_a_fitted_router_beats_the_uniform_merge() {
    let listed = stdout_json(
        moerge_with_plugins(&["policies", "--local", "--json"]),
        "policies",
    );
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for builtin in [
        "uniform-merge",
        "learned-merge",
        "ensemble",
        "arrow",
        "sgd-router",
        "hierarchical",
        "lp-ensemble",
        "layerwise",
        "peft-merge",
        "distill",
    ] {
        assert!(names.contains(&builtin), "{builtin} missing from {names:?}");
    }

    let tmp = tempfile::tempdir().unwrap();
    let tasks = ["reverse", "upper", "rot13"];
    let (train, valid) = (
        tmp.path().join("train.jsonl"),
        tmp.path().join("valid.jsonl"),
    );
    subset(&tiny().join("data/train.jsonl"), &tasks, 60, &train);
    subset(&tiny().join("data/valid.jsonl"), &tasks, 45, &valid);
    let (base, library) = (tiny().join("base"), tiny().join("experts"));
    let fit = |policy: &str, extra: &[&str]| {
        let out = tmp.path().join(format!("{policy}.json"));
        let mut args = vec![
            "fit",
            "--policy",
            policy,
            "--base",
            path(&base),
            "--library",
            path(&library),
            "--experts",
            "reverse,upper,rot13",
            "--train",
            path(&train),
            "--valid",
            path(&valid),
            "--out",
            path(&out),
            "--json",
        ];
        args.extend_from_slice(extra);
        let report = stdout_json(moerge_with_plugins(&args), policy);
        (out, report)
    };
    let (uniform_plan, uniform) = fit("uniform-merge", &[]);
    let (router_plan, router) = fit("sgd-router", &["--param", "steps=40"]);
    assert!(uniform["tensors"].is_null());
    let tensors = router["tensors"]
        .as_str()
        .expect("a learned router has a tensor file");
    assert!(tmp.path().join(tensors).is_file());

    // The model commands serve the written plans; eval's mean agrees with fit's report.
    let eval = |plan: &Path| {
        json(&[
            "eval",
            "--base",
            path(&base),
            "--library",
            path(&library),
            "--plan",
            path(plan),
            "--data",
            path(&valid),
            "--json",
        ])
    };
    let (u, r) = (eval(&uniform_plan), eval(&router_plan));
    let mean_of_examples = |report: &serde_json::Value| {
        let tasks = report["tasks"].as_object().unwrap();
        let total: f64 = tasks
            .values()
            .map(|t| t["mean_loss"].as_f64().unwrap() * t["examples"].as_f64().unwrap())
            .sum();
        total
            / tasks
                .values()
                .map(|t| t["examples"].as_f64().unwrap())
                .sum::<f64>()
    };
    for (report, fitted) in [(&u, &uniform), (&r, &router)] {
        let want = fitted["valid_mean_loss"].as_f64().unwrap();
        assert!(
            (mean_of_examples(report) - want).abs() < 1e-3,
            "{report} vs {fitted}"
        );
    }
    // The paper's ordering on these three tasks: a trained router beats the uniform merge.
    let (u, r) = (
        u["mean_over_tasks"].as_f64().unwrap(),
        r["mean_over_tasks"].as_f64().unwrap(),
    );
    assert!(r < u - 0.1, "sgd-router {r} vs uniform merge {u}");

    // Bad parameters are refused by name, and nothing is written.
    let out = moerge_with_plugins(&[
        "fit",
        "--policy",
        "sgd-router",
        "--base",
        path(&base),
        "--library",
        path(&library),
        "--param",
        "init=sideways",
        "--out",
        path(&tmp.path().join("bad.json")),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("init") && err.contains("sideways"), "{err}");
    assert!(!tmp.path().join("bad.json").exists());
}
