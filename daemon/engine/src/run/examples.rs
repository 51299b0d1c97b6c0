//! Examples (a prompt and its completion, tokenized) and the paper's loss on them: the mean
//! NLL of completion tokens, per batch (with gradients, for training) or per example.

use candle_core::{DType, Device, Tensor, D};
use moerge_sdk::policy::Record;

use super::tokenizer::TextTokenizer;
use crate::error::{EngineError, Result};
use crate::models::LanguageModel;
use crate::nn::ForwardState;

/// One training or evaluation record, tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub task: Option<String>,
    pub prompt: Vec<u32>,
    pub completion: Vec<u32>,
}

impl Example {
    /// `record` tokenized (prompt and completion apart, no special tokens added).
    pub fn from_record(record: &Record, tokenizer: &TextTokenizer) -> Result<Example> {
        Ok(Example {
            task: record.task.clone(),
            prompt: tokenizer.encode(&record.prompt)?,
            completion: tokenizer.encode(&record.completion)?,
        })
    }
}

/// Every record tokenized, in order: the engine's one tokenization of records.
pub fn tokenize_records(records: &[Record], tokenizer: &TextTokenizer) -> Result<Vec<Example>> {
    records
        .iter()
        .map(|r| Example::from_record(r, tokenizer))
        .collect()
}

/// Token ids `[b, t]` of prompt + completion (right-padded with 0), the targets `[b, t - 1]`
/// and a mask `[b, t - 1]` that is 1 where position `p` predicts a completion token, on
/// `device`.
pub(crate) fn pack(batch: &[&Example], device: &Device) -> Result<(Tensor, Tensor, Tensor)> {
    let t = batch
        .iter()
        .map(|e| e.prompt.len() + e.completion.len())
        .max()
        .unwrap_or(0);
    if t < 2
        || batch
            .iter()
            .any(|e| e.prompt.is_empty() || e.completion.is_empty())
    {
        return Err(EngineError::InvalidArgument {
            argument: "example",
            message: "every example needs a non-empty prompt and completion".into(),
        });
    }
    let mut ids = vec![0u32; batch.len() * t];
    let mut mask = vec![0f32; batch.len() * (t - 1)];
    for (i, e) in batch.iter().enumerate() {
        let row = &mut ids[i * t..(i + 1) * t];
        for (slot, id) in row.iter_mut().zip(e.prompt.iter().chain(&e.completion)) {
            *slot = *id;
        }
        let first = e.prompt.len() - 1;
        for m in &mut mask[i * (t - 1) + first..i * (t - 1) + first + e.completion.len()] {
            *m = 1.0;
        }
    }
    let ids = Tensor::from_vec(ids, (batch.len(), t), device)?;
    let targets = ids.narrow(1, 1, t - 1)?.contiguous()?;
    let mask = Tensor::from_vec(mask, (batch.len(), t - 1), device)?;
    Ok((ids, targets, mask))
}

/// Per-token NLL `[b, t - 1]` (masked to completion tokens) and the mask.
fn masked_nll(model: &impl LanguageModel, batch: &[&Example]) -> Result<(Tensor, Tensor)> {
    let (ids, targets, mask) = pack(batch, model.device())?;
    let t = ids.dim(1)?;
    let logits = model
        .forward(&ids, &mut ForwardState::new())?
        .narrow(1, 0, t - 1)?;
    let log_probs = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    let picked = log_probs.gather(&targets.unsqueeze(2)?, 2)?.squeeze(2)?;
    Ok(((picked.neg()? * &mask)?, mask))
}

/// Mean NLL over every completion token of the batch (a scalar with gradients).
pub fn batch_loss(model: &impl LanguageModel, batch: &[&Example]) -> Result<Tensor> {
    let (nll, mask) = masked_nll(model, batch)?;
    Ok((nll.sum_all()? / mask.sum_all()?.to_dtype(DType::F32)?)?)
}

/// Each example's mean NLL per completion token (the paper's loss), in batches.
pub fn example_losses(
    model: &impl LanguageModel,
    data: &[Example],
    batch_size: usize,
) -> Result<Vec<f32>> {
    let mut out = Vec::with_capacity(data.len());
    for chunk in data.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (nll, mask) = masked_nll(model, &refs)?;
        let per_row = (nll.sum(1)? / mask.sum(1)?)?;
        out.extend(per_row.to_vec1::<f32>()?);
    }
    Ok(out)
}
