//! The LoRA path of the adapter-aware linear against a hand computation in plain loops:
//! `y = W x + b + s · B (A x)` with `s = alpha / r`, `alpha / sqrt(r)` (rsLoRA) or the
//! per-module values of `rank_pattern` / `alpha_pattern`.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use moerge_engine::{BaseModel, ForwardState, Precision};
use moerge_library::Adapter;

/// `y[n][o] = Σ_i W[o][i] x[n][i] + b[o] + s Σ_r B[o][r] Σ_i A[r][i] x[n][i]`, in f64.
fn by_hand(
    x: &[Vec<f32>],
    w: &[Vec<f32>],
    b: &[f32],
    a: &[Vec<f32>],
    bb: &[Vec<f32>],
    s: f64,
) -> Vec<Vec<f64>> {
    x.iter()
        .map(|xn| {
            let ax: Vec<f64> = a
                .iter()
                .map(|ar| ar.iter().zip(xn).map(|(p, q)| *p as f64 * *q as f64).sum())
                .collect();
            (0..w.len())
                .map(|o| {
                    let base: f64 = w[o]
                        .iter()
                        .zip(xn)
                        .map(|(p, q)| *p as f64 * *q as f64)
                        .sum::<f64>()
                        + b[o] as f64;
                    let delta: f64 = bb[o].iter().zip(&ax).map(|(p, q)| *p as f64 * q).sum();
                    base + s * delta
                })
                .collect()
        })
        .collect()
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

/// Runs module `module` of `model` on random inputs and compares with the loops, using the
/// factors read back from the adapter file and the scale the test expects.
fn check(model: &BaseModel, adapter: &Adapter, module: &str, expected_scale: f64) {
    let lora = &adapter.modules()[module];
    assert!(
        (lora.scale - expected_scale).abs() < 1e-12,
        "{module}: scale {} != {expected_scale}",
        lora.scale
    );
    let layer = model
        .linear(module)
        .unwrap_or_else(|| panic!("no layer {module}"));
    assert!(layer.has_lora(), "{module} carries no adapter");
    let (out, inp) = layer.shape();
    let mut w = Weights::new(11);
    let x = Tensor::from_vec(w.values(5 * inp, 0.0, 1.0), (5, inp), &Device::Cpu).unwrap();
    let got = rows(&layer.forward(&x, &mut ForwardState::new()).unwrap());
    let a: Vec<Vec<f32>> = adapter
        .tensor_f32(&lora.a)
        .chunks(inp)
        .map(<[f32]>::to_vec)
        .collect();
    let b: Vec<Vec<f32>> = adapter
        .tensor_f32(&lora.b)
        .chunks(lora.rank)
        .map(<[f32]>::to_vec)
        .collect();
    let bias = match layer.bias() {
        Some(b) => b.to_vec1::<f32>().unwrap(),
        None => vec![0.0; out],
    };
    let want = by_hand(
        &rows(&x),
        &rows(layer.weight()),
        &bias,
        &a,
        &b,
        expected_scale,
    );
    let mut worst = 0f64;
    for (g, wv) in got.iter().zip(&want) {
        for (p, q) in g.iter().zip(wv) {
            worst = worst.max((*p as f64 - q).abs());
        }
    }
    assert!(worst < 1e-4, "{module}: max |diff| {worst}");
    // The delta is not negligible, so a layer that ignored the adapter would fail above.
    let base = rows(&layer.forward_base(&x).unwrap());
    let moved = got
        .iter()
        .flatten()
        .zip(base.iter().flatten())
        .map(|(p, q)| (p - q).abs())
        .fold(0f32, f32::max);
    assert!(
        moved > 1e-2,
        "{module}: adapter barely changes the output ({moved})"
    );
}

#[test]
fn peft_fixture_adapter_matches_the_loops() {
    let base = BaseModel::load_dir(&fixtures().join("dev-phi"), Precision::F32).unwrap();
    // length: lora_alpha 32, r 8.
    let adapter = Adapter::load(&fixtures().join("dev-phi/adapters/length")).unwrap();
    let model = base.with_adapter(&adapter).unwrap();
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.2.mlp.fc1",
        "model.layers.1.mlp.fc2",
    ] {
        check(&model, &adapter, module, 4.0);
    }
}

#[test]
fn rslora_and_patterns_match_the_loops() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phi");
    write_phi(&dir, TINY_PHI, 21);
    let mk = |module: &str, rank, i, o| LoraSpec {
        module: module.into(),
        rank,
        in_features: i,
        out_features: o,
    };
    let modules = [
        mk("model.layers.0.self_attn.q_proj", 4, 64, 64),
        // rank_pattern gives layer 1's fc1 rank 2; alpha_pattern gives every fc2 alpha 6.
        mk("model.layers.1.mlp.fc1", 2, 64, 256),
        mk("model.layers.0.mlp.fc2", 4, 256, 64),
    ];
    let mut config = lora_config(4, 16.0, &["q_proj", "fc1", "fc2"]);
    config["rank_pattern"] = serde_json::json!({"model.layers.1.mlp.fc1": 2});
    config["alpha_pattern"] = serde_json::json!({"fc2": 6});
    let plain = tmp.path().join("plain");
    write_adapter(&plain, config.clone(), &modules, 22);
    let model = BaseModel::load_dir(&dir, Precision::F32).unwrap();
    let adapter = Adapter::load(&plain).unwrap();
    let adapted = model.with_adapter(&adapter).unwrap();
    check(
        &adapted,
        &adapter,
        "model.layers.0.self_attn.q_proj",
        16.0 / 4.0,
    );
    check(&adapted, &adapter, "model.layers.1.mlp.fc1", 16.0 / 2.0);
    check(&adapted, &adapter, "model.layers.0.mlp.fc2", 6.0 / 4.0);

    config["use_rslora"] = true.into();
    let rs = tmp.path().join("rslora");
    write_adapter(&rs, config, &modules, 22);
    let adapter = Adapter::load(&rs).unwrap();
    let adapted = model.with_adapter(&adapter).unwrap();
    check(
        &adapted,
        &adapter,
        "model.layers.0.self_attn.q_proj",
        16.0 / 2.0,
    );
    check(
        &adapted,
        &adapter,
        "model.layers.1.mlp.fc1",
        16.0 / 2f64.sqrt(),
    );
    check(&adapted, &adapter, "model.layers.0.mlp.fc2", 6.0 / 2.0);
}
