//! Base models: `config.json` parsing, the Phi and Llama families, and [`BaseModel`], which
//! loads a folder and runs a forward pass. Models carry adapters (frozen factors, or updates
//! the layers above attach) but do not know plans.

mod base;
mod config;
mod llama;
mod load;
mod phi;

use candle_core::{Device, Tensor};

pub(crate) use base::Family;
pub use base::{BaseModel, Precision};
pub use llama::{Llama, LlamaConfig};
pub use phi::{Phi, PhiConfig};

use crate::error::Result;
use crate::nn::ForwardState;

/// Anything that maps token ids to next-token scores.
pub trait LanguageModel: Send + Sync {
    /// Scores `[b, t, vocab]` (f32) for ids `[b, t]` continuing the request `state`: logits,
    /// or for a probability ensemble the log of the mixture probabilities.
    fn forward(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor>;
    /// The last position's scores only, `[b, vocab]`.
    fn forward_last(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor>;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// Where tensors live.
    fn device(&self) -> &Device;
}

impl LanguageModel for BaseModel {
    fn forward(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        BaseModel::forward(self, ids, state)
    }
    fn forward_last(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        BaseModel::forward_last(self, ids, state)
    }
    fn vocab_size(&self) -> usize {
        BaseModel::vocab_size(self)
    }
    fn device(&self) -> &Device {
        BaseModel::device(self)
    }
}
