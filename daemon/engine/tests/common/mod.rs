//! Test support: writes small random Hugging Face checkpoints and PEFT adapters to disk, as
//! transformers and PEFT would, so tests load real folders through the real loaders.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use moerge_library::Adapter;
use moerge_sdk::plan::{ExpertRef, ModulePlan, Plan, PLAN_VERSION};
use rand::{Rng, SeedableRng};
use serde_json::json;

/// A single-pass plan over `experts` (in order, by name and hash) with `default` for every
/// module; tests change the fields they need.
pub fn plan_of(experts: &[Adapter], default: ModulePlan) -> Plan {
    Plan {
        version: PLAN_VERSION,
        experts: experts
            .iter()
            .map(|e| ExpertRef {
                name: e.name().into(),
                hash: e.hash().to_string(),
            })
            .collect(),
        default,
        modules: Default::default(),
        ensemble: None,
        tensors: None,
    }
}

/// The shared read-only fixtures (written by transformers + PEFT).
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("MOERGE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    };
    assert!(
        dir.join("dev-phi").is_dir(),
        "PEFT fixtures not found at {} (set MOERGE_FIXTURES)",
        dir.display()
    );
    dir
}

/// A deterministic source of small random tensors.
pub struct Weights {
    rng: rand::rngs::StdRng,
    pub tensors: HashMap<String, Tensor>,
}

impl Weights {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: rand::rngs::StdRng::seed_from_u64(seed),
            tensors: HashMap::new(),
        }
    }

    pub fn values(&mut self, n: usize, center: f32, spread: f32) -> Vec<f32> {
        (0..n)
            .map(|_| center + self.rng.random_range(-spread..spread))
            .collect()
    }

    pub fn add(&mut self, name: &str, shape: &[usize], center: f32, spread: f32) {
        let n = shape.iter().product();
        let v = self.values(n, center, spread);
        let t = Tensor::from_vec(v, shape, &Device::Cpu).unwrap();
        self.tensors.insert(name.to_string(), t);
    }

    pub fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) {
        let spread = 1.0 / (inp as f32).sqrt();
        self.add(&format!("{name}.weight"), &[out, inp], 0.0, spread);
        if bias {
            self.add(&format!("{name}.bias"), &[out], 0.0, 0.05);
        }
    }

    pub fn save(&self, path: &Path) {
        candle_core::safetensors::save(&self.tensors, path).unwrap();
    }
}

/// Shape of a tiny Phi (the issue's benchmark model by default).
#[derive(Clone, Copy)]
pub struct PhiShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub partial_rotary: f64,
}

pub const TINY_PHI: PhiShape = PhiShape {
    layers: 2,
    hidden: 64,
    heads: 4,
    intermediate: 256,
    vocab: 256,
    partial_rotary: 0.5,
};

/// Writes a random Phi checkpoint in transformers 5's layout (`rope_parameters`).
pub fn write_phi(dir: &Path, s: PhiShape, seed: u64) -> HashMap<String, Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = Weights::new(seed);
    let h = s.hidden;
    w.add("model.embed_tokens.weight", &[s.vocab, h], 0.0, 1.0);
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        w.add(&format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.2);
        w.add(&format!("{p}.input_layernorm.bias"), &[h], 0.0, 0.1);
        for m in ["q_proj", "k_proj", "v_proj", "dense"] {
            w.linear(&format!("{p}.self_attn.{m}"), h, h, true);
        }
        w.linear(&format!("{p}.mlp.fc1"), s.intermediate, h, true);
        w.linear(&format!("{p}.mlp.fc2"), h, s.intermediate, true);
    }
    w.add("model.final_layernorm.weight", &[h], 1.0, 0.2);
    w.add("model.final_layernorm.bias", &[h], 0.0, 0.1);
    w.linear("lm_head", s.vocab, h, true);
    w.save(&dir.join("model.safetensors"));
    let config = json!({
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": s.vocab,
        "hidden_size": h,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.heads,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 512,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "qk_layernorm": false,
        "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": s.partial_rotary, "rope_type": "default"},
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    copy_tokenizer(dir);
    w.tensors
}

/// Shape of a tiny Llama (the issue's benchmark model by default).
#[derive(Clone, Copy)]
pub struct LlamaShape {
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub tied: bool,
}

pub const TINY_LLAMA: LlamaShape = LlamaShape {
    layers: 3,
    hidden: 64,
    heads: 4,
    kv_heads: 2,
    intermediate: 172,
    vocab: 256,
    tied: false,
};

