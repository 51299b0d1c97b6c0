//! Base model folders built here: sharded weights, other families, and each refusal.

mod support;

use std::path::Path;

use moerge_library::{BaseModelInfo, Dtype, LinearShape};
use serde_json::json;
use support::*;

fn zeros(name: &str, shape: &[usize]) -> Tensor {
    Tensor::f32(name, shape, &vec![0.0; shape.iter().product()])
}

/// A tiny sharded llama: embeddings and layer 0 in one shard, the rest in another.
fn sharded(dir: &Path) {
    write_json(
        &dir.join("config.json"),
        &json!({"model_type": "llama", "tie_word_embeddings": false}),
    );
    write_tensors(
        &dir.join("model-00001-of-00002.safetensors"),
        &[
            zeros("model.embed_tokens.weight", &[10, 4]),
            zeros("model.layers.0.self_attn.q_proj.weight", &[4, 4]),
        ],
    );
    write_tensors(
        &dir.join("model-00002-of-00002.safetensors"),
        &[
            zeros("lm_head.weight", &[10, 4]),
            zeros("model.norm.weight", &[4]),
            zeros("model.layers.0.mlp.up_proj.weight", &[6, 4]),
        ],
    );
    let map = |shard: u32| format!("model-0000{shard}-of-00002.safetensors");
    write_json(
        &dir.join("model.safetensors.index.json"),
        &json!({"metadata": {}, "weight_map": {
            "model.embed_tokens.weight": map(1),
            "model.layers.0.self_attn.q_proj.weight": map(1),
            "lm_head.weight": map(2),
            "model.norm.weight": map(2),
            "model.layers.0.mlp.up_proj.weight": map(2),
        }}),
    );
}

#[test]
fn sharded_weights_are_read_through_the_index() {
    let tmp = tempfile::tempdir().unwrap();
    sharded(tmp.path());
    let base = BaseModelInfo::from_dir(tmp.path()).unwrap();
    assert_eq!(base.weight_files().len(), 2);
    assert!(base.weight_files()[0].ends_with("model-00001-of-00002.safetensors"));
    let linear: Vec<&str> = base.linear_modules().keys().map(String::as_str).collect();
    assert_eq!(
        linear,
        [
            "lm_head",
            "model.layers.0.mlp.up_proj",
            "model.layers.0.self_attn.q_proj"
        ]
    );
    assert_eq!(
        base.linear_modules()["model.layers.0.mlp.up_proj"],
        LinearShape {
            out_features: 6,
            in_features: 4,
            dtype: Dtype::F32
        }
    );
    assert_eq!(base.tensor_shape("model.norm.weight"), Some(&[4][..]));
}

#[test]
fn other_families_use_the_generic_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    write_json(
        &dir.join("config.json"),
        &json!({"model_type": "gpt_neox", "tie_word_embeddings": true}),
    );
    write_tensors(
        &dir.join("model.safetensors"),
        &[
            zeros("gpt_neox.embed_in.weight", &[10, 4]),
            zeros(
                "gpt_neox.layers.0.attention.query_key_value.weight",
                &[12, 4],
            ),
            zeros("gpt_neox.layers.0.attention.query_key_value.bias", &[12]),
            zeros("gpt_neox.layers.0.input_layernorm.weight", &[4]),
            zeros("gpt_neox.layers.0.weird_norm_matrix.weight", &[4, 4]),
            zeros("embed_out.weight", &[10, 4]),
        ],
    );
    let base = BaseModelInfo::from_dir(dir).unwrap();
    assert_eq!(base.model_type(), "gpt_neox");
    let linear: Vec<&str> = base.linear_modules().keys().map(String::as_str).collect();
    // No embed_tokens here, so tying adds no lm_head; "embed" and "norm" names are excluded.
    assert_eq!(linear, ["gpt_neox.layers.0.attention.query_key_value"]);
}

fn check(label: &str, build: fn(&Path), expected: &[&str]) -> Result<(), String> {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("base");
    std::fs::create_dir(&dir).unwrap();
    sharded(&dir);
    build(&dir);
    match BaseModelInfo::from_dir(&dir) {
        Ok(_) => Err(format!("{label}: accepted")),
        Err(e) => match expected.iter().find(|x| !e.to_string().contains(*x)) {
            Some(missing) => Err(format!("{label}: {e:?} / {e} lacks {missing:?}")),
            None => Ok(()),
        },
    }
}

type Case = (&'static str, fn(&Path), &'static [&'static str]);

const CASES: &[Case] = &[
    (
        "no config",
        |d| std::fs::remove_file(d.join("config.json")).unwrap(),
        &["base", "no config.json"],
    ),
    (
        "config not JSON",
        |d| std::fs::write(d.join("config.json"), "{").unwrap(),
        &["base/config.json", "not valid JSON"],
    ),
    (
        "no model_type",
        |d| write_json(&d.join("config.json"), &json!({})),
        &["base/config.json", "\"model_type\""],
    ),
    (
        "pickle only",
        |d| {
            std::fs::remove_file(d.join("model.safetensors.index.json")).unwrap();
            std::fs::write(d.join("pytorch_model.bin"), b"pickle").unwrap();
        },
        &["base", "pytorch_model.bin", "pickle"],
    ),
    (
        "no weights",
        |d| std::fs::remove_file(d.join("model.safetensors.index.json")).unwrap(),
        &["base", "no model.safetensors"],
    ),
    (
        "shard outside the folder",
        |d| {
            write_json(
                &d.join("model.safetensors.index.json"),
                &json!({"weight_map": {"lm_head.weight": "../x.safetensors"}}),
            )
        },
        &[
            "model.safetensors.index.json",
            "lm_head.weight",
            "../x.safetensors",
            "plain file name",
        ],
    ),
    (
        "index names the wrong shard",
        |d| {
            let path = d.join("model.safetensors.index.json");
            let mut index = read_json(&path);
            index["weight_map"]["lm_head.weight"] = json!("model-00001-of-00002.safetensors");
            write_json(&path, &index);
        },
        &[
            "model.safetensors.index.json",
            "lm_head.weight",
            "does not contain it",
        ],
    ),
    (
        "tensor in two shards",
        |d| {
            write_tensors(
                &d.join("model-00002-of-00002.safetensors"),
                &[zeros("model.embed_tokens.weight", &[10, 4])],
            )
        },
        &[
            "model-00002-of-00002.safetensors",
            "model.embed_tokens.weight",
            "also appears in",
        ],
    ),
    (
        "truncated shard",
        |d| {
            let path = d.join("model-00002-of-00002.safetensors");
            let bytes = std::fs::read(&path).unwrap();
            std::fs::write(&path, &bytes[..bytes.len() - 8]).unwrap();
        },
        &[
            "model-00002-of-00002.safetensors",
            "model.layers.0.mlp.up_proj.weight",
            "beyond the data area",
        ],
    ),
    (
        "header length beyond the shard",
        |d| {
            std::fs::write(
                d.join("model-00001-of-00002.safetensors"),
                1000u64.to_le_bytes(),
            )
            .unwrap()
        },
        &["model-00001-of-00002.safetensors", "truncated"],
    ),
];

#[test]
fn each_base_refusal_names_file_and_cause() {
    let failures: Vec<String> = CASES
        .iter()
        .filter_map(|(label, build, expected)| check(label, *build, expected).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        CASES.len(),
        failures.join("\n")
    );
    assert!(
        check("unchanged", |_| {}, &[]).is_err_and(|e| e.ends_with("accepted")),
        "the unmutated base must load"
    );
}
