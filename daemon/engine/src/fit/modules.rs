//! The trainable form of a plan's modules: each trainable module's update reads the fit's
//! variables (merge weights, group weights, router matrices) afresh at every forward, through
//! the same stacks and routing maths serving uses.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use moerge_library::{Adapter, TensorMap};
use moerge_sdk::plan::{self, MergeSpace, Mix, ModulePlan, Plan, Router};

use super::plan_fit::{bad, PlanFitOptions, RouterInit};
use crate::error::Result;
use crate::nn::{ForwardState, LowRankUpdate, UpdateInput};
use crate::plan::routing::{arrow_prototypes, routing_weights, units_of, RouteSpec};
use crate::plan::stacks::{mix_factors, ColumnStacks, FactorStacks, UnitParts};

/// One module's trainable update, read afresh from its variables at every forward.
#[derive(Debug, Clone)]
pub(super) struct FitModule {
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
    /// A learned router mixing the experts' factors (`mix_factors`, as serving does).
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
    spec: RouteSpec,
}

impl FitRouter {
    /// The routing weights `[n, U]` of the input's rows, differentiable in the router: the
    /// serving path's routing maths with this router's matrices.
    fn coefficients(&self, input: &UpdateInput<'_>, state: &mut ForwardState) -> Result<Tensor> {
        routing_weights(input, state, self.spec, |routed| {
            Ok(routed
                .matmul(&self.weight.t()?)?
                .broadcast_add(&self.bias)?)
        })
    }
}

impl LowRankUpdate for FitModule {
    fn delta(&self, input: &UpdateInput<'_>, state: &mut ForwardState) -> Result<Tensor> {
        let x2 = input.x;
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
                let coeffs = router.coefficients(input, state)?;
                let cols = coeffs.matmul(unit_cols)?.broadcast_mul(&col_weights)?;
                let xa = x2.matmul(&self.a_stack)?;
                Ok((xa * cols)?.matmul(&self.b_stack)?)
            }
            FitKind::RoutedFactors { router, stacks } => {
                mix_factors(x2, &router.coefficients(input, state)?, stacks)
            }
        }
    }
}

/// The variables of a fit, by what they become in the plan.
#[derive(Default)]
pub(super) struct FitVars {
    /// Static weights per entry (`None` = default).
    pub merges: BTreeMap<Option<String>, Var>,
    /// Group weights per entry, flattened group by group over the plan's experts.
    pub groups: BTreeMap<Option<String>, Var>,
    /// Router weight and bias per module.
    pub routers: BTreeMap<String, (Var, Var)>,
    /// Fixed modules' `A` and `B` per module.
    pub fixed: BTreeMap<String, (Var, Var)>,
}

