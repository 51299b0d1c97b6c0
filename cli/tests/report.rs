//! `moerge eval --policies all` end to end on the tiny library (3 tasks, a few records, short
//! fits, through the real plugin `.so` files), checked against independent paths: the
//! offline `moerge eval` of the base and of single adapters, `moerge plan merge` for the
//! exact uniform merge, and the report's own greedy curve (scored on the same split).
//! Then `moerge plot` redraws the figures from the saved JSON.

mod common;

use std::path::Path;

use common::{close, moerge_with_plugins, ok, tiny};
use serde_json::Value;

const TASKS: [&str; 3] = ["reverse", "add", "vowel"];
const RECORDS: usize = 4;

/// The first RECORDS validation records of each of TASKS, as the report picks them.
fn valid_subset(out: &Path) {
    let text = std::fs::read_to_string(tiny().join("data/valid.jsonl")).unwrap();
    let mut lines = Vec::new();
    for t in TASKS {
        lines.extend(
            text.lines()
                .filter(|l| l.contains(&format!("\"task\":\"{t}\"")))
                .take(RECORDS),
        );
    }
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
}

/// `moerge eval` (offline, one model) of `data`: per-task mean losses.
fn offline_eval(model: &[&str], data: &Path) -> Value {
    let mut args = vec!["eval", "--json", "--data", data.to_str().unwrap()];
    args.extend_from_slice(model);
    serde_json::from_str(&ok(&args)).unwrap()
}

fn row<'a>(report: &'a Value, key: &str) -> &'a Value {
    report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["key"] == key)
        .unwrap_or_else(|| panic!("no row {key}"))
}

