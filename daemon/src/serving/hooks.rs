//! The two hooks a daemon is given at start: a [`PolicyRunner`] (the policy plugin host)
//! and a [`Selector`] (greedy selection). Both run on a job's own thread and report through
//! a [`JobReporter`]. Without them, `Fuse`, `Fit` and `Select` answer "not supported".

use std::path::PathBuf;
use std::sync::Arc;

use moerge_engine::{BaseModel, TextTokenizer};

use crate::service::Lease;

pub use super::jobs::JobReporter;

/// A fusion policy on offer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyDescription {
    pub name: String,
    pub version: String,
    pub description: String,
}

/// What to fit.
#[derive(Debug, Clone)]
pub struct FitRequest {
    pub policy: String,
    /// The policy's parameters, JSON (may be empty).
    pub params_json: String,
    /// The experts to fuse (all ready experts of the lease when empty).
    pub experts: Vec<String>,
    /// Training data (JSONL `{task, prompt, completion}`), when the caller gave some.
    pub data: Option<PathBuf>,
    /// The library generation the fit runs on.
    pub lease: Lease,
    /// The serving base model and its tokenizer (shared, not reloaded).
    pub engine: Engine,
}

/// The loaded base model and tokenizer, shared with the hooks.
#[derive(Clone)]
pub struct Engine {
    pub base: Arc<BaseModel>,
    pub tokenizer: Arc<TextTokenizer>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Engine")
    }
}

/// What a fit made: a plan, the bytes of its tensor file if it has one (named by the plan's
/// `tensors` hash), and the validation loss when there was validation data.
#[derive(Debug, Clone, PartialEq)]
pub struct FitOutcome {
    pub plan_json: String,
    pub tensors: Option<Vec<u8>>,
    pub valid_loss: Option<f64>,
}

/// What to select.
#[derive(Debug, Clone)]
pub struct SelectRequest {
    pub params_json: String,
    pub data: PathBuf,
    pub lease: Lease,
    pub engine: Engine,
}

/// What a selection found.
#[derive(Debug, Clone, PartialEq)]
pub struct SelectOutcome {
    /// The active set, in selection order.
    pub selected: Vec<String>,
    /// The whole result (curve, tolerance...), JSON.
    pub result_json: String,
}

/// Why a hook failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum HookError {
    /// The request is wrong; `argument` names the D-Bus argument (`params`, `policy`...).
    #[error("{argument}: {message}")]
    InvalidArgument { argument: String, message: String },
    /// The plugin failed.
    #[error("{0}")]
    Failed(String),
    /// The job saw its cancel flag and stopped.
    #[error("cancelled")]
    Cancelled,
}

/// The policy plugin host, as the daemon sees it.
pub trait PolicyRunner: Send + Sync {
    fn policies(&self) -> Vec<PolicyDescription>;
    /// Runs `request.policy`; called on a job thread (or a compute thread for `Fuse`).
    fn fit(&self, request: FitRequest, reporter: &JobReporter) -> Result<FitOutcome, HookError>;
}

/// Greedy selection, as the daemon sees it.
pub trait Selector: Send + Sync {
    fn select(
        &self,
        request: SelectRequest,
        reporter: &JobReporter,
    ) -> Result<SelectOutcome, HookError>;
}
