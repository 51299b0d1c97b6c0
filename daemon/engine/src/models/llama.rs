//! The Llama family (Llama 2/3, and Mistral- or Qwen2-style checkpoints whose config fits), as
//! transformers' `LlamaForCausalLM`.
//!
//! Paper: "LLaMA: Open and Efficient Foundation Language Models" (arXiv 2302.13971). Pre-norm
//! blocks with RMSNorm, rotary embeddings, grouped-query attention and a SwiGLU MLP
//! (`down(silu(gate(x)) * up(x))`). Mistral's sliding window only matters past its window
//! length, which the sequences served here do not reach; Qwen2 adds q/k/v biases.

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use super::config;
use crate::error::{EngineError, Result};
use crate::nn::{AdapterLinear, ForwardState, Heads, Norm, RotaryTables, SelfAttention};

/// The fields of a Llama-style `config.json` this implementation reads.
#[derive(Debug, Clone, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    /// Transformers allows `head_dim != hidden_size / num_attention_heads`.
    pub head_dim: Option<usize>,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_act() -> String {
    "silu".into()
}

#[derive(Clone)]
struct LlamaLayer {
    input_layernorm: Norm,
    self_attn: SelfAttention,
    post_attention_layernorm: Norm,
    gate_proj: AdapterLinear,
    up_proj: AdapterLinear,
    down_proj: AdapterLinear,
}

/// A Llama-style model whose linear layers can carry adapters.
#[derive(Clone)]
pub struct Llama {
    cfg: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<LlamaLayer>,
    norm: Norm,
    lm_head: AdapterLinear,
    rotary: RotaryTables,
}

impl Llama {
    /// Builds the model; `model_type` decides the family's fixed quirks (Qwen2's biases).
    pub fn load(
        json: &Value,
        config_path: &Path,
        model_type: &str,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let cfg: LlamaConfig = config::parse(json, config_path)?;
        let rope = config::rope_settings(json, config_path)?;
        if cfg.hidden_act != "silu" {
            return Err(EngineError::Config {
                path: config_path.to_path_buf(),
                message: format!(
                    "hidden_act \"{}\" is not supported for {model_type} (only silu)",
                    cfg.hidden_act
                ),
            });
        }
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
        if !heads.is_multiple_of(kv_heads) {
            return Err(EngineError::Config {
                path: config_path.to_path_buf(),
                message: format!("num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}"),
            });
        }
        let head_dim = cfg.head_dim.unwrap_or(cfg.hidden_size / heads);
        let qkv_bias = cfg.attention_bias || model_type == "qwen2";
        let rotary = RotaryTables::new(&rope.inv_freq(head_dim), cfg.max_position_embeddings);
        let (h, i, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        let vb_m = vb.pp("model");
        let embed = vb_m.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let vb_l = vb_m.pp("layers").pp(l);
            let mlp = vb_l.pp("mlp");
            let shape = Heads {
                heads,
                kv_heads,
                head_dim,
            };
            let out = ("o_proj", cfg.attention_bias);
            layers.push(LlamaLayer {
                input_layernorm: Norm::rms(h, eps, vb_l.pp("input_layernorm"))?,
                self_attn: SelfAttention::load(vb_l.pp("self_attn"), h, shape, qkv_bias, out)?,
                post_attention_layernorm: Norm::rms(h, eps, vb_l.pp("post_attention_layernorm"))?,
                gate_proj: AdapterLinear::load(h, i, cfg.mlp_bias, mlp.pp("gate_proj"))?,
                up_proj: AdapterLinear::load(h, i, cfg.mlp_bias, mlp.pp("up_proj"))?,
                down_proj: AdapterLinear::load(i, h, cfg.mlp_bias, mlp.pp("down_proj"))?,
            });
        }
        let norm = Norm::rms(h, eps, vb_m.pp("norm"))?;
        // Tied checkpoints (like the dev fixtures) have no lm_head.weight at all.
        let lm_head = if cfg.tie_word_embeddings {
            AdapterLinear::new("lm_head", embed.clone(), None)
        } else {
            AdapterLinear::load(h, cfg.vocab_size, false, vb.pp("lm_head"))?
        };
        Ok(Self {
            cfg,
            embed_tokens: Embedding::new(embed, h),
            layers,
            norm,
            lm_head,
            rotary,
        })
    }

    /// The parsed configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Hidden states after the final norm, `[b, t, hidden]`.
    pub fn forward_hidden(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        let mut x = self.embed_tokens.forward(ids)?;
        for (idx, layer) in self.layers.iter().enumerate() {
            let normed = layer.input_layernorm.forward(&x)?;
            x = (&x + layer.self_attn.forward(&normed, &self.rotary, state, idx)?)?;
            let normed = layer.post_attention_layernorm.forward(&x)?;
            let gate = candle_nn::ops::silu(&layer.gate_proj.forward(&normed, state)?)?;
            let up = layer.up_proj.forward(&normed, state)?;
            let mlp = layer.down_proj.forward(&(gate * up)?, state)?;
            x = (x + mlp)?;
        }
        self.norm.forward(&x)
    }

    /// The output projection.
    pub fn lm_head(&self) -> &AdapterLinear {
        &self.lm_head
    }

    /// Every linear layer an adapter may target, in a fixed order.
    pub fn linears(&self) -> Vec<&AdapterLinear> {
        let mut out = Vec::new();
        for l in &self.layers {
            out.extend(l.self_attn.linears());
            out.extend([&l.gate_proj, &l.up_proj, &l.down_proj]);
        }
        out.push(&self.lm_head);
        out
    }

    /// Mutable access to the same layers as [`Self::linears`], in the same order.
    pub fn linears_mut(&mut self) -> Vec<&mut AdapterLinear> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            out.extend(l.self_attn.linears_mut());
            out.extend([&mut l.gate_proj, &mut l.up_proj, &mut l.down_proj]);
        }
        out.push(&mut self.lm_head);
        out
    }
}
