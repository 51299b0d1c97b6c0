//! Routed modules: per-token weights over routed units (experts, or static merges of
//! several experts for hierarchical plans) from a router (Arrow or learned), softmax over
//! the top-k scores, the others exactly 0. The units' factors are stacked once, so a routed
//! forward is a few small matmuls whatever the number of units.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Tensor};
use moerge_library::{Adapter, LoraModule, TensorMap};
use moerge_sdk::plan::{self, Granularity, Mix, ModulePlan, Plan, Router};

use crate::arrow;
use crate::error::{EngineError, Result};

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
    /// Output mixing, `Σ_u c_u ΔW_u x`.
    Outputs {
        /// `[in, Σr]`: the units' `Aᵀ` side by side.
        a_stack: Tensor,
        /// `[Σr, out]`: the units' `(w s B)ᵀ` stacked.
        b_stack: Tensor,
        /// `[U, Σr]`: 1 where a column belongs to the unit, spreading each weight over its
        /// rank.
        expand: Tensor,
    },
    /// Factor mixing, `(Σ_u c_u √s_u B_u)(Σ_u c_u √s_u A_u) x`: see [`mix_factors`].
    Factors(FactorStacks),
}

/// Every unit's `√s A` and `√s B` (equal ranks `r`), for [`mix_factors`].
#[derive(Debug, Clone)]
pub(crate) struct FactorStacks {
    /// `[in, U·r]`: unit `u`'s `√s_u A_uᵀ` in columns `u·r..(u+1)·r`.
    pub a_cat: Tensor,
    /// `[U·r, out]`: unit `u`'s `√s_u B_uᵀ` in rows `u·r..(u+1)·r`.
    pub b_cat: Tensor,
    pub rank: usize,
}

/// The factor-mixed update for inputs `x2` `[n, in]` and routing weights `coeffs` `[n, U]`:
/// per row, `h = Σ_u c_u (√s_u A_u x)` `[r]`, then `Σ_u c_u (√s_u B_u h)`, the latter as one
/// matmul of the outer products `c ⊗ h` `[n, U·r]` with the stacked `Bᵀ`s, so it costs what
/// output mixing costs. Differentiable in `coeffs` and in the stacks (the fitting path shares
/// it).
pub(crate) fn mix_factors(x2: &Tensor, coeffs: &Tensor, f: &FactorStacks) -> Result<Tensor> {
    let (n, units) = coeffs.dims2()?;
    let c = coeffs.unsqueeze(2)?; // [n, U, 1]
    let xa = x2.matmul(&f.a_cat)?.reshape((n, units, f.rank))?;
    let h = xa.broadcast_mul(&c)?.sum(1)?; // [n, r]
    let outer = c
        .broadcast_mul(&h.unsqueeze(1)?)?
        .reshape((n, units * f.rank))?;
    Ok(outer.matmul(&f.b_cat)?)
}

impl FactorStacks {
    /// The stacks of units given as `(√s A [r, in], √s B [out, r])` per unit, f32 row-major;
    /// a unit without the module is `None` (zeros).
    fn new(
        units: &[Option<(Vec<f32>, Vec<f32>)>],
        rank: usize,
        inp: usize,
        out: usize,
    ) -> Result<Self> {
        let u = units.len();
        let mut a_cat = vec![0f32; inp * u * rank];
        let mut b_cat = vec![0f32; u * rank * out];
        for (i, unit) in units.iter().enumerate() {
            let Some((a, b)) = unit else { continue };
            for k in 0..rank {
                for j in 0..inp {
                    a_cat[j * u * rank + i * rank + k] = a[k * inp + j];
                }
                for o in 0..out {
                    b_cat[(i * rank + k) * out + o] = b[o * rank + k];
                }
            }
        }
        let dev = Device::Cpu;
        Ok(FactorStacks {
            a_cat: Tensor::from_vec(a_cat, (inp, u * rank), &dev)?,
            b_cat: Tensor::from_vec(b_cat, (u * rank, out), &dev)?,
            rank,
        })
    }

