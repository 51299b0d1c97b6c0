//! Fitting a plan's parameters with candle autograd (the host's `optimize` for policies):
//! static merge weights, the weights inside routed groups, learned routers, ensemble member
//! weights, and fixed modules' factors. Base and experts stay frozen: only the plan's own
//! numbers move. The loss is the data's NLL, or with a teacher the KL to the teacher's
//! distributions ([`crate::distill`]).
//!
//! Parameters are tied by plan entry: every module whose plan comes from the same entry
//! (`default`, or one `modules` key such as `model.layers.3`) shares one weight vector, so a
//! global merge learns N numbers and a per-layer merge N per layer. Routers are per module.

use std::collections::BTreeMap;
use std::ops::ControlFlow;

use candle_core::{DType, Device, Tensor, Var};
use moerge_library::{Adapter, F32Tensor, LoraModule, TensorMap};
use moerge_sdk::plan::{self, Granularity, MergeSpace, Mix, ModulePlan, Plan, Router};

use crate::distill::{self, Teacher};
use crate::error::{EngineError, Result};
use crate::model::BaseModel;
use crate::routing::{mix_factors, FactorStacks};
use crate::trainer::{self, Example, StepReport, TrainOptions, TrainSummary};

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

fn bad(message: String) -> EngineError {
    EngineError::InvalidArgument {
        argument: "template",
        message,
    }
}

/// One module's trainable update, read afresh from its variables at every forward.
#[derive(Debug, Clone)]
pub(crate) struct FitModule {
    /// `[in, Σr]` the experts' `Aᵀ` side by side; `[Σr, out]` their `(s B)ᵀ` stacked.
    a_stack: Tensor,
    b_stack: Tensor,
    /// `[M, Σr]`: which columns belong to which member weight.
    member_cols: Tensor,
    /// The member weights `[M]` (a variable when trained).
    members: Tensor,
    kind: FitKind,
}

#[derive(Debug, Clone)]
enum FitKind {
    /// An exact merge: every column scaled by its member's weight.
    Exact,
    /// A low-rank merge `A = Σ wᵢ √sᵢ Aᵢ`, `B = Σ wᵢ √sᵢ Bᵢ` (`a_all` `[N, r·in]`,
    /// `b_all` `[N, out·r]`, scales folded in).
    LowRank {
        a_all: Tensor,
        b_all: Tensor,
        rank: usize,
    },
    /// A learned router mixing the experts' factors (`routing::mix_factors`).
    RoutedFactors {
        router: FitRouter,
        stacks: FactorStacks,
    },
    /// A learned router over units (`unit_cols` `[U, Σr]`).
    Routed {
        router: FitRouter,
        unit_cols: Tensor,
    },
}

/// A learned router being fitted: its matrices (variables when trained) and how it mixes.
#[derive(Debug, Clone)]
struct FitRouter {
    weight: Tensor,
    bias: Tensor,
    top_k: usize,
    temperature: f64,
    granularity: Granularity,
}

impl FitRouter {
    /// The routing weights `[n, U]` of inputs `x2`, differentiable in the router.
    fn coefficients(&self, x2: &Tensor, lead: &[usize]) -> Result<Tensor> {
        let input = match self.granularity {
            Granularity::Token => x2.clone(),
            Granularity::Sequence => prefix_means(x2, lead)?,
        };
        let scores = input.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?;
        masked_top_k_softmax(&scores, self.top_k, self.temperature)
    }
}

