//! Training with candle autograd: the one optimiser loop (AdamW over a given set of
//! variables, warm-up then cosine decay, optional clipping and weight decay) for LoRA factors,
//! a whole base, a plan's merge weights, routers and ensemble weights, everything else frozen.
//! Loss is the mean NLL of completion tokens, as the paper reports it, unless the caller gives
//! another ([`train_with_loss`], e.g. distillation's KL or cached ensemble outputs).
//! Deterministic for a seed on CPU.

use std::ops::ControlFlow;

use candle_core::{Tensor, Var};
use candle_nn::optim::{AdamW, Optimizer, ParamsAdamW};
use rand::{Rng, SeedableRng};

use crate::error::{EngineError, Result};
use crate::models::LanguageModel;
use crate::run::examples::{batch_loss, Example};

/// How to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch_size: usize,
    /// Peak learning rate, reached after `warmup_steps`, then cosine decay to a tenth.
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 disables it.
    pub grad_clip: f64,
    /// Seeds the order in which examples are drawn.
    pub seed: u64,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            steps: 200,
            batch_size: 16,
            lr: 1e-3,
            warmup_steps: 10,
            weight_decay: 0.0,
            grad_clip: 1.0,
            seed: 0,
        }
    }
}

/// Progress after one optimiser step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub step: usize,
    pub steps: usize,
    pub loss: f32,
    pub lr: f64,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: usize,
    pub first_loss: f32,
    /// Mean of the last (up to) ten steps' losses.
    pub final_loss: f32,
}

/// Learning rate at `step` (0-based): linear warm-up, then cosine decay to 10% of the peak.
pub fn learning_rate(opts: &TrainOptions, step: usize) -> f64 {
    if step < opts.warmup_steps {
        return opts.lr * (step + 1) as f64 / opts.warmup_steps as f64;
    }
    let span = opts.steps.saturating_sub(opts.warmup_steps).max(1) as f64;
    let progress = ((step - opts.warmup_steps) as f64 / span).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    opts.lr * (0.1 + 0.9 * cosine)
}

/// Trains `params` (variables the model reads) to lower the completion loss on `data`.
/// `on_step` sees every step and may stop the run early.
pub fn train(
    model: &impl LanguageModel,
    params: Vec<Var>,
    data: &[Example],
    opts: &TrainOptions,
    on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<TrainSummary> {
    let loss = |batch: &[usize]| {
        let batch: Vec<&Example> = batch.iter().map(|&i| &data[i]).collect();
        batch_loss(model, &batch)
    };
    train_with_loss(params, data, opts, loss, on_step)
}

/// [`train`] with another loss: `loss` maps a batch, given as indices into `data` (so it may
/// keep something per example), to a scalar with gradients.
pub fn train_with_loss(
    params: Vec<Var>,
    data: &[Example],
    opts: &TrainOptions,
    mut loss: impl FnMut(&[usize]) -> Result<Tensor>,
    mut on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<TrainSummary> {
    if data.is_empty() || opts.batch_size == 0 || params.is_empty() {
        return Err(EngineError::InvalidArgument {
            argument: "training",
            message: "needs data, a batch size of at least 1 and something to train".into(),
        });
    }
    let mut optimizer = AdamW::new(
        params.clone(),
        ParamsAdamW {
            lr: opts.lr,
            weight_decay: opts.weight_decay,
            ..Default::default()
        },
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let batch: Vec<usize> = (0..opts.batch_size)
            .map(|_| rng.random_range(0..data.len()))
            .collect();
        let loss = loss(&batch)?;
        let mut grads = loss.backward()?;
        if opts.grad_clip > 0.0 {
            clip_gradients(&params, &mut grads, opts.grad_clip)?;
        }
        let lr = learning_rate(opts, step);
        optimizer.set_learning_rate(lr);
        optimizer.step(&grads)?;
        let loss = loss.to_scalar::<f32>()?;
        losses.push(loss);
        let report = StepReport {
            step: step + 1,
            steps: opts.steps,
            loss,
            lr,
        };
        if on_step(&report).is_break() {
            break;
        }
    }
    let tail = &losses[losses.len().saturating_sub(10)..];
    Ok(TrainSummary {
        steps: losses.len(),
        first_loss: losses.first().copied().unwrap_or(f32::NAN),
        final_loss: tail.iter().sum::<f32>() / tail.len().max(1) as f32,
    })
}

/// Scales all gradients down together when their global norm exceeds `max_norm`.
fn clip_gradients(
    params: &[Var],
    grads: &mut candle_core::backprop::GradStore,
    max_norm: f64,
) -> Result<()> {
    let mut total = 0f64;
    for p in params {
        if let Some(g) = grads.get(p) {
            total += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
    }
    let norm = total.sqrt();
    if norm > max_norm {
        let factor = max_norm / (norm + 1e-6);
        for p in params {
            if let Some(g) = grads.remove(p) {
                grads.insert(p, (g * factor)?);
            }
        }
    }
    Ok(())
}
