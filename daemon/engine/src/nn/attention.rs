//! The attention block both families share, and scaled dot-product attention.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use super::linear::AdapterLinear;
use super::rope::RotaryTables;
use super::state::ForwardState;
use crate::error::Result;

/// Scaled dot-product attention over `q` `[b, h, t, d]` and `k`, `v` `[b, kv_h, s, d]`
/// (grouped-query heads are repeated), causal with `offset` cached positions. Scores and
/// softmax run in f32 whatever the model dtype; the result is `[b, t, h·d]`.
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, offset: usize) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let kv_heads = k.dim(1)?;
    let in_dtype = q.dtype();
    let k = candle_transformers::utils::repeat_kv(k.clone(), h / kv_heads)?;
    let v = candle_transformers::utils::repeat_kv(v.clone(), h / kv_heads)?;
    let q = q.to_dtype(DType::F32)?.contiguous()?;
    let k = k.to_dtype(DType::F32)?.contiguous()?;
    let v = v.to_dtype(DType::F32)?.contiguous()?;
    let scores = q.matmul(&k.t()?)?;
    debug_assert_eq!(scores.dim(3)?, offset + t);
    let probs = super::kernels::causal_softmax(&scores, 1.0 / (d as f64).sqrt())?;
    let out = probs.matmul(&v)?.to_dtype(in_dtype)?;
    Ok(out.transpose(1, 2)?.reshape((b, t, h * d))?)
}

/// Head counts of an attention block.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// The attention block both families share: q/k/v projections, rotary embeddings, the
/// cache, causal attention and the output projection (Phi names it `dense`, Llama `o_proj`).
#[derive(Debug, Clone)]
pub(crate) struct SelfAttention {
    pub q_proj: AdapterLinear,
    pub k_proj: AdapterLinear,
    pub v_proj: AdapterLinear,
    pub out_proj: AdapterLinear,
    heads: Heads,
}

impl SelfAttention {
    /// Loads the four projections under `vb` (`self_attn`).
    pub(crate) fn load(
        vb: VarBuilder<'_>,
        hidden: usize,
        heads: Heads,
        qkv_bias: bool,
        out: (&str, bool),
    ) -> Result<Self> {
        let (q, kv) = (
            heads.heads * heads.head_dim,
            heads.kv_heads * heads.head_dim,
        );
        Ok(Self {
            q_proj: AdapterLinear::load(hidden, q, qkv_bias, vb.pp("q_proj"))?,
            k_proj: AdapterLinear::load(hidden, kv, qkv_bias, vb.pp("k_proj"))?,
            v_proj: AdapterLinear::load(hidden, kv, qkv_bias, vb.pp("v_proj"))?,
            out_proj: AdapterLinear::load(q, hidden, out.1, vb.pp(out.0))?,
            heads,
        })
    }

    /// Attention output `[b, t, hidden]` for normed input `x`, continuing the request `state` at `layer`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryTables,
        state: &mut ForwardState,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // Earlier layers of this same step have already grown their part of the cache.
        let offset = state.layer_len(layer);
        let Heads {
            heads,
            kv_heads,
            head_dim,
        } = self.heads;
        let q = rotary.apply_heads(&self.q_proj.forward(x, state)?, heads, head_dim, offset)?;
        let k = rotary.apply_heads(&self.k_proj.forward(x, state)?, kv_heads, head_dim, offset)?;
        let v = self
            .v_proj
            .forward(x, state)?
            .reshape((b, t, kv_heads, head_dim))?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = state.append(layer, k, v)?;
        self.out_proj
            .forward(&attention(&q, &k, &v, offset)?, state)
    }

    /// The four projections, in PEFT's usual order.
    pub(crate) fn linears(&self) -> [&AdapterLinear; 4] {
        [&self.q_proj, &self.k_proj, &self.v_proj, &self.out_proj]
    }

    /// Mutable access to the same projections.
    pub(crate) fn linears_mut(&mut self) -> [&mut AdapterLinear; 4] {
        [
            &mut self.q_proj,
            &mut self.k_proj,
            &mut self.v_proj,
            &mut self.out_proj,
        ]
    }
}