impl FitVars {
    pub(super) fn all(&self) -> Vec<Var> {
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

/// Whether the options train the parameters of a module plan.
pub(super) fn is_trainable(p: &ModulePlan, opts: &PlanFitOptions) -> bool {
    match p {
        ModulePlan::Static { .. } => opts.merge_weights,
        ModulePlan::Routed { router, .. } => {
            *router == Router::Learned && (opts.routers || opts.group_weights)
        }
        _ => false,
    }
}

/// What every module of one fit shares.
pub(super) struct Fit<'a> {
    pub experts: &'a [Adapter],
    pub template: &'a Plan,
    pub opts: &'a PlanFitOptions,
    pub device: &'a Device,
}

impl Fit<'_> {
    /// The trainable update of `module` (whose plan comes from `entry`), creating or reusing
    /// its variables; `None` when the options leave it frozen.
    pub(super) fn module(
        &self,
        module: &str,
        entry: Option<String>,
        tensors: &mut TensorMap,
        vars: &mut FitVars,
    ) -> Result<Option<FitModule>> {
        let mplan = self.template.module(module);
        if !is_trainable(mplan, self.opts) {
            return Ok(None);
        }
        let experts = self.experts;
        let Some(first) = experts.iter().find_map(|e| e.modules().get(module)) else {
            return Ok(None);
        };
        let (inp, out) = (first.in_features, first.out_features);
        let n = experts.len();
        let dev = self.device;
        // Each expert is its own unit (with no columns where it lacks the module).
        let units: Vec<UnitParts<'_>> = experts
            .iter()
            .map(|e| {
                e.modules()
                    .get(module)
                    .map(|m| vec![(1.0, e, m)])
                    .unwrap_or_default()
            })
            .collect();
        let ColumnStacks {
            a_stack,
            b_stack,
            cols: expert_cols,
            ranges,
        } = ColumnStacks::new(&units, inp, out, dev)?;
        match mplan {
            ModulePlan::Static { weights, space, .. } => {
                let var = match vars.merges.get(&entry) {
                    Some(v) => v.clone(),
                    None => {
                        let v = Var::from_vec(f32s(weights), n, dev)?;
                        vars.merges.insert(entry.clone(), v.clone());
                        v
                    }
                };
                let kind = match space {
                    MergeSpace::LowRank => self.lowrank(module, &units, inp, out)?,
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
                let unit_count = if groups.is_empty() { n } else { groups.len() };
                let (router_weight, router_bias) =
                    self.router_start(module, unit_count, inp, tensors)?;
                let (a_stack, b_stack, member_cols, members, unit_cols) = if groups.is_empty() {
                    // Units are the experts: every column weighs 1 within its unit.
                    let ones = Tensor::ones(n, DType::F32, dev)?;
                    (a_stack, b_stack, expert_cols.clone(), ones, expert_cols)
                } else {
                    let stacks = ColumnStacks {
                        a_stack,
                        b_stack,
                        cols: expert_cols,
                        ranges,
                    };
                    self.group_columns(&stacks, groups, &entry, vars)?
                };
                let (weight, bias) = if self.opts.routers {
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
                    spec: RouteSpec {
                        top_k: (*top_k).min(u),
                        temperature: *temperature,
                        granularity: *granularity,
                    },
                };
                let kind = if *mix == Mix::Factors {
                    let by_expert: Vec<_> = experts
                        .iter()
                        .map(|e| e.modules().get(module).map(|m| (e, m)))
                        .collect();
                    let stacks = FactorStacks::of_experts(module, &by_expert, dev)?;
                    FitKind::RoutedFactors { router, stacks }
                } else {
                    FitKind::Routed { router, unit_cols }
                };
                Ok(Some(FitModule {
                    a_stack,
                    b_stack,
                    member_cols,
                    members,
                    kind,
                }))
            }
            _ => Ok(None),
        }
    }

    /// The stacks repeated once per group, so each (group, expert) pair has its own columns
    /// and its own weight: `(a, b, member_cols [G·N, G·Σr], member weights, unit_cols
    /// [G, G·Σr])`.
    fn group_columns(
        &self,
        stacks: &ColumnStacks,
        groups: &[plan::Group],
        entry: &Option<String>,
        vars: &mut FitVars,
    ) -> Result<(Tensor, Tensor, Tensor, Tensor, Tensor)> {
        let (dev, n) = (self.device, self.experts.len());
        let g_count = groups.len();
        let total = stacks.a_stack.dim(1)?;
        let cols = stacks.cols.to_vec2::<f32>()?;
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
        let members = if self.opts.group_weights {
            match vars.groups.get(entry) {
                Some(v) => v.as_tensor().clone(),
                None => {
                    let v = Var::from_vec(values, m_count, dev)?;
                    vars.groups.insert(entry.clone(), v.clone());
                    v.as_tensor().clone()
                }
            }
        } else {
            Tensor::from_vec(values, m_count, dev)?
        };
        Ok((
            Tensor::cat(&vec![&stacks.a_stack; g_count], 1)?,
            Tensor::cat(&vec![&stacks.b_stack; g_count], 0)?,
            Tensor::from_vec(member_cols, (m_count, g_count * total), dev)?,
            members,
            Tensor::from_vec(unit_cols, (g_count, g_count * total), dev)?,
        ))
    }

    /// The low-rank merge's per-expert `√s A` and `√s B`, flattened (every expert that adapts
    /// the module must have the same rank).
    fn lowrank(
        &self,
        module: &str,
        units: &[UnitParts<'_>],
        inp: usize,
        out: usize,
    ) -> Result<FitKind> {
        let n = units.len();
        let parts: Vec<(usize, &Adapter, &moerge_library::LoraModule)> = units
            .iter()
            .enumerate()
            .filter_map(|(i, u)| u.first().map(|(_, e, m)| (i, *e, *m)))
            .collect();
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
        for &(i, e, m) in &parts {
            let c = m.scale.sqrt() as f32;
            e.add_scaled_f32(&m.a, c, &mut a_all[i * rank * inp..(i + 1) * rank * inp]);
            e.add_scaled_f32(&m.b, c, &mut b_all[i * out * rank..(i + 1) * out * rank]);
        }
        Ok(FitKind::LowRank {
            a_all: Tensor::from_vec(a_all, (n, rank * inp), self.device)?,
            b_all: Tensor::from_vec(b_all, (n, out * rank), self.device)?,
            rank,
        })
    }

    /// The router's starting matrices: the template's, else zeros or the units' prototypes.
    fn router_start(
        &self,
        module: &str,
        units: usize,
        inp: usize,
        tensors: &TensorMap,
    ) -> Result<(Tensor, Tensor)> {
        let dev = self.device;
        let bias = match tensors.get(&plan::router_bias_name(module)) {
            Some(b) if b.shape == [units] => Tensor::from_vec(b.data.clone(), units, dev)?,
            _ => Tensor::zeros(units, DType::F32, dev)?,
        };
        let weight_name = plan::router_weight_name(module);
        if let Some(w) = tensors.get(&weight_name) {
            if w.shape != [units, inp] {
                return Err(bad(format!(
                    "tensor {weight_name} is {:?}; module {module} needs [{units}, {inp}]",
                    w.shape
                )));
            }
            return Ok((Tensor::from_vec(w.data.clone(), (units, inp), dev)?, bias));
        }
        let weight = match self.opts.router_init {
            RouterInit::Zero => Tensor::zeros((units, inp), DType::F32, dev)?,
            RouterInit::Arrow => self.arrow_rows(module, units, inp)?,
        };
        Ok((weight, bias))
    }

    /// The Arrow prototypes of the module's units, as a serving Arrow router computes them
    /// (a unit that does not adapt this module keeps a zero row).
    fn arrow_rows(&self, module: &str, units: usize, inp: usize) -> Result<Tensor> {
        let mut arrow = self.template.clone();
        let mut mplan = self.template.module(module).clone();
        if let ModulePlan::Routed { router, .. } = &mut mplan {
            *router = Router::Arrow;
        }
        arrow.modules.insert(module.to_string(), mplan);
        arrow.tensors = None;
        let routed = units_of(module, &arrow, self.experts);
        let protos = arrow_prototypes(&routed, inp, self.device)?.to_vec2::<f32>()?;
        let names: Vec<String> = match arrow.module(module) {
            ModulePlan::Routed { groups, .. } if !groups.is_empty() => groups
                .iter()
                .enumerate()
                .map(|(g, grp)| grp.name.clone().unwrap_or_else(|| format!("group{g}")))
                .collect(),
            _ => arrow.experts.iter().map(|e| e.name.clone()).collect(),
        };
        let mut rows = vec![0f32; units * inp];
        for (row, unit) in names.iter().enumerate() {
            if let Some(k) = routed.iter().position(|(u, _)| u == unit) {
                rows[row * inp..(row + 1) * inp].copy_from_slice(&protos[k]);
            }
        }
        Ok(Tensor::from_vec(rows, (units, inp), self.device)?)
    }
}

fn f32s(v: &[f64]) -> Vec<f32> {
    v.iter().map(|&x| x as f32).collect()
}
