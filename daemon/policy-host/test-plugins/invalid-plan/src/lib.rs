//! A test plugin that returns a plan with one weight too few, which the host must refuse.

use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{MergeSpace, ModulePlan, Plan, PLAN_VERSION};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError};

#[derive(Default)]
pub struct InvalidPlan;

impl Policy for InvalidPlan {
    fn name(&self) -> &str {
        "test-invalid-plan"
    }

    fn version(&self) -> &str {
        "0.0.1"
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        Vec::new()
    }

    fn fit(&self, ctx: &FitContext<'_>, _params: &Params) -> Result<Fitted, PolicyError> {
        let n = ctx.experts().len();
        Ok(Fitted::plan(Plan {
            version: PLAN_VERSION,
            experts: ctx.expert_refs(),
            default: ModulePlan::Static {
                weights: vec![1.0; n.saturating_sub(1)],
                space: MergeSpace::Exact,
                svd_rank: None,
            },
            modules: Default::default(),
            ensemble: None,
            tensors: None,
        }))
    }
}

moerge_sdk::export_policy!(InvalidPlan);
