//! `arrow`: Arrow routing (Ostapenko et al. 2024) on every module. Each expert's prototype is
//! the top right singular vector of its `B A`; a token's input `x` scores expert `e` by
//! `|x · v_e|`, and the `top_k` best share `softmax(score / temperature)`. Nothing is
//! trained: the engine computes the prototypes from the factors (and the index caches them).

use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{Granularity, Mix, ModulePlan, Router};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError};

#[derive(Default)]
pub struct Arrow;

impl Policy for Arrow {
    fn name(&self) -> &str {
        "arrow"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::int(
                "top_k",
                4,
                "experts mixed per token (clipped to the number of experts)",
            )
            .min(1.0),
            ParamSpec::float(
                "temperature",
                1.0,
                "softmax temperature over the top-k scores",
            )
            .min(1e-6),
            ParamSpec::choice(
                "granularity",
                &["token", "sequence"],
                "token",
                "route every token on its own input, or on the running mean of its sequence",
            ),
            Mix::param_spec(),
        ]
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let n = ctx.experts().len();
        if n == 0 {
            return Err(PolicyError::invalid("arrow needs at least one expert"));
        }
        let granularity = match params.str("granularity")? {
            "sequence" => Granularity::Sequence,
            _ => Granularity::Token,
        };
        Ok(Fitted::plan(ctx.plan(ModulePlan::Routed {
            router: Router::Arrow,
            top_k: (params.int("top_k")? as usize).min(n),
            temperature: params.float("temperature")?,
            granularity,
            groups: Vec::new(),
            mix: Mix::from_name(params.str("mix")?).unwrap_or_default(),
        })))
    }
}

moerge_sdk::export_policy!(Arrow);
