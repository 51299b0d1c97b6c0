//! `moerge` over D-Bus end to end: the real `moerged` binary on a private socket (and once on
//! a private dbus-daemon) over three tiny experts, driven by the real `moerge` binary. Numbers
//! are checked against the offline commands, which run the engine in-process.

mod remote_support;

use remote_support::*;

/// The offline flags that load the same model as the daemon's library.
fn local<'a>(d: &'a Daemon, plan: &'a str) -> Vec<&'a str> {
    vec![
        "--base",
        tiny_base(),
        "--library",
        path(&d.library),
        "--plan",
        plan,
    ]
}

fn tiny_base() -> &'static str {
    static BASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BASE.get_or_init(|| tiny().join("base").to_str().unwrap().to_string())
}

fn with<'a>(mut a: Vec<&'a str>, b: &[&'a str]) -> Vec<&'a str> {
    a.extend_from_slice(b);
    a
}

fn code(out: &std::process::Output) -> Option<i32> {
    out.status.code()
}

#[test]
fn status_and_the_expert_commands() {
    let d = Daemon::start();
    let status = d.json(&["status", "--json"]);
    assert_eq!(status["status"], "serving");
    assert_eq!(status["base_model"], "base");
    // An f32 checkpoint is served in f32 by default (`--precision auto`).
    assert_eq!(status["precision"], "f32");
    // The daemon holds at least its base model's weights.
    let weights: u64 = std::fs::read_dir(tiny().join("base"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(
        status["resident_bytes"].as_u64().unwrap() > weights,
        "{status} vs {weights} bytes of weights"
    );
    assert_eq!(status["expert_count"], 3);
    assert_eq!(status["ready_experts"], 3);
    assert_eq!(status["models"].as_array().unwrap().len(), 0);

    let listed = d.json(&["experts", "list", "--json"]);
    let mut names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["reverse", "rot13", "upper"]);
    // The daemon's hash is the library's content hash, as `inspect` computes it offline.
    let shown = d.json(&["experts", "show", "upper", "--json"]);
    let inspected = json_of(
        offline(&["inspect", path(&d.library.join("upper")), "--json"]),
        &["inspect"],
    );
    assert_eq!(shown["hash"], inspected["hash"], "{shown} vs {inspected}");
    assert_eq!(shown["state"], "ready");

    // A copied adapter is added under its folder name (a relative path is made absolute).
    let incoming = d.tmp.path().join("incoming");
    copy_adapter(&tiny().join("experts/first"), &incoming.join("first"));
    let added = moerge_command(&["experts", "add", "first", "--json"])
        .args(&d.connect)
        .current_dir(&incoming)
        .output()
        .unwrap();
    let added = json_of(added, &["experts", "add"]);
    assert_eq!(added["name"], "first");
    assert!(d.library.join("first/adapter_model.safetensors").is_file());
    let listed = d.json(&["experts", "list", "--json"]);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "first"));
    let table = d.ok(&["experts", "list"]);
    assert!(table.lines().next().unwrap().starts_with("name"), "{table}");
    assert!(table.contains("first"), "{table}");

    d.ok(&["experts", "remove", "first"]);
    assert!(!d.library.join("first").exists());
    let listed = d.json(&["experts", "list", "--json"]);
    assert_eq!(listed.as_array().unwrap().len(), 3);

    // Unknown names: exit 5, the name in the message.
    for args in [
        &["experts", "show", "nope"][..],
        &["experts", "remove", "nope"][..],
    ] {
        let out = d.moerge(args);
        assert_eq!(code(&out), Some(5), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("moerge: ") && err.contains("nope"), "{err}");
    }
    // A plan naming an unknown expert: exit 5 too, through FusePlan.
    let plan = d.tmp.path().join("ghost.json");
    std::fs::write(
        &plan,
        r#"{"moerge_plan": 1, "experts": [{"name": "ghost", "hash": "0000000000000000000000000000000000000000000000000000000000000000"}],
            "default": {"static": {"weights": [1.0], "space": "lowrank"}}}"#,
    )
    .unwrap();
    let out = d.moerge(&["fuse", "--plan", path(&plan)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(code(&out), Some(5), "{err}");
    assert!(err.contains("ghost"), "{err}");
}

#[test]
fn model_commands_over_the_daemon_match_offline() {
    let d = Daemon::start();
    let tmp = d.tmp.path();
    let arrow = tmp.join("arrow.json");
    let merge = tmp.join("merge.json");
    let lib = path(&d.library);
    stdout_of(
        offline(&[
            "plan",
            "arrow",
            "--library",
            lib,
            "--top-k",
            "2",
            "--out",
            path(&arrow),
        ]),
        &["plan arrow"],
    );
    stdout_of(
        offline(&[
            "plan",
            "merge",
            "--library",
            lib,
            "--experts",
            "rot13,upper",
            "--out",
            path(&merge),
        ]),
        &["plan merge"],
    );
    let (arrow, merge) = (path(&arrow), path(&merge));

    // score: the same tokens and the same per-token NLL (the daemon widens f32 to f64).
    let score = [
        "score",
        "--prompt",
        "rot13 kamilo>",
        "--completion",
        "xnzvyb\n",
        "--json",
    ];
    let remote = d.json(&with(score.to_vec(), &["--plan", arrow]));
    let here = json_of(offline(&with(score.to_vec(), &local(&d, arrow))), &score);
    let nll = |v: &serde_json::Value| -> Vec<(u64, f32)> {
        v["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| (t["id"].as_u64().unwrap(), t["nll"].as_f64().unwrap() as f32))
            .collect()
    };
    assert_eq!(nll(&remote), nll(&here));
    assert!(!nll(&here).is_empty());
    let (rm, hm) = (
        remote["mean_nll"].as_f64().unwrap(),
        here["mean_nll"].as_f64().unwrap(),
    );
    assert!((rm - hm).abs() < 1e-5, "{rm} vs {hm}");

    // generate: the streamed text is the offline greedy text.
    for plan in [arrow, merge] {
        let gen = [
            "generate",
            "--prompt",
            "rot13 kamilo>",
            "--max-tokens",
            "12",
        ];
        let remote = d.ok(&with(gen.to_vec(), &["--plan", plan]));
        let here = stdout_of(offline(&with(gen.to_vec(), &local(&d, plan))), &gen);
        assert_eq!(remote, here, "{plan}");
        assert!(!here.trim().is_empty());
    }

    // explain --json: the same routing weights, exactly.
    let explain = ["explain", "--prompt", "upper kiwi>", "--json"];
    let remote = d.json(&with(explain.to_vec(), &["--plan", arrow]));
    let here = json_of(
        offline(&with(explain.to_vec(), &local(&d, arrow))),
        &explain,
    );
    assert_eq!(remote, here);
    assert!(!here["modules"].as_array().unwrap().is_empty());

    // eval: per-task means from one Score call per record agree with the batched offline eval.
    let data = tmp.join("data.jsonl");
    subset(
        &tiny().join("data/test.jsonl"),
        &["upper", "rot13"],
        6,
        &data,
    );
    let eval = ["eval", "--data", path(&data), "--json"];
    let remote = d.json(&with(eval.to_vec(), &["--plan", arrow]));
    let here = json_of(offline(&with(eval.to_vec(), &local(&d, arrow))), &eval);
    let tasks = |v: &serde_json::Value| v["tasks"].as_object().unwrap().clone();
    assert_eq!(tasks(&remote).len(), 2);
    for (task, t) in tasks(&here) {
        let r = &tasks(&remote)[&task];
        assert_eq!(r["examples"], t["examples"]);
        let (a, b) = (
            r["mean_loss"].as_f64().unwrap(),
            t["mean_loss"].as_f64().unwrap(),
        );
        assert!((a - b).abs() < 1e-4, "{task}: {a} vs {b}");
    }

    // export: the daemon writes the same adapter as the offline export (same content hash).
    let (remote_out, here_out) = (tmp.join("exported-remote"), tmp.join("exported-here"));
    d.ok(&["export", "--plan", merge, "--out", path(&remote_out)]);
    stdout_of(
        offline(&[
            "export",
            "--library",
            lib,
            "--plan",
            merge,
            "--out",
            path(&here_out),
        ]),
        &["export"],
    );
    let hash = |dir: &std::path::Path| {
        json_of(offline(&["inspect", path(dir), "--json"]), &["inspect"])["hash"].clone()
    };
    assert_eq!(hash(&remote_out), hash(&here_out));
    // A routed plan is not one adapter: refused, nothing written.
    let out = d.moerge(&["export", "--plan", arrow, "--out", path(&tmp.join("no"))]);
    assert!(!out.status.success());
    assert!(!tmp.join("no").exists());

    // fuse: a check that it fuses, then released.
    let fused = d.json(&["fuse", "--plan", merge, "--json"]);
    assert!(
        fused["summary"].as_str().unwrap().contains("rot13"),
        "{fused}"
    );
    let status = d.json(&["status", "--json"]);
    assert_eq!(status["models"].as_array().unwrap().len(), 0, "{status}");
}

#[test]
fn no_daemon_is_exit_3_with_how_to_start_one() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = format!("unix:path={}", tmp.path().join("none.sock").display());
    for args in [
        vec!["status", "--address", &socket],
        vec!["experts", "list", "--address", &socket],
        vec![
            "score",
            "--policy",
            "arrow",
            "--prompt",
            "a",
            "--completion",
            "b",
            "--address",
            &socket,
        ],
    ] {
        let out = offline(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(code(&out), Some(3), "{args:?}: {err}");
        assert!(err.contains("moerged --library"), "{err}");
    }
    // $MOERGE_ADDRESS stands in for --address.
    let out = moerge_command(&["status"])
        .env("MOERGE_ADDRESS", &socket)
        .output()
        .unwrap();
    assert_eq!(code(&out), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("none.sock"));
    // A malformed address is an invalid argument, named.
    let out = offline(&["status", "--address", "/tmp/x.sock"]);
    assert_eq!(code(&out), Some(6));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--address /tmp/x.sock"));
    // Over a bus with no moerged on it: 3 as well.
    let out = offline(&["status", "--bus-address", &socket]);
    assert_eq!(code(&out), Some(3));
}

#[test]
fn a_daemon_on_a_private_bus_serves_through_bus_address() {
    let d = Daemon::start_on_bus();
    let status = d.json(&["status", "--json"]);
    assert_eq!(status["expert_count"], 3);
    let plan = d.tmp.path().join("rot13.json");
    stdout_of(
        offline(&[
            "plan",
            "merge",
            "--library",
            path(&d.library),
            "--experts",
            "rot13",
            "--out",
            path(&plan),
        ]),
        &["plan"],
    );
    // Streaming goes through the bus's signal routing here.
    let gen = [
        "generate",
        "--prompt",
        "rot13 kamilo>",
        "--max-tokens",
        "12",
    ];
    let remote = d.ok(&with(gen.to_vec(), &["--plan", path(&plan)]));
    let here = stdout_of(offline(&with(gen.to_vec(), &local(&d, path(&plan)))), &gen);
    assert_eq!(remote, here);
}
