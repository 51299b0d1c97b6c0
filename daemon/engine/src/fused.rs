//! What a plan builds: one model (a base with merged, routed or no updates), or an output
//! ensemble of several such models. Both are [`LanguageModel`]s, which is all that
//! inference and training need.

use candle_core::{Device, Tensor, D};
use moerge_library::{Adapter, TensorMap};
use moerge_sdk::plan::{EnsembleLevel, Plan};

use crate::error::Result;
use crate::layers::KvCache;
use crate::model::BaseModel;

/// Anything that maps token ids to next-token scores.
pub trait LanguageModel: Send + Sync {
    /// Scores `[b, t, vocab]` (f32) for ids `[b, t]` continuing `cache`: logits, or for a
    /// probability ensemble the log of the mixture probabilities.
    fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// The last position's scores only, `[b, vocab]`.
    fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor>;
    /// Size of the output vocabulary.
    fn vocab_size(&self) -> usize;
    /// Where tensors live.
    fn device(&self) -> &Device;
}

impl LanguageModel for BaseModel {
    fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        BaseModel::forward(self, ids, cache)
    }
    fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        BaseModel::forward_last(self, ids, cache)
    }
    fn vocab_size(&self) -> usize {
        BaseModel::vocab_size(self)
    }
    fn device(&self) -> &Device {
        BaseModel::device(self)
    }
}

/// Several single-pass models mixed at the output.
#[derive(Clone)]
pub struct EnsembleModel {
    members: Vec<(f64, BaseModel)>,
    level: EnsembleLevel,
}

impl EnsembleModel {
    fn combine(&self, outputs: Vec<Tensor>) -> Result<Tensor> {
        match self.level {
            EnsembleLevel::Logit => {
                let mut total: Option<Tensor> = None;
                for ((w, _), z) in self.members.iter().zip(outputs) {
                    let term = (z * *w)?;
                    total = Some(match total {
                        Some(t) => (t + term)?,
                        None => term,
                    });
                }
                Ok(total.expect("an ensemble has members"))
            }
            EnsembleLevel::Probability => {
                // log Σ wᵢ softmax(zᵢ) = logsumexp over members of (log wᵢ + log_softmax(zᵢ)),
                // skipping members of weight 0 (log 0 = -inf).
                let terms = self
                    .members
                    .iter()
                    .zip(outputs)
                    .filter(|((w, _), _)| *w > 0.0)
                    .map(|((w, _), z)| Ok((candle_nn::ops::log_softmax(&z, D::Minus1)? + w.ln())?))
                    .collect::<Result<Vec<_>>>()?;
                let stacked = Tensor::stack(&terms, 0)?;
                let max = stacked.max_keepdim(0)?;
                let sum = stacked.broadcast_sub(&max)?.exp()?.sum_keepdim(0)?;
                Ok((sum.log()? + max)?.squeeze(0)?)
            }
        }
    }
}

impl LanguageModel for EnsembleModel {
    fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let outputs = self
            .members
            .iter()
            .enumerate()
            .map(|(i, (_, m))| m.forward(ids, cache.member(i)))
            .collect::<Result<Vec<_>>>()?;
        self.combine(outputs)
    }
    fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let outputs = self
            .members
            .iter()
            .enumerate()
            .map(|(i, (_, m))| m.forward_last(ids, cache.member(i)))
            .collect::<Result<Vec<_>>>()?;
        self.combine(outputs)
    }
    fn vocab_size(&self) -> usize {
        self.members[0].1.vocab_size()
    }
    fn device(&self) -> &Device {
        self.members[0].1.device()
    }
}

/// A fused model: one pass, or an ensemble.
#[derive(Clone)]
// Built once per request and moved rarely: boxing the common single case buys nothing.
#[allow(clippy::large_enum_variant)]
pub enum FusedModel {
    Single(BaseModel),
    Ensemble(EnsembleModel),
}

impl FusedModel {
    /// End-of-sequence ids declared by the base's `config.json`.
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.base().eos_token_ids()
    }

    /// The (first) underlying model.
    pub fn base(&self) -> &BaseModel {
        match self {
            FusedModel::Single(m) => m,
            FusedModel::Ensemble(e) => &e.members[0].1,
        }
    }
}

impl LanguageModel for FusedModel {
    fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        match self {
            FusedModel::Single(m) => m.forward(ids, cache),
            FusedModel::Ensemble(e) => e.forward(ids, cache),
        }
    }
    fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        match self {
            FusedModel::Single(m) => m.forward_last(ids, cache),
            FusedModel::Ensemble(e) => e.forward_last(ids, cache),
        }
    }
    fn vocab_size(&self) -> usize {
        self.base().vocab_size()
    }
    fn device(&self) -> &Device {
        self.base().device()
    }
}

impl BaseModel {
    /// Builds what `plan` describes from `experts`: a single fused model, or an ensemble of
    /// one fused model per member.
    pub fn fuse(&self, plan: &Plan, experts: &[Adapter]) -> Result<FusedModel> {
        self.fuse_with(plan, experts, &TensorMap::new())
    }

    /// [`BaseModel::fuse`] for a plan with a tensor file (learned routers, fixed modules):
    /// `tensors` is its content, read with `moerge_library::read_tensor_file`.
    pub fn fuse_with(
        &self,
        plan: &Plan,
        experts: &[Adapter],
        tensors: &TensorMap,
    ) -> Result<FusedModel> {
        if plan.ensemble.is_none() {
            return Ok(FusedModel::Single(self.with_plan(plan, experts, tensors)?));
        }
        let members = plan
            .passes()
            .into_iter()
            .map(|(w, pass)| Ok((w, self.with_plan(&pass, experts, tensors)?)))
            .collect::<Result<Vec<_>>>()?;
        let level = plan.ensemble.as_ref().map(|e| e.level).unwrap_or_default();
        Ok(FusedModel::Ensemble(EnsembleModel { members, level }))
    }
}
