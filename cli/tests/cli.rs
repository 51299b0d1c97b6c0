//! The `moerge` binary end to end on the shared fixtures (models and adapters written by
//! transformers and PEFT): its numbers must equal theirs, its refusals must name the culprit.

mod common;

use common::*;

use std::path::Path;

use safetensors::SafeTensors;

/// `(input_ids, logits rows)` of sequence `i` in a reference or output file.
fn read_logits(file: &Path, suffix: &str) -> (Vec<i64>, Vec<Vec<f32>>) {
    let bytes = std::fs::read(file).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let ids = st.tensor(&format!("input_ids{suffix}")).unwrap();
    let ids: Vec<i64> = ids
        .data()
        .chunks(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let logits = st.tensor(&format!("logits{suffix}")).unwrap();
    assert_eq!(logits.dtype(), safetensors::Dtype::F32);
    let vocab = logits.shape()[1];
    let values: Vec<f32> = logits
        .data()
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    (ids, values.chunks(vocab).map(<[f32]>::to_vec).collect())
}

fn sequence(base: &str, i: usize) -> String {
    let inputs: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join(base).join("reference/inputs.json")).unwrap(),
    )
    .unwrap();
    inputs["sequences"][i].as_str().unwrap().to_string()
}

fn check_logits(base: &str, adapter: Option<&str>) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.safetensors");
    let base_dir = fixtures().join(base);
    let adapter_dir = adapter.map(|a| base_dir.join("adapters").join(a));
    let text = sequence(base, 2);
    let mut args = vec![
        "logits",
        "--base",
        path(&base_dir),
        "--text",
        &text,
        "--out",
        path(&out),
    ];
    if let Some(a) = &adapter_dir {
        args.extend(["--adapter", path(a)]);
    }
    ok(&args);
    let reference = match adapter {
        Some(a) => format!("adapter_{a}_logits.safetensors"),
        None => "base_logits.safetensors".into(),
    };
    let (want_ids, want) = read_logits(&base_dir.join("reference").join(reference), ".2");
    let (got_ids, got) = read_logits(&out, "");
    assert_eq!(got_ids, want_ids, "tokenization differs from transformers'");
    let worst = got
        .iter()
        .flatten()
        .zip(want.iter().flatten())
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(worst <= 1e-4, "{base} {adapter:?}: max |diff| {worst}");
}

#[test]
fn logits_match_transformers_and_peft() {
    check_logits("dev-phi", None);
    check_logits("dev-phi", Some("rot13"));
    check_logits("dev-llama", None);
    check_logits("dev-llama", Some("length"));
}

#[test]
fn score_is_the_mean_nll_of_the_reference_logits() {
    // Sequence 0 is "HeLLo>hEllO\n...": score the answer "hEllO" after the prompt "HeLLo>".
    let base = fixtures().join("dev-phi");
    let adapter = base.join("adapters/swapcase");
    let json = ok(&[
        "score",
        "--base",
        path(&base),
        "--adapter",
        path(&adapter),
        "--prompt",
        "HeLLo>",
        "--completion",
        "hEllO",
        "--json",
    ]);
    let report: serde_json::Value = serde_json::from_str(&json).unwrap();
    let (ids, logits) = read_logits(
        &base.join("reference/adapter_swapcase_logits.safetensors"),
        ".0",
    );
    // Independent NLL from PEFT's logits: position p-1 predicts token p.
    let expected: Vec<f64> = (6..11)
        .map(|p| {
            let row = &logits[p - 1];
            let max = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let lse = max
                + row
                    .iter()
                    .map(|&x| (x as f64 - max).exp())
                    .sum::<f64>()
                    .ln();
            lse - row[ids[p] as usize] as f64
        })
        .collect();
    let tokens = report["tokens"].as_array().unwrap();
    assert_eq!(tokens.len(), 5);
    for (t, e) in tokens.iter().zip(&expected) {
        assert!((t["nll"].as_f64().unwrap() - e).abs() < 1e-4, "{t} vs {e}");
    }
    let mean = expected.iter().sum::<f64>() / 5.0;
    assert!((report["mean_nll"].as_f64().unwrap() - mean).abs() < 1e-4);
    assert_eq!(report["prompt_tokens"], 6);
    assert_eq!(tokens[0]["text"], "h");
}

