//! The trainer: it lowers the loss, it is deterministic, it leaves frozen weights alone, and
//! its LoRA gradients match finite differences.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use moerge_engine::trainer::{self, Example, TrainOptions};
use moerge_engine::{inference, BaseModel, LoraSpec, Precision};
use moerge_library::Adapter;

/// A toy task: after "x>" answer the next letter of the alphabet, then a newline.
fn toy_data() -> Vec<Example> {
    (b'a'..=b'x')
        .map(|c| Example {
            task: Some("next".into()),
            prompt: vec![u32::from(c), u32::from(b'>')],
            completion: vec![u32::from(c + 1), 10],
        })
        .collect()
}

fn spec(seed: u64) -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        use_rslora: false,
        targets: vec!["q_proj".into(), "v_proj".into(), "fc1".into(), "fc2".into()],
        seed,
    }
}

#[test]
fn lora_training_lowers_the_loss_deterministically_and_freezes_the_base() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phi");
    write_phi(&dir, TINY_PHI, 31);
    let base = BaseModel::load_dir(&dir, Precision::F32).unwrap();
    let data = toy_data();
    let before = trainer::example_losses(&base, &data, 8).unwrap();
    let opts = TrainOptions {
        steps: 150,
        batch_size: 8,
        lr: 1e-2,
        seed: 5,
        ..Default::default()
    };
    let run = |out: &str| {
        let (model, lora) = base.with_trainable_lora(&spec(3)).unwrap();
        let summary = trainer::train(&model, lora.vars(), &data, &opts, |_| {
            std::ops::ControlFlow::Continue(())
        })
        .unwrap();
        let hash = lora.save_peft(&tmp.path().join(out)).unwrap();
        (
            summary,
            hash,
            trainer::example_losses(&model, &data, 8).unwrap(),
        )
    };
    let (summary, hash, after) = run("one");
    assert_eq!(summary.steps, 150);
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        mean(&after) < 0.5 * mean(&before),
        "loss {} -> {}",
        mean(&before),
        mean(&after)
    );
    assert!(summary.final_loss < summary.first_loss);
    // Same seed, same adapter, bit for bit.
    let (_, hash2, _) = run("two");
    assert_eq!(hash, hash2);
    // The base itself did not move: its losses are unchanged.
    assert_eq!(trainer::example_losses(&base, &data, 8).unwrap(), before);
    // The saved adapter, loaded as a plain PEFT adapter, computes what the trained model did.
    let adapted = base
        .with_adapter(&Adapter::load(&tmp.path().join("one")).unwrap())
        .unwrap();
    let reloaded = trainer::example_losses(&adapted, &data, 8).unwrap();
    for (a, b) in reloaded.iter().zip(&after) {
        assert!((a - b).abs() < 1e-4, "{a} vs {b}");
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phi");
    write_phi(
        &dir,
        PhiShape {
            layers: 1,
            hidden: 16,
            heads: 2,
            intermediate: 32,
            vocab: 256,
            partial_rotary: 0.5,
        },
        41,
    );
    let base = BaseModel::load_dir(&dir, Precision::F32).unwrap();
    let (model, lora) = base
        .with_trainable_lora(&LoraSpec {
            targets: vec!["q_proj".into(), "fc2".into()],
            ..spec(7)
        })
        .unwrap();
    let vars = lora.vars();
    // B starts at zero (so dL/dA would be zero); give every factor random values first.
    let mut w = Weights::new(43);
    for v in &vars {
        let values = w.values(v.elem_count(), 0.0, 0.5);
        v.set(&Tensor::from_vec(values, v.shape(), &Device::Cpu).unwrap())
            .unwrap();
    }
    let data = toy_data();
    let batch: Vec<&Example> = data.iter().take(6).collect();
    let loss = |m: &BaseModel| {
        trainer::batch_loss(m, &batch)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let grads = trainer::batch_loss(&model, &batch)
        .unwrap()
        .backward()
        .unwrap();
    let mut checked = 0;
    for v in &vars {
        let g = grads
            .get(v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let original = v
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for idx in [0, original.len() / 2, original.len() - 1] {
            let eps = 1e-2f32;
            let mut shifted = original.clone();
            shifted[idx] = original[idx] + eps;
            v.set(&Tensor::from_vec(shifted.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let up = loss(&model);
            shifted[idx] = original[idx] - eps;
            v.set(&Tensor::from_vec(shifted, v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let down = loss(&model);
            v.set(&Tensor::from_vec(original.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
            let numeric = (up - down) / (2.0 * eps as f64);
            let analytic = g[idx] as f64;
            let tol = 2e-3 + 0.05 * numeric.abs().max(analytic.abs());
            assert!(
                (numeric - analytic).abs() < tol,
                "entry {idx}: numeric {numeric} vs autograd {analytic}"
            );
            checked += 1;
        }
    }
    assert_eq!(checked, 12);
    // At least one of them is not trivially zero.
    let any = vars.iter().any(|v| {
        grads
            .get(v)
            .unwrap()
            .abs()
            .unwrap()
            .max_keepdim(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 1e-3
    });
    assert!(any);
}

#[test]
fn a_whole_base_trains_and_saves() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("fresh");
    let config = serde_json::json!({
        "model_type": "phi", "vocab_size": 256, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2, "hidden_act": "gelu_new",
        "max_position_embeddings": 64, "layer_norm_eps": 1e-5, "tie_word_embeddings": false,
        "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"}
    });
    moerge_engine::write_random_base(&dir, &config, 9).unwrap();
    moerge_engine::write_byte_level_tokenizer(&dir).unwrap();
    let (model, weights) = BaseModel::load_trainable(&dir).unwrap();
    let data = toy_data();
    let before = trainer::example_losses(&model, &data, 8).unwrap();
    let opts = TrainOptions {
        steps: 40,
        batch_size: 8,
        lr: 1e-2,
        seed: 1,
        ..Default::default()
    };
    trainer::train(&model, weights.vars(), &data, &opts, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    let after = trainer::example_losses(&model, &data, 8).unwrap();
    let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
    assert!(
        mean(&after) < 0.7 * mean(&before),
        "{} -> {}",
        mean(&before),
        mean(&after)
    );
    weights.save(&dir).unwrap();
    let reloaded = BaseModel::load_dir(&dir, Precision::F32).unwrap();
    let ids = [98u32, 62];
    let diff = max_abs_diff(
        &inference::logits(&reloaded, &ids).unwrap(),
        &inference::logits(&model, &ids).unwrap(),
    );
    assert!(
        diff < 1e-5,
        "saved weights differ from the trained ones by {diff}"
    );
}
