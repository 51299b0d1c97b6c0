//! Adapters PEFT can write that the fixtures do not show: adapter-name segments, rsLoRA,
//! rank and alpha patterns, regex targets, half-precision factors, fan_in_fan_out, a LoRA
//! on a tied lm_head. Each is built here from a real adapter and must load with the
//! semantics PEFT gives it.

mod support;

use std::path::{Path, PathBuf};

use moerge_library::{Adapter, BaseModelInfo, Dtype, Incompatibility, TargetModules};
use serde_json::{json, Value};
use support::*;

/// A writable copy of a fixture adapter, edited by `edit`.
fn variant(model: &str, task: &str, edit: impl FnOnce(&Path)) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(format!("{task}-variant"));
    copy_adapter(&adapter_dir(model, task), &dir);
    edit(&dir);
    (tmp, dir)
}

fn edit_config(dir: &Path, pairs: &[(&str, Value)]) {
    let path = dir.join("adapter_config.json");
    let mut config = read_json(&path);
    for (k, v) in pairs {
        config[*k] = v.clone();
    }
    write_json(&path, &config);
}

fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut Vec<Tensor>)) {
    let path = dir.join("adapter_model.safetensors");
    let mut tensors = read_tensors(&path);
    edit(&mut tensors);
    write_tensors(&path, &tensors);
}

#[test]
fn adapter_name_segment_is_accepted() {
    let original = Adapter::load(&adapter_dir("dev-phi", "swapcase")).unwrap();
    let (_tmp, dir) = variant("dev-phi", "swapcase", |d| {
        edit_tensors(d, |ts| {
            ts.iter_mut()
                .for_each(|t| t.name = t.name.replace(".weight", ".default.weight"))
        })
    });
    let adapter = Adapter::load(&dir).unwrap();
    assert_eq!(
        adapter.modules().keys().collect::<Vec<_>>(),
        original.modules().keys().collect::<Vec<_>>()
    );
    let m = &adapter.modules()["model.layers.1.self_attn.q_proj"];
    assert_eq!(
        m.a.name,
        "base_model.model.model.layers.1.self_attn.q_proj.lora_A.default.weight"
    );
    let o = &original.modules()["model.layers.1.self_attn.q_proj"];
    assert_eq!(adapter.tensor_f32(&m.a), original.tensor_f32(&o.a));
}

#[test]
fn rslora_scales_by_the_square_root_of_the_rank() {
    let (_tmp, dir) = variant("dev-llama", "length", |d| {
        edit_config(d, &[("use_rslora", json!(true))])
    });
    let adapter = Adapter::load(&dir).unwrap();
    for m in adapter.modules().values() {
        assert_eq!(m.scale, 32.0 / 8f64.sqrt(), "{}", m.module);
    }
}

#[test]
fn rank_and_alpha_patterns_apply_per_module() {
    // Module model.layers.1.mlp.fc1 gets rank 4; fc1 and fc2 everywhere get alpha 2;
    // q_proj of layer 2 gets alpha 64 from its full name, listed before the broader "q_proj".
    let special = "model.layers.1.mlp.fc1";
    let (_tmp, dir) = variant("dev-phi", "minus", |d| {
        edit_tensors(d, |ts| {
            for t in ts
                .iter_mut()
                .filter(|t| t.name.contains(&format!(".{special}.lora_")))
            {
                *t = if t.name.contains("lora_A") {
                    Tensor::f32(&t.name, &[4, 96], &values(4 * 96, 3))
                } else {
                    Tensor::f32(&t.name, &[192, 4], &values(192 * 4, 4))
                };
            }
        });
        // Written as text so the key order of the patterns is the one given here.
        let path = d.join("adapter_config.json");
        let text = std::fs::read_to_string(&path).unwrap();
        let patterns = r#""rank_pattern": {"layers.1.mlp.fc1": 4}, "alpha_pattern": {"model.layers.2.self_attn.q_proj": 64, "fc[12]": 2, "q_proj": 3},"#;
        let text = text.replacen("\"alpha_pattern\": {},", "", 1).replacen(
            "\"rank_pattern\": {},",
            patterns,
            1,
        );
        std::fs::write(&path, text).unwrap();
    });
    let adapter = Adapter::load(&dir).unwrap();
    assert_eq!(
        adapter.config().rank_pattern,
        vec![("layers.1.mlp.fc1".to_owned(), 4)]
    );
    let check = |module: &str, rank: usize, alpha: f64| {
        let m = &adapter.modules()[module];
        assert_eq!(
            (m.rank, m.alpha, m.scale),
            (rank, alpha, alpha / rank as f64),
            "{module}"
        );
    };
    check(special, 4, 2.0);
    check("model.layers.0.mlp.fc1", 8, 2.0);
    check("model.layers.2.mlp.fc2", 8, 2.0);
    check("model.layers.2.self_attn.q_proj", 8, 64.0);
    check("model.layers.0.self_attn.q_proj", 8, 3.0);
    check("model.layers.0.self_attn.k_proj", 8, 8.0);
    let m = &adapter.modules()[special];
    assert_eq!(
        (m.a.shape.as_slice(), m.b.shape.as_slice()),
        (&[4, 96][..], &[192, 4][..])
    );
    assert_eq!(adapter.tensor_f32(&m.a), values(4 * 96, 3));
    // Rank 4 on a module of the right size still fits the base.
    let base = BaseModelInfo::from_dir(&base_dir("dev-phi")).unwrap();
    assert_eq!(adapter.check_compatible(&base), Ok(()));
}

