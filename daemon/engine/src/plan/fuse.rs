//! What a plan builds: one model (a base with merged, routed or no updates), or an output
//! ensemble of several such models. Both are [`LanguageModel`]s, which is all that
//! inference and training need.

use candle_core::{Device, Tensor, D};
use moerge_library::{Adapter, TensorMap};
use moerge_sdk::plan::{EnsembleLevel, MergeSpace, ModulePlan, Plan};

use super::{merge, routing};
use crate::error::{EngineError, Result};
use crate::models::{BaseModel, LanguageModel};
use crate::nn::{threads, AdapterLinear, ForwardState};

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

/// One model whose every adapted layer serves each member's update on that member's rows.
fn stack_members(members: &[(f64, BaseModel)]) -> BaseModel {
    let mut stacked = members[0].1.clone();
    let layers: Vec<Vec<&AdapterLinear>> = members.iter().map(|(_, m)| m.linears()).collect();
    for (i, layer) in stacked.linears_mut().into_iter().enumerate() {
        let same: Vec<&AdapterLinear> = layers.iter().map(|l| l[i]).collect();
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
        state: &mut ForwardState,
        last_only: bool,
    ) -> Result<Vec<Tensor>> {
        let m = self.members.len();
        let b = ids.dim(0)?;
        let repeated = Tensor::cat(&vec![ids; m], 0)?;
        let rows_apart = stacked.rows_apart(ids)?;
        let out = threads::split_blocks(m, &repeated, state, rows_apart, |ids, state| {
            if last_only {
                stacked.forward_last_rows(ids, state)
            } else {
                stacked.forward_rows(ids, state)
            }
        })?;
        (0..m).map(|i| Ok(out.narrow(0, i * b, b)?)).collect()
    }

    /// Every member's output, stacked or one after another (each with its own state).
    fn outputs(
        &self,
        ids: &Tensor,
        state: &mut ForwardState,
        last_only: bool,
    ) -> Result<Vec<Tensor>> {
        if let Some(stacked) = &self.stacked {
            return self.stacked_outputs(stacked, ids, state, last_only);
        }
        self.members
            .iter()
            .enumerate()
            .map(|(i, (_, m))| {
                state.with_member(i, |state| {
                    if last_only {
                        m.forward_last(ids, state)
                    } else {
                        m.forward(ids, state)
                    }
                })
            })
            .collect()
    }
}

impl LanguageModel for EnsembleModel {
    fn forward(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        let outputs = self.outputs(ids, state, false)?;
        self.combine(outputs)
    }
    fn forward_last(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        let outputs = self.outputs(ids, state, true)?;
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
    fn forward(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        match self {
            FusedModel::Single(m) => m.forward(ids, state),
            FusedModel::Ensemble(e) => e.forward(ids, state),
        }
    }
    fn forward_last(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        match self {
            FusedModel::Single(m) => m.forward_last(ids, state),
            FusedModel::Ensemble(e) => e.forward_last(ids, state),
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
        let any_fold = plan
            .ensemble
            .iter()
            .flat_map(|e| &e.members)
            .any(|m| is_folded(&m.default) || m.modules.values().any(is_folded));
        let stacked = (!any_fold).then(|| stack_members(&members));
        Ok(FusedModel::Ensemble(EnsembleModel {
            members,
            level,
            stacked,
        }))
    }
}

/// Whether a module plan changes the base weights themselves (a folded merge).
fn is_folded(p: &ModulePlan) -> bool {
    matches!(
        p,
        ModulePlan::Static {
            space: MergeSpace::Folded,
            ..
        }
    )
}

impl BaseModel {
    /// A copy of this model fused as `plan` says from `experts` (the plan's experts, in its
    /// order, with the hashes it names) and `tensors` (the plan's tensor file, empty when it
    /// has none). Low-rank, exact and fixed merges are served as one LoRA path per module;
    /// folded merges are added into the base weights; routed modules route.
    pub fn with_plan(
        &self,
        plan: &Plan,
        experts: &[Adapter],
        tensors: &TensorMap,
    ) -> Result<BaseModel> {
        for adapter in experts {
            self.check_fits(adapter)?;
        }
        let device = self.device().clone();
        let merged = merge::merged_modules(plan, experts, tensors, &device)?;
        let dtype = self.precision().dtype();
        let routed = routing::routed_modules(plan, experts, tensors, &device, dtype)?;
        let mut model = self.clone();
        let mut by_name = model.linears_by_name_mut();
        let not_a_layer = |module: &str| EngineError::InvalidArgument {
            argument: "plan",
            message: format!("module {module} is not a linear layer of this model"),
        };
        for (module, m) in merged {
            let layer = by_name
                .get_mut(module.as_str())
                .ok_or_else(|| not_a_layer(&module))?;
            match m.space {
                MergeSpace::Folded => layer.fold_into_weight(&m.b.matmul(&m.a)?)?,
                _ => layer.set_lora(&m.a, &m.b, 1.0)?,
            }
        }
        for (module, r) in routed {
            let layer = by_name
                .get_mut(module.as_str())
                .ok_or_else(|| not_a_layer(&module))?;
            layer.set_update(r.into_update());
        }
        drop(by_name);
        let names: Vec<&str> = plan.experts.iter().map(|e| e.name.as_str()).collect();
        model.set_adapter_name(format!("plan({})", names.join(",")));
        Ok(model)
    }
}
