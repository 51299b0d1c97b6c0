//! `uniform-merge`: every module a static merge of all experts with weight 1/N — the paper's
//! baseline. `space` picks where the merge happens (`lowrank`: average the factors, as the
//! paper does; `exact`: the exact mean delta; `folded`: the exact delta folded into the base
//! weights); `svd_rank` truncates an exact or folded merge.

use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{MergeSpace, ModulePlan};
use moerge_sdk::policy::{rank_mismatch, FitContext, Fitted, Policy, PolicyError};

#[derive(Default)]
pub struct UniformMerge;

impl Policy for UniformMerge {
    fn name(&self) -> &str {
        "uniform-merge"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::choice(
                "space",
                &["lowrank", "exact", "folded"],
                "lowrank",
                "lowrank averages A and B separately (equal ranks needed); exact sums the \
                 deltas; folded adds the exact delta into the base weights",
            ),
            ParamSpec::optional_int(
                "svd_rank",
                "keep only this many singular directions of the merged delta (exact or folded)",
            )
            .min(1.0),
        ]
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let n = ctx.experts().len();
        if n == 0 {
            return Err(PolicyError::invalid(
                "uniform-merge needs at least one expert",
            ));
        }
        let space = match params.str("space")? {
            "exact" => MergeSpace::Exact,
            "folded" => MergeSpace::Folded,
            _ => MergeSpace::LowRank,
        };
        let svd_rank = params.opt_int("svd_rank")?.map(|r| r as usize);
        if space == MergeSpace::LowRank {
            if svd_rank.is_some() {
                return Err(PolicyError::invalid(
                    "parameter svd_rank needs space=exact or space=folded",
                ));
            }
            if let Some(m) = rank_mismatch(ctx.experts(), ctx.module_paths()) {
                return Err(m.refusal("space"));
            }
        }
        let weights = vec![1.0 / n as f64; n];
        Ok(Fitted::plan(ctx.plan(ModulePlan::Static {
            weights,
            space,
            svd_rank,
        })))
    }
}

moerge_sdk::export_policy!(UniformMerge);
