//! Routed modules: per-token weights over routed units (experts, or static merges of
//! several experts for hierarchical plans) from a router (Arrow or learned), softmax over
//! the top-k scores, the others exactly 0. The units' factors are stacked once, so a routed
//! forward is a few small matmuls whatever the number of units. The routing maths
//! ([`routing_weights`]: sequence means, then the top-k softmax kernel) is the one copy
//! serving and fitting share.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use moerge_library::{Adapter, TensorMap};
use moerge_sdk::plan::{self, Granularity, Mix, ModulePlan, Plan, Router};

use super::arrow;
use super::stacks::{mix_factors, ColumnStacks, FactorStacks, UnitParts};
use super::{check_experts, plan_error};
use crate::error::Result;
use crate::nn::{top_k_softmax, ForwardState, LowRankUpdate, RoutingRecord, UpdateInput};

/// How a routed module scores its units.
#[derive(Debug, Clone)]
pub(crate) enum Scorer {
    /// `|x · v_u|`, prototypes `[U, in]`.
    Arrow { prototypes: Tensor },
    /// `x · w_u + b_u`, weight `[U, in]`, bias `[U]`.
    Learned {
        weight: Tensor,
        bias: Option<Tensor>,
    },
}

/// One routed module, ready to serve.
#[derive(Debug, Clone)]
pub(crate) struct RoutedModule {
    pub scorer: Scorer,
    pub stacks: Stacks,
    pub top_k: usize,
    pub temperature: f64,
    pub granularity: Granularity,
    /// Unit names (expert or group names), in router order: what traces report.
    pub units: Vec<String>,
}

/// The units' factors, laid out for the plan's [`Mix`].
#[derive(Debug, Clone)]
pub(crate) enum Stacks {
    /// Output mixing, `Σ_u c_u ΔW_u x` (`cols` spreads each unit's weight over its rank).
    Outputs(ColumnStacks),
    /// Factor mixing, `(Σ_u c_u √s_u B_u)(Σ_u c_u √s_u A_u) x`: see [`mix_factors`].
    Factors(FactorStacks),
}

/// Every module `plan` routes, with its stacked factors and router, on `device` in `dtype`
/// (the model's: converted once here, not at every forward). Learned routers read their
/// matrices from `tensors`.
pub(crate) fn routed_modules(
    plan: &Plan,
    experts: &[Adapter],
    tensors: &TensorMap,
    device: &Device,
    dtype: DType,
) -> Result<BTreeMap<String, RoutedModule>> {
    check_experts(plan, experts)?;
    let modules: BTreeSet<&String> = experts.iter().flat_map(|e| e.modules().keys()).collect();
    let mut out = BTreeMap::new();
    for module in modules {
        if let Some(routed) = routed_module(module, plan, experts, tensors, device)? {
            out.insert(module.clone(), routed.into_dtype(dtype)?);
        }
    }
    Ok(out)
}

