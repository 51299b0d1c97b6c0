//! The Phi family (Phi-1, Phi-1.5, Phi-2: the paper's base), as transformers' `PhiForCausalLM`.
//!
//! Model card: <https://huggingface.co/microsoft/phi-2>. Each block runs attention and the
//! MLP in parallel on the same layer-normed input and adds both to the residual; rotary
//! embeddings cover only the first `partial_rotary_factor · head_dim` channels; the MLP is
//! `fc2(gelu_new(fc1(x)))`; the output goes through `final_layernorm` and a biased `lm_head`.

use std::path::Path;

use candle_core::{Module, Tensor};
use candle_nn::{Activation, Embedding, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use super::config::{self, RopeSettings};
use crate::error::{EngineError, Result};
use crate::nn::{AdapterLinear, ForwardState, Heads, Norm, RotaryTables, SelfAttention};

/// The fields of a Phi `config.json` this implementation reads.
#[derive(Debug, Clone, Deserialize)]
pub struct PhiConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: Option<usize>,
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub qk_layernorm: bool,
}

#[derive(Clone)]
struct PhiLayer {
    input_layernorm: Norm,
    self_attn: SelfAttention,
    fc1: AdapterLinear,
    fc2: AdapterLinear,
}

/// A Phi model whose linear layers can carry adapters.
#[derive(Clone)]
pub struct Phi {
    cfg: PhiConfig,
    embed_tokens: Embedding,
    layers: Vec<PhiLayer>,
    final_layernorm: Norm,
    lm_head: AdapterLinear,
    rotary: RotaryTables,
}

impl Phi {
    /// Builds the model from `config.json` (already parsed) and the checkpoint's tensors.
    pub fn load(json: &Value, config_path: &Path, vb: VarBuilder<'_>) -> Result<Self> {
        let cfg: PhiConfig = config::parse(json, config_path)?;
        let rope: RopeSettings = config::rope_settings(json, config_path)?;
        if cfg.qk_layernorm {
            return Err(EngineError::Config {
                path: config_path.to_path_buf(),
                message: "qk_layernorm: true is not supported for phi".into(),
            });
        }
        let heads = cfg.num_attention_heads;
        let kv_heads = cfg.num_key_value_heads.unwrap_or(heads);
        if !cfg.hidden_size.is_multiple_of(heads) || !heads.is_multiple_of(kv_heads) {
            return Err(EngineError::Config {
                path: config_path.to_path_buf(),
                message: format!(
                    "hidden_size {} must divide into {heads} heads, and heads into {kv_heads} key/value heads",
                    cfg.hidden_size
                ),
            });
        }
        let head_dim = cfg.hidden_size / heads;
        let rotary_dim = (rope.partial_rotary_factor * head_dim as f64) as usize;
        let rotary = RotaryTables::new(&rope.inv_freq(rotary_dim), cfg.max_position_embeddings);
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let vb_m = vb.pp("model");
        let embed = vb_m.pp("embed_tokens").get((cfg.vocab_size, h), "weight")?;
        let embed_tokens = Embedding::new(embed.clone(), h);
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let vb_l = vb_m.pp("layers").pp(l);
            let mlp = vb_l.pp("mlp");
            let shape = Heads {
                heads,
                kv_heads,
                head_dim,
            };
            layers.push(PhiLayer {
                input_layernorm: Norm::layer(h, cfg.layer_norm_eps, vb_l.pp("input_layernorm"))?,
                self_attn: SelfAttention::load(
                    vb_l.pp("self_attn"),
                    h,
                    shape,
                    true,
                    ("dense", true),
                )?,
                fc1: AdapterLinear::load(h, i, true, mlp.pp("fc1"))?,
                fc2: AdapterLinear::load(i, h, true, mlp.pp("fc2"))?,
            });
        }
        let final_layernorm = Norm::layer(h, cfg.layer_norm_eps, vb_m.pp("final_layernorm"))?;
        let lm_head = if cfg.tie_word_embeddings {
            // Tied: the output weight is the embedding; the bias is still the checkpoint's.
            let bias = vb.pp("lm_head").get(cfg.vocab_size, "bias").ok();
            AdapterLinear::new("lm_head", embed, bias)
        } else {
            AdapterLinear::load(h, cfg.vocab_size, true, vb.pp("lm_head"))?
        };
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            final_layernorm,
            lm_head,
            rotary,
        })
    }

    /// The parsed configuration.
    pub fn config(&self) -> &PhiConfig {
        &self.cfg
    }

    /// Hidden states after `final_layernorm`, `[b, t, hidden]`, for `ids` `[b, t]` that
    /// follow the positions already in the request `state`.
    pub fn forward_hidden(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        let mut x = self.embed_tokens.forward(ids)?;
        for (idx, layer) in self.layers.iter().enumerate() {
            // Attention and MLP read the same normed input, in parallel.
            let normed = layer.input_layernorm.forward(&x)?;
            let attn = layer.self_attn.forward(&normed, &self.rotary, state, idx)?;
            let hidden = self.activation(&layer.fc1.forward(&normed, state)?)?;
            let ff = layer.fc2.forward(&hidden, state)?;
            x = ((attn + ff)? + x)?;
        }
        self.final_layernorm.forward(&x)
    }

    fn activation(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act {
            // Same function as candle's, several times faster (see `kernels`).
            Activation::NewGelu | Activation::GeluPytorchTanh => crate::nn::kernels::gelu_tanh(x)?,
            other => other.forward(x)?,
        })
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
            out.extend([&l.fc1, &l.fc2]);
        }
        out.push(&self.lm_head);
        out
    }

    /// Mutable access to the same layers as [`Self::linears`], in the same order.
    pub fn linears_mut(&mut self) -> Vec<&mut AdapterLinear> {
        let mut out = Vec::new();
        for l in &mut self.layers {
            out.extend(l.self_attn.linears_mut());
            out.extend([&mut l.fc1, &mut l.fc2]);
        }
        out.push(&mut self.lm_head);
        out
    }
}
