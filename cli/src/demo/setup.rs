//! What the demo runs on: a handful of tasks of the tiny library (one per family first),
//! their experts copied into a library folder, and their records.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use moerge_library::records::{self, Record};

use crate::exit::invalid;

/// Train and validation records per task for the learned policies' fits.
const FIT_TRAIN_PER_TASK: usize = 100;
const FIT_VALID_PER_TASK: usize = 16;

/// The demo's tasks and data.
pub struct Setup {
    /// Task names, which are also their experts' names.
    pub tasks: Vec<String>,
    /// Test records scored per policy, grouped by task in `tasks`' order.
    pub test: Vec<Record>,
}

/// `n` tasks from the tiny library's manifest: the first task of every family, then the
/// second of every family, and so on.
pub fn pick_tasks(tiny: &Path, n: usize) -> Result<Vec<String>> {
    let manifest = tiny.join("manifest.json");
    let text = std::fs::read_to_string(&manifest)
        .with_context(|| format!("--tiny: cannot read {}", manifest.display()))?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("--tiny: {} is not JSON", manifest.display()))?;
    let families: Vec<Vec<String>> = value["families"]
        .as_array()
        .with_context(|| format!("--tiny: {} has no \"families\"", manifest.display()))?
        .iter()
        .map(|f| {
            f["tasks"]
                .as_array()
                .map(|ts| {
                    ts.iter()
                        .filter_map(|t| t.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default()
        })
        .collect();
    let most = families.iter().map(Vec::len).max().unwrap_or(0);
    let order: Vec<String> = (0..most)
        .flat_map(|i| families.iter().filter_map(move |f| f.get(i).cloned()))
        .collect();
    if n == 0 || n > order.len() {
        invalid!(
            "--tasks {n}: the tiny library has 1 to {} tasks",
            order.len()
        );
    }
    Ok(order.into_iter().take(n).collect())
}

/// Copies the tasks' experts into `library`, writes the fits' data into `data`
/// (`train.jsonl`, `valid.jsonl`), and reads `per_task` test records of each task.
pub fn prepare(
    tiny: &Path,
    tasks: Vec<String>,
    per_task: usize,
    library: &Path,
    data: &Path,
) -> Result<Setup> {
    if per_task == 0 {
        invalid!("--records 0: score at least one record per task");
    }
    for task in &tasks {
        let (src, dest) = (tiny.join("experts").join(task), library.join(task));
        std::fs::create_dir_all(&dest)?;
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            std::fs::copy(src.join(file), dest.join(file))
                .with_context(|| format!("--tiny: expert {task}: {file}"))?;
        }
    }
    std::fs::create_dir_all(data)?;
    let by_task = |split: &str| -> Result<BTreeMap<String, Vec<Record>>> {
        let file = tiny.join("data").join(format!("{split}.jsonl"));
        let mut map: BTreeMap<String, Vec<Record>> = BTreeMap::new();
        for r in records::read_jsonl(&file).with_context(|| format!("--tiny: {split}"))? {
            if let Some(t) = r.task.clone().filter(|t| tasks.contains(t)) {
                map.entry(t).or_default().push(r);
            }
        }
        Ok(map)
    };
    let take = |map: &BTreeMap<String, Vec<Record>>, n: usize| -> Vec<Record> {
        tasks
            .iter()
            .flat_map(|t| map.get(t).into_iter().flatten().take(n).cloned())
            .collect()
    };
    for (split, n) in [("train", FIT_TRAIN_PER_TASK), ("valid", FIT_VALID_PER_TASK)] {
        let lines: Vec<String> = take(&by_task(split)?, n)
            .iter()
            .map(serde_json::to_string)
            .collect::<Result<_, _>>()?;
        std::fs::write(data.join(format!("{split}.jsonl")), lines.join("\n") + "\n")?;
    }
    let test = take(&by_task("test")?, per_task);
    Ok(Setup { tasks, test })
}
