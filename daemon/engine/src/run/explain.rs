//! Which units routed modules chose, token by token: what `moerge explain` and the daemon's
//! `Explain` show. Recorded through the request's [`ForwardState`], so it works whichever
//! threads the forward pass runs on.

use candle_core::{DType, Tensor};

use super::inference;
use crate::error::Result;
use crate::models::LanguageModel;
use crate::nn::{ForwardState, RoutingRecord};

/// Logits `[t, vocab]` of one sequence and every routing decision made computing them, in
/// the order the modules ran.
pub fn trace(model: &impl LanguageModel, ids: &[u32]) -> Result<(Tensor, Vec<RoutingRecord>)> {
    let mut state = ForwardState::tracing();
    let logits = inference::logits_in(model, ids, &mut state)?;
    Ok((logits, state.take_trace()))
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
pub fn explain(model: &impl LanguageModel, ids: &[u32]) -> Result<Vec<ModuleRouting>> {
    let (_, records) = trace(model, ids)?;
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
