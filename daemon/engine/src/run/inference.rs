//! What a caller does with a model: logits, scoring a completion, top tokens, generation.

use std::ops::ControlFlow;

use candle_core::{DType, Tensor, D};
use candle_transformers::generation::{LogitsProcessor, Sampling};

use crate::error::{EngineError, Result};
use crate::models::LanguageModel;
use crate::nn::ForwardState;

/// Logits `[t, vocab]` of one sequence (batch 1, no padding), one forward pass.
pub fn logits(model: &impl LanguageModel, ids: &[u32]) -> Result<Tensor> {
    logits_in(model, ids, &mut ForwardState::new())
}

/// [`logits`] within a request `state` the caller keeps (to trace it, say).
pub fn logits_in(
    model: &impl LanguageModel,
    ids: &[u32],
    state: &mut ForwardState,
) -> Result<Tensor> {
    let input = ids_tensor(model, ids, "text")?;
    Ok(model.forward(&input, state)?.squeeze(0)?)
}

/// The negative log-likelihood of each completion token given everything before it.
#[derive(Debug, Clone, PartialEq)]
pub struct Score {
    /// One value per completion token, in nats.
    pub token_nll: Vec<f32>,
    /// The completion's token ids.
    pub completion_ids: Vec<u32>,
}

impl Score {
    /// Mean NLL per completion token (the paper's loss).
    pub fn mean_nll(&self) -> f32 {
        self.token_nll.iter().sum::<f32>() / self.token_nll.len() as f32
    }
}

/// Scores `completion_ids` after `prompt_ids` in one forward pass.
pub fn score(
    model: &impl LanguageModel,
    prompt_ids: &[u32],
    completion_ids: &[u32],
) -> Result<Score> {
    if prompt_ids.is_empty() {
        return Err(EngineError::InvalidArgument {
            argument: "prompt",
            message: "must not be empty: the first completion token needs a context".into(),
        });
    }
    if completion_ids.is_empty() {
        return Err(EngineError::InvalidArgument {
            argument: "completion",
            message: "must not be empty".into(),
        });
    }
    let all: Vec<u32> = prompt_ids.iter().chain(completion_ids).copied().collect();
    let logits = logits(model, &all)?;
    // Position p-1+j predicts completion token j.
    let start = prompt_ids.len() - 1;
    let predicting = logits.narrow(0, start, completion_ids.len())?;
    let log_probs = candle_nn::ops::log_softmax(&predicting, D::Minus1)?;
    let targets = Tensor::new(completion_ids, model.device())?.unsqueeze(1)?;
    let picked = log_probs
        .gather(&targets, 1)?
        .squeeze(1)?
        .to_dtype(DType::F32)?;
    let token_nll = picked.neg()?.to_vec1::<f32>()?;
    Ok(Score {
        token_nll,
        completion_ids: completion_ids.to_vec(),
    })
}

/// The `k` most likely next tokens after `ids`, with their probabilities, best first.
pub fn top_tokens(model: &impl LanguageModel, ids: &[u32], k: usize) -> Result<Vec<(u32, f32)>> {
    let input = ids_tensor(model, ids, "prompt")?;
    let last = model
        .forward_last(&input, &mut ForwardState::new())?
        .squeeze(0)?;
    let probs = candle_nn::ops::softmax_last_dim(&last)?.to_vec1::<f32>()?;
    let mut ranked: Vec<(u32, f32)> = probs
        .into_iter()
        .enumerate()
        .map(|(i, p)| (i as u32, p))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(k);
    Ok(ranked)
}

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// Stop after this many new tokens.
    pub max_tokens: usize,
    /// 0 (the default) is greedy; above 0 samples from the softened distribution.
    pub temperature: f64,
    /// Nucleus sampling: keep the smallest set of tokens whose mass reaches `top_p`.
    pub top_p: Option<f64>,
    /// Seed of the sampler, so a sampled generation can be repeated.
    pub seed: u64,
    /// Generation stops when the model picks any of these ids (not included in the output).
    pub stop_ids: Vec<u32>,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        Self {
            max_tokens: 64,
            temperature: 0.0,
            top_p: None,
            seed: 299_792_458,
            stop_ids: Vec::new(),
        }
    }
}

/// Generates up to `max_tokens` tokens after `prompt_ids` with a KV cache, calling
/// `on_token` with each new id as soon as it exists; `on_token` may stop early.
/// Returns the new ids.
pub fn generate(
    model: &impl LanguageModel,
    prompt_ids: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32) -> ControlFlow<()>,
) -> Result<Vec<u32>> {
    if opts.temperature.is_nan() || opts.temperature < 0.0 {
        return Err(EngineError::InvalidArgument {
            argument: "temperature",
            message: format!("must be 0 (greedy) or positive, got {}", opts.temperature),
        });
    }
    if let Some(p) = opts.top_p {
        if !(p > 0.0 && p <= 1.0) {
            return Err(EngineError::InvalidArgument {
                argument: "top_p",
                message: format!("must be in (0, 1], got {p}"),
            });
        }
    }
    let sampling = if opts.temperature == 0.0 {
        Sampling::ArgMax
    } else {
        match opts.top_p {
            Some(p) => Sampling::TopP {
                p,
                temperature: opts.temperature,
            },
            None => Sampling::All {
                temperature: opts.temperature,
            },
        }
    };
    let mut sampler = LogitsProcessor::from_sampling(opts.seed, sampling);
    let mut state = ForwardState::new();
    let mut out = Vec::new();
    let mut next_input = ids_tensor(model, prompt_ids, "prompt")?;
    while out.len() < opts.max_tokens {
        let last = model.forward_last(&next_input, &mut state)?.squeeze(0)?;
        let id = sampler.sample(&last)?;
        if opts.stop_ids.contains(&id) {
            break;
        }
        out.push(id);
        if on_token(id).is_break() {
            break;
        }
        next_input = Tensor::new(&[id], model.device())?.unsqueeze(0)?;
    }
    Ok(out)
}

fn ids_tensor(model: &impl LanguageModel, ids: &[u32], argument: &'static str) -> Result<Tensor> {
    if ids.is_empty() {
        return Err(EngineError::InvalidArgument {
            argument,
            message: "tokenizes to no tokens".into(),
        });
    }
    if let Some(bad) = ids.iter().find(|&&id| id as usize >= model.vocab_size()) {
        return Err(EngineError::InvalidArgument {
            argument,
            message: format!(
                "token id {bad} is outside the vocabulary (size {})",
                model.vocab_size()
            ),
        });
    }
    Ok(Tensor::new(ids, model.device())?.unsqueeze(0)?)
}

/// Writes `logits` (f32 `[t, vocab]`) and `input_ids` (i64 `[t]`) to a safetensors file, the
/// layout of the PEFT reference fixtures, so numbers can be compared with transformers + PEFT.
pub fn save_logits(path: &std::path::Path, ids: &[u32], logits: &Tensor) -> Result<()> {
    let ids: Vec<i64> = ids.iter().map(|&i| i64::from(i)).collect();
    let n = ids.len();
    let tensors = std::collections::HashMap::from([
        ("logits".to_string(), logits.to_dtype(DType::F32)?),
        (
            "input_ids".to_string(),
            Tensor::from_vec(ids, n, logits.device())?,
        ),
    ]);
    candle_core::safetensors::save(&tensors, path).map_err(|e| EngineError::InvalidArgument {
        argument: "out",
        message: format!("cannot write {}: {e}", path.display()),
    })
}
