//! Distillation (the paper's "distilled ensemble") and trainable fixed modules. A fit with a
//! [`Teacher`] lowers `KL(teacher ‖ student)` over the next-token distributions at every
//! completion token instead of the data's NLL; a fit with `fixed` trains the LoRA factors the
//! plan carries itself (`ModulePlan::Fixed`). Together they train one adapter that imitates,
//! say, a learned ensemble at the cost of a single pass.
//!
//! The teacher is frozen: its distributions are computed once per example, without
//! gradients, and kept while they fit in [`TEACHER_CACHE_FLOATS`].

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var, D};
use moerge_library::{Adapter, F32Tensor, TensorMap};
use moerge_sdk::plan::{self, Plan};

use crate::error::{EngineError, Result};
use crate::models::{BaseModel, LanguageModel};
use crate::nn::ForwardState;
use crate::plan::{check_experts, merge, FusedModel};
use crate::run::examples::{pack, Example};

/// A frozen plan whose next-token distributions a fit learns to match: single-pass or an
/// ensemble (whose output is already the mixture), over the fit's experts in their order.
#[derive(Debug, Clone, PartialEq)]
pub struct Teacher {
    pub plan: Plan,
    /// The teacher's own tensor file (learned routers, fixed factors); empty when it has none.
    pub tensors: TensorMap,
}

/// How many floats of teacher distributions are kept between steps (256 MiB); past that,
/// the remaining examples' distributions are recomputed whenever they are drawn.
pub const TEACHER_CACHE_FLOATS: usize = 1 << 26;

fn teacher_error(message: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidArgument {
        argument: "teacher",
        message: message.to_string(),
    }
}

/// One example's teacher distributions over its completion positions.
#[derive(Clone)]
pub(crate) struct TeacherTarget {
    /// `[c, vocab]` probabilities.
    probs: Tensor,
    /// `Σ p log p` over those positions: the constant part of the KL.
    neg_entropy: f64,
}

/// The teacher model and its distributions per example (by index into the data).
pub(crate) struct TeacherOutputs {
    model: FusedModel,
    cached: Vec<Option<TeacherTarget>>,
    room: usize,
}

impl TeacherOutputs {
    /// Builds the teacher; errors name the teacher, since its plan came with the options.
    pub(crate) fn new(
        base: &BaseModel,
        experts: &[Adapter],
        teacher: &Teacher,
        examples: usize,
    ) -> Result<TeacherOutputs> {
        check_experts(&teacher.plan, experts).map_err(|e| {
            teacher_error(format!(
                "must name the fit's experts in the fit's order: {e}"
            ))
        })?;
        let mut plan = teacher.plan.clone();
        plan.tensors = None;
        let model = base
            .fuse_with(&plan, experts, &teacher.tensors)
            .map_err(teacher_error)?;
        Ok(TeacherOutputs {
            model,
            cached: vec![None; examples],
            room: TEACHER_CACHE_FLOATS,
        })
    }

    /// The teacher's targets for the examples `batch` (indices into `data`).
    pub(crate) fn targets(
        &mut self,
        data: &[Example],
        batch: &[usize],
    ) -> Result<Vec<TeacherTarget>> {
        let mut missing: Vec<usize> = batch
            .iter()
            .copied()
            .filter(|&i| self.cached[i].is_none())
            .collect();
        missing.sort_unstable();
        missing.dedup();
        let mut fresh = BTreeMap::new();
        if !missing.is_empty() {
            let examples: Vec<&Example> = missing.iter().map(|&i| &data[i]).collect();
            let targets = teacher_targets(&self.model, &examples)?;
            for (i, t) in missing.into_iter().zip(targets) {
                let size = t.probs.elem_count();
                if size <= self.room {
                    self.room -= size;
                    self.cached[i] = Some(t);
                } else {
                    fresh.insert(i, t);
                }
            }
        }
        Ok(batch
            .iter()
            .map(|i| match &self.cached[*i] {
                Some(t) => t.clone(),
                None => fresh[i].clone(),
            })
            .collect())
    }
}

/// Log-probabilities `[Σc, vocab]` of every example's completion positions (position
/// `p - 1 + j` predicts completion token `j`), example after example, with gradients.
pub(crate) fn completion_log_probs(
    model: &impl LanguageModel,
    batch: &[&Example],
) -> Result<Tensor> {
    let (ids, _, _) = pack(batch, model.device())?;
    let (b, t) = ids.dims2()?;
    let logits = model.forward(&ids, &mut ForwardState::new())?;
    let v = logits.dim(D::Minus1)?;
    let rows = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
    let mut picks = Vec::new();
    for (i, e) in batch.iter().enumerate() {
        let first = i * (t - 1) + e.prompt.len() - 1;
        picks.extend((first..first + e.completion.len()).map(|p| p as u32));
    }
    let picks = Tensor::new(picks.as_slice(), model.device())?;
    // Normalise even a teacher's "log mixture" output (already normalised up to rounding) so
    // every distribution sums to 1.
    Ok(candle_nn::ops::log_softmax(
        &rows.index_select(&picks, 0)?,
        D::Minus1,
    )?)
}