#[test]
fn greedy_generation_follows_the_argmax_and_sampling_repeats_with_a_seed() {
    let base = fixtures().join("dev-phi");
    let adapter = base.join("adapters/twice");
    let text = sequence("dev-phi", 1);
    let (_, logits) = read_logits(
        &base.join("reference/adapter_twice_logits.safetensors"),
        ".1",
    );
    let last = logits.last().unwrap();
    let argmax = (0..last.len())
        .max_by(|&a, &b| last[a].total_cmp(&last[b]))
        .unwrap() as u8;
    let args = [
        "generate",
        "--base",
        path(&base),
        "--adapter",
        path(&adapter),
        "--prompt",
        &text,
        "--max-tokens",
        "1",
    ];
    let out = ok(&args);
    assert_eq!(
        out.as_bytes()[0],
        argmax,
        "first greedy token {out:?} is not PEFT's argmax {argmax}"
    );

    let sampled = |seed: &str| {
        ok(&[
            "generate",
            "--base",
            path(&base),
            "--prompt",
            "abc>",
            "--max-tokens",
            "12",
            "--temperature",
            "1.5",
            "--seed",
            seed,
        ])
    };
    assert_eq!(sampled("7"), sampled("7"));
    assert!(
        (1..6).any(|s| sampled(&s.to_string()) != sampled("7")),
        "the seed changes nothing"
    );
}

#[test]
fn generation_stops_at_the_stop_text() {
    let base = fixtures().join("dev-phi");
    let full = ok(&[
        "generate",
        "--base",
        path(&base),
        "--prompt",
        "xyz>",
        "--max-tokens",
        "40",
    ]);
    let full = full.trim_end_matches('\n');
    // Stop at the first character the unconstrained run produced after its third.
    let stop: String = full.chars().nth(3).unwrap().to_string();
    let cut = ok(&[
        "generate",
        "--base",
        path(&base),
        "--prompt",
        "xyz>",
        "--max-tokens",
        "40",
        "--stop",
        &stop,
    ]);
    let cut = cut.strip_suffix('\n').unwrap();
    let expected_end = full.find(&stop).unwrap() + stop.len();
    assert_eq!(cut, &full[..expected_end]);
}

#[test]
fn inspect_reports_a_fixture_adapter() {
    let adapter = fixtures().join("dev-phi/adapters/length");
    let report: serde_json::Value =
        serde_json::from_str(&ok(&["inspect", path(&adapter), "--json"])).unwrap();
    assert_eq!(report["state"], "ready");
    assert_eq!(report["rank"], 8);
    assert_eq!(report["alpha"], 32.0);
    assert_eq!(report["scale"], 4.0);
    assert_eq!(report["modules"].as_array().unwrap().len(), 18);
    assert_eq!(report["hash"].as_str().unwrap().len(), 64);
    let text = ok(&[
        "inspect",
        path(&adapter),
        "--base",
        path(&fixtures().join("dev-phi")),
    ]);
    assert!(
        text.contains("compatible") && text.contains("model.layers.2.mlp.fc2"),
        "{text}"
    );
}

#[test]
fn inspect_against_the_wrong_base_says_incompatible_and_fails() {
    let adapter = fixtures().join("dev-phi/adapters/minus");
    let out = run(&[
        "inspect",
        path(&adapter),
        "--base",
        path(&fixtures().join("dev-llama")),
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["state"], "incompatible");
    let reason = report["reason"].as_str().unwrap();
    assert!(
        reason.contains("model.layers.0") && reason.contains("in=96"),
        "{reason}"
    );
}

#[test]
fn a_pickle_adapter_is_refused_without_reading_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pickled");
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(
        fixtures().join("dev-phi/adapters/twice/adapter_config.json"),
        dir.join("adapter_config.json"),
    )
    .unwrap();
    // Not even a valid pickle: moerge must refuse by name, never open it.
    std::fs::write(
        dir.join("adapter_model.bin"),
        b"\x80\x04not really a pickle",
    )
    .unwrap();
    let out = run(&["inspect", path(&dir)]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("adapter_model.bin") && text.contains("pickle"),
        "{text}"
    );

    let run = run(&[
        "score",
        "--base",
        path(&fixtures().join("dev-phi")),
        "--adapter",
        path(&dir),
        "--prompt",
        "a",
        "--completion",
        "b",
    ]);
    assert_eq!(run.status.code(), Some(1));
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("--adapter") && err.contains("adapter_model.bin"),
        "{err}"
    );
}

#[test]
fn missing_inputs_are_named() {
    let out = run(&[
        "score",
        "--base",
        "/nonexistent/base",
        "--prompt",
        "a",
        "--completion",
        "b",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--base") && err.contains("/nonexistent/base"),
        "{err}"
    );

    let base = fixtures().join("dev-phi");
    let out = run(&[
        "score",
        "--base",
        path(&base),
        "--prompt",
        "",
        "--completion",
        "b",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("prompt"));

    let out = run(&[
        "generate",
        "--base",
        path(&base),
        "--prompt",
        "a",
        "--top-p",
        "1.5",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("top_p"));
}
