//! Explicit conversions between serving's domain values and the wire types of `moerge-bus`.

use moerge_bus::{
    ExpertInfo, ExplainRecord, Explanation, MoergeError, PlanInfo, PolicyInfo, ScoreResult,
    TokenProbability,
};
use moerge_library::AdapterState;

use crate::index::{ExpertRecord, PlanRecord};
use crate::serving::{
    GenerateRequest, PolicyDescription, RoutingExplanation, ScoreOutput, ServeError,
};

pub(crate) fn error(e: ServeError) -> MoergeError {
    let text = e.to_string();
    match e {
        ServeError::NoSuchExpert(_) => MoergeError::NoSuchExpert(text),
        ServeError::InvalidArgument { .. } => MoergeError::InvalidArgument(text),
        ServeError::AccessDenied(_) => MoergeError::AccessDenied(text),
        ServeError::LimitExceeded { .. } => MoergeError::LimitExceeded(text),
        ServeError::PluginFailed(_) => MoergeError::PluginFailed(text),
        ServeError::NoSuchObject(_) => MoergeError::NoSuchObject(text),
        ServeError::NotSupported(_) => MoergeError::NotSupported(text),
        _ => MoergeError::Internal(text),
    }
}

pub(crate) fn expert(generation: u64, r: ExpertRecord) -> ExpertInfo {
    let (state, reason) = match r.state {
        AdapterState::Ready => ("ready", String::new()),
        AdapterState::Rejected { reason } => ("rejected", reason),
        AdapterState::Incompatible { reason } => ("incompatible", reason),
    };
    ExpertInfo {
        name: r.name,
        hash: r.hash.map(|h| h.to_string()).unwrap_or_default(),
        state: state.into(),
        reason,
        generation: r.generation,
        size_bytes: r.size_bytes,
        library_generation: generation,
    }
}

pub(crate) fn policy(p: PolicyDescription) -> PolicyInfo {
    PolicyInfo {
        name: p.name,
        version: p.version,
        description: p.description,
    }
}

pub(crate) fn plan(p: PlanRecord) -> PlanInfo {
    PlanInfo {
        name: p.name,
        experts: p.experts.into_iter().map(|e| e.name).collect(),
        stale: p.stale.is_some(),
        reason: p.stale.unwrap_or_default(),
    }
}

pub(crate) fn score(s: ScoreOutput) -> ScoreResult {
    let token_nll: Vec<f64> = s.nll.iter().map(|&x| f64::from(x)).collect();
    let total_nll: f64 = token_nll.iter().sum();
    ScoreResult {
        mean_nll: total_nll / token_nll.len().max(1) as f64,
        total_nll,
        tokens: s.tokens,
        token_ids: s.ids,
        token_nll,
    }
}

pub(crate) fn top_tokens(top: Vec<(u32, String, f32)>) -> Vec<TokenProbability> {
    top.into_iter()
        .map(|(id, text, p)| TokenProbability {
            id,
            text,
            probability: f64::from(p),
        })
        .collect()
}

pub(crate) fn explanation(e: RoutingExplanation) -> Explanation {
    Explanation {
        tokens: e.tokens,
        records: e
            .modules
            .into_iter()
            .map(|m| ExplainRecord {
                module: m.module,
                units: m.units,
                weights: m
                    .weights
                    .into_iter()
                    .map(|row| row.into_iter().map(f64::from).collect())
                    .collect(),
            })
            .collect(),
    }
}

/// `Generate`'s `a{sv}` options as a request, defaults filled in.
pub(crate) fn generate_request(
    options: &std::collections::HashMap<String, zbus::OwnedVariant>,
) -> Result<GenerateRequest, MoergeError> {
    let o = moerge_bus::GenerateOptions::from_dict(options)
        .map_err(|e| MoergeError::InvalidArgument(e.to_string()))?;
    Ok(GenerateRequest {
        max_tokens: o.max_tokens.unwrap_or(64) as usize,
        temperature: o.temperature.unwrap_or(0.0),
        top_p: o.top_p,
        seed: o.seed,
        stop: o.stop,
    })
}
