//! Routed modules: per-token expert weights from a router (Arrow today), softmax over the
//! top-k scores, the others exactly 0. The experts' factors are stacked once, so a routed
//! forward is three small matmuls whatever the number of experts.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, Tensor};
use moerge_library::Adapter;
use moerge_sdk::plan::{ModulePlan, Plan, Router};

use crate::arrow;
use crate::error::Result;

/// One routed module, ready to serve.
#[derive(Debug, Clone)]
pub(crate) struct RoutedModule {
    /// `[E, in]`: one unit prototype per expert that adapts this module.
    pub prototypes: Tensor,
    /// `[in, Σr]`: the experts' `Aᵀ` side by side.
    pub a_stack: Tensor,
    /// `[Σr, out]`: the experts' `(s B)ᵀ` stacked.
    pub b_stack: Tensor,
    /// `[E, Σr]`: 1 where a column belongs to the expert, spreading each weight over its rank.
    pub expand: Tensor,
    pub top_k: usize,
    pub temperature: f64,
}

/// Every module `plan` routes, with its stacked factors and router.
pub(crate) fn routed_modules(
    plan: &Plan,
    experts: &[Adapter],
) -> Result<BTreeMap<String, RoutedModule>> {
    crate::merge::check_experts(plan, experts)?;
    let modules: BTreeSet<&String> = experts.iter().flat_map(|e| e.modules().keys()).collect();
    let mut out = BTreeMap::new();
    for module in modules {
        let ModulePlan::Routed {
            router,
            top_k,
            temperature,
            ..
        } = plan.module(module)
        else {
            continue;
        };
        let parts: Vec<(usize, &Adapter, &moerge_library::LoraModule)> = experts
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.modules().get(module).map(|m| (i, e, m)))
            .collect();
        let inp = parts[0].2.in_features;
        let out_features = parts[0].2.out_features;
        let total: usize = parts.iter().map(|(_, _, m)| m.rank).sum();
        let mut protos = Vec::with_capacity(parts.len() * inp);
        let mut a_stack = vec![0f32; inp * total];
        let mut b_stack = vec![0f32; total * out_features];
        let mut expand = vec![0f32; parts.len() * total];
        let mut offset = 0;
        for (row, (_, e, m)) in parts.iter().enumerate() {
            match router {
                Router::Arrow => protos.extend(arrow::prototype(e, m)),
                Router::Learned => {
                    return Err(crate::EngineError::InvalidArgument {
                        argument: "plan",
                        message: "learned routers are not executed yet".into(),
                    })
                }
            }
            let a = e.tensor_f32(&m.a); // r × in
            let b = e.tensor_f32(&m.b); // out × r
            for k in 0..m.rank {
                for j in 0..inp {
                    a_stack[j * total + offset + k] = a[k * inp + j];
                }
                for o in 0..out_features {
                    b_stack[(offset + k) * out_features + o] = (m.scale as f32) * b[o * m.rank + k];
                }
                expand[row * total + offset + k] = 1.0;
            }
            offset += m.rank;
        }
        let e = parts.len();
        let dev = Device::Cpu;
        out.insert(
            module.clone(),
            RoutedModule {
                prototypes: Tensor::from_vec(protos, (e, inp), &dev)?,
                a_stack: Tensor::from_vec(a_stack, (inp, total), &dev)?,
                b_stack: Tensor::from_vec(b_stack, (total, out_features), &dev)?,
                expand: Tensor::from_vec(expand, (e, total), &dev)?,
                top_k: (*top_k).min(e),
                temperature: *temperature,
            },
        );
    }
    Ok(out)
}

thread_local! {
    /// Set while [`trace`] runs on this thread: routed layers report their weights here.
    static TRACE: std::cell::RefCell<Option<Vec<RoutingRecord>>> = const { std::cell::RefCell::new(None) };
}

/// The routing weights one routed module gave every input row of one forward call.
#[derive(Debug, Clone)]
pub struct RoutingRecord {
    /// Module path, e.g. `model.layers.0.mlp.fc1`.
    pub module: String,
    /// `[rows, E]`, in the module's expert order (the plan's order, skipping experts that do
    /// not adapt the module); 0 for experts outside the top-k.
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

/// Called by routed layers with their weights.
pub(crate) fn note(module: &str, weights: &Tensor) {
    TRACE.with(|t| {
        if let Some(records) = t.borrow_mut().as_mut() {
            records.push(RoutingRecord {
                module: module.to_string(),
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