    /// Every expert of `parts` as its own unit (`None` where it lacks the module), with the
    /// scale split evenly over the factors; refuses unequal ranks, naming the module and
    /// expert.
    pub(crate) fn of_experts(
        module: &str,
        parts: &[Option<(&Adapter, &LoraModule)>],
    ) -> Result<Self> {
        let Some((_, first)) = parts.iter().flatten().next() else {
            return Err(plan_error(format!("module {module}: no expert adapts it")));
        };
        let (rank, inp, out) = (first.rank, first.in_features, first.out_features);
        if let Some((e, m)) = parts.iter().flatten().find(|(_, m)| m.rank != rank) {
            return Err(plan_error(format!(
                "module {module}: mix \"factors\" needs equal ranks, but expert {} has r={} and \
                 another r={rank}; use mix \"outputs\"",
                e.name(),
                m.rank
            )));
        }
        let units: Vec<_> = parts
            .iter()
            .map(|p| {
                p.map(|(e, m)| {
                    let c = m.scale.sqrt() as f32;
                    let scaled = |t| e.tensor_f32(t).iter().map(|v| c * v).collect::<Vec<f32>>();
                    (scaled(&m.a), scaled(&m.b))
                })
            })
            .collect();
        Self::new(&units, rank, inp, out)
    }
}

fn plan_error(message: String) -> EngineError {
    EngineError::InvalidArgument {
        argument: "plan",
        message,
    }
}

/// One routed unit's contribution to a module: `(weight, adapter, module)` per member.
type UnitParts<'a> = Vec<(f64, &'a Adapter, &'a LoraModule)>;

/// Every module `plan` routes, with its stacked factors and router. Learned routers read
/// their matrices from `tensors`.
pub(crate) fn routed_modules(
    plan: &Plan,
    experts: &[Adapter],
    tensors: &TensorMap,
) -> Result<BTreeMap<String, RoutedModule>> {
    crate::merge::check_experts(plan, experts)?;
    let modules: BTreeSet<&String> = experts.iter().flat_map(|e| e.modules().keys()).collect();
    let mut out = BTreeMap::new();
    for module in modules {
        if let Some(routed) = routed_module(module, plan, experts, tensors)? {
            out.insert(module.clone(), routed);
        }
    }
    Ok(out)
}

