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
    /// The members as one model over a batch of one block of rows per member, so every
    /// base weight is read once per step for all of them; `None` when a member changes the
    /// base weights themselves (a folded merge), which cannot share them.
    stacked: Option<BaseModel>,
}

thread_local! {
    /// While a stacked ensemble runs a part of its batch on this thread: its first member
    /// and how many members (row blocks) the part holds.
    static MEMBER_PART: std::cell::Cell<Option<(usize, usize)>> = const { std::cell::Cell::new(None) };
}

/// The member blocks of the stacked forward running on this thread, if any.
pub(crate) fn member_part() -> Option<(usize, usize)> {
    MEMBER_PART.with(std::cell::Cell::get)
}

/// One model whose every adapted layer serves each member's update on that member's rows.
fn stack_members(members: &[(f64, BaseModel)]) -> BaseModel {
    let mut stacked = members[0].1.clone();
    let layers: Vec<Vec<&crate::AdapterLinear>> =
        members.iter().map(|(_, m)| m.linears()).collect();
    for (i, layer) in stacked.linears_mut().into_iter().enumerate() {
        let same: Vec<&crate::AdapterLinear> = layers.iter().map(|l| l[i]).collect();
        layer.set_members(&same);
    }
    stacked
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

impl EnsembleModel {
    /// The same ensemble running its members one after another (each reads the base
    /// weights itself): the baseline the stacked form is measured and checked against.
    pub fn sequential(&self) -> EnsembleModel {
        EnsembleModel {
            stacked: None,
            ..self.clone()
        }
    }

    /// Whether the members run as one stacked batch.
    pub fn is_stacked(&self) -> bool {
        self.stacked.is_some()
    }

    /// Runs the stacked members on `ids` repeated once per member, then splits the output
    /// back into one tensor per member.
    fn stacked_outputs(
        &self,
        stacked: &BaseModel,
        ids: &Tensor,
        cache: &mut KvCache,
        last_only: bool,
    ) -> Result<Vec<Tensor>> {
        let m = self.members.len();
        let b = ids.dim(0)?;
        let repeated = Tensor::cat(&vec![ids; m], 0)?;
        let out = crate::threads::split_blocks(m, &repeated, cache, |ids, cache, first, count| {
            MEMBER_PART.with(|p| p.set(Some((first, count))));
            let out = if last_only {
                stacked.forward_last_rows(ids, cache)
            } else {
                stacked.forward_rows(ids, cache)
            };
            MEMBER_PART.with(|p| p.set(None));
            out
        })?;
        (0..m).map(|i| Ok(out.narrow(0, i * b, b)?)).collect()
    }
}

impl LanguageModel for EnsembleModel {
    fn forward(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if let Some(stacked) = &self.stacked {
            let outputs = self.stacked_outputs(stacked, ids, cache, false)?;
            return self.combine(outputs);
        }
        let outputs = self
            .members
            .iter()
            .enumerate()
            .map(|(i, (_, m))| m.forward(ids, cache.member(i)))
            .collect::<Result<Vec<_>>>()?;
        self.combine(outputs)
    }
    fn forward_last(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        if let Some(stacked) = &self.stacked {
            let outputs = self.stacked_outputs(stacked, ids, cache, true)?;
            return self.combine(outputs);
        }
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
        let folds = |p: &moerge_sdk::plan::ModulePlan| {
            matches!(
                p,
                moerge_sdk::plan::ModulePlan::Static {
                    space: moerge_sdk::plan::MergeSpace::Folded,
                    ..
                }
            )
        };
        let any_fold = plan
            .ensemble
            .iter()
            .flat_map(|e| &e.members)
            .any(|m| folds(&m.default) || m.modules.values().any(folds));
        let stacked = (!any_fold).then(|| stack_members(&members));
        Ok(FusedModel::Ensemble(EnsembleModel {
            members,
            level,
            stacked,
        }))
    }
}