/// The teacher's targets for `batch`, one per example, detached from any graph.
fn teacher_targets(model: &FusedModel, batch: &[&Example]) -> Result<Vec<TeacherTarget>> {
    let log_probs = completion_log_probs(model, batch)?.detach();
    let mut out = Vec::with_capacity(batch.len());
    let mut start = 0;
    for e in batch {
        let c = e.completion.len();
        let lp = log_probs.narrow(0, start, c)?;
        let probs = lp.exp()?;
        let neg_entropy = f64::from((&probs * &lp)?.sum_all()?.to_scalar::<f32>()?);
        // `exp` made new storage of this example's size: the cache holds no batch.
        out.push(TeacherTarget { probs, neg_entropy });
        start += c;
    }
    Ok(out)
}

/// Mean `KL(teacher ‖ student)` per completion token of `batch` (a scalar with gradients),
/// `targets` being the teacher's, in the same order.
pub(crate) fn kl_loss(
    student: &impl LanguageModel,
    batch: &[&Example],
    targets: &[TeacherTarget],
) -> Result<Tensor> {
    let student_lp = completion_log_probs(student, batch)?;
    let probs: Vec<&Tensor> = targets.iter().map(|t| &t.probs).collect();
    let probs = Tensor::cat(&probs, 0)?;
    let tokens = probs.dim(0)?;
    let neg_entropy: f64 = targets.iter().map(|t| t.neg_entropy).sum();
    // KL = Σ p log p − Σ p log q; only the second term depends on the student.
    let cross = (probs * student_lp)?.sum_all()?;
    Ok(((cross.neg()? + neg_entropy)? / tokens as f64)?)
}

/// The fixed modules of `template` (those whose factors its tensors hold, as serving finds
/// them) as variables `(A [r, in], B [out, r])` on `device`, starting from those factors.
pub(crate) fn fixed_vars(
    template: &Plan,
    tensors: &TensorMap,
    device: &candle_core::Device,
) -> Result<BTreeMap<String, (Var, Var)>> {
    let mut out = BTreeMap::new();
    for (module, (a, b)) in merge::fixed_factors(template, tensors, "template", device)? {
        out.insert(module, (Var::from_tensor(&a)?, Var::from_tensor(&b)?));
    }
    Ok(out)
}

fn fixed_error(message: String) -> EngineError {
    EngineError::InvalidArgument {
        argument: "template",
        message,
    }
}

/// Serves every fixed module of `model` from its variables (scale 1), checking their shapes
/// against the layer.
pub(crate) fn attach_fixed(
    model: &mut BaseModel,
    fixed: &BTreeMap<String, (Var, Var)>,
) -> Result<()> {
    let mut left: BTreeMap<&str, &(Var, Var)> =
        fixed.iter().map(|(m, v)| (m.as_str(), v)).collect();
    for layer in model.linears_mut() {
        let Some((a, b)) = left.remove(layer.name()) else {
            continue;
        };
        let (out, inp) = layer.shape();
        let (r, a_in) = a.as_tensor().dims2()?;
        if a_in != inp || b.as_tensor().dims() != [out, r] {
            return Err(fixed_error(format!(
                "module {}: fixed factors are A {:?} and B {:?}, but the layer needs \
                 A [r, {inp}] and B [{out}, r]",
                layer.name(),
                a.as_tensor().dims(),
                b.as_tensor().dims()
            )));
        }
        layer.set_trainable_lora(a.clone(), b.clone(), 1.0);
    }
    if let Some(module) = left.keys().next() {
        return Err(fixed_error(format!(
            "module {module} is not a linear layer of this model"
        )));
    }
    Ok(())
}

/// Writes the trained factors into `tensors` under their fixed names.
pub(crate) fn write_fixed(
    fixed: &BTreeMap<String, (Var, Var)>,
    tensors: &mut TensorMap,
) -> Result<()> {
    for (module, (a, b)) in fixed {
        for (name, v) in [
            (plan::fixed_a_name(module), a),
            (plan::fixed_b_name(module), b),
        ] {
            let t = v.as_tensor();
            tensors.insert(
                name,
                F32Tensor {
                    shape: t.dims().to_vec(),
                    data: t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
                },
            );
        }
    }
    Ok(())
}

#[cfg(test)]
#[path = "distill_tests.rs"]
pub(crate) mod tests;
