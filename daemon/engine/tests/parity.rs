//! Our Phi and Llama against candle-transformers' reference models on the same weights,
//! base and with a LoRA folded into the reference's weights, within 1e-4.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::{llama as ref_llama, phi as ref_phi};
use common::*;
use moerge_engine::{inference, BaseModel, Precision};
use moerge_library::Adapter;

const IDS: [u32; 12] = [72, 101, 76, 76, 111, 62, 104, 69, 108, 108, 79, 10];
const TOL: f32 = 1e-4;

/// Logits of the reference for every prefix's last position (its forward returns only the
/// last position), stacked to `[t, vocab]`.
fn prefix_logits(mut last: impl FnMut(&Tensor) -> Tensor) -> Tensor {
    let rows: Vec<Tensor> = (1..=IDS.len())
        .map(|p| {
            let input = Tensor::new(&IDS[..p], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            last(&input).squeeze(0).unwrap()
        })
        .collect();
    Tensor::stack(&rows, 0).unwrap()
}

/// `W + scale · B A` for every module the adapter targets.
fn fold(
    tensors: &HashMap<String, Tensor>,
    lora: &HashMap<String, (Tensor, Tensor)>,
    scale: f64,
) -> HashMap<String, Tensor> {
    let mut out = tensors.clone();
    for (module, (a, b)) in lora {
        let key = format!("{module}.weight");
        let delta = (b.matmul(a).unwrap() * scale).unwrap();
        let w = (&out[&key] + delta).unwrap();
        out.insert(key, w);
    }
    out
}

fn phi_reference(dir: &std::path::Path, tensors: HashMap<String, Tensor>) -> Tensor {
    // candle's phi reads rope keys only at the top level (transformers 5 nests them).
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let rope = cfg["rope_parameters"].clone();
    cfg["rope_theta"] = rope["rope_theta"].clone();
    cfg["partial_rotary_factor"] = rope["partial_rotary_factor"].clone();
    let cfg: ref_phi::Config = serde_json::from_value(cfg).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut model = ref_phi::Model::new(&cfg, vb).unwrap();
    prefix_logits(|input| {
        model.clear_kv_cache();
        model.forward(input).unwrap()
    })
}

fn llama_reference(dir: &std::path::Path, tensors: HashMap<String, Tensor>) -> Tensor {
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"].clone();
    let cfg: ref_llama::LlamaConfig = serde_json::from_value(cfg).unwrap();
    let cfg = cfg.into_config(false);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let model = ref_llama::Llama::load(vb, &cfg).unwrap();
    prefix_logits(|input| {
        let mut cache = ref_llama::Cache::new(false, DType::F32, &cfg, &Device::Cpu).unwrap();
        model.forward(input, 0, &mut cache).unwrap()
    })
}

fn ours(dir: &std::path::Path, adapter: Option<&std::path::Path>) -> Tensor {
    let base = BaseModel::load_dir(dir, Precision::F32).unwrap();
    let model = match adapter {
        Some(a) => base.with_adapter(&Adapter::load(a).unwrap()).unwrap(),
        None => base,
    };
    inference::logits(&model, &IDS).unwrap()
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) {
    let diff = max_abs_diff(got, want);
    assert!(diff <= TOL, "{what}: max |diff| {diff} > {TOL}");
    // A model that output zeros would pass a loose check on tiny logits; these are not tiny.
    let spread = want
        .i(0)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        spread > 0.1,
        "{what}: reference logits suspiciously small ({spread})"
    );
}

#[test]
fn phi_matches_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phi");
    let tensors = write_phi(&dir, TINY_PHI, 1);
    assert_close(
        "phi base",
        &ours(&dir, None),
        &phi_reference(&dir, tensors.clone()),
    );

    let modules = lora_specs(&dir, &["q_proj", "v_proj", "dense", "fc1", "fc2"], 4);
    let adapter = tmp.path().join("phi-adapter");
    let lora = write_adapter(
        &adapter,
        lora_config(4, 8.0, &["q_proj", "v_proj", "dense", "fc1", "fc2"]),
        &modules,
        2,
    );
    let want = phi_reference(&dir, fold(&tensors, &lora, 2.0));
    let got = ours(&dir, Some(&adapter));
    assert_close("phi + lora", &got, &want);
    // The adapter must actually change the output, or the check above proves nothing.
    assert!(max_abs_diff(&got, &ours(&dir, None)) > 1e-2);
}

#[test]
fn llama_matches_candle_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llama");
    let tensors = write_llama(&dir, TINY_LLAMA, 3);
    assert_close(
        "llama base",
        &ours(&dir, None),
        &llama_reference(&dir, tensors.clone()),
    );

    let modules = lora_specs(
        &dir,
        &["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
        8,
    );
    let adapter = tmp.path().join("llama-adapter");
    let mut config = lora_config(
        8,
        16.0,
        &["q_proj", "k_proj", "o_proj", "gate_proj", "down_proj"],
    );
    config["use_rslora"] = true.into();
    let lora = write_adapter(&adapter, config, &modules, 4);
    // rsLoRA: alpha / sqrt(r) = 16 / sqrt(8).
    let want = llama_reference(&dir, fold(&tensors, &lora, 16.0 / 8f64.sqrt()));
    let got = ours(&dir, Some(&adapter));
    assert_close("llama + rslora", &got, &want);
    assert!(max_abs_diff(&got, &ours(&dir, None)) > 1e-2);
}

