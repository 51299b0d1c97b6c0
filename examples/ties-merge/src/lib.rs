//! `ties-merge`: a third-party moerge policy plugin. Per module it forms each expert's dense
//! delta `s · B A` (fine for the small models this is meant for: one module at a time),
//! merges them with TIES (trim to the top `density` fraction by magnitude, elect signs,
//! disjoint mean, times optional `weights`) and factors the result back to rank `rank` by a
//! truncated SVD — PEFT's `ties_svd`. The plan makes every module `Fixed`: the factors travel
//! in the fit's tensors, with scale 1.

pub mod ties;

use std::collections::BTreeMap;

use moerge_sdk::linalg::{dense_delta, low_rank};
use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{fixed_a_name, fixed_b_name, ModulePlan};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError, TensorData};

#[derive(Default)]
pub struct TiesMerge;

impl Policy for TiesMerge {
    fn name(&self) -> &str {
        "ties-merge"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::float(
                "density",
                0.2,
                "fraction of each delta's largest-magnitude entries kept (the TIES paper's 20%)",
            )
            .min(0.0)
            .max(1.0),
            ParamSpec::optional_int(
                "rank",
                "rank of the merged factors (default: the sum of the experts' ranks, capped at \
                 min(in, out))",
            )
            .min(1.0),
            ParamSpec::string(
                "weights",
                "",
                "comma-separated weight per expert, in order (default: 1 each)",
            ),
        ]
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let experts = ctx.experts();
        let weights = parse_weights(params.str("weights")?, experts.len())?;
        let density = params.float("density")?;
        let rank = params.opt_int("rank")?.map(|r| r as usize);
        let modules = ctx.module_paths();
        let mut plan = ctx.plan(ModulePlan::None);
        let mut tensors = BTreeMap::new();
        for (done, module) in modules.iter().enumerate() {
            ctx.check_cancelled()?;
            let views: Vec<_> = experts.iter().filter_map(|e| e.module(module)).collect();
            let (inputs, out) = (views[0].in_features, views[0].out_features);
            let deltas: Vec<Vec<f64>> = experts
                .iter()
                .map(|e| match e.module(module) {
                    Some(m) => dense_delta(m),
                    None => vec![0.0; out * inputs],
                })
                .collect();
            let merged = ties::ties(&deltas, &weights, density);
            let full: usize = views.iter().map(|m| m.rank).sum();
            let r = rank.unwrap_or(full).min(inputs.min(out));
            let (a, b) = low_rank(&merged, out, inputs, r);
            let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
            let a = TensorData {
                shape: vec![r, inputs],
                data: f32s(a),
            };
            let b = TensorData {
                shape: vec![out, r],
                data: f32s(b),
            };
            tensors.insert(fixed_a_name(module), a);
            tensors.insert(fixed_b_name(module), b);
            plan.modules.insert((*module).to_owned(), ModulePlan::Fixed);
            ctx.progress((done + 1) as f64 / modules.len() as f64, module);
        }
        Ok(Fitted { plan, tensors })
    }
}

fn parse_weights(text: &str, n: usize) -> Result<Vec<f64>, PolicyError> {
    if text.trim().is_empty() {
        return Ok(vec![1.0; n]);
    }
    let weights: Result<Vec<f64>, _> = text.split(',').map(|w| w.trim().parse::<f64>()).collect();
    match weights {
        Ok(w) if w.len() == n && w.iter().all(|x| x.is_finite()) => Ok(w),
        Ok(w) if w.len() != n => Err(PolicyError::invalid(format!(
            "parameter weights has {} values for {n} experts",
            w.len()
        ))),
        _ => Err(PolicyError::invalid(format!(
            "parameter weights: {text:?} is not a comma-separated list of numbers"
        ))),
    }
}

moerge_sdk::export_policy!(TiesMerge);