/// The routed units of `module` under `plan` (each expert alone, or each group's weighted
/// members), by name, in router order; with an Arrow router only the units that adapt it.
pub(crate) fn units_of<'a>(
    module: &str,
    plan: &Plan,
    experts: &'a [Adapter],
) -> Vec<(String, UnitParts<'a>)> {
    let ModulePlan::Routed { router, groups, .. } = plan.module(module) else {
        return Vec::new();
    };
    let unit_weights: Vec<(String, Vec<f64>)> = if groups.is_empty() {
        (0..experts.len())
            .map(|i| {
                let mut w = vec![0.0; experts.len()];
                w[i] = 1.0;
                (plan.experts[i].name.clone(), w)
            })
            .collect()
    } else {
        groups
            .iter()
            .enumerate()
            .map(|(g, group)| {
                let name = group.name.clone().unwrap_or_else(|| format!("group{g}"));
                (name, group.weights.clone())
            })
            .collect()
    };
    let mut units: Vec<(String, UnitParts<'a>)> = unit_weights
        .into_iter()
        .map(|(name, weights)| {
            let parts = experts
                .iter()
                .zip(weights)
                .filter(|(_, w)| *w != 0.0)
                .filter_map(|(e, w)| e.modules().get(module).map(|m| (w, e, m)))
                .collect();
            (name, parts)
        })
        .collect();
    if *router == Router::Arrow {
        // A unit that does not adapt this module has no prototype: it cannot be routed to.
        units.retain(|(_, parts)| !parts.is_empty());
    }
    units
}

/// The Arrow prototypes `[U, in]` of `units`.
pub(crate) fn arrow_prototypes(
    units: &[(String, UnitParts<'_>)],
    inp: usize,
    device: &Device,
) -> Result<Tensor> {
    let mut protos = Vec::with_capacity(units.len() * inp);
    for (_, parts) in units {
        protos.extend(match parts.as_slice() {
            [(_, e, m)] => arrow::cached_prototype(e, m),
            _ => arrow::unit_prototype(parts),
        });
    }
    Ok(Tensor::from_vec(protos, (units.len(), inp), device)?)
}

/// The routed form of one `module`, or `None` when the plan does not route it.
fn routed_module(
    module: &str,
    plan: &Plan,
    experts: &[Adapter],
    tensors: &TensorMap,
    device: &Device,
) -> Result<Option<RoutedModule>> {
    let ModulePlan::Routed {
        router,
        top_k,
        temperature,
        granularity,
        mix,
        ..
    } = plan.module(module)
    else {
        return Ok(None);
    };
    let units = units_of(module, plan, experts);
    let Some(first) = units.iter().flat_map(|(_, p)| p.first()).next() else {
        return Ok(None);
    };
    let (inp, out_features) = (first.2.in_features, first.2.out_features);
    let u = units.len();
    let scorer = match router {
        Router::Arrow => Scorer::Arrow {
            prototypes: arrow_prototypes(&units, inp, device)?,
        },
        Router::Learned => learned_scorer(module, u, inp, tensors, device)?,
    };
    let stacks = match mix {
        Mix::Outputs => {
            let parts: Vec<UnitParts<'_>> = units.iter().map(|(_, p)| p.clone()).collect();
            Stacks::Outputs(ColumnStacks::new(&parts, inp, out_features, device)?)
        }
        // Plans refuse groups with factor mixing, so every unit is one expert (or none).
        Mix::Factors => {
            let parts: Vec<_> = units
                .iter()
                .map(|(_, p)| p.first().map(|(_, e, m)| (*e, *m)))
                .collect();
            Stacks::Factors(FactorStacks::of_experts(module, &parts, device)?)
        }
    };
    Ok(Some(RoutedModule {
        scorer,
        stacks,
        top_k: (*top_k).min(u),
        temperature: *temperature,
        granularity: *granularity,
        units: units.into_iter().map(|(name, _)| name).collect(),
    }))
}

/// A learned router's matrices from the plan's tensors, checked against the module.
fn learned_scorer(
    module: &str,
    units: usize,
    inp: usize,
    tensors: &TensorMap,
    device: &Device,
) -> Result<Scorer> {
    let weight_name = plan::router_weight_name(module);
    let weight = tensors.get(&weight_name).ok_or_else(|| {
        plan_error(format!(
            "module {module} routes with a learned router but the plan's tensors have no {weight_name}"
        ))
    })?;
    if weight.shape != [units, inp] {
        return Err(plan_error(format!(
            "tensor {weight_name} is {:?} but module {module} needs [{units}, {inp}] (units × in_features)",
            weight.shape
        )));
    }
    let bias_name = plan::router_bias_name(module);
    let bias = match tensors.get(&bias_name) {
        None => None,
        Some(b) if b.shape == [units] => Some(Tensor::from_vec(b.data.clone(), units, device)?),
        Some(b) => {
            return Err(plan_error(format!(
                "tensor {bias_name} is {:?} but module {module} needs [{units}]",
                b.shape
            )))
        }
    };
    Ok(Scorer::Learned {
        weight: Tensor::from_vec(weight.data.clone(), (units, inp), device)?,
        bias,
    })
}

/// How a router turns its inputs into weights over units.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteSpec {
    pub top_k: usize,
    pub temperature: f64,
    pub granularity: Granularity,
}

/// The routing weights `[n, U]` (f32) of `input`'s rows: the router `score`s each row (or,
/// routing per sequence, the mean of its sequence so far, kept in `state` across decoding
/// steps), then the softmax over each row's `top_k` largest scores divided by the
/// temperature, exactly 0 elsewhere (ties to the lower unit; `nn::top_k_softmax`). Serving
/// and fitting both route through here; differentiable in whatever `score` reads.
pub(crate) fn routing_weights(
    input: &UpdateInput<'_>,
    state: &mut ForwardState,
    spec: RouteSpec,
    score: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let routed = match spec.granularity {
        Granularity::Token => input.x.clone(),
        Granularity::Sequence => sequence_means(input, state)?,
    };
    Ok(top_k_softmax(
        &score(&routed)?,
        spec.top_k,
        1.0 / spec.temperature,
    )?)
}

impl LowRankUpdate for RoutedModule {
    /// The routed update `Σ_u c_u ΔW_u x`, recording the weights when tracing.
    fn delta(&self, input: &UpdateInput<'_>, state: &mut ForwardState) -> Result<Tensor> {
        let x2 = input.x;
        let dtype = x2.dtype();
        let spec = RouteSpec {
            top_k: self.top_k,
            temperature: self.temperature,
            granularity: self.granularity,
        };
        let coeffs = routing_weights(input, state, spec, |routed| {
            Ok(match &self.scorer {
                Scorer::Arrow { prototypes } => {
                    routed.matmul(&prototypes.to_dtype(dtype)?.t()?)?.abs()?
                }
                Scorer::Learned { weight, bias } => {
                    let s = routed.matmul(&weight.to_dtype(dtype)?.t()?)?;
                    match bias {
                        Some(b) => s.broadcast_add(&b.to_dtype(dtype)?)?,
                        None => s,
                    }
                }
            })
        })?;
        if state.is_tracing() {
            state.note(RoutingRecord {
                module: input.key.to_string(),
                units: self.units.clone(),
                weights: coeffs.clone(),
            });
        }
        let coeffs = coeffs.to_dtype(dtype)?;
        match &self.stacks {
            Stacks::Outputs(s) => {
                // Only a top-k leaves units out: then gather the ones some row weighs.
                let (a, b, cols, coeffs) = if self.top_k < self.units.len() {
                    s.kept(&coeffs)?
                } else {
                    (s.a_stack.clone(), s.b_stack.clone(), s.cols.clone(), coeffs)
                };
                let xa = x2.matmul(&a.to_dtype(dtype)?)?;
                let weighted = (xa * coeffs.matmul(&cols.to_dtype(dtype)?)?)?;
                Ok(weighted.matmul(&b.to_dtype(dtype)?)?)
            }
            Stacks::Factors(f) => {
                let f = FactorStacks {
                    a_cat: f.a_cat.to_dtype(dtype)?,
                    b_cat: f.b_cat.to_dtype(dtype)?,
                    rank: f.rank,
                };
                mix_factors(x2, &coeffs, &f)
            }
        }
    }
}

impl RoutedModule {
    /// The same module with its matrices in `dtype` (the sums and the softmax still run in
    /// f32 at every forward).
    fn into_dtype(self, dtype: DType) -> Result<Self> {
        let scorer = match self.scorer {
            Scorer::Arrow { prototypes } => Scorer::Arrow {
                prototypes: prototypes.to_dtype(dtype)?,
            },
            Scorer::Learned { weight, bias } => Scorer::Learned {
                weight: weight.to_dtype(dtype)?,
                bias: bias.map(|b| b.to_dtype(dtype)).transpose()?,
            },
        };
        let stacks = match self.stacks {
            Stacks::Outputs(s) => Stacks::Outputs(ColumnStacks {
                a_stack: s.a_stack.to_dtype(dtype)?,
                b_stack: s.b_stack.to_dtype(dtype)?,
                cols: s.cols.to_dtype(dtype)?,
                ranges: s.ranges,
            }),
            Stacks::Factors(f) => Stacks::Factors(FactorStacks {
                a_cat: f.a_cat.to_dtype(dtype)?,
                b_cat: f.b_cat.to_dtype(dtype)?,
                rank: f.rank,
            }),
        };
        Ok(RoutedModule {
            scorer,
            stacks,
            ..self
        })
    }

    /// As an update a layer can carry.
    pub(crate) fn into_update(self) -> Arc<dyn LowRankUpdate> {
        Arc::new(self)
    }
}

/// Per position, the mean of its sequence's inputs up to and including it, continuing the
/// running sum `state` keeps under the input's key (so a decode step sees the whole prefix),
/// which it then updates. Computed in f32; differentiable in the inputs.
fn sequence_means(input: &UpdateInput<'_>, state: &mut ForwardState) -> Result<Tensor> {
    let x2 = input.x;
    let (n, inp) = x2.dims2()?;
    let (b, t) = input.sequences()?;
    let x3 = x2.to_dtype(DType::F32)?.reshape((b, t, inp))?;
    let mut cum = x3.cumsum(1)?;
    let mut seen = 0;
    if let Some(prefix) = state.sequence_sum(input.key) {
        if prefix.sum.dim(0)? != b {
            return Err(plan_error(format!(
                "module {}: sequence routing state has {} rows but this step has {b}",
                input.key,
                prefix.sum.dim(0)?
            )));
        }
        cum = cum.broadcast_add(&prefix.sum.unsqueeze(1)?)?;
        seen = prefix.seen;
    }
    let counts: Vec<f32> = (0..t).map(|i| (seen + i + 1) as f32).collect();
    let counts = Tensor::from_vec(counts, (1, t, 1), x2.device())?;
    let means = cum.broadcast_div(&counts)?;
    let last = cum.narrow(1, t - 1, 1)?.squeeze(1)?;
    state.set_sequence_sum(input.key, last, seen + t);
    Ok(means.reshape((n, inp))?.to_dtype(x2.dtype())?)
}
