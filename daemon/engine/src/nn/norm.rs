//! The two normalisations of the supported families.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::error::Result;

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
