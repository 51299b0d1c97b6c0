//! Fitting an ensemble's member weights (the paper's "SGD-weighted ensemble"). The members
//! are frozen, so each member's outputs on an example are computed once, the first time a
//! batch draws it (only the examples the steps draw are ever run); the weights are then
//! fitted on those cached outputs, which costs almost nothing per step.
//!
//! Probability level: weights `softmax(θ)`, loss `-log Σ_m softmax(θ)_m p_m(y)`.
//! Logit level: free weights `θ`, loss `-log softmax(Σ_m θ_m z_m)[y]`.

use std::ops::ControlFlow;

use candle_core::{Tensor, Var, D};
use moerge_library::{Adapter, TensorMap};
use moerge_sdk::plan::{EnsembleLevel, Plan};

use super::plan_fit::FittedPlan;
use crate::error::Result;
use crate::models::BaseModel;
use crate::run::examples::Example;
use crate::run::inference;
use crate::train::trainer::{self, StepReport, TrainOptions};

/// What each member said about one example's completion tokens.
struct Cached {
    /// Probability level: `[t, M]` log-probabilities of the targets. Logit level: `[t, M, V]`
    /// logits.
    outputs: Tensor,
    /// `[t]` target ids (logit level).
    targets: Tensor,
}

pub(crate) fn fit_ensemble_weights(
    base: &BaseModel,
    experts: &[Adapter],
    template: &Plan,
    tensors: &TensorMap,
    data: &[Example],
    train: &TrainOptions,
    mut on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<FittedPlan> {
    let ensemble = template.ensemble.as_ref().expect("an ensemble template");
    let level = ensemble.level;
    let members = template
        .passes()
        .into_iter()
        .map(|(_, pass)| base.with_plan(&pass, experts, tensors))
        .collect::<Result<Vec<_>>>()?;
    let mut cached: Vec<Option<Cached>> = (0..data.len()).map(|_| None).collect();
    let start: Vec<f32> = ensemble
        .members
        .iter()
        .map(|m| match level {
            EnsembleLevel::Probability => (m.weight.max(1e-6)).ln() as f32,
            EnsembleLevel::Logit => m.weight as f32,
        })
        .collect();
    let theta = Var::from_vec(start, members.len(), base.device())?;
    let loss = |picks: &[usize]| {
        for &i in picks {
            if cached[i].is_none() {
                cached[i] = Some(cache_example(&members, &data[i], level)?);
            }
        }
        let batch: Vec<&Cached> = picks
            .iter()
            .map(|&i| cached[i].as_ref().expect("cached above"))
            .collect();
        batch_loss(&theta, &batch, level)
    };
    let summary = trainer::train_with_loss(vec![theta.clone()], data, train, loss, &mut on_step)?;
    let weights: Vec<f64> = match level {
        EnsembleLevel::Probability => candle_nn::ops::softmax(theta.as_tensor(), 0)?,
        EnsembleLevel::Logit => theta.as_tensor().clone(),
    }
    .to_vec1::<f32>()?
    .into_iter()
    .map(f64::from)
    .collect();
    let mut plan = template.clone();
    let e = plan.ensemble.as_mut().expect("an ensemble template");
    for (m, w) in e.members.iter_mut().zip(&weights) {
        m.weight = *w;
    }
    if level == EnsembleLevel::Probability {
        // Renormalise in f64 so the plan validates exactly.
        let total: f64 = e.members.iter().map(|m| m.weight).sum();
        e.members.iter_mut().for_each(|m| m.weight /= total);
    }
    Ok(FittedPlan {
        plan,
        tensors: tensors.clone(),
        summary,
    })
}

fn cache_example(members: &[BaseModel], e: &Example, level: EnsembleLevel) -> Result<Cached> {
    let ids: Vec<u32> = e.prompt.iter().chain(&e.completion).copied().collect();
    let first = e.prompt.len() - 1;
    let t = e.completion.len();
    let targets = Tensor::new(e.completion.as_slice(), members[0].device())?;
    let per_member = members
        .iter()
        .map(|m| {
            let logits = inference::logits(m, &ids)?.narrow(0, first, t)?; // [t, V]
            Ok(match level {
                EnsembleLevel::Probability => candle_nn::ops::log_softmax(&logits, D::Minus1)?
                    .gather(&targets.unsqueeze(1)?, 1)?, // [t, 1]
                EnsembleLevel::Logit => logits.unsqueeze(1)?, // [t, 1, V]
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Cached {
        outputs: Tensor::cat(&per_member, 1)?,
        targets,
    })
}

fn batch_loss(theta: &Var, batch: &[&Cached], level: EnsembleLevel) -> Result<Tensor> {
    let mut total = Vec::with_capacity(batch.len());
    let mut count = 0usize;
    for c in batch {
        let nll = match level {
            EnsembleLevel::Probability => {
                let log_w = candle_nn::ops::log_softmax(theta.as_tensor(), 0)?;
                let x = c.outputs.broadcast_add(&log_w)?; // [t, M]
                let max = x.max_keepdim(1)?.detach();
                let lse = (x.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + max)?;
                lse.neg()?.squeeze(1)?
            }
            EnsembleLevel::Logit => {
                let (t, m, v) = c.outputs.dims3()?;
                let mixed = theta
                    .as_tensor()
                    .reshape((1, 1, m))?
                    .broadcast_as((t, 1, m))?
                    .matmul(&c.outputs)?
                    .reshape((t, v))?;
                candle_nn::ops::log_softmax(&mixed, D::Minus1)?
                    .gather(&c.targets.unsqueeze(1)?, 1)?
                    .squeeze(1)?
                    .neg()?
            }
        };
        count += nll.dim(0)?;
        total.push(nll.sum_all()?);
    }
    Ok((Tensor::stack(&total, 0)?.sum_all()? / count as f64)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fit::plan_fit::tests::{one_hot_ensemble, setup};
    use crate::run::examples::batch_loss as serving_batch_loss;
    use candle_core::Device;

    fn serving_loss(base: &BaseModel, experts: &[Adapter], plan: &Plan, data: &[Example]) -> f32 {
        let model = base.fuse(plan, experts).unwrap();
        let refs: Vec<&Example> = data.iter().collect();
        serving_batch_loss(&model, &refs)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    #[test]
    fn cached_member_outputs_give_the_served_ensembles_loss_and_fitting_lowers_it() {
        let (base, experts, data) = setup();
        for level in [EnsembleLevel::Probability, EnsembleLevel::Logit] {
            let weights = [0.5, 0.3, 0.2];
            let template = one_hot_ensemble(&experts, &weights, level);
            let members = template
                .passes()
                .into_iter()
                .map(|(_, p)| base.with_plan(&p, &experts, &TensorMap::new()).unwrap())
                .collect::<Vec<_>>();
            let cached: Vec<Cached> = data
                .iter()
                .map(|e| cache_example(&members, e, level).unwrap())
                .collect();
            let start: Vec<f32> = weights
                .iter()
                .map(|&w| match level {
                    EnsembleLevel::Probability => (w as f32).ln(),
                    EnsembleLevel::Logit => w as f32,
                })
                .collect();
            let theta = Var::from_vec(start, 3, &Device::Cpu).unwrap();
            let refs: Vec<&Cached> = cached.iter().collect();
            let cached_loss: f32 = batch_loss(&theta, &refs, level)
                .unwrap()
                .to_scalar()
                .unwrap();
            let served = serving_loss(&base, &experts, &template, &data);
            assert!(
                (cached_loss - served).abs() < 1e-4,
                "{level:?}: {cached_loss} vs {served}"
            );

            let train = TrainOptions {
                steps: 40,
                batch_size: 4,
                lr: 0.1,
                warmup_steps: 1,
                grad_clip: 0.0,
                ..Default::default()
            };
            let fitted = fit_ensemble_weights(
                &base,
                &experts,
                &template,
                &TensorMap::new(),
                &data,
                &train,
                |_| ControlFlow::Continue(()),
            )
            .unwrap();
            fitted.plan.validate().unwrap();
            let after = serving_loss(&base, &experts, &fitted.plan, &data);
            assert!(after < served - 1e-3, "{level:?}: {served} -> {after}");
        }
    }
}