impl FitModule {
    pub(crate) fn delta(&self, x2: &Tensor, lead: &[usize]) -> Result<Tensor> {
        let col_weights = self.members.unsqueeze(0)?.matmul(&self.member_cols)?; // [1, Σr]
        match &self.kind {
            FitKind::Exact => {
                let xa = x2.matmul(&self.a_stack)?;
                Ok(xa.broadcast_mul(&col_weights)?.matmul(&self.b_stack)?)
            }
            FitKind::LowRank { a_all, b_all, rank } => {
                let inp = x2.dim(1)?;
                let w = self.members.unsqueeze(0)?;
                let a = w.matmul(a_all)?.reshape((*rank, inp))?;
                let b = w.matmul(b_all)?.reshape(((), *rank))?;
                Ok(x2.matmul(&a.t()?)?.matmul(&b.t()?)?)
            }
            FitKind::Routed { router, unit_cols } => {
                let coeffs = router.coefficients(x2, lead)?;
                let cols = coeffs.matmul(unit_cols)?.broadcast_mul(&col_weights)?;
                let xa = x2.matmul(&self.a_stack)?;
                Ok((xa * cols)?.matmul(&self.b_stack)?)
            }
            FitKind::RoutedFactors { router, stacks } => {
                mix_factors(x2, &router.coefficients(x2, lead)?, stacks)
            }
        }
    }
}

/// Softmax over each row's `top_k` largest scores (chosen on the values, as in serving),
/// differentiable in the kept scores; the others get exactly 0.
fn masked_top_k_softmax(scores: &Tensor, top_k: usize, temperature: f64) -> Result<Tensor> {
    let values = scores.to_vec2::<f32>()?;
    let e = values.first().map_or(0, Vec::len);
    let mut penalty = Vec::with_capacity(values.len() * e);
    for row in &values {
        let mut order: Vec<usize> = (0..e).collect();
        order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
        let mut p = vec![-1e9f32; e];
        for &i in &order[..top_k] {
            p[i] = 0.0;
        }
        penalty.extend(p);
    }
    let penalty = Tensor::from_vec(penalty, (values.len(), e), scores.device())?;
    // The composed softmax: candle's fused one has no backward pass.
    Ok(candle_nn::ops::softmax(
        &((scores / temperature)? + penalty)?,
        candle_core::D::Minus1,
    )?)
}

/// Per position, the mean of its sequence's inputs up to and including it (full sequences:
/// training never decodes step by step).
fn prefix_means(x2: &Tensor, lead: &[usize]) -> Result<Tensor> {
    let (n, inp) = x2.dims2()?;
    let b = if lead.len() >= 2 { lead[0] } else { 1 };
    let t = n / b;
    let cum = x2.reshape((b, t, inp))?.cumsum(1)?;
    let counts: Vec<f32> = (1..=t).map(|i| i as f32).collect();
    let counts = Tensor::from_vec(counts, (1, t, 1), x2.device())?;
    Ok(cum.broadcast_div(&counts)?.reshape((n, inp))?)
}

/// The variables of a fit, by what they become in the plan.
#[derive(Default)]
struct FitVars {
    /// Static weights per entry (`None` = default).
    merges: BTreeMap<Option<String>, Var>,
    /// Group weights per entry, flattened group by group over the plan's experts.
    groups: BTreeMap<Option<String>, Var>,
    /// Router weight and bias per module.
    routers: BTreeMap<String, (Var, Var)>,
    /// Fixed modules' `A` and `B` per module.
    fixed: BTreeMap<String, (Var, Var)>,
}

