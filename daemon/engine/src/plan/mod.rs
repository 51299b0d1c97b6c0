//! Plans: reading the experts' factors, static merges, Arrow prototypes, routed modules and
//! ensembles, and fusing a `Plan` into a [`FusedModel`] on a base model's device. PEFT
//! writing (`export`) lives here too, so the `train` layer above saves through it.

pub(crate) mod arrow;
pub(crate) mod export;
mod fuse;
pub(crate) mod merge;
pub(crate) mod routing;
pub(crate) mod stacks;

pub use fuse::{EnsembleModel, FusedModel};

use moerge_library::Adapter;
use moerge_sdk::plan::Plan;

use crate::error::{EngineError, Result};

fn plan_error(message: String) -> EngineError {
    EngineError::InvalidArgument {
        argument: "plan",
        message,
    }
}

/// Checks that `experts` are the plan's experts, in its order, with the hashes it names.
pub(crate) fn check_experts(plan: &Plan, experts: &[Adapter]) -> Result<()> {
    if experts.len() != plan.experts.len() {
        return Err(plan_error(format!(
            "names {} experts but {} were given",
            plan.experts.len(),
            experts.len()
        )));
    }
    for (i, (want, got)) in plan.experts.iter().zip(experts).enumerate() {
        if want.name != got.name() {
            return Err(plan_error(format!(
                "experts[{i}] is {:?} but the adapter given is {:?}",
                want.name,
                got.name()
            )));
        }
        if want.hash != got.hash().to_string() {
            return Err(plan_error(format!(
                "experts[{i}].hash: expert {:?} has changed since the plan was made (plan {}, files {}); re-create the plan",
                want.name,
                &want.hash[..12.min(want.hash.len())],
                got.hash().short()
            )));
        }
    }
    Ok(())
}
