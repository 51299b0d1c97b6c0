//! Pieces shared by the model families: rotary tables, the causal mask, the KV cache, attention.

use std::sync::Arc;

use candle_core::{DType, Module, Tensor};
use candle_nn::VarBuilder;

use crate::adapter_linear::AdapterLinear;
use crate::error::{EngineError, Result};

/// Cached keys and values of every layer, for incremental decoding.
///
/// The cache lives outside the model so one loaded model serves many requests at once;
/// each request owns its cache.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
    /// Running input sums of sequence-routed modules (see `routing`).
    pub(crate) routing: crate::routing::SequenceSums,
    /// One cache per ensemble member (empty for a single model).
    members: Vec<KvCache>,
}

impl KvCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of positions already cached.
    pub fn len(&self) -> usize {
        match self.members.first() {
            Some(m) if self.layers.is_empty() => m.len(),
            _ => self.layer_len(0),
        }
    }

    /// The cache of ensemble member `i`, created on first use.
    pub(crate) fn member(&mut self, i: usize) -> &mut KvCache {
        if self.members.len() <= i {
            self.members.resize_with(i + 1, KvCache::new);
        }
        &mut self.members[i]
    }

    /// Number of positions cached for one layer.
    pub(crate) fn layer_len(&self, layer: usize) -> usize {
        match self.layers.get(layer) {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Splits the cache along the batch into parts of `sizes` rows (views, no copy).
    pub(crate) fn split_batch(&self, sizes: &[usize]) -> Result<Vec<KvCache>> {
        let mut parts = vec![KvCache::new(); sizes.len()];
        for (module, (sum, seen)) in &self.routing {
            let mut start = 0;
            for (part, &n) in parts.iter_mut().zip(sizes) {
                part.routing
                    .insert(module.clone(), (sum.narrow(0, start, n)?, *seen));
                start += n;
            }
        }
        for layer in &self.layers {
            let mut start = 0;
            for (part, &n) in parts.iter_mut().zip(sizes) {
                let kv = match layer {
                    Some((k, v)) => Some((k.narrow(0, start, n)?, v.narrow(0, start, n)?)),
                    None => None,
                };
                part.layers.push(kv);
                start += n;
            }
        }
        Ok(parts)
    }

    /// Joins caches of consecutive batch parts back into one.
    pub(crate) fn concat_batch(parts: &[KvCache]) -> Result<KvCache> {
        let layers = parts.iter().map(|p| p.layers.len()).max().unwrap_or(0);
        let mut out = KvCache::new();
        if let Some(first) = parts.first() {
            for (module, (_, seen)) in &first.routing {
                let sums: Vec<&Tensor> = parts
                    .iter()
                    .filter_map(|p| p.routing.get(module).map(|s| &s.0))
                    .collect();
                out.routing
                    .insert(module.clone(), (Tensor::cat(&sums, 0)?, *seen));
            }
        }
        for l in 0..layers {
            let kvs: Option<Vec<&(Tensor, Tensor)>> = parts
                .iter()
                .map(|p| p.layers.get(l).and_then(Option::as_ref))
                .collect();
            out.layers.push(match kvs {
                Some(kvs) => {
                    let ks: Vec<&Tensor> = kvs.iter().map(|kv| &kv.0).collect();
                    let vs: Vec<&Tensor> = kvs.iter().map(|kv| &kv.1).collect();
                    Some((Tensor::cat(&ks, 0)?, Tensor::cat(&vs, 0)?))
                }
                None => None,
            });
        }
        Ok(out)
    }

    /// Appends this step's keys and values (`[b, kv_heads, t, head_dim]`) for `layer` and
    /// returns the full keys and values so far.
    pub(crate) fn append(
        &mut self,
        layer: usize,
        k: Tensor,
        v: Tensor,
    ) -> Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize(layer + 1, None);
        }
        let kv = match self.layers[layer].take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        self.layers[layer] = Some(kv.clone());
        Ok(kv)
    }
}

/// Precomputed `cos` / `sin` for rotary position embeddings over `rotary_dim` channels.
#[derive(Debug, Clone)]
pub(crate) struct RotaryTables {
    /// `[max_positions, half]`, row-major; shared by every clone of the model.
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    half: usize,
    max_positions: usize,
}