#[test]
fn the_paper_table_agrees_with_independent_computations_and_plots() {
    let tmp = tempfile::tempdir().unwrap();
    let figures = tmp.path().join("figures");
    let out = moerge_with_plugins(&[
        "eval",
        "--policies",
        "all",
        "--split",
        "valid",
        "--tasks",
        &TASKS.join(","),
        "--records",
        &RECORDS.to_string(),
        "--steps",
        "3",
        "--json",
        "--plot",
        figures.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "eval --policies all failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let keys: Vec<&str> = report["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "base",
            "shared",
            "oracle",
            "oracle-cluster",
            "uniform-merge-lowrank",
            "uniform-merge-exact",
            "learned-merge",
            "uniform-ensemble",
            "learned-ensemble",
            "arrow",
            "sgd-router",
            "hierarchical",
            "learned-merge-per-layer",
            "uniform-ensemble-logit",
            "arrow-factors",
            "sgd-router-factors",
            "sgd-router-top1",
            "sgd-router-top4",
            "distilled",
            "ties",
            "ties-svd",
            "dare-linear",
            "dare-ties",
            "magnitude-prune",
            "lp-ensemble",
            "layerwise",
            "layerwise-learned",
        ]
    );
    assert_eq!(report["records"], TASKS.len() * RECORDS);
    for r in report["rows"].as_array().unwrap() {
        let losses = r["task_losses"].as_object().unwrap();
        assert_eq!(losses.len(), TASKS.len(), "{r}");
        // The mean over tasks is the mean of the per-task values.
        let mean = losses.values().map(|v| v.as_f64().unwrap()).sum::<f64>() / 3.0;
        close(
            r["mean_loss"].as_f64().unwrap(),
            mean,
            r["key"].as_str().unwrap(),
        );
        let key = r["key"].as_str().unwrap();
        let passes = r["passes_per_token"].as_f64().unwrap();
        if key == "lp-ensemble" {
            // The LP's vertex keeps at most one expert per task.
            assert!((1.0..=TASKS.len() as f64).contains(&passes), "{r}");
        } else if key.contains("ensemble") {
            assert_eq!(passes, TASKS.len() as f64, "{r}");
        } else {
            assert_eq!(passes, 1.0, "{r}");
        }
        assert!(r["time_vs_one_expert"].as_f64().unwrap() > 0.0, "{r}");
        assert_eq!(
            r["fit"].is_object(),
            [
                "learned",
                "sgd-router",
                "hierarchical",
                "lp-ensemble",
                "layerwise-learned",
                "distilled",
            ]
            .iter()
            .any(|k| key.starts_with(k)),
            "{r}"
        );
    }
    assert_eq!(row(&report, "oracle")["time_vs_one_expert"], 1.0);

    // The base row and the oracle row, against the offline single-model `moerge eval`.
    let data = tmp.path().join("valid.jsonl");
    valid_subset(&data);
    let base_dir = tiny().join("base");
    let base = base_dir.to_str().unwrap();
    let offline = offline_eval(&["--base", base], &data);
    close(
        row(&report, "base")["mean_loss"].as_f64().unwrap(),
        offline["mean_over_tasks"].as_f64().unwrap(),
        "base row vs moerge eval --base",
    );
    for task in TASKS {
        let adapter = tiny().join("experts").join(task);
        let single = offline_eval(
            &["--base", base, "--adapter", adapter.to_str().unwrap()],
            &data,
        );
        close(
            row(&report, "oracle")["task_losses"][task]
                .as_f64()
                .unwrap(),
            single["tasks"][task]["mean_loss"].as_f64().unwrap(),
            &format!("oracle row, task {task}, vs moerge eval --adapter"),
        );
    }

    // The exact uniform merge through the plugin equals `moerge plan merge` (no plugin).
    let library = tiny().join("experts");
    let plan = tmp.path().join("merge.json");
    ok(&[
        "plan",
        "merge",
        "--library",
        library.to_str().unwrap(),
        "--experts",
        &TASKS.join(","),
        "--space",
        "exact",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let merged = offline_eval(
        &[
            "--base",
            base,
            "--library",
            library.to_str().unwrap(),
            "--plan",
            plan.to_str().unwrap(),
        ],
        &data,
    );
    close(
        row(&report, "uniform-merge-exact")["mean_loss"]
            .as_f64()
            .unwrap(),
        merged["mean_over_tasks"].as_f64().unwrap(),
        "uniform-merge exact row vs moerge plan merge",
    );

    // Greedy selection ran on the same records: its reference lines are the table's rows,
    // and its curve falls to the full library's value.
    let greedy = &report["greedy"];
    close(
        greedy["oracle"].as_f64().unwrap(),
        row(&report, "oracle")["mean_loss"].as_f64().unwrap(),
        "greedy oracle line vs oracle row",
    );
    close(
        greedy["base"].as_f64().unwrap(),
        row(&report, "base")["mean_loss"].as_f64().unwrap(),
        "greedy base line vs base row",
    );
    let curve: Vec<f64> = greedy["curve"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let experts = std::fs::read_dir(&library).unwrap().count();
    assert_eq!(curve.len(), experts);
    assert!(curve.windows(2).all(|w| w[1] <= w[0] + 1e-12), "{curve:?}");
    assert_eq!(greedy["full"].as_f64().unwrap(), *curve.last().unwrap());
    let active = greedy["active"].as_u64().unwrap() as usize;
    assert!(active >= 1 && active <= experts);
    assert!(curve[active - 1] <= curve.last().unwrap() * 1.01 + 1e-12);
    // With one expert per task in the library the full value is at most the oracle's.
    assert!(greedy["full"].as_f64().unwrap() <= greedy["oracle"].as_f64().unwrap() + 1e-9);

    // The findings are the orderings of the rows.
    let loss = |k: &str| row(&report, k)["mean_loss"].as_f64().unwrap();
    let finding = |claim: &str| {
        report["findings"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["claim"] == claim)
            .unwrap_or_else(|| panic!("no finding {claim:?}"))["holds"]
            .as_bool()
            .unwrap()
    };
    assert_eq!(
        finding("oracle < SGD router"),
        loss("oracle") < loss("sgd-router")
    );
    assert_eq!(
        finding("learned ensemble ≤ uniform ensemble"),
        loss("learned-ensemble") <= loss("uniform-ensemble")
    );

    // The similarity matrix is of the fused experts, symmetric, with a clustering of them.
    let sim = &report["similarity"];
    assert_eq!(sim["experts"], serde_json::json!(TASKS));
    let m = sim["similarity"].as_array().unwrap();
    let at = |i: usize, j: usize| m[i][j].as_f64().unwrap();
    for (i, j) in (0..3).flat_map(|i| (0..3).map(move |j| (i, j))) {
        close(at(i, j), at(j, i), "symmetry");
        if i == j {
            close(at(i, i), 1.0, "self-similarity");
        }
    }
    assert_eq!(sim["clusters"].as_array().unwrap().len(), 3);
    // The routing map is the SGD router's, over the fused experts, one weight row per token.
    let routing = &report["routing"];
    assert_eq!(routing["experts"], serde_json::json!(TASKS));
    let tokens = routing["tokens"].as_array().unwrap().len();
    for layer in routing["layers"].as_array().unwrap() {
        assert_eq!(layer["weights"].as_array().unwrap().len(), tokens);
    }

    // Figures: drawn by --plot, and again by `moerge plot` from the saved JSON.
    let names = |dir: &Path| {
        let mut n: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        n.sort();
        n
    };
    let expected: Vec<String> = ["greedy", "routing", "similarity", "tradeoff"]
        .iter()
        .flat_map(|f| [format!("{f}.png"), format!("{f}.svg")])
        .collect();
    assert_eq!(names(&figures), expected);
    let saved = tmp.path().join("report.json");
    std::fs::write(&saved, &out.stdout).unwrap();
    let again = tmp.path().join("again");
    ok(&[
        "plot",
        saved.to_str().unwrap(),
        "--out",
        again.to_str().unwrap(),
    ]);
    assert_eq!(names(&again), expected);
    let svg = std::fs::read_to_string(again.join("tradeoff.svg")).unwrap();
    assert!(
        svg.contains("SGD router"),
        "the trade-off plot labels its points"
    );
}

#[test]
fn unknown_rows_and_tasks_are_named() {
    let out = moerge_with_plugins(&["eval", "--policies", "base,nope"]);
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("\"nope\"") && err.contains("sgd-router"),
        "{err}"
    );
    let out = moerge_with_plugins(&["eval", "--policies", "base", "--tasks", "reverse,nosuch"]);
    assert_eq!(out.status.code(), Some(6));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("\"nosuch\""), "{err}");
}
