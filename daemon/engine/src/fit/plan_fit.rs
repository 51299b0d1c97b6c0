//! Fitting a plan's parameters with candle autograd (the host's `optimize` for policies):
//! static merge weights, the weights inside routed groups, learned routers, ensemble member
//! weights, and fixed modules' factors. Base and experts stay frozen: only the plan's own
//! numbers move. The loss is the data's NLL, or with a teacher the KL to the teacher's
//! distributions (`distill`).
//!
//! Parameters are tied by plan entry: every module whose plan comes from the same entry
//! (`default`, or one `modules` key such as `model.layers.3`) shares one weight vector, so a
//! global merge learns N numbers and a per-layer merge N per layer. Routers are per module.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::ControlFlow;

use candle_core::Var;
use moerge_library::{Adapter, F32Tensor, TensorMap};
use moerge_sdk::plan::{self, ModulePlan, Plan};

use super::distill::{self, Teacher};
use super::modules::{is_trainable, Fit, FitVars};
use crate::error::{EngineError, Result};
use crate::models::BaseModel;
use crate::nn::LowRankUpdate;
use crate::plan::check_experts;
use crate::run::examples::{example_losses, Example};
use crate::train::trainer::{self, StepReport, TrainOptions, TrainSummary};

/// How a learned router starts when the template has no matrix for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RouterInit {
    /// All scores 0: a uniform softmax over the units.
    #[default]
    Zero,
    /// Each unit's Arrow prototype as its row.
    Arrow,
}

/// What to fit and how.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanFitOptions {
    pub steps: usize,
    pub learning_rate: f64,
    pub batch_size: usize,
    pub seed: u64,
    /// Static entries' weights.
    pub merge_weights: bool,
    /// The weights inside routed groups (learned routers only).
    pub group_weights: bool,
    /// Learned routers' matrices and biases.
    pub routers: bool,
    pub router_init: RouterInit,
    /// Ensemble members' weights.
    pub ensemble_weights: bool,
    /// Fixed modules' factors, starting from the template's tensors.
    pub fixed: bool,
    /// Distil: lower `KL(teacher ‖ plan)` per completion token instead of the data's NLL
    /// (the run's reported losses are then KL values).
    pub teacher: Option<Teacher>,
}

impl Default for PlanFitOptions {
    fn default() -> Self {
        Self {
            steps: 100,
            learning_rate: 0.05,
            batch_size: 8,
            seed: 0,
            merge_weights: false,
            group_weights: false,
            routers: false,
            router_init: RouterInit::Zero,
            ensemble_weights: false,
            fixed: false,
            teacher: None,
        }
    }
}

/// A fitted plan: the template with learned values filled in, its tensors, and the run.
#[derive(Debug, Clone)]
pub struct FittedPlan {
    pub plan: Plan,
    pub tensors: TensorMap,
    pub summary: TrainSummary,
}

pub(super) fn bad(message: String) -> EngineError {
    EngineError::InvalidArgument {
        argument: "template",
        message,
    }
}

/// Fits what `opts` names in `template` (plus its `tensors`) on `data`, the base and experts
/// frozen. `on_step` sees every step and may stop early.
pub fn fit_plan(
    base: &BaseModel,
    experts: &[Adapter],
    template: &Plan,
    tensors: &TensorMap,
    data: &[Example],
    opts: &PlanFitOptions,
    on_step: impl FnMut(&StepReport) -> ControlFlow<()>,
) -> Result<FittedPlan> {
    check_experts(template, experts)?;
    let train = TrainOptions {
        steps: opts.steps,
        batch_size: opts.batch_size,
        lr: opts.learning_rate,
        warmup_steps: (opts.steps / 10).max(1),
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: opts.seed,
    };
    if template.ensemble.is_some() {
        if opts.teacher.is_some() {
            return Err(bad(
                "an ensemble cannot be distilled into: the student of a teacher is a single-pass plan".into(),
            ));
        }
        if opts.merge_weights || opts.group_weights || opts.routers || opts.fixed {
            return Err(bad(
                "in an ensemble only the member weights can be fitted; fit each member's plan first".into(),
            ));
        }
        if !opts.ensemble_weights {
            return Err(bad("nothing to fit: ask for ensemble weights".into()));
        }
        // Member weights on cached outputs: no clipping, as the ensemble fit always had.
        let train = TrainOptions {
            grad_clip: 0.0,
            ..train
        };
        return super::ensemble::fit_ensemble_weights(
            base, experts, template, tensors, data, &train, on_step,
        );
    }
    let (model, vars, mut tensors) = prepare(base, experts, template, tensors, opts)?;
    let summary = match &opts.teacher {
        None => trainer::train(&model, vars.all(), data, &train, on_step)?,
        Some(teacher) => {
            let mut outputs = distill::TeacherOutputs::new(base, experts, teacher, data.len())?;
            let loss = |batch: &[usize]| {
                let targets = outputs.targets(data, batch)?;
                let batch: Vec<&Example> = batch.iter().map(|&i| &data[i]).collect();
                distill::kl_loss(&model, &batch, &targets)
            };
            trainer::train_with_loss(vars.all(), data, &train, loss, on_step)?
        }
    };
    let plan = write_back(template, &vars, &mut tensors)?;
    Ok(FittedPlan {
        plan,
        tensors,
        summary,
    })
}

