//! `moerge interpolate A B` on the tiny library, against independent paths: both ends are the
//! experts alone (offline `moerge eval --adapter`), the midpoint of the exact merge is
//! `moerge plan merge --space exact` of the pair, and with one record per task the oracle is
//! the better expert per task.

mod common;

use std::path::Path;

use common::{close, ok, run, tiny};
use serde_json::Value;

const A: &str = "reverse";
const B: &str = "add";

/// The first validation record of each task, as `--records 1` picks them.
fn first_records(out: &Path) {
    let text = std::fs::read_to_string(tiny().join("data/valid.jsonl")).unwrap();
    let lines: Vec<&str> = [A, B]
        .iter()
        .map(|t| {
            text.lines()
                .find(|l| l.contains(&format!("\"task\":\"{t}\"")))
                .unwrap()
        })
        .collect();
    std::fs::write(out, lines.join("\n") + "\n").unwrap();
}

#[test]
fn the_curve_agrees_with_the_experts_and_the_plan_merge() {
    let tmp = tempfile::tempdir().unwrap();
    let figures = tmp.path().join("figures");
    let report: Value = serde_json::from_str(&ok(&[
        "interpolate",
        A,
        B,
        "--steps",
        "3",
        "--records",
        "1",
        "--json",
        "--plot",
        figures.to_str().unwrap(),
    ]))
    .unwrap();
    let points = report["points"].as_array().unwrap();
    let ts: Vec<f64> = points.iter().map(|p| p["t"].as_f64().unwrap()).collect();
    assert_eq!(ts, [0.0, 0.5, 1.0]);
    assert_eq!(report["records"], 2);

    let data = tmp.path().join("valid.jsonl");
    first_records(&data);
    let base = tiny().join("base");
    let library = tiny().join("experts");
    let eval = |model: &[&str]| -> Value {
        let mut args = vec!["eval", "--json", "--data", data.to_str().unwrap()];
        args.extend_from_slice(model);
        serde_json::from_str(&ok(&args)).unwrap()
    };
    let alone = |name: &str| {
        let adapter = library.join(name);
        eval(&[
            "--base",
            base.to_str().unwrap(),
            "--adapter",
            adapter.to_str().unwrap(),
        ])
    };
    let (ea, eb) = (alone(A), alone(B));
    for (point, single, end) in [
        (&points[0], &ea, "t = 0 vs A"),
        (&points[2], &eb, "t = 1 vs B"),
    ] {
        for task in [A, B] {
            close(
                point["task_losses"][task].as_f64().unwrap(),
                single["tasks"][task]["mean_loss"].as_f64().unwrap(),
                &format!("{end}, task {task}"),
            );
        }
    }
    // With one record per task the oracle is the mean over tasks of the better expert.
    let better: f64 = [A, B]
        .iter()
        .map(|t| {
            let l = |e: &Value| e["tasks"][t]["mean_loss"].as_f64().unwrap();
            l(&ea).min(l(&eb))
        })
        .sum::<f64>()
        / 2.0;
    close(report["oracle"].as_f64().unwrap(), better, "oracle");
    let base_eval = eval(&["--base", base.to_str().unwrap()]);
    close(
        report["base"].as_f64().unwrap(),
        base_eval["mean_over_tasks"].as_f64().unwrap(),
        "base line",
    );

    // The midpoint of the exact merge is the uniform exact merge of the pair.
    let plan = tmp.path().join("merge.json");
    ok(&[
        "plan",
        "merge",
        "--library",
        library.to_str().unwrap(),
        "--experts",
        &format!("{A},{B}"),
        "--space",
        "exact",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let merged = eval(&[
        "--base",
        base.to_str().unwrap(),
        "--library",
        library.to_str().unwrap(),
        "--plan",
        plan.to_str().unwrap(),
    ]);
    close(
        points[1]["loss"].as_f64().unwrap(),
        merged["mean_over_tasks"].as_f64().unwrap(),
        "t = 0.5 vs moerge plan merge --space exact",
    );

    for ext in ["svg", "png"] {
        let file = figures.join(format!("interpolation.{ext}"));
        assert!(
            std::fs::metadata(&file).unwrap().len() > 1000,
            "{}",
            file.display()
        );
    }
    let svg = std::fs::read_to_string(figures.join("interpolation.svg")).unwrap();
    assert!(svg.contains("Interpolating"));
}

#[test]
fn bad_arguments_name_what_is_wrong() {
    for (args, words) in [
        (
            vec!["interpolate", A, "nope"],
            vec!["\"nope\"", "not an expert"],
        ),
        (vec!["interpolate", A, A], vec!["two different experts"]),
        (
            vec!["interpolate", A, B, "--steps", "1"],
            vec!["--steps 1", "at least 2"],
        ),
    ] {
        let out = run(&args);
        assert_eq!(out.status.code(), Some(6), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        for w in words {
            assert!(err.contains(w), "{args:?}: {err}");
        }
    }
}