impl FitVars {
    fn all(&self) -> Vec<Var> {
        // Router (weight, bias) and fixed (A, B) pairs.
        let pairs = self
            .routers
            .values()
            .chain(self.fixed.values())
            .flat_map(|(w, b)| [w.clone(), b.clone()]);
        self.merges
            .values()
            .chain(self.groups.values())
            .cloned()
            .chain(pairs)
            .collect()
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
    crate::merge::check_experts(template, experts)?;
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
        return crate::ensemble_fit::fit_ensemble_weights(
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
    let mut modules: BTreeMap<String, FitModule> = BTreeMap::new();
    let module_names: std::collections::BTreeSet<String> = experts
        .iter()
        .flat_map(|e| e.modules().keys().cloned())
        .collect();
    for module in &module_names {
        let (entry, mplan) = template.entry(module);
        let entry = entry.map(str::to_string);
        if let Some(m) = fit_module(
            module,
            entry,
            mplan,
            experts,
            template,
            &mut tensors,
            &mut vars,
            opts,
        )? {
            modules.insert(module.clone(), m);
        }
    }
    if opts.fixed {
        vars.fixed = distill::fixed_vars(template, &tensors)?;
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
            layer.set_fitting(m);
        }
    }
    // Fixed modules were attached frozen from the same tensors; now they read their variables.
    distill::attach_fixed(&mut model, &vars.fixed)?;
    Ok((model, vars, tensors))
}

fn is_trainable(p: &ModulePlan, opts: &PlanFitOptions) -> bool {
    match p {
        ModulePlan::Static { .. } => opts.merge_weights,
        ModulePlan::Routed { router, .. } => {
            *router == Router::Learned && (opts.routers || opts.group_weights)
        }
        _ => false,
    }
}

type Part<'a> = (usize, &'a Adapter, &'a LoraModule);

/// Builds the trainable update of one module, creating or reusing its variables.
#[allow(clippy::too_many_arguments)]
fn fit_module(
    module: &str,
    entry: Option<String>,
    mplan: &ModulePlan,
    experts: &[Adapter],
    template: &Plan,
    tensors: &mut TensorMap,
    vars: &mut FitVars,
    opts: &PlanFitOptions,
) -> Result<Option<FitModule>> {
    if !is_trainable(mplan, opts) {
        return Ok(None);
    }
    let parts: Vec<Part<'_>> = experts
        .iter()
        .enumerate()
        .filter_map(|(i, e)| e.modules().get(module).map(|m| (i, e, m)))
        .collect();
    let Some(first) = parts.first() else {
        return Ok(None);
    };
    let (inp, out) = (first.2.in_features, first.2.out_features);
    let n = experts.len();
    let dev = Device::Cpu;
    let (a_stack, b_stack, expert_cols) = stack(&parts, n, inp, out)?;
    match mplan {
        ModulePlan::Static { weights, space, .. } => {
            let var = match vars.merges.get(&entry) {
                Some(v) => v.clone(),
                None => {
                    let v = Var::from_vec(f32s(weights), n, &dev)?;
                    vars.merges.insert(entry.clone(), v.clone());
                    v
                }
            };
            let kind = match space {
                MergeSpace::LowRank => lowrank(module, &parts, n, inp, out)?,
                MergeSpace::Exact | MergeSpace::Folded => FitKind::Exact,
            };
            Ok(Some(FitModule {
                a_stack,
                b_stack,
                member_cols: expert_cols,
                members: var.as_tensor().clone(),
                kind,
            }))
        }
        ModulePlan::Routed {
            top_k,
            temperature,
            granularity,
            groups,
            mix,
            ..
        } => {
            let (router_weight, router_bias) = router_start(
                module,
                units_of(groups, n),
                inp,
                tensors,
                template,
                experts,
                opts,
            )?;
            let (a_stack, b_stack, member_cols, members_t, unit_cols) = if groups.is_empty() {
                // Units are the experts: every column weighs 1 within its unit.
                let ones = Tensor::ones(n, DType::F32, &dev)?;
                (a_stack, b_stack, expert_cols.clone(), ones, expert_cols)
            } else {
                group_columns(
                    &a_stack,
                    &b_stack,
                    &expert_cols,
                    groups,
                    n,
                    &entry,
                    vars,
                    opts,
                )?
            };
            let (weight, bias) = if opts.routers {
                let w = Var::from_tensor(&router_weight)?;
                let b = Var::from_tensor(&router_bias)?;
                vars.routers
                    .insert(module.to_string(), (w.clone(), b.clone()));
                (w.as_tensor().clone(), b.as_tensor().clone())
            } else {
                (router_weight, router_bias)
            };
            let u = unit_cols.dim(0)?;
            let router = FitRouter {
                weight,
                bias,
                top_k: (*top_k).min(u),
                temperature: *temperature,
                granularity: *granularity,
            };
            let kind = if *mix == Mix::Factors {
                let mut by_expert = vec![None; n];
                for &(i, e, m) in &parts {
                    by_expert[i] = Some((e, m));
                }
                let stacks = FactorStacks::of_experts(module, &by_expert)?;
                FitKind::RoutedFactors { router, stacks }
            } else {
                FitKind::Routed { router, unit_cols }
            };
            Ok(Some(FitModule {
                a_stack,
                b_stack,
                member_cols,
                members: members_t,
                kind,
            }))
        }
        _ => Ok(None),
    }
}
fn units_of(groups: &[plan::Group], experts: usize) -> usize {
    if groups.is_empty() {
        experts
    } else {
        groups.len()
    }
}

/// The stacks repeated once per group, so each (group, expert) pair has its own columns and
/// its own weight: `(a, b, member_cols [G·N, G·Σr], member weights, unit_cols [G, G·Σr])`.
#[allow(clippy::too_many_arguments)]
fn group_columns(
    a_stack: &Tensor,
    b_stack: &Tensor,
    expert_cols: &Tensor,
    groups: &[plan::Group],
    n: usize,
    entry: &Option<String>,
    vars: &mut FitVars,
    opts: &PlanFitOptions,
) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
    let dev = Device::Cpu;
    let g_count = groups.len();
    let total = a_stack.dim(1)?;
    let cols = expert_cols.to_vec2::<f32>()?;
    let m_count = g_count * n;
    let mut member_cols = vec![0f32; m_count * g_count * total];
    let mut unit_cols = vec![0f32; g_count * g_count * total];
    for g in 0..g_count {
        for (i, expert_cols) in cols.iter().enumerate() {
            let row = (g * n + i) * g_count * total + g * total;
            member_cols[row..row + total].copy_from_slice(expert_cols);
        }
        let row = g * g_count * total + g * total;
        unit_cols[row..row + total]
            .iter_mut()
            .for_each(|v| *v = 1.0);
    }
    let values: Vec<f32> = groups.iter().flat_map(|g| f32s(&g.weights)).collect();
    let members = if opts.group_weights {
        match vars.groups.get(entry) {
            Some(v) => v.as_tensor().clone(),
            None => {
                let v = Var::from_vec(values, m_count, &dev)?;
                vars.groups.insert(entry.clone(), v.clone());
                v.as_tensor().clone()
            }
        }
    } else {
        Tensor::from_vec(values, m_count, &dev)?
    };
    Ok((
        Tensor::cat(&vec![a_stack; g_count], 1)?,
        Tensor::cat(&vec![b_stack; g_count], 0)?,
        Tensor::from_vec(member_cols, (m_count, g_count * total), &dev)?,
        members,
        Tensor::from_vec(unit_cols, (g_count, g_count * total), &dev)?,
    ))
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}

