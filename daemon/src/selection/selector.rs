//! Greedy selection as the daemon's `Select` job: the data's rows refreshed (only missing
//! ones evaluated, on the serving base model), the selection run and stored.

use crate::index::Index;
use crate::serving::{HookError, JobReporter, SelectOutcome, SelectRequest, Selector};

use super::matrix::MatrixError;
use super::{read_eval_data, run, EngineRows, RunError, DEFAULT_TOLERANCE};
use std::sync::Arc;

/// The `Selector` hook of the daemon.
pub struct GreedySelector {
    index: Arc<Index>,
}

impl GreedySelector {
    pub fn new(index: Arc<Index>) -> GreedySelector {
        GreedySelector { index }
    }
}

fn invalid(argument: &str, message: String) -> HookError {
    HookError::InvalidArgument {
        argument: argument.into(),
        message,
    }
}

/// `{"tolerance": 0.01}` (or empty): the active set's relative tolerance.
pub fn tolerance_from_params(json: &str) -> Result<f64, HookError> {
    if json.trim().is_empty() {
        return Ok(DEFAULT_TOLERANCE);
    }
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| invalid("params", format!("not JSON: {e}")))?;
    let serde_json::Value::Object(map) = value else {
        return Err(invalid(
            "params",
            "expected a JSON object such as {\"tolerance\": 0.01}".into(),
        ));
    };
    let mut tolerance = DEFAULT_TOLERANCE;
    for (key, value) in map {
        match (key.as_str(), value.as_f64()) {
            ("tolerance", Some(t)) if t.is_finite() && t >= 0.0 => tolerance = t,
            ("tolerance", _) => {
                return Err(invalid(
                    "params",
                    format!("tolerance: expected a number ≥ 0, got {value}"),
                ))
            }
            _ => {
                return Err(invalid(
                    "params",
                    format!("{key}: unknown parameter (known: tolerance)"),
                ))
            }
        }
    }
    Ok(tolerance)
}

impl Selector for GreedySelector {
    fn select(
        &self,
        request: SelectRequest,
        reporter: &JobReporter,
    ) -> Result<SelectOutcome, HookError> {
        let tolerance = tolerance_from_params(&request.params_json)?;
        let data = read_eval_data(&request.data).map_err(|e| invalid("data", e.to_string()))?;
        let evaluator = EngineRows::new(
            request.engine.base.clone(),
            &request.engine.tokenizer,
            &data,
        )
        .map_err(|e| invalid("data", e))?;
        let report = run(
            &self.index,
            &request.lease,
            &data,
            &evaluator,
            tolerance,
            &mut |done, total, expert| {
                reporter.progress(
                    done as f64 / total.max(1) as f64,
                    &format!("evaluating {expert} ({}/{total})", done + 1),
                )
            },
            &|| reporter.is_cancelled(),
        )
        .map_err(|e| match e {
            RunError::Matrix(MatrixError::Cancelled) => HookError::Cancelled,
            other => HookError::Failed(other.to_string()),
        })?;
        let result_json =
            serde_json::to_string(&report).map_err(|e| HookError::Failed(e.to_string()))?;
        Ok(SelectOutcome {
            selected: report.selection.active_set().to_vec(),
            result_json,
        })
    }
}
