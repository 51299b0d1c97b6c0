//! A test plugin whose `fit` panics unless given `panic=false` (then it returns a uniform
//! exact merge), to show a panic fails one fit and leaves the host working.

use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{MergeSpace, ModulePlan, Plan, PLAN_VERSION};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError};

#[derive(Default)]
pub struct Panicking;

impl Policy for Panicking {
    fn name(&self) -> &str {
        "test-panic"
    }

    fn version(&self) -> &str {
        "0.0.1"
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        vec![ParamSpec::bool("panic", true, "panic inside fit")]
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        if params.bool("panic")? {
            panic!("test-panic was asked to panic");
        }
        let n = ctx.experts().len();
        Ok(Fitted::plan(Plan {
            version: PLAN_VERSION,
            experts: ctx.expert_refs(),
            default: ModulePlan::Static {
                weights: vec![1.0 / n as f64; n],
                space: MergeSpace::Exact,
                svd_rank: None,
            },
            modules: Default::default(),
            ensemble: None,
            tensors: None,
        }))
    }
}

moerge_sdk::export_policy!(Panicking);
