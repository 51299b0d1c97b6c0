//! `moerge` over D-Bus with the daemon's policy host: policies, `fuse --policy`, a `fit` job
//! stored as a plan and served back with `--saved`, a cancelled fit, and `moerge demo`.

mod remote_support;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use remote_support::*;

const BUILTINS: [&str; 6] = [
    "uniform-merge",
    "learned-merge",
    "ensemble",
    "arrow",
    "sgd-router",
    "hierarchical",
];

/// A data folder (`train.jsonl`, `valid.jsonl`) over the test library's tasks.
fn data_folder(d: &Daemon) -> std::path::PathBuf {
    let dir = d.tmp.path().join("data");
    std::fs::create_dir_all(&dir).unwrap();
    subset(
        &tiny().join("data/train.jsonl"),
        &EXPERTS,
        24,
        &dir.join("train.jsonl"),
    );
    subset(
        &tiny().join("data/valid.jsonl"),
        &EXPERTS,
        8,
        &dir.join("valid.jsonl"),
    );
    dir
}

fn token_nll(v: &serde_json::Value) -> Vec<(u64, f32)> {
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["id"].as_u64().unwrap(), t["nll"].as_f64().unwrap() as f32))
        .collect()
}

#[test]
fn policies_fuse_fit_and_stored_plans() {
    let d = Daemon::start();
    let listed = d.json(&["policies", "--json"]);
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    for builtin in BUILTINS {
        assert!(names.contains(&builtin), "{builtin} missing from {names:?}");
    }

    // fuse --policy: the plan Arrow made, with the parameter passed as a number.
    let fused = d.json(&["fuse", "--policy", "arrow", "--param", "top_k=2", "--json"]);
    assert_eq!(fused["plan"]["default"]["routed"]["top_k"], 2, "{fused}");
    assert!(
        fused["summary"].as_str().unwrap().contains("top-2"),
        "{fused}"
    );
    // Scoring through the policy equals scoring its plan offline.
    let plan = d.tmp.path().join("arrow-policy.json");
    std::fs::write(&plan, fused["plan"].to_string()).unwrap();
    let score = [
        "score",
        "--prompt",
        "upper kiwi>",
        "--completion",
        "KIWI\n",
        "--json",
    ];
    let mut remote_args = score.to_vec();
    remote_args.extend(["--policy", "arrow", "--param", "top_k=2"]);
    let remote = d.json(&remote_args);
    let mut local_args = score.to_vec();
    let base = tiny().join("base");
    local_args.extend([
        "--base",
        path(&base),
        "--library",
        path(&d.library),
        "--plan",
        path(&plan),
    ]);
    let here = json_of(offline(&local_args), &local_args);
    assert_eq!(token_nll(&remote), token_nll(&here));
    // A parameter the policy does not know is refused by name: exit 6.
    let out = d.moerge(&["fuse", "--policy", "arrow", "--param", "top_q=2"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{err}");
    assert!(err.contains("top_q"), "{err}");

    // fit: a job to completion, stored under its name.
    let data = data_folder(&d);
    let fit = d.json(&[
        "fit",
        "--policy",
        "sgd-router",
        "--data",
        path(&data),
        "--param",
        "steps=30",
        "--name",
        "router",
        "--json",
    ]);
    assert_eq!(fit["plan_name"], "router", "{fit}");
    let valid_loss = fit["valid_loss"].as_f64().expect("a validation loss");
    assert!(valid_loss.is_finite());
    let plans = d.json(&["plans", "--json"]);
    let router = plans
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "router")
        .unwrap_or_else(|| panic!("no plan router in {plans}"));
    assert_eq!(router["stale"], false);
    assert_eq!(router["experts"].as_array().unwrap().len(), 3);
    // The stored plan serves: its per-record losses over the validation records average to
    // the fit's validation loss.
    let valid = data.join("valid.jsonl");
    let eval = d.json(&[
        "eval",
        "--saved",
        "router",
        "--data",
        path(&valid),
        "--json",
    ]);
    let tasks = eval["tasks"].as_object().unwrap();
    let (sum, n) = tasks.values().fold((0.0, 0.0), |(s, n), t| {
        let k = t["examples"].as_f64().unwrap();
        (s + t["mean_loss"].as_f64().unwrap() * k, n + k)
    });
    assert!(
        (sum / n - valid_loss).abs() < 1e-3,
        "{eval} vs {valid_loss}"
    );
    let text = d.ok(&[
        "fit",
        "--policy",
        "uniform-merge",
        "--data",
        path(&data),
        "--name",
        "flat",
    ]);
    assert!(text.contains("stored plan flat"), "{text}");

    // plans save / remove.
    d.ok(&["plans", "save", "arrow2", path(&plan)]);
    let score_saved = d.json(&{
        let mut a = score.to_vec();
        a.extend(["--saved", "arrow2"]);
        a
    });
    assert_eq!(token_nll(&score_saved), token_nll(&here));
    d.ok(&["plans", "remove", "arrow2"]);
    let plans = d.json(&["plans", "list", "--json"]);
    assert!(!plans
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "arrow2"));
    let out = d.moerge(&[
        "score",
        "--saved",
        "arrow2",
        "--prompt",
        "a",
        "--completion",
        "b",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{err}");
    assert!(err.contains("arrow2"), "{err}");
}

#[test]
fn a_cancelled_fit_exits_130_and_the_daemon_serves_on() {
    let d = Daemon::start();
    let data = data_folder(&d);
    let mut child = moerge_command(&[
        "fit",
        "--policy",
        "sgd-router",
        "--data",
        path(&data),
        "--param",
        "steps=1000000",
        "--name",
        "never",
    ])
    .args(&d.connect)
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "no job started: {seen}"
        );
        seen.push_str(&line);
        if line.contains("Ctrl-C cancels it") {
            break;
        }
    }
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::INT).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(130), "{seen}{rest}");
    assert!(rest.contains("cancelled"), "{rest}");
    // The daemon serves on, and stored nothing.
    let status = d.json(&["status", "--json"]);
    assert_eq!(status["status"], "serving");
    let plans = d.json(&["plans", "--json"]);
    assert!(!plans
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == "never"));
}