/// Writes a random Llama checkpoint in transformers 5's layout.
pub fn write_llama(dir: &Path, s: LlamaShape, seed: u64) -> HashMap<String, Tensor> {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = Weights::new(seed);
    let h = s.hidden;
    let hd = h / s.heads;
    w.add("model.embed_tokens.weight", &[s.vocab, h], 0.0, 1.0);
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        w.add(&format!("{p}.input_layernorm.weight"), &[h], 1.0, 0.2);
        w.add(
            &format!("{p}.post_attention_layernorm.weight"),
            &[h],
            1.0,
            0.2,
        );
        w.linear(&format!("{p}.self_attn.q_proj"), s.heads * hd, h, false);
        w.linear(&format!("{p}.self_attn.k_proj"), s.kv_heads * hd, h, false);
        w.linear(&format!("{p}.self_attn.v_proj"), s.kv_heads * hd, h, false);
        w.linear(&format!("{p}.self_attn.o_proj"), h, s.heads * hd, false);
        w.linear(&format!("{p}.mlp.gate_proj"), s.intermediate, h, false);
        w.linear(&format!("{p}.mlp.up_proj"), s.intermediate, h, false);
        w.linear(&format!("{p}.mlp.down_proj"), h, s.intermediate, false);
    }
    w.add("model.norm.weight", &[h], 1.0, 0.2);
    if !s.tied {
        w.linear("lm_head", s.vocab, h, false);
    }
    w.save(&dir.join("model.safetensors"));
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s.vocab,
        "hidden_size": h,
        "intermediate_size": s.intermediate,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "tie_word_embeddings": s.tied,
        "attention_bias": false,
        "mlp_bias": false,
        "rope_parameters": {"rope_theta": 50000.0, "rope_type": "default"},
    });
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    copy_tokenizer(dir);
    w.tensors
}

fn copy_tokenizer(dir: &Path) {
    std::fs::copy(
        fixtures().join("dev-phi/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
}

/// One LoRA'd module of a test adapter.
pub struct LoraSpec {
    pub module: String,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
}

/// Writes a PEFT adapter folder with random factors; returns `module → (A, B)`.
pub fn write_adapter(
    dir: &Path,
    config: serde_json::Value,
    modules: &[LoraSpec],
    seed: u64,
) -> HashMap<String, (Tensor, Tensor)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut w = Weights::new(seed);
    let mut out = HashMap::new();
    for m in modules {
        let a_name = format!("base_model.model.{}.lora_A.weight", m.module);
        let b_name = format!("base_model.model.{}.lora_B.weight", m.module);
        w.add(&a_name, &[m.rank, m.in_features], 0.0, 0.3);
        w.add(&b_name, &[m.out_features, m.rank], 0.0, 0.3);
        out.insert(
            m.module.clone(),
            (w.tensors[&a_name].clone(), w.tensors[&b_name].clone()),
        );
    }
    w.save(&dir.join("adapter_model.safetensors"));
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).unwrap(),
    )
    .unwrap();
    out
}

/// A PEFT-style `adapter_config.json` for LoRA.
pub fn lora_config(r: usize, alpha: f64, targets: &[&str]) -> serde_json::Value {
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": alpha,
        "target_modules": targets,
        "use_rslora": false,
        "use_dora": false,
        "fan_in_fan_out": false,
        "rank_pattern": {},
        "alpha_pattern": {},
        "modules_to_save": null,
        "bias": "none",
        "base_model_name_or_path": "test-base",
    })
}

/// Largest absolute difference between two equally shaped tensors.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// One rank-`rank` LoRA spec per linear module of the checkpoint in `base_dir` whose name
/// ends in one of `targets` (PEFT's suffix rule), with the module's real shapes.
pub fn lora_specs(base_dir: &Path, targets: &[&str], rank: usize) -> Vec<LoraSpec> {
    let info = moerge_library::BaseModelInfo::from_dir(base_dir).unwrap();
    info.linear_modules()
        .iter()
        .filter(|(m, _)| targets.iter().any(|t| m.ends_with(&format!(".{t}"))))
        .map(|(m, s)| LoraSpec {
            module: m.clone(),
            rank,
            in_features: s.in_features,
            out_features: s.out_features,
        })
        .collect()
}

/// `(input_ids, tensor)` of the three reference sequences in a fixture file: ids from
/// `input_ids.<i>`, values from `<key>.<i>` (`logits` or `log_probs`).
pub fn reference_sequences(base: &str, file: &str, key: &str) -> Vec<(Vec<u32>, Tensor)> {
    let path = fixtures().join(base).join("reference").join(file);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    (0..3)
        .map(|i| {
            let ids = tensors[&format!("input_ids.{i}")]
                .to_dtype(candle_core::DType::I64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|x| x as u32)
                .collect();
            (ids, tensors[&format!("{key}.{i}")].clone())
        })
        .collect()
}