/// The routed form of one `module`, or `None` when the plan does not route it.
pub(crate) fn routed_module(
    module: &str,
    plan: &Plan,
    experts: &[Adapter],
    tensors: &TensorMap,
) -> Result<Option<RoutedModule>> {
    let ModulePlan::Routed {
        router,
        top_k,
        temperature,
        granularity,
        groups,
        mix,
    } = plan.module(module)
    else {
        return Ok(None);
    };
    // The units: each expert alone, or each group's weighted members.
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
    let mut units: Vec<(String, UnitParts<'_>)> = unit_weights
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
    let Some(first) = units.iter().flat_map(|(_, p)| p.first()).next() else {
        return Ok(None);
    };
    let (inp, out_features) = (first.2.in_features, first.2.out_features);
    let total: usize = units
        .iter()
        .flat_map(|(_, p)| p.iter().map(|(_, _, m)| m.rank))
        .sum();
    let mut a_stack = vec![0f32; inp * total];
    let mut b_stack = vec![0f32; total * out_features];
    let mut expand = vec![0f32; units.len() * total];
    let mut protos = Vec::new();
    let mut offset = 0;
    for (row, (_, parts)) in units.iter().enumerate() {
        let unit_start = offset;
        for (w, e, m) in parts {
            let a = e.tensor_f32(&m.a); // r × in
            let b = e.tensor_f32(&m.b); // out × r
            let c = (w * m.scale) as f32;
            for k in 0..m.rank {
                for j in 0..inp {
                    a_stack[j * total + offset + k] = a[k * inp + j];
                }
                for o in 0..out_features {
                    b_stack[(offset + k) * out_features + o] = c * b[o * m.rank + k];
                }
                expand[row * total + offset + k] = 1.0;
            }
            offset += m.rank;
        }
        if *router == Router::Arrow {
            protos.extend(match parts.as_slice() {
                [(_, e, m)] => arrow::cached_prototype(e, m),
                _ => unit_prototype(
                    &a_stack,
                    &b_stack,
                    inp,
                    out_features,
                    total,
                    unit_start..offset,
                ),
            });
        }
    }
    let u = units.len();
    let dev = Device::Cpu;
    let scorer = match router {
        Router::Arrow => Scorer::Arrow {
            prototypes: Tensor::from_vec(protos, (u, inp), &dev)?,
        },
        Router::Learned => learned_scorer(module, u, inp, tensors)?,
    };
    let stacks = match mix {
        Mix::Outputs => Stacks::Outputs {
            a_stack: Tensor::from_vec(a_stack, (inp, total), &dev)?,
            b_stack: Tensor::from_vec(b_stack, (total, out_features), &dev)?,
            expand: Tensor::from_vec(expand, (u, total), &dev)?,
        },
        // Plans refuse groups with factor mixing, so every unit is one expert (or none).
        Mix::Factors => {
            let parts: Vec<_> = units
                .iter()
                .map(|(_, p)| p.first().map(|(_, e, m)| (*e, *m)))
                .collect();
            Stacks::Factors(FactorStacks::of_experts(module, &parts)?)
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

/// The Arrow prototype of a merged unit, from its columns `cols` of the stacks.
fn unit_prototype(
    a_stack: &[f32],
    b_stack: &[f32],
    inp: usize,
    out: usize,
    total: usize,
    cols: std::ops::Range<usize>,
) -> Vec<f32> {
    let r = cols.len();
    let mut a = vec![0f64; r * inp];
    let mut b = vec![0f64; out * r];
    for (k, col) in cols.enumerate() {
        for j in 0..inp {
            a[k * inp + j] = f64::from(a_stack[j * total + col]);
        }
        for o in 0..out {
            b[o * r + k] = f64::from(b_stack[col * out + o]);
        }
    }
    arrow::prototype_of_factors(&a, &b, r, inp, out)
}

/// A learned router's matrices from the plan's tensors, checked against the module.
fn learned_scorer(module: &str, units: usize, inp: usize, tensors: &TensorMap) -> Result<Scorer> {
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
        Some(b) if b.shape == [units] => {
            Some(Tensor::from_vec(b.data.clone(), units, &Device::Cpu)?)
        }
        Some(b) => {
            return Err(plan_error(format!(
                "tensor {bias_name} is {:?} but module {module} needs [{units}]",
                b.shape
            )))
        }
    };
    Ok(Scorer::Learned {
        weight: Tensor::from_vec(weight.data.clone(), (units, inp), &Device::Cpu)?,
        bias,
    })
}

impl RoutedModule {
    /// The routed update `Σ_u c_u ΔW_u x` for inputs `x2` `[n, in]` (`lead` the leading
    /// dims, `[b, t]` for a batch of sequences), recording the weights when tracing.
    pub(crate) fn delta(&self, module: &str, x2: &Tensor, lead: &[usize]) -> Result<Tensor> {
        let dtype = x2.dtype();
        let input = match self.granularity {
            Granularity::Token => x2.clone(),
            Granularity::Sequence => sequence_means(module, x2, lead)?,
        };
        let scores = match &self.scorer {
            Scorer::Arrow { prototypes } => {
                input.matmul(&prototypes.to_dtype(dtype)?.t()?)?.abs()?
            }
            Scorer::Learned { weight, bias } => {
                let s = input.matmul(&weight.to_dtype(dtype)?.t()?)?;
                match bias {
                    Some(b) => s.broadcast_add(&b.to_dtype(dtype)?)?,
                    None => s,
                }
            }
        };
        let coeffs = top_k_softmax(&scores, self.top_k, self.temperature)?;
        note(module, &self.units, &coeffs);
        let coeffs = coeffs.to_dtype(dtype)?;
        match &self.stacks {
            Stacks::Outputs {
                a_stack,
                b_stack,
                expand,
            } => {
                let xa = x2.matmul(&a_stack.to_dtype(dtype)?)?;
                let weighted = (xa * coeffs.matmul(&expand.to_dtype(dtype)?)?)?;
                Ok(weighted.matmul(&b_stack.to_dtype(dtype)?)?)
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

/// Running sums of routed modules' inputs per sequence, for sequence-granularity routing
/// across decoding steps: module → (`[b, in]` sum so far, positions so far). Kept in the
/// request's [`crate::KvCache`].
pub(crate) type SequenceSums = BTreeMap<String, (Tensor, usize)>;

thread_local! {
    /// The sums of the forward pass running on this thread (installed by the model).
    static SEQUENCE: RefCell<Option<SequenceSums>> = const { RefCell::new(None) };
}

/// Runs `f` (one forward pass) with `sums` available to sequence-routed modules, and keeps
/// what they add to it.
pub(crate) fn with_sequence_sums<T>(sums: &mut SequenceSums, f: impl FnOnce() -> T) -> T {
    let previous = SEQUENCE.with(|s| s.borrow_mut().replace(std::mem::take(sums)));
    let out = f();
    *sums = SEQUENCE
        .with(|s| std::mem::replace(&mut *s.borrow_mut(), previous))
        .unwrap_or_default();
    out
}

/// Per position, the mean of the inputs of its sequence up to and including it.
fn sequence_means(module: &str, x2: &Tensor, lead: &[usize]) -> Result<Tensor> {
    let (n, inp) = x2.dims2()?;
    let b = if lead.len() >= 2 { lead[0] } else { 1 };
    let t = n / b;
    let x3 = x2.to_dtype(DType::F32)?.reshape((b, t, inp))?;
    let prefix = SEQUENCE.with(|s| s.borrow().as_ref().and_then(|m| m.get(module).cloned()));
    let (mut cum, seen) = (x3.cumsum(1)?, prefix.as_ref().map_or(0, |p| p.1));
    if let Some((sum, _)) = &prefix {
        if sum.dim(0)? != b {
            return Err(plan_error(format!(
                "module {module}: sequence routing state has {} rows but this step has {b}",
                sum.dim(0)?
            )));
        }
        cum = cum.broadcast_add(&sum.unsqueeze(1)?)?;
    }
    let counts: Vec<f32> = (0..t).map(|i| (seen + i + 1) as f32).collect();
    let counts = Tensor::from_vec(counts, (1, t, 1), x2.device())?;
    let means = cum.broadcast_div(&counts)?;
    SEQUENCE.with(|s| {
        if let Some(map) = s.borrow_mut().as_mut() {
            if let Ok(last) = cum.narrow(1, t - 1, 1).and_then(|l| l.squeeze(1)) {
                map.insert(module.to_string(), (last, seen + t));
            }
        }
    });
    Ok(means.reshape((n, inp))?.to_dtype(x2.dtype())?)
}

thread_local! {
    /// Set while [`trace`] runs on this thread: routed layers report their weights here.
    static TRACE: RefCell<Option<Vec<RoutingRecord>>> = const { RefCell::new(None) };
}

/// The routing weights one routed module gave every input row of one forward call.
#[derive(Debug, Clone)]
pub struct RoutingRecord {
    /// Module path, e.g. `model.layers.0.mlp.fc1`.
    pub module: String,
    /// The routed units in column order: expert names (the plan's order; with an Arrow
    /// router, skipping experts that do not adapt the module) or group names.
    pub units: Vec<String>,
    /// `[rows, U]`; 0 for units outside the top-k.
    pub weights: Tensor,
}

/// Runs `f` on this thread and returns what it returned plus every routing decision made
/// during it, in call order (what `explain` shows). Costs nothing when not tracing.
pub fn trace<T>(f: impl FnOnce() -> T) -> (T, Vec<RoutingRecord>) {
    TRACE.with(|t| *t.borrow_mut() = Some(Vec::new()));
    let out = f();
    let records = TRACE.with(|t| t.borrow_mut().take()).unwrap_or_default();
    (out, records)
}

/// One routed module's decisions over a text, without candle types: what `explain` shows.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModuleRouting {
    pub module: String,
    /// The routed units (expert or group names), in column order.
    pub units: Vec<String>,
    /// Per token, per unit: the weight (0 outside the top-k).
    pub weights: Vec<Vec<f32>>,
}

/// Runs `model` over `ids` (one sequence) and returns every routed module's weights per
/// token, in the order the modules ran (empty when the plan routes nothing).
pub fn explain(model: &impl crate::LanguageModel, ids: &[u32]) -> Result<Vec<ModuleRouting>> {
    let (logits, records) = trace(|| crate::inference::logits(model, ids));
    logits?;
    records
        .into_iter()
        .map(|r| {
            Ok(ModuleRouting {
                module: r.module,
                units: r.units,
                weights: r.weights.to_dtype(DType::F32)?.to_vec2::<f32>()?,
            })
        })
        .collect()
}

/// Called by routed layers with their weights.
fn note(module: &str, units: &[String], weights: &Tensor) {
    TRACE.with(|t| {
        if let Some(records) = t.borrow_mut().as_mut() {
            records.push(RoutingRecord {
                module: module.to_string(),
                units: units.to_vec(),
                weights: weights.clone(),
            });
        }
    });
}

/// Routing weights `[n, E]` from scores `[n, E]`: per row, softmax of `score / temperature`
/// over the `top_k` largest scores, exactly 0 elsewhere (ties broken by expert order).
pub(crate) fn top_k_softmax(scores: &Tensor, top_k: usize, temperature: f64) -> Result<Tensor> {
    let (n, e) = scores.dims2()?;
    let rows = scores.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut out = vec![0f32; n * e];
    let mut order: Vec<usize> = Vec::with_capacity(e);
    for (row, coeffs) in rows.iter().zip(out.chunks_exact_mut(e)) {
        order.clear();
        order.extend(0..e);
        order.sort_by(|&i, &j| row[j].total_cmp(&row[i]).then(i.cmp(&j)));
        let kept = &order[..top_k];
        let max = row[kept[0]] as f64;
        let weights: Vec<f64> = kept
            .iter()
            .map(|&i| ((row[i] as f64 - max) / temperature).exp())
            .collect();
        let sum: f64 = weights.iter().sum();
        for (&i, w) in kept.iter().zip(weights) {
            coeffs[i] = (w / sum) as f32;
        }
    }
    Ok(Tensor::from_vec(out, (n, e), scores.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(scores: Vec<f32>, e: usize, k: usize, t: f64, want: Vec<f32>) {
        let n = scores.len() / e;
        let s = Tensor::from_vec(scores, (n, e), &Device::Cpu).unwrap();
        let got = top_k_softmax(&s, k, t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    /// Factor mixing in plain loops: `h = Σ_u c_u A'_u x`, `y = Σ_u c_u B'_u h`.
    #[test]
    fn mix_factors_equals_plain_loops() {
        let (n, units, r, inp, out) = (3, 4, 2, 5, 6);
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let a: Vec<Vec<f32>> = (0..units)
            .map(|_| (0..r * inp).map(|_| next()).collect())
            .collect();
        let b: Vec<Vec<f32>> = (0..units)
            .map(|_| (0..out * r).map(|_| next()).collect())
            .collect();
        let x: Vec<f32> = (0..n * inp).map(|_| next()).collect();
        let c: Vec<f32> = (0..n * units).map(|_| next().abs()).collect();
        // Unit 2 lacks the module: zeros.
        let parts: Vec<_> = (0..units)
            .map(|u| (u != 2).then(|| (a[u].clone(), b[u].clone())))
            .collect();
        let stacks = FactorStacks::new(&parts, r, inp, out).unwrap();
        let dev = Device::Cpu;
        let got = mix_factors(
            &Tensor::from_vec(x.clone(), (n, inp), &dev).unwrap(),
            &Tensor::from_vec(c.clone(), (n, units), &dev).unwrap(),
            &stacks,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        for row in 0..n {
            let mut h = vec![0f64; r];
            for u in (0..units).filter(|&u| u != 2) {
                for (k, hk) in h.iter_mut().enumerate() {
                    let ax: f64 = (0..inp)
                        .map(|j| f64::from(a[u][k * inp + j]) * f64::from(x[row * inp + j]))
                        .sum();
                    *hk += f64::from(c[row * units + u]) * ax;
                }
            }
            for o in 0..out {
                let want: f64 = (0..units)
                    .filter(|&u| u != 2)
                    .map(|u| {
                        let bh: f64 = (0..r).map(|k| f64::from(b[u][o * r + k]) * h[k]).sum();
                        f64::from(c[row * units + u]) * bh
                    })
                    .sum();
                let g = f64::from(got[row][o]);
                assert!((g - want).abs() < 1e-5, "row {row} out {o}: {g} vs {want}");
            }
        }
    }

    #[test]
    fn top_k_softmax_cases() {
        let e1 = (1f64).exp();
        let p = (e1 / (e1 + 1.0)) as f32;
        check(vec![3.0, 1.0, 2.0], 3, 2, 1.0, vec![p, 0.0, 1.0 - p]);
        check(vec![3.0, 1.0, 2.0], 3, 1, 1.0, vec![1.0, 0.0, 0.0]);
        check(vec![1.0, 1.0, 1.0, 1.0], 4, 4, 0.5, vec![0.25; 4]);
        // Temperature 0.5 doubles the gap: e^2 / (e^2 + 1).
        let q = ((2f64).exp() / ((2f64).exp() + 1.0)) as f32;
        check(
            vec![0.0, 5.0, 4.0, -1.0, 0.0, 0.0],
            3,
            2,
            0.5,
            vec![0.0, q, 1.0 - q, 0.0, 0.5, 0.5],
        );
    }
}
