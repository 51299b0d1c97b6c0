//! The engine's [`RowEvaluator`]: an expert's row is its mean loss per completion token on
//! each task's records, with the expert attached to the base model unmerged (what serving
//! that expert alone computes).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use moerge_engine::trainer::{self, Example};
use moerge_engine::{BaseModel, TextTokenizer};
use moerge_library::Adapter;

use super::matrix::{EvalData, RowEvaluator};

/// Examples per forward pass.
const BATCH: usize = 64;

/// Evaluates experts on one data set, tokenized once.
pub struct EngineRows {
    base: Arc<BaseModel>,
    examples: Vec<Example>,
}

impl EngineRows {
    pub fn new(
        base: Arc<BaseModel>,
        tokenizer: &TextTokenizer,
        data: &EvalData,
    ) -> Result<EngineRows, String> {
        let examples = data
            .records
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let encode = |text: &str| {
                    tokenizer
                        .encode(text)
                        .map_err(|e| format!("record {}: {e}", i + 1))
                };
                Ok(Example {
                    task: r.task.clone(),
                    prompt: encode(&r.prompt)?,
                    completion: encode(&r.completion)?,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(EngineRows { base, examples })
    }
}

impl RowEvaluator for EngineRows {
    fn evaluate(&self, dir: &Path, _data: &EvalData) -> Result<BTreeMap<String, f64>, String> {
        let adapter = Adapter::load(dir).map_err(|e| e.to_string())?;
        let model = self
            .base
            .with_adapter(&adapter)
            .map_err(|e| e.to_string())?;
        let losses =
            trainer::example_losses(&model, &self.examples, BATCH).map_err(|e| e.to_string())?;
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for (example, loss) in self.examples.iter().zip(losses) {
            let task = example.task.clone().unwrap_or_default();
            let entry = sums.entry(task).or_default();
            entry.0 += f64::from(loss);
            entry.1 += 1;
        }
        Ok(sums
            .into_iter()
            .map(|(task, (sum, n))| (task, sum / n as f64))
            .collect())
    }
}
