//! The scale benchmark's files: a random base checkpoint (Phi-2 or a 3B Llama shape) as
//! sharded bf16 safetensors, and random PEFT LoRA experts, in the layout
//! `../shared/bench/make_phi2_scale.py` writes (`DIR/base`, `DIR/experts/expert-NNN`), so
//! `peft_scale_bench.py` reads the same folder. Tensors are generated and written one at a
//! time, in chunks: the whole model is never in memory.

use std::path::Path;

use serde_json::{json, Value};

use super::writer::{mix, write_safetensors, Dtype, Init, TensorSpec};

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// Written last into a complete base folder; its presence means the folder can be reused.
const MARKER: &str = "moerge-scale-complete.json";
const SHARDS: u64 = 10;
const LORA_RANK: usize = 4;
const LORA_ALPHA: f64 = 16.0;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Phi,
    Llama,
}

/// The shape of a base model.
#[derive(Clone, Copy)]
pub struct Shape {
    pub family: Family,
    pub layers: usize,
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub seed: u64,
}

/// microsoft/phi-2's shapes.
pub const PHI2: Shape = Shape {
    family: Family::Phi,
    layers: 32,
    hidden: 2560,
    heads: 32,
    kv_heads: 32,
    intermediate: 10240,
    vocab: 51200,
    seed: 1,
};

/// A 3B Llama with grouped-query attention (Llama-3.2-3B's layers, a 32k vocabulary).
pub const LLAMA_3B: Shape = Shape {
    family: Family::Llama,
    layers: 28,
    hidden: 3072,
    heads: 24,
    kv_heads: 8,
    intermediate: 8192,
    vocab: 32000,
    seed: 2,
};

impl Shape {
    pub fn name(&self) -> &'static str {
        match self.family {
            Family::Phi => "phi",
            Family::Llama => "llama",
        }
    }

    /// Every layer's linear modules: (path, in, out).
    fn linears(&self) -> Vec<(String, usize, usize)> {
        let (h, i) = (self.hidden, self.intermediate);
        let kv = self.kv_heads * h / self.heads;
        let per_layer: &[(&str, usize, usize)] = match self.family {
            Family::Phi => &[
                ("self_attn.q_proj", h, h),
                ("self_attn.k_proj", h, h),
                ("self_attn.v_proj", h, h),
                ("self_attn.dense", h, h),
                ("mlp.fc1", h, i),
                ("mlp.fc2", i, h),
            ],
            Family::Llama => &[
                ("self_attn.q_proj", h, h),
                ("self_attn.k_proj", h, kv),
                ("self_attn.v_proj", h, kv),
                ("self_attn.o_proj", h, h),
                ("mlp.gate_proj", h, i),
                ("mlp.up_proj", h, i),
                ("mlp.down_proj", i, h),
            ],
        };
        (0..self.layers)
            .flat_map(|l| {
                per_layer
                    .iter()
                    .map(move |&(m, inp, out)| (format!("model.layers.{l}.{m}"), inp, out))
            })
            .collect()
    }

    /// The checkpoint's tensors in file order, initialised as transformers does: weights
    /// normal(0, 0.02), biases 0, norm weights 1.
    fn base_tensors(&self) -> Vec<TensorSpec> {
        let (h, v) = (self.hidden, self.vocab);
        let normal = Init::Normal(0.02);
        let phi = self.family == Family::Phi;
        let mut t = vec![TensorSpec::new(
            "model.embed_tokens.weight".into(),
            &[v, h],
            normal,
        )];
        let linears = self.linears();
        for (l, layer) in linears.chunks(linears.len() / self.layers).enumerate() {
            let norm = format!("model.layers.{l}.input_layernorm");
            t.push(TensorSpec::new(format!("{norm}.weight"), &[h], Init::Ones));
            if phi {
                t.push(TensorSpec::new(format!("{norm}.bias"), &[h], Init::Zeros));
            } else {
                let post = format!("model.layers.{l}.post_attention_layernorm.weight");
                t.push(TensorSpec::new(post, &[h], Init::Ones));
            }
            for (m, inp, out) in layer {
                t.push(TensorSpec::new(
                    format!("{m}.weight"),
                    &[*out, *inp],
                    normal,
                ));
                if phi {
                    t.push(TensorSpec::new(format!("{m}.bias"), &[*out], Init::Zeros));
                }
            }
        }
        let norm = if phi {
            "model.final_layernorm"
        } else {
            "model.norm"
        };
        t.push(TensorSpec::new(format!("{norm}.weight"), &[h], Init::Ones));
        if phi {
            t.push(TensorSpec::new(format!("{norm}.bias"), &[h], Init::Zeros));
        }
        t.push(TensorSpec::new("lm_head.weight".into(), &[v, h], normal));
        if phi {
            t.push(TensorSpec::new("lm_head.bias".into(), &[v], Init::Zeros));
        }
        t
    }

    /// Bytes of the checkpoint's tensors at `bytes_per_value`, and of those a decode step
    /// reads (all but the embedding table, of which a step reads one row).
    pub fn weight_bytes(&self, bytes_per_value: usize) -> (u64, u64) {
        let tensors = self.base_tensors();
        let all: usize = tensors.iter().map(TensorSpec::numel).sum();
        let embed = self.vocab * self.hidden;
        let b = bytes_per_value as u64;
        (all as u64 * b, (all - embed) as u64 * b)
    }

    fn config(&self) -> Value {
        match self.family {
            Family::Phi => json!({
                "architectures": ["PhiForCausalLM"], "model_type": "phi",
                "hidden_act": "gelu_new", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "vocab_size": self.vocab, "max_position_embeddings": 2048,
                "layer_norm_eps": 1e-5, "partial_rotary_factor": 0.4, "rope_theta": 10000.0,
                "qk_layernorm": false, "tie_word_embeddings": false,
                "bos_token_id": 50256, "eos_token_id": 50256, "torch_dtype": "bfloat16",
            }),
            Family::Llama => json!({
                "architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "hidden_act": "silu", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.hidden / self.heads, "vocab_size": self.vocab,
                "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "tie_word_embeddings": false, "attention_bias": false, "mlp_bias": false,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16",
            }),
        }
    }

    fn lora_targets(&self) -> &'static [&'static str] {
        match self.family {
            Family::Phi => &["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
            Family::Llama => &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        }
    }
}

