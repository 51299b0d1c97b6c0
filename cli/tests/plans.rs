//! `moerge plan merge`, `--library/--plan` and `moerge export` end to end on PEFT's fixtures:
//! a plan's logits equal PEFT's merged adapter's, and an export loads back as the same model.

mod common;

use common::*;

#[test]
fn plan_logits_equal_peft_and_exports_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("dev-phi");
    let library = base.join("adapters");
    let (base_s, library_s) = (base.to_str().unwrap(), library.to_str().unwrap());
    let plan = tmp.path().join("linear.json");
    // PEFT's linear merge with p = 0.2 is the low-rank merge with w = sqrt(0.2).
    let w = format!("{0},{0},{0},{0},{0}", 0.2f64.sqrt());
    ok(&[
        "plan",
        "merge",
        "--library",
        library_s,
        "--experts",
        "swapcase,rot13,twice,length,minus",
        "--weights",
        &w,
        "--space",
        "lowrank",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let text = std::fs::read_to_string(base.join("reference/inputs.json")).unwrap();
    let inputs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sequence = inputs["sequences"][0].as_str().unwrap();
    let out = tmp.path().join("plan.safetensors");
    ok(&[
        "logits",
        "--base",
        base_s,
        "--library",
        library_s,
        "--plan",
        plan.to_str().unwrap(),
        "--text",
        sequence,
        "--out",
        out.to_str().unwrap(),
    ]);
    let want = f32_tensor(
        &base.join("reference/merge_linear_logits.safetensors"),
        "logits.0",
    );
    let got = f32_tensor(&out, "logits");
    assert!(
        max_diff(&got, &want) <= 1e-4,
        "plan vs PEFT linear merge: {}",
        max_diff(&got, &want)
    );

    let exported = tmp.path().join("merged");
    ok(&[
        "export",
        "--library",
        library_s,
        "--plan",
        plan.to_str().unwrap(),
        "--out",
        exported.to_str().unwrap(),
    ]);
    let report: serde_json::Value = serde_json::from_str(&ok(&[
        "inspect",
        exported.to_str().unwrap(),
        "--base",
        base_s,
        "--json",
    ]))
    .unwrap();
    assert_eq!(report["state"], "ready");
    assert_eq!(report["rank"], 8);
    let out2 = tmp.path().join("export.safetensors");
    ok(&[
        "logits",
        "--base",
        base_s,
        "--adapter",
        exported.to_str().unwrap(),
        "--text",
        sequence,
        "--out",
        out2.to_str().unwrap(),
    ]);
    assert!(max_diff(&f32_tensor(&out2, "logits"), &got) <= 1e-4);
}

#[test]
fn stale_and_malformed_plans_are_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("dev-phi");
    let library = base.join("adapters");
    let (base_s, library_s) = (base.to_str().unwrap(), library.to_str().unwrap());
    let plan = ok(&[
        "plan",
        "merge",
        "--library",
        library_s,
        "--experts",
        "rot13,twice",
        "--space",
        "exact",
    ]);
    let mut value: serde_json::Value = serde_json::from_str(&plan).unwrap();
    value["experts"][1]["hash"] = "0".repeat(64).into();
    let stale = tmp.path().join("stale.json");
    std::fs::write(&stale, value.to_string()).unwrap();
    let out = run(&[
        "score",
        "--base",
        base_s,
        "--library",
        library_s,
        "--plan",
        stale.to_str().unwrap(),
        "--prompt",
        "a",
        "--completion",
        "b",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("experts[1].hash") && err.contains("twice"),
        "{err}"
    );

    value["experts"][1]["name"] = "nope".into();
    std::fs::write(&stale, value.to_string()).unwrap();
    let out = run(&[
        "score",
        "--base",
        base_s,
        "--library",
        library_s,
        "--plan",
        stale.to_str().unwrap(),
        "--prompt",
        "a",
        "--completion",
        "b",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown expert \"nope\""));

    value["moerge_plan"] = 7.into();
    std::fs::write(&stale, value.to_string()).unwrap();
    let out = run(&[
        "score",
        "--base",
        base_s,
        "--library",
        library_s,
        "--plan",
        stale.to_str().unwrap(),
        "--prompt",
        "a",
        "--completion",
        "b",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("version 7"));

    // --plan and --adapter do not mix.
    let out = run(&[
        "score",
        "--base",
        base_s,
        "--adapter",
        library.join("rot13").to_str().unwrap(),
        "--library",
        library_s,
        "--plan",
        stale.to_str().unwrap(),
        "--prompt",
        "a",
        "--completion",
        "b",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn arrow_plan_equals_peft_arrow() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("dev-llama");
    let library = base.join("adapters");
    let (base_s, library_s) = (base.to_str().unwrap(), library.to_str().unwrap());
    let plan = tmp.path().join("arrow.json");
    // Every adapter folder of the library, in name order (PEFT's order differs: routing does not care).
    ok(&[
        "plan",
        "arrow",
        "--library",
        library_s,
        "--top-k",
        "3",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(written["experts"].as_array().unwrap().len(), 5);
    assert_eq!(written["default"]["routed"]["top_k"], 3);
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("reference/inputs.json")).unwrap())
            .unwrap();
    let out = tmp.path().join("arrow.safetensors");
    ok(&[
        "logits",
        "--base",
        base_s,
        "--library",
        library_s,
        "--plan",
        plan.to_str().unwrap(),
        "--text",
        inputs["sequences"][1].as_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let want = f32_tensor(
        &base.join("reference/arrow_top3_exactproto_logits.safetensors"),
        "logits.1",
    );
    assert!(max_diff(&f32_tensor(&out, "logits"), &want) <= 1e-4);

    let too_many = run(&["plan", "arrow", "--library", library_s, "--top-k", "6"]);
    assert_eq!(too_many.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&too_many.stderr).contains("top_k"));
}

#[test]
fn ensemble_plan_equals_peft_reference_mixture() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("dev-phi");
    let library = base.join("adapters");
    let (base_s, library_s) = (base.to_str().unwrap(), library.to_str().unwrap());
    let plan = tmp.path().join("ensemble.json");
    ok(&[
        "plan",
        "ensemble",
        "--library",
        library_s,
        "--experts",
        "swapcase,rot13,twice,length,minus",
        "--out",
        plan.to_str().unwrap(),
    ]);
    let inputs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("reference/inputs.json")).unwrap())
            .unwrap();
    let out = tmp.path().join("ensemble.safetensors");
    ok(&[
        "logits",
        "--base",
        base_s,
        "--library",
        library_s,
        "--plan",
        plan.to_str().unwrap(),
        "--text",
        inputs["sequences"][2].as_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    // For a probability ensemble `moerge logits` writes the log of the mixture probabilities.
    let want = f32_tensor(
        &base.join("reference/ensemble_uniform.safetensors"),
        "log_probs.2",
    );
    assert!(max_diff(&f32_tensor(&out, "logits"), &want) <= 1e-4);

    let bad = run(&[
        "plan",
        "ensemble",
        "--library",
        library_s,
        "--experts",
        "rot13,twice",
        "--weights",
        "0.7,0.7",
    ]);
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("sum to 1.4"));
}

#[test]
fn explain_reports_pefts_arrow_routing_and_arrow_plans_export_their_config() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixtures().join("dev-phi");
    let library = base.join("adapters");
    let plan = tmp.path().join("arrow.json");
    ok(&[
        "plan",
        "arrow",
        "--library",
        path(&library),
        "--experts",
        "swapcase,rot13,twice,length,minus",
        "--top-k",
        "2",
        "--out",
        path(&plan),
    ]);
    let text = std::fs::read_to_string(base.join("reference/inputs.json")).unwrap();
    let inputs: serde_json::Value = serde_json::from_str(&text).unwrap();
    let sequence = inputs["sequences"][0].as_str().unwrap();
    let explained = json(&[
        "explain",
        "--base",
        path(&base),
        "--library",
        path(&library),
        "--plan",
        path(&plan),
        "--prompt",
        sequence,
        "--json",
    ]);
    let tokens = explained["tokens"].as_array().unwrap().len();
    let modules = explained["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 18, "3 layers x 6 routed modules");
    let reference = base.join("reference/arrow_top2_exactproto_routing.safetensors");
    for m in modules {
        let name = m["module"].as_str().unwrap();
        let got: Vec<f32> = m["weights"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_f64().unwrap() as f32)
            })
            .collect();
        assert_eq!(got.len(), tokens * 5);
        let want = f32_tensor(&reference, &format!("{name}.coeff.0"));
        assert!(
            max_diff(&got, &want) <= 1e-4,
            "{name}: {}",
            max_diff(&got, &want)
        );
    }
    // The table names experts per layer.
    let table = ok(&[
        "explain",
        "--base",
        path(&base),
        "--library",
        path(&library),
        "--plan",
        path(&plan),
        "--prompt",
        sequence,
    ]);
    assert!(
        table.contains("layer 0") && table.contains("layer 2"),
        "{table}"
    );

    let out = tmp.path().join("peft-arrow");
    ok(&[
        "export",
        "--library",
        path(&library),
        "--plan",
        path(&plan),
        "--out",
        path(&out),
    ]);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("arrow_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["arrow_config"]["top_k"], 2);
    assert_eq!(config["arrow_config"]["router_temperature"], 1.0);
    let names: Vec<&str> = config["adapters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["swapcase", "rot13", "twice", "length", "minus"]);
    assert!(
        std::path::Path::new(config["adapters"][1]["path"].as_str().unwrap())
            .join("adapter_config.json")
            .is_file()
    );
}