/// The model whose trainable modules read the fit's variables, the variables, and the
/// template's tensors completed with the routers' starting matrices.
fn prepare(
    base: &BaseModel,
    experts: &[Adapter],
    template: &Plan,
    tensors: &TensorMap,
    opts: &PlanFitOptions,
) -> Result<(BaseModel, FitVars, TensorMap)> {
    let mut tensors = tensors.clone();
    let mut vars = FitVars::default();
    let mut modules: BTreeMap<String, std::sync::Arc<dyn LowRankUpdate>> = BTreeMap::new();
    let module_names: BTreeSet<String> = experts
        .iter()
        .flat_map(|e| e.modules().keys().cloned())
        .collect();
    let fit = Fit {
        experts,
        template,
        opts,
        device: base.device(),
    };
    for module in &module_names {
        let entry = template.entry(module).0.map(str::to_string);
        if let Some(m) = fit.module(module, entry, &mut tensors, &mut vars)? {
            modules.insert(module.clone(), std::sync::Arc::new(m));
        }
    }
    if opts.fixed {
        vars.fixed = distill::fixed_vars(template, &tensors, base.device())?;
    }
    if vars.all().is_empty() {
        return Err(bad(
            "nothing to fit: the template has no part that the options make trainable \
             (static weights, learned routers, group weights, or fixed modules with factors)"
                .into(),
        ));
    }
    // Serve the frozen rest of the plan as usual; trainable modules read their variables.
    let mut frozen = template.clone();
    let strip = |p: &mut ModulePlan| {
        if is_trainable(p, opts) {
            *p = ModulePlan::None;
        }
    };
    strip(&mut frozen.default);
    frozen.modules.values_mut().for_each(strip);
    let mut model = base.with_plan(&frozen, experts, &tensors)?;
    for layer in model.linears_mut() {
        if let Some(m) = modules.remove(layer.name()) {
            layer.set_update(m);
        }
    }
    // Fixed modules were attached frozen from the same tensors; now they read their variables.
    distill::attach_fixed(&mut model, &vars.fixed)?;
    Ok((model, vars, tensors))
}

/// The template with the fitted values written in.
fn write_back(template: &Plan, vars: &FitVars, tensors: &mut TensorMap) -> Result<Plan> {
    let mut plan = template.clone();
    let values = |v: &Var| -> Result<Vec<f64>> {
        Ok(v.as_tensor()
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    };
    for (entry, var) in &vars.merges {
        if let ModulePlan::Static { weights, .. } = entry_mut(&mut plan, entry) {
            *weights = values(var)?;
        }
    }
    for (entry, var) in &vars.groups {
        if let ModulePlan::Routed { groups, .. } = entry_mut(&mut plan, entry) {
            let v = values(var)?;
            let n = template.experts.len();
            for (g, group) in groups.iter_mut().enumerate() {
                group.weights = v[g * n..(g + 1) * n].to_vec();
            }
        }
    }
    distill::write_fixed(&vars.fixed, tensors)?;
    for (module, (w, b)) in &vars.routers {
        for (name, t) in [
            (plan::router_weight_name(module), w),
            (plan::router_bias_name(module), b),
        ] {
            let t = t.as_tensor();
            tensors.insert(
                name,
                F32Tensor {
                    shape: t.dims().to_vec(),
                    data: t.flatten_all()?.to_vec1::<f32>()?,
                },
            );
        }
    }
    Ok(plan)
}

fn entry_mut<'a>(plan: &'a mut Plan, entry: &Option<String>) -> &'a mut ModulePlan {
    match entry {
        None => &mut plan.default,
        Some(k) => plan.modules.get_mut(k).expect("entry came from this plan"),
    }
}

/// Mean NLL per example of the plan, one value per example in order (what `evaluate` gives
/// a policy).
pub fn evaluate_plan(
    base: &BaseModel,
    experts: &[Adapter],
    plan: &Plan,
    tensors: &TensorMap,
    data: &[Example],
) -> Result<Vec<f64>> {
    let model = base.fuse_with(plan, experts, tensors)?;
    Ok(example_losses(&model, data, 8)?
        .into_iter()
        .map(f64::from)
        .collect())
}

#[cfg(test)]
#[path = "plan_fit_tests.rs"]
pub(crate) mod tests;