#[test]
fn tied_llama_uses_the_embedding_as_output() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("tied");
    let shape = LlamaShape {
        tied: true,
        ..TINY_LLAMA
    };
    let tensors = write_llama(&dir, shape, 5);
    assert!(!tensors.contains_key("lm_head.weight"));
    assert_close(
        "tied llama",
        &ours(&dir, None),
        &llama_reference(&dir, tensors),
    );
}

#[test]
fn incremental_decoding_matches_a_full_forward() {
    // Feeding tokens one at a time through the KV cache must give the same logits as one
    // pass over the whole sequence, for both families.
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    write_phi(&phi, TINY_PHI, 7);
    let llama = tmp.path().join("llama");
    write_llama(&llama, TINY_LLAMA, 8);
    for dir in [phi, llama] {
        let model = BaseModel::load_dir(&dir, Precision::F32).unwrap();
        let full = inference::logits(&model, &IDS).unwrap();
        let mut cache = moerge_engine::ForwardState::new();
        // A 5-token prefill, then single tokens.
        let first = Tensor::new(&IDS[..5], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let mut rows = vec![model
            .forward(&first, &mut cache)
            .unwrap()
            .squeeze(0)
            .unwrap()];
        for id in &IDS[5..] {
            let step = Tensor::new(&[*id], &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap();
            rows.push(
                model
                    .forward(&step, &mut cache)
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
        }
        let stepped = Tensor::cat(&rows, 0).unwrap();
        assert_eq!(cache.len(), IDS.len());
        let diff = max_abs_diff(&stepped, &full);
        assert!(
            diff <= TOL,
            "{}: cached decoding differs by {diff}",
            dir.display()
        );
    }
}

#[test]
fn bf16_stays_close_to_f32() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("phi");
    write_phi(&dir, TINY_PHI, 9);
    let f32_logits = ours(&dir, None);
    let model = BaseModel::load_dir(&dir, Precision::Bf16).unwrap();
    let bf16_logits = inference::logits(&model, &IDS).unwrap();
    assert_eq!(bf16_logits.dtype(), DType::F32);
    let diff = max_abs_diff(&bf16_logits, &f32_logits);
    // bf16 keeps 8 bits of mantissa: close, but not equal.
    assert!(diff < 0.25 && diff > 0.0, "bf16 vs f32 differ by {diff}");
}

#[test]
fn qwen2_checkpoint_loads_with_its_qkv_biases() {
    use candle_transformers::models::qwen2 as ref_qwen2;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("qwen2");
    let mut tensors = write_llama(&dir, TINY_LLAMA, 12);
    // Qwen2: q/k/v carry biases (o_proj and the MLP do not), and the config says so only
    // through model_type.
    let mut w = Weights::new(13);
    for l in 0..TINY_LLAMA.layers {
        for (m, n) in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)] {
            w.add(
                &format!("model.layers.{l}.self_attn.{m}.bias"),
                &[n],
                0.0,
                0.3,
            );
        }
    }
    tensors.extend(w.tensors);
    candle_core::safetensors::save(&tensors, dir.join("model.safetensors")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    cfg["model_type"] = "qwen2".into();
    cfg["sliding_window"] = 4096.into();
    cfg["max_window_layers"] = 28.into();
    cfg["use_sliding_window"] = false.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();

    cfg["rope_theta"] = cfg["rope_parameters"]["rope_theta"].clone();
    let ref_cfg: ref_qwen2::Config = serde_json::from_value(cfg).unwrap();
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let mut model = ref_qwen2::ModelForCausalLM::new(&ref_cfg, vb).unwrap();
    let want = prefix_logits(|input| {
        model.clear_kv_cache();
        model.forward(input, 0).unwrap().squeeze(1).unwrap()
    });
    assert_close("qwen2", &ours(&dir, None), &want);
}

#[test]
fn sharded_checkpoint_gives_the_same_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    let tensors = write_phi(&single, TINY_PHI, 14);
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(single.join(f), sharded.join(f)).unwrap();
    }
    // Layer 0 and the embeddings in one shard, the rest in the other, as transformers splits.
    let (mut first, mut second) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (name, t) in tensors {
        let (shard, file) = if name.starts_with("model.layers.0.") || name.contains("embed") {
            (&mut first, "model-00001-of-00002.safetensors")
        } else {
            (&mut second, "model-00002-of-00002.safetensors")
        };
        weight_map.insert(name.clone(), file.into());
        shard.insert(name, t);
    }
    candle_core::safetensors::save(&first, sharded.join("model-00001-of-00002.safetensors"))
        .unwrap();
    candle_core::safetensors::save(&second, sharded.join("model-00002-of-00002.safetensors"))
        .unwrap();
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(
        sharded.join("model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    assert!(!sharded.join("model.safetensors").exists());
    let diff = max_abs_diff(&ours(&sharded, None), &ours(&single, None));
    assert_eq!(diff, 0.0, "sharded and single-file checkpoints differ");
}