impl RotaryTables {
    /// `inv_freq` has `rotary_dim / 2` entries.
    pub(crate) fn new(inv_freq: &[f64], max_positions: usize) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half);
        let mut sin = Vec::with_capacity(max_positions * half);
        for pos in 0..max_positions {
            for f in inv_freq {
                // Angles in f32 as transformers computes them, so long positions round alike.
                let angle = (pos as f32) * (*f as f32);
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Self {
            cos: cos.into(),
            sin: sin.into(),
            half,
            max_positions,
        }
    }

    /// Splits a projection's output `[b, t, heads · head_dim]` into `[b, heads, t, head_dim]`
    /// and rotates the first `rotary_dim` channels of each head as transformers'
    /// `rotate_half` does, for positions `offset .. offset + t`.
    pub(crate) fn apply_heads(
        &self,
        x: &Tensor,
        heads: usize,
        head_dim: usize,
        offset: usize,
    ) -> Result<Tensor> {
        let t = x.dim(1)?;
        if offset + t > self.max_positions {
            return Err(EngineError::InvalidArgument {
                argument: "sequence length",
                message: format!(
                    "{} positions exceed the model's max_position_embeddings ({})",
                    offset + t,
                    self.max_positions
                ),
            });
        }
        Ok(crate::kernels::rope_heads(
            x,
            heads,
            head_dim,
            (&self.cos, &self.sin, self.half),
            offset,
        )?)
    }
}

/// Standard inverse frequencies `1 / theta^(2i / dim)`.
pub(crate) fn default_inv_freq(rotary_dim: usize, theta: f64) -> Vec<f64> {
    (0..rotary_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f64 / rotary_dim as f64))
        .collect()
}

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
    let probs = crate::kernels::causal_softmax(&scores, 1.0 / (d as f64).sqrt())?;
    let out = probs.matmul(&v)?.to_dtype(in_dtype)?;
    Ok(out.transpose(1, 2)?.reshape((b, t, h * d))?)
}

/// LayerNorm (with a bias) or RMSNorm (without), on the last dim.
///
/// Inference uses candle's fused kernels; they have no backward pass, so when gradients are
/// being tracked (training) the composed formula runs instead. Both compute the same values.
#[derive(Debug, Clone)]
pub(crate) struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
    eps: f32,
}

impl Norm {
    /// transformers' `LayerNorm` (`weight`, `bias`).
    pub(crate) fn layer(size: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: Some(vb.get(size, "bias")?),
            eps: eps as f32,
        })
    }

    /// Llama's `RMSNorm` (`weight` only).
    pub(crate) fn rms(size: usize, eps: f64, vb: VarBuilder<'_>) -> Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            bias: None,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let training = x.track_op() || self.weight.track_op();
        let (w, eps) = (&self.weight, self.eps);
        Ok(match (&self.bias, training) {
            (Some(b), false) => candle_nn::ops::layer_norm(&x.contiguous()?, w, b, eps)?,
            (Some(b), true) => candle_nn::ops::layer_norm_slow(x, w, b, eps)?,
            (None, false) => candle_nn::ops::rms_norm(&x.contiguous()?, w, eps)?,
            (None, true) => candle_nn::ops::rms_norm_slow(x, w, eps)?,
        })
    }
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

    /// Attention output `[b, t, hidden]` for normed input `x`, continuing `cache` at `layer`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        rotary: &RotaryTables,
        cache: &mut KvCache,
        layer: usize,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        // Earlier layers of this same step have already grown their part of the cache.
        let offset = cache.layer_len(layer);
        let Heads {
            heads,
            kv_heads,
            head_dim,
        } = self.heads;
        let q = rotary.apply_heads(&self.q_proj.forward(x)?, heads, head_dim, offset)?;
        let k = rotary.apply_heads(&self.k_proj.forward(x)?, kv_heads, head_dim, offset)?;
        let v = self
            .v_proj
            .forward(x)?
            .reshape((b, t, kv_heads, head_dim))?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = cache.append(layer, k, v)?;
        Ok(self.out_proj.forward(&attention(&q, &k, &v, offset)?)?)
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
