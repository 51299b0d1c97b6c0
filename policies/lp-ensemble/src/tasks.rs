//! Per-record validation losses grouped into per-task means.

use std::collections::BTreeMap;

use moerge_sdk::policy::Record;

/// The name records without a task are grouped under.
pub const UNTASKED: &str = "(untasked)";

/// The validation records' tasks, sorted (records without a task form one task, listed first),
/// and which task each record belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskIndex {
    names: Vec<String>,
    of_record: Vec<usize>,
}

impl TaskIndex {
    /// Groups `records` by task.
    pub fn new(records: &[Record]) -> TaskIndex {
        // `None` sorts before every label, so a task literally named "(untasked)" stays apart.
        let mut ids: BTreeMap<Option<&str>, usize> =
            records.iter().map(|r| (r.task.as_deref(), 0)).collect();
        for (i, id) in ids.values_mut().enumerate() {
            *id = i;
        }
        let names = ids
            .keys()
            .map(|t| t.unwrap_or(UNTASKED).to_owned())
            .collect();
        let of_record = records.iter().map(|r| ids[&r.task.as_deref()]).collect();
        TaskIndex { names, of_record }
    }

    /// The task names, in column order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The mean of `per_record` (one loss per record, in record order) over each task's
    /// records, or the number of losses when it is not one per record.
    pub fn means(&self, per_record: &[f64]) -> Result<Vec<f64>, usize> {
        if per_record.len() != self.of_record.len() {
            return Err(per_record.len());
        }
        let mut sums = vec![(0.0, 0usize); self.names.len()];
        for (&task, &loss) in self.of_record.iter().zip(per_record) {
            sums[task].0 += loss;
            sums[task].1 += 1;
        }
        Ok(sums.iter().map(|&(s, n)| s / n as f64).collect())
    }
}
