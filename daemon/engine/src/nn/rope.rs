//! Rotary position embeddings: tables of `cos` / `sin` per position, applied while a
//! projection's output is split into heads.

use std::sync::Arc;

use candle_core::Tensor;

use crate::error::{EngineError, Result};

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
        Ok(super::kernels::rope_heads(
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
