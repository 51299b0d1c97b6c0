//! `ensemble`: output ensembling. Member `i` is expert `i` alone (a one-hot exact merge);
//! the members' outputs are mixed at probability level (`Σ wᵢ softmax(zᵢ)`, the default) or
//! logit level, with uniform weights or weights learned by the host's trainer.

use moerge_sdk::optimize::OptimizeOptions;
use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{Ensemble, EnsembleLevel, ModulePlan};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError};

#[derive(Default)]
pub struct OutputEnsemble;

impl Policy for OutputEnsemble {
    fn name(&self) -> &str {
        "ensemble"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        let mut specs = vec![
            ParamSpec::choice(
                "weights",
                &["uniform", "learned"],
                "uniform",
                "1/N per member, or mixture weights trained on the training data",
            ),
            ParamSpec::choice(
                "level",
                &["probability", "logit"],
                "probability",
                "mix next-token distributions, or logits",
            ),
        ];
        specs.extend(OptimizeOptions::param_specs());
        specs
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let n = ctx.experts().len();
        if n == 0 {
            return Err(PolicyError::invalid("ensemble needs at least one expert"));
        }
        let level = match params.str("level")? {
            "logit" => EnsembleLevel::Logit,
            _ => EnsembleLevel::Probability,
        };
        let mut plan = ctx.plan(ModulePlan::None);
        plan.ensemble = Some(Ensemble::uniform(level, n));
        let uniform = Fitted::plan(plan);
        if params.str("weights")? == "uniform" {
            return Ok(uniform);
        }
        let options = OptimizeOptions {
            train_ensemble_weights: true,
            ..OptimizeOptions::from_params(params)?
        };
        ctx.progress(0.0, "learning the ensemble's mixture weights");
        ctx.optimize(&uniform, &options)
    }
}

moerge_sdk::export_policy!(OutputEnsemble);