/// `Aᵀ` columns and `(s B)ᵀ` rows of every expert adapting the module, and `[N, Σr]` marking
/// each expert's columns.
fn stack(parts: &[Part<'_>], n: usize, inp: usize, out: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let total: usize = parts.iter().map(|p| p.2.rank).sum();
    let mut a_stack = vec![0f32; inp * total];
    let mut b_stack = vec![0f32; total * out];
    let mut cols = vec![0f32; n * total];
    let mut offset = 0;
    for &(i, e, m) in parts {
        let a = e.tensor_f32(&m.a);
        let b = e.tensor_f32(&m.b);
        for k in 0..m.rank {
            for j in 0..inp {
                a_stack[j * total + offset + k] = a[k * inp + j];
            }
            for o in 0..out {
                b_stack[(offset + k) * out + o] = m.scale as f32 * b[o * m.rank + k];
            }
            cols[i * total + offset + k] = 1.0;
        }
        offset += m.rank;
    }
    let dev = Device::Cpu;
    Ok((
        Tensor::from_vec(a_stack, (inp, total), &dev)?,
        Tensor::from_vec(b_stack, (total, out), &dev)?,
        Tensor::from_vec(cols, (n, total), &dev)?,
    ))
}

fn lowrank(module: &str, parts: &[Part<'_>], n: usize, inp: usize, out: usize) -> Result<FitKind> {
    let rank = parts[0].2.rank;
    if let Some(p) = parts.iter().find(|p| p.2.rank != rank) {
        return Err(bad(format!(
            "module {module}: a lowrank merge needs equal ranks, but {} has r={}; use space \"exact\"",
            p.1.name(),
            p.2.rank
        )));
    }
    let mut a_all = vec![0f32; n * rank * inp];
    let mut b_all = vec![0f32; n * out * rank];
    for &(i, e, m) in parts {
        let c = m.scale.sqrt() as f32;
        e.add_scaled_f32(&m.a, c, &mut a_all[i * rank * inp..(i + 1) * rank * inp]);
        e.add_scaled_f32(&m.b, c, &mut b_all[i * out * rank..(i + 1) * out * rank]);
    }
    let dev = Device::Cpu;
    Ok(FitKind::LowRank {
        a_all: Tensor::from_vec(a_all, (n, rank * inp), &dev)?,
        b_all: Tensor::from_vec(b_all, (n, out * rank), &dev)?,
        rank,
    })
}

/// The router's starting matrices: the template's, else zeros or the units' prototypes.
fn router_start(
    module: &str,
    units: usize,
    inp: usize,
    tensors: &TensorMap,
    template: &Plan,
    experts: &[Adapter],
    opts: &PlanFitOptions,
) -> Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let bias = match tensors.get(&plan::router_bias_name(module)) {
        Some(b) if b.shape == [units] => Tensor::from_vec(b.data.clone(), units, &dev)?,
        _ => Tensor::zeros(units, DType::F32, &dev)?,
    };
    let weight_name = plan::router_weight_name(module);
    if let Some(w) = tensors.get(&weight_name) {
        if w.shape != [units, inp] {
            return Err(bad(format!(
                "tensor {weight_name} is {:?}; module {module} needs [{units}, {inp}]",
                w.shape
            )));
        }
        return Ok((Tensor::from_vec(w.data.clone(), (units, inp), &dev)?, bias));
    }
    let weight = match opts.router_init {
        RouterInit::Zero => Tensor::zeros((units, inp), DType::F32, &dev)?,
        RouterInit::Arrow => {
            // The Arrow prototypes of the same units, as a serving Arrow router computes them
            // (a unit that does not adapt this module keeps a zero row).
            let mut arrow = template.clone();
            let mplan = match template.module(module) {
                ModulePlan::Routed {
                    top_k,
                    temperature,
                    granularity,
                    groups,
                    mix,
                    ..
                } => ModulePlan::Routed {
                    router: Router::Arrow,
                    top_k: *top_k,
                    temperature: *temperature,
                    granularity: *granularity,
                    groups: groups.clone(),
                    mix: *mix,
                },
                other => other.clone(),
            };
            arrow.modules.insert(module.to_string(), mplan);
            arrow.tensors = None;
            arrow_rows(module, units, inp, &arrow, experts)?
        }
    };
    Ok((weight, bias))
}

fn arrow_rows(
    module: &str,
    units: usize,
    inp: usize,
    plan: &Plan,
    experts: &[Adapter],
) -> Result<Tensor> {
    let Some(r) = crate::routing::routed_module(module, plan, experts, &TensorMap::new())? else {
        return Ok(Tensor::zeros((units, inp), DType::F32, &Device::Cpu)?);
    };
    let crate::routing::Scorer::Arrow { prototypes } = &r.scorer else {
        unreachable!("built with an Arrow router")
    };
    let names: Vec<String> = match plan.module(module) {
        ModulePlan::Routed { groups, .. } if !groups.is_empty() => groups
            .iter()
            .enumerate()
            .map(|(g, grp)| grp.name.clone().unwrap_or_else(|| format!("group{g}")))
            .collect(),
        _ => plan.experts.iter().map(|e| e.name.clone()).collect(),
    };
    let protos = prototypes.to_vec2::<f32>()?;
    let mut rows = vec![0f32; units * inp];
    for (row, unit) in names.iter().enumerate() {
        if let Some(k) = r.units.iter().position(|u| u == unit) {
            rows[row * inp..(row + 1) * inp].copy_from_slice(&protos[k]);
        }
    }
    Ok(Tensor::from_vec(rows, (units, inp), &Device::Cpu)?)
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
    Ok(trainer::example_losses(&model, data, 8)?
        .into_iter()
        .map(f64::from)
        .collect())
}

#[cfg(test)]
#[path = "plan_fit_tests.rs"]
pub(crate) mod tests;
