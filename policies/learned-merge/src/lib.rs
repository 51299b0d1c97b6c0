//! `learned-merge`: static merge weights learned by the host's trainer on the training data.
//! The template is a uniform 1/N merge; with `granularity=per_layer` it has one override per
//! layer prefix (`model.layers.N`, the module path up to its first numeric segment), so every
//! layer gets its own weight vector. Modules outside any layer keep the global entry.

use std::collections::BTreeMap;

use moerge_sdk::optimize::OptimizeOptions;
use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{MergeSpace, ModulePlan};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError};

#[derive(Default)]
pub struct LearnedMerge;

impl Policy for LearnedMerge {
    fn name(&self) -> &str {
        "learned-merge"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        let mut specs = vec![
            ParamSpec::choice(
                "granularity",
                &["global", "per_layer"],
                "global",
                "one weight vector for all modules, or one per layer",
            ),
            ParamSpec::choice(
                "space",
                &["lowrank", "exact"],
                "lowrank",
                "average A and B separately (equal ranks), or sum the exact deltas",
            ),
        ];
        specs.extend(OptimizeOptions::param_specs());
        specs
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let n = ctx.experts().len();
        if n == 0 {
            return Err(PolicyError::invalid(
                "learned-merge needs at least one expert",
            ));
        }
        let space = match params.str("space")? {
            "exact" => MergeSpace::Exact,
            _ => MergeSpace::LowRank,
        };
        let uniform = ModulePlan::Static {
            weights: vec![1.0 / n as f64; n],
            space,
            svd_rank: None,
        };
        let mut plan = ctx.plan(uniform.clone());
        if params.str("granularity")? == "per_layer" {
            plan.modules = layer_prefixes(&ctx.module_paths())
                .into_iter()
                .map(|prefix| (prefix, uniform.clone()))
                .collect::<BTreeMap<_, _>>();
        }
        let options = OptimizeOptions {
            train_merge_weights: true,
            ..OptimizeOptions::from_params(params)?
        };
        ctx.progress(0.0, "learning merge weights");
        ctx.optimize(&Fitted::plan(plan), &options)
    }
}

/// The distinct layer prefixes of `modules`: each path up to and including its first
/// all-digit segment (`model.layers.3.mlp.fc1` → `model.layers.3`). Paths without one
/// belong to no layer.
pub fn layer_prefixes(modules: &[&str]) -> Vec<String> {
    let mut prefixes: Vec<String> = modules
        .iter()
        .filter_map(|path| {
            let mut end = 0;
            for segment in path.split('.') {
                end += segment.len();
                if !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit()) {
                    return Some(path[..end].to_owned());
                }
                end += 1;
            }
            None
        })
        .collect();
    prefixes.sort();
    prefixes.dedup();
    prefixes
}

moerge_sdk::export_policy!(LearnedMerge);