#[test]
fn regex_and_all_linear_targets_select_the_same_modules() {
    let regex = r"model\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|dense)|mlp\.fc[12])";
    for (target, expected) in [
        (json!(regex), TargetModules::Regex(regex.to_owned())),
        (json!("all-linear"), TargetModules::AllLinear),
    ] {
        let (_tmp, dir) = variant("dev-phi", "twice", |d| {
            edit_config(d, &[("target_modules", target)])
        });
        let adapter = Adapter::load(&dir).unwrap();
        assert_eq!(adapter.config().target_modules, expected);
        assert_eq!(adapter.modules().len(), 18);
    }
}

#[test]
fn fan_in_fan_out_is_accepted_and_changes_nothing() {
    let (_tmp, dir) = variant("dev-llama", "minus", |d| {
        edit_config(d, &[("fan_in_fan_out", json!(true))])
    });
    let adapter = Adapter::load(&dir).unwrap();
    assert!(adapter.config().fan_in_fan_out);
    let m = &adapter.modules()["model.layers.0.mlp.gate_proj"];
    assert_eq!(
        (m.a.shape.as_slice(), m.b.shape.as_slice()),
        (&[8, 96][..], &[200, 8][..])
    );
}

/// Exactly representable values and their encodings, written by hand (not by `half`).
const F16_CASES: [(f32, u16); 6] = [
    (1.0, 0x3c00),
    (-2.0, 0xc000),
    (0.5, 0x3800),
    (65504.0, 0x7bff),
    (5.960_464_5e-8, 0x0001),
    (-0.0, 0x8000),
];

#[test]
fn half_precision_factors_are_converted_exactly() {
    let a_module = "model.layers.0.self_attn.q_proj";
    let (_tmp, dir) = variant("dev-phi", "rot13", |d| {
        edit_tensors(d, |ts| {
            for t in ts
                .iter_mut()
                .filter(|t| t.name.contains(&format!(".{a_module}.")))
            {
                let n = t.shape.iter().product::<usize>();
                if t.name.contains("lora_A") {
                    t.dtype = "F16".into();
                    t.data = (0..n)
                        .flat_map(|i| F16_CASES[i % 6].1.to_le_bytes())
                        .collect();
                } else {
                    // bf16 is the top half of an f32; integers in [-128, 128) lose nothing.
                    t.dtype = "BF16".into();
                    t.data = (0..n)
                        .map(|i| (((i % 256) as f32 - 128.0).to_bits() >> 16) as u16)
                        .flat_map(u16::to_le_bytes)
                        .collect();
                }
            }
        })
    });
    let adapter = Adapter::load(&dir).unwrap();
    let m = &adapter.modules()[a_module];
    assert_eq!((m.a.dtype, m.b.dtype), (Dtype::F16, Dtype::BF16));
    let a = adapter.tensor_f32(&m.a);
    assert_eq!(a.len(), 8 * 96);
    for (i, v) in a.iter().enumerate() {
        assert_eq!(v.to_bits(), F16_CASES[i % 6].0.to_bits(), "A[{i}]");
    }
    let b = adapter.tensor_f32(&m.b);
    assert_eq!(
        b,
        (0..96 * 8)
            .map(|i| (i % 256) as f32 - 128.0)
            .collect::<Vec<_>>()
    );
    assert_eq!(adapter.tensor_bytes(&m.a).len(), 8 * 96 * 2);
}

#[test]
fn lora_on_a_tied_lm_head_fits_the_tied_base() {
    let (_tmp, dir) = variant("dev-llama", "twice", |d| {
        edit_tensors(d, |ts| {
            ts.push(Tensor::f32(
                "base_model.model.lm_head.lora_A.weight",
                &[8, 96],
                &values(8 * 96, 5),
            ));
            ts.push(Tensor::f32(
                "base_model.model.lm_head.lora_B.weight",
                &[256, 8],
                &values(256 * 8, 6),
            ));
        });
        let mut targets = read_json(&d.join("adapter_config.json"))["target_modules"].clone();
        targets.as_array_mut().unwrap().push(json!("lm_head"));
        edit_config(d, &[("target_modules", targets)]);
    });
    let adapter = Adapter::load(&dir).unwrap();
    let head = &adapter.modules()["lm_head"];
    assert_eq!((head.in_features, head.out_features), (96, 256));
    let llama = BaseModelInfo::from_dir(&base_dir("dev-llama")).unwrap();
    assert_eq!(adapter.check_compatible(&llama), Ok(()));
}

#[test]
fn a_module_the_base_lacks_is_named() {
    // Only the modules whose shapes agree in both bases, plus gate_proj, which phi lacks.
    let (_tmp, dir) = variant("dev-llama", "rot13", |d| {
        edit_tensors(d, |ts| {
            ts.retain(|t| ["q_proj", "gate_proj"].iter().any(|m| t.name.contains(m)))
        })
    });
    let adapter = Adapter::load(&dir).unwrap();
    let phi = BaseModelInfo::from_dir(&base_dir("dev-phi")).unwrap();
    let err = adapter.check_compatible(&phi).unwrap_err();
    assert_eq!(
        err,
        Incompatibility::MissingModule {
            adapter: "rot13-variant".into(),
            base: "dev-phi".into(),
            module: "model.layers.0.mlp.gate_proj".into(),
        }
    );
    assert!(
        err.to_string()
            .contains("base dev-phi has no such linear layer"),
        "{err}"
    );
}
