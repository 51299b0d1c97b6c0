//! The expert × task validation-loss matrix, cached in the index by (data set, expert
//! content): a refresh evaluates only the ready experts whose row is missing, so adding one
//! expert to a library of N costs one row, not N. Rows are keyed by content hash, so a
//! renamed expert keeps its row and a rewritten one gets a new one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use moerge_library::records::Record;

use super::greedy::LossMatrix;
use crate::index::{DatasetId, EvalRow, Index};
use crate::service::Lease;

/// Evaluation data: the validation records with a task each, and their identity.
#[derive(Debug, Clone)]
pub struct EvalData {
    pub id: DatasetId,
    pub tasks: Vec<String>,
    pub records: Vec<Record>,
}

/// Why a matrix could not be refreshed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MatrixError {
    #[error("{what}: record {line} has no \"task\"; selection needs a task on every record")]
    NoTask { what: String, line: usize },
    #[error("expert {expert:?}: {message}")]
    Expert { expert: String, message: String },
    #[error("index: {0}")]
    Index(#[from] crate::index::IndexError),
    #[error("cancelled")]
    Cancelled,
}

impl EvalData {
    /// `records` as read from `what` (a file name, for messages). The data set's identity is
    /// the hash of the records themselves, so two files with the same records share rows.
    pub fn new(what: &str, records: Vec<Record>) -> Result<EvalData, MatrixError> {
        let mut hasher = blake3::Hasher::new();
        hasher.update(b"moerge eval data v1\0");
        let mut tasks = BTreeSet::new();
        for (i, r) in records.iter().enumerate() {
            let task = r.task.as_deref().ok_or_else(|| MatrixError::NoTask {
                what: what.to_owned(),
                line: i + 1,
            })?;
            tasks.insert(task.to_owned());
            for part in [task, &r.prompt, &r.completion] {
                hasher.update(&(part.len() as u64).to_le_bytes());
                hasher.update(part.as_bytes());
            }
        }
        Ok(EvalData {
            id: DatasetId(*hasher.finalize().as_bytes()),
            tasks: tasks.into_iter().collect(),
            records,
        })
    }
}

/// Computes one expert's row: its mean loss per task on the data.
pub trait RowEvaluator {
    /// `dir` is a pinned copy of the expert (never the library folder itself).
    fn evaluate(&self, dir: &Path, data: &EvalData) -> Result<BTreeMap<String, f64>, String>;
}

/// What a refresh did.
#[derive(Debug, Clone, PartialEq)]
pub struct Refreshed {
    pub matrix: LossMatrix,
    /// The experts whose rows were computed now (the rest came from the index).
    pub evaluated: Vec<String>,
}

/// Makes the matrix of every ready expert of `lease` on `data`, evaluating missing rows and
/// storing them. `progress(done, total, expert)` is called before each evaluation;
/// `cancelled()` is checked between rows (rows already stored stay).
pub fn refresh(
    index: &Index,
    lease: &Lease,
    data: &EvalData,
    evaluator: &dyn RowEvaluator,
    progress: &mut dyn FnMut(usize, usize, &str),
    cancelled: &dyn Fn() -> bool,
) -> Result<Refreshed, MatrixError> {
    let cached: BTreeMap<_, EvalRow> = index
        .eval_rows(&data.id)?
        .into_iter()
        .map(|row| (row.expert, row))
        .collect();
    let ready: Vec<(&String, _)> = lease
        .experts()
        .iter()
        .filter(|(_, r)| r.is_ready())
        .filter_map(|(name, r)| r.hash.map(|h| (name, h)))
        .collect();
    let missing: Vec<_> = ready
        .iter()
        .filter(|(_, h)| !cached.get(h).is_some_and(|row| covers(row, data)))
        .collect();
    let mut rows = BTreeMap::new();
    let mut evaluated = Vec::new();
    for (done, (name, hash)) in missing.iter().enumerate() {
        if cancelled() {
            return Err(MatrixError::Cancelled);
        }
        progress(done, missing.len(), name);
        let expert_error = |message: String| MatrixError::Expert {
            expert: (*name).clone(),
            message,
        };
        let pin = lease.open(name).map_err(|e| expert_error(e.to_string()))?;
        let losses = evaluator.evaluate(pin.dir(), data).map_err(expert_error)?;
        let row = EvalRow {
            dataset: data.id,
            expert: *hash,
            losses,
        };
        if !covers(&row, data) {
            return Err(expert_error("the evaluator left tasks out".into()));
        }
        index.put_eval_row(&row)?;
        rows.insert((*name).clone(), row_in_order(&row, data));
        evaluated.push((*name).clone());
    }
    for (name, hash) in &ready {
        if !rows.contains_key(*name) {
            rows.insert((*name).clone(), row_in_order(&cached[hash], data));
        }
    }
    Ok(Refreshed {
        matrix: LossMatrix {
            tasks: data.tasks.clone(),
            rows,
        },
        evaluated,
    })
}

fn covers(row: &EvalRow, data: &EvalData) -> bool {
    data.tasks.iter().all(|t| row.losses.contains_key(t))
}

fn row_in_order(row: &EvalRow, data: &EvalData) -> Vec<f64> {
    data.tasks.iter().map(|t| row.losses[t]).collect()
}