/// Writes `dir/base` unless a complete one is there (its marker file present).
pub fn ensure_base(dir: &Path, shape: &Shape) -> Res<()> {
    let base = dir.join("base");
    if base.join(MARKER).is_file() {
        return Ok(());
    }
    if base.exists() {
        std::fs::remove_dir_all(&base)?;
    }
    std::fs::create_dir_all(&base)?;
    let started = std::time::Instant::now();
    eprintln!(
        "writing a random {} base to {}",
        shape.name(),
        base.display()
    );
    let config = serde_json::to_string_pretty(&shape.config())?;
    std::fs::write(base.join("config.json"), config)?;
    moerge_engine::write_byte_level_tokenizer(&base)?;

    // Greedy shards of about a tenth of the checkpoint each, in file order.
    let tensors = shape.base_tensors();
    let (total, _) = shape.weight_bytes(Dtype::Bf16.size());
    let target = total.div_ceil(SHARDS);
    let mut shards: Vec<Vec<&TensorSpec>> = vec![Vec::new()];
    let mut size = 0;
    for t in &tensors {
        let bytes = (t.numel() * Dtype::Bf16.size()) as u64;
        if size > 0 && size + bytes > target {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("one shard").push(t);
        size += bytes;
    }
    let mut weight_map = serde_json::Map::new();
    for (k, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", k + 1, shards.len());
        write_safetensors(&base.join(&file), shard, Dtype::Bf16, shape.seed)?;
        for t in shard {
            weight_map.insert(t.name.clone(), file.clone().into());
        }
        eprintln!("  {file} ({:.0} s)", started.elapsed().as_secs_f64());
    }
    let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    let index = serde_json::to_string_pretty(&index)?;
    std::fs::write(base.join("model.safetensors.index.json"), index)?;
    let marker = json!({"layers": shape.layers, "seed": shape.seed, "bytes": total});
    std::fs::write(base.join(MARKER), marker.to_string())?;
    Ok(())
}

/// Writes `dir/experts/expert-000` … up to `n` experts, keeping those already there (each is
/// written under another name and renamed into place when complete).
pub fn ensure_experts(dir: &Path, shape: &Shape, n: usize) -> Res<()> {
    let experts = dir.join("experts");
    std::fs::create_dir_all(&experts)?;
    let linears = shape.linears();
    for k in 0..n {
        let name = format!("expert-{k:03}");
        let target = experts.join(&name);
        if target.is_dir() {
            continue;
        }
        let partial = dir.join(format!("partial-{name}"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial)?;
        }
        std::fs::create_dir_all(&partial)?;
        // PEFT's initialisation of A (kaiming uniform, a = √5: bound 1/√in); B small and
        // random so the update is not zero.
        let tensors: Vec<TensorSpec> = linears
            .iter()
            .flat_map(|(m, inp, out)| {
                let prefix = format!("base_model.model.{m}");
                let bound = 1.0 / (*inp as f32).sqrt();
                [
                    TensorSpec::new(
                        format!("{prefix}.lora_A.weight"),
                        &[LORA_RANK, *inp],
                        Init::Uniform(bound),
                    ),
                    TensorSpec::new(
                        format!("{prefix}.lora_B.weight"),
                        &[*out, LORA_RANK],
                        Init::Normal(0.01),
                    ),
                ]
            })
            .collect();
        let refs: Vec<&TensorSpec> = tensors.iter().collect();
        // A stream per expert: adding experts leaves the others as they were.
        let seed = mix(shape.seed, 1 + k as u64);
        write_safetensors(
            &partial.join("adapter_model.safetensors"),
            &refs,
            Dtype::F32,
            seed,
        )?;
        let config = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK,
            "lora_alpha": LORA_ALPHA, "target_modules": shape.lora_targets(),
            "use_rslora": false, "use_dora": false, "fan_in_fan_out": false,
            "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": null, "bias": "none",
            "base_model_name_or_path": format!("{}-shaped", shape.name()),
        });
        let config = serde_json::to_string_pretty(&config)?;
        std::fs::write(partial.join("adapter_config.json"), config)?;
        std::fs::rename(&partial, &target)?;
    }
    Ok(())
}