#[test]
fn the_demo_runs_every_policy_and_the_oracle_beats_the_base() {
    let tiny_dir = tiny();
    let out = moerge_command(&[
        "demo",
        "--tasks",
        "2",
        "--records",
        "4",
        "--fit-steps",
        "5",
        "--json",
        "--tiny",
        path(&tiny_dir),
        "--moerged",
        path(moerged()),
    ])
    .output()
    .unwrap();
    let report = json_of(out, &["demo"]);
    let rows = report["rows"].as_array().unwrap();
    let row = |name: &str| {
        rows.iter()
            .find(|r| r["policy"].as_str().unwrap().starts_with(name))
            .unwrap_or_else(|| panic!("no row {name} in {report}"))
    };
    assert_eq!(rows.len(), 2 + BUILTINS.len(), "{report}");
    for r in rows {
        let loss = r["mean_loss"].as_f64().unwrap();
        assert!(loss.is_finite() && loss > 0.0, "{r}");
        assert_eq!(r["task_losses"].as_array().unwrap().len(), 2, "{r}");
    }
    for builtin in BUILTINS {
        row(builtin);
    }
    let (base, oracle) = (row("base model"), row("one expert"));
    assert!(
        oracle["mean_loss"].as_f64().unwrap() <= base["mean_loss"].as_f64().unwrap(),
        "{report}"
    );
    assert_eq!(row("ensemble")["passes_per_token"], 2);
    assert_eq!(row("arrow")["passes_per_token"], 1);
    assert!(
        row("sgd-router")["fit"]["plan_name"].is_string(),
        "{report}"
    );
}

#[test]
fn select_picks_first_the_expert_that_is_best_over_the_tasks() {
    let d = Daemon::start();
    let data = d.tmp.path().join("select.jsonl");
    subset(&tiny().join("data/valid.jsonl"), &EXPERTS, 6, &data);
    let result = d.json(&["select", "--data", path(&data), "--json"]);
    let selection = &result["selection"];
    let order: Vec<&str> = selection["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n.as_str().unwrap())
        .collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(sorted, ["reverse", "rot13", "upper"], "{result}");
    let active = selection["active"].as_u64().unwrap();
    assert!((1..=3).contains(&active), "{result}");
    // Independently: each expert alone, evaluated offline; greedy's first pick is the one
    // with the lowest mean over tasks, and the curve starts at that mean.
    let base = tiny().join("base");
    let mean_of = |expert: &str| {
        let adapter = d.library.join(expert);
        let args = [
            "eval",
            "--base",
            path(&base),
            "--adapter",
            path(&adapter),
            "--data",
            path(&data),
            "--json",
        ];
        json_of(offline(&args), &args)["mean_over_tasks"]
            .as_f64()
            .unwrap()
    };
    let (best, best_mean) = EXPERTS
        .iter()
        .map(|e| (*e, mean_of(e)))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap();
    assert_eq!(order[0], best, "{result}");
    let first = selection["curve"][0].as_f64().unwrap();
    assert!((first - best_mean).abs() < 1e-3, "{first} vs {best_mean}");
    let text = d.ok(&["select", "--data", path(&data)]);
    assert!(
        text.starts_with(&format!("selected {active} of 3 experts: {best}")),
        "{text}"
    );
}

#[test]
fn the_daemon_keeps_selection_and_clusters_current_on_eval_data() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("valid.jsonl");
    subset(
        &tiny().join("data/valid.jsonl"),
        &["upper", "reverse", "rot13", "add"],
        6,
        &data,
    );
    let mut d = Daemon::start_with(&["--eval-data", path(&data)]);
    d.wait_line("clustering refreshed");
    let first = d.json(&["selection", "--json"]);
    let mut order: Vec<String> = first["order"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    order.sort();
    assert_eq!(order, ["reverse", "rot13", "upper"], "{first}");

    // A new expert: the refresher evaluates it and the selection covers it.
    let staged = d.tmp.path().join("add");
    copy_adapter(&tiny().join("experts/add"), &staged);
    d.ok(&["experts", "add", path(&staged)]);
    d.wait_line("selection refreshed");
    let deadline = std::time::Instant::now() + PATIENCE; // a hang guard only
    let second = loop {
        let s = d.json(&["selection", "--json"]);
        if s["order"].as_array().unwrap().len() == 4 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "{s}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    // "add" is the only expert that knows its task: it is in the active set.
    let active: Vec<&str> = second["active_set"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(active.contains(&"add"), "{second}");
    let text = d.ok(&["selection"]);
    assert!(text.contains("active set:"), "{text}");

    let clusters = d.json(&["clusters", "--json"]);
    let mut members: Vec<&str> = clusters["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|c| c.as_array().unwrap().iter().map(|v| v.as_str().unwrap()))
        .collect();
    members.sort();
    assert_eq!(members, ["add", "reverse", "rot13", "upper"], "{clusters}");
    assert!(d.ok(&["clusters"]).contains("members"));
}
