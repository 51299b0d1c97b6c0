//! Greedy expert selection in the daemon: the expert × task validation-loss matrix, cached
//! in the index by (data set, expert content) and refreshed one missing row at a time
//! ([`matrix`]), greedy selection over it (`moerge_sdk::greedy`, shared with `moerge eval`),
//! and the stored result whose active set is the default experts of a fusion.
//!
//! Layering: this module sits beside `serving` (it uses the engine through
//! [`EngineRows`] and the index through its API), and knows nothing about D-Bus.

mod auto;
mod engine_rows;
mod matrix;
mod selector;

use std::path::Path;

use moerge_library::records::{read_jsonl, DataError};

pub use auto::{AutoRefresh, Refresh};
pub use engine_rows::EngineRows;
pub use matrix::{refresh, EvalData, MatrixError, Refreshed, RowEvaluator};
pub use moerge_sdk::greedy::{self, select, LossMatrix, Selection, SelectionError};
pub use selector::{tolerance_from_params, GreedySelector};

use crate::index::{Index, IndexError, SelectionRecord};
use crate::service::Lease;

/// The default tolerance of the active set: 1% of the full library's value.
pub const DEFAULT_TOLERANCE: f64 = 0.01;

/// The name the daemon's own selection is stored under.
pub const ACTIVE_SELECTION: &str = "active";

/// Reads evaluation data: a JSONL file, or a folder's `valid.jsonl` (the tiny library's
/// `data/` layout).
pub fn read_eval_data(path: &Path) -> Result<EvalData, ReadError> {
    let file = if path.is_dir() {
        path.join("valid.jsonl")
    } else {
        path.to_path_buf()
    };
    let records = read_jsonl(&file)?;
    Ok(EvalData::new(&file.display().to_string(), records)?)
}

/// Why evaluation data could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Data(#[from] DataError),
    #[error(transparent)]
    Matrix(#[from] MatrixError),
}

/// A selection run: the selection, which rows were evaluated for it, and the generation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SelectionReport {
    pub generation: u64,
    pub dataset: String,
    pub tasks: Vec<String>,
    pub selection: Selection,
    /// The experts whose rows were computed for this run (the others were cached).
    pub evaluated: Vec<String>,
}

/// Why a selection failed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Matrix(#[from] MatrixError),
    #[error(transparent)]
    Selection(#[from] SelectionError),
    #[error("index: {0}")]
    Index(#[from] IndexError),
}

/// Refreshes the matrix, selects, and stores the result as [`ACTIVE_SELECTION`].
pub fn run(
    index: &Index,
    lease: &Lease,
    data: &EvalData,
    evaluator: &dyn RowEvaluator,
    tolerance: f64,
    progress: &mut dyn FnMut(usize, usize, &str),
    cancelled: &dyn Fn() -> bool,
) -> Result<SelectionReport, RunError> {
    let refreshed = refresh(index, lease, data, evaluator, progress, cancelled)?;
    let selection = select(&refreshed.matrix, tolerance)?;
    let order = selection
        .order
        .iter()
        .map(|name| {
            lease
                .expert(name)
                .and_then(|r| r.hash)
                .expect("the matrix has ready experts of this lease only")
        })
        .collect();
    index.put_selection(&SelectionRecord {
        name: ACTIVE_SELECTION.to_owned(),
        dataset: data.id,
        order,
        curve: selection.curve.clone(),
        active: selection.active,
        stale: false,
    })?;
    Ok(SelectionReport {
        generation: lease.generation(),
        dataset: data.id.0.iter().map(|b| format!("{b:02x}")).collect(),
        tasks: data.tasks.clone(),
        selection,
        evaluated: refreshed.evaluated,
    })
}
