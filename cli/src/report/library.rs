//! The library a report runs on: a folder laid out like the tiny library (`base/`,
//! `experts/<name>/` with `moerge.json` task metadata, `data/{train,valid,test}.jsonl`),
//! read into the experts' roles the paper's table needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use moerge_library::records::{read_jsonl, Record};
use moerge_library::{Adapter, ExpertMetadata};

use crate::args::ReportArgs;

/// One expert of the library, with the tasks its metadata says it was trained on.
pub struct Expert {
    pub name: String,
    pub adapter: Adapter,
    pub tasks: Vec<String>,
}

/// The library and the records a report scores.
pub struct Library {
    pub dir: PathBuf,
    pub base_dir: PathBuf,
    /// Every expert, by name order.
    pub experts: Vec<Expert>,
    /// The tasks reported on, in the data's order.
    pub tasks: Vec<String>,
    /// Per task: the expert trained on that task alone (the oracle, and what fusions fuse).
    pub private: BTreeMap<String, usize>,
    /// Per task: the expert trained on that task's family (more than one task, not all).
    pub cluster: BTreeMap<String, usize>,
    /// The expert trained on every task, if there is one.
    pub shared: Option<usize>,
    pub train: Vec<Record>,
    pub valid: Vec<Record>,
    /// The split the table is scored on, at most `--records` per task.
    pub scored: Vec<Record>,
    /// What the fusions combine: each reported task's private expert, in task order (loaded
    /// a second time: an `Adapter` is a memory map, so this costs no copy).
    pub fused: Vec<Adapter>,
    /// Their metadata, for the policies that read it.
    pub fused_metadata: Vec<Option<ExpertMetadata>>,
}

/// Reads `dir` as `args` asks: which tasks, which split, how many records.
pub fn read(dir: &Path, args: &ReportArgs) -> Result<Library> {
    let base_dir = dir.join("base");
    let experts = read_experts(&dir.join("experts"))?;
    let data = dir.join("data");
    let split = |name: &str| -> Result<Vec<Record>> {
        let path = data.join(format!("{name}.jsonl"));
        let records = read_jsonl(&path).with_context(|| format!("{}", path.display()))?;
        if let Some(i) = records.iter().position(|r| r.task.is_none()) {
            bail!(
                "{}: record {} has no \"task\"; the report is per task",
                path.display(),
                i + 1
            );
        }
        Ok(records)
    };
    let (train, valid, scored) = (
        split("train")?,
        split("valid")?,
        split(args.split.file_stem())?,
    );
    let mut all_tasks: Vec<String> = Vec::new();
    for r in &scored {
        let task = r.task.clone().expect("checked above");
        if !all_tasks.contains(&task) {
            all_tasks.push(task);
        }
    }
    let tasks = pick_tasks(&all_tasks, args.tasks.as_deref())?;
    let (mut private, mut cluster, mut shared) = (BTreeMap::new(), BTreeMap::new(), None);
    for (i, e) in experts.iter().enumerate() {
        match e.tasks.len() {
            0 => {}
            1 => {
                private.entry(e.tasks[0].clone()).or_insert(i);
            }
            n if n >= all_tasks.len() && all_tasks.iter().all(|t| e.tasks.contains(t)) => {
                shared.get_or_insert(i);
            }
            _ => {
                for t in &e.tasks {
                    cluster.entry(t.clone()).or_insert(i);
                }
            }
        }
    }
    if let Some(t) = tasks.iter().find(|t| !private.contains_key(*t)) {
        bail!(
            "{}: no expert was trained on task {t:?} alone (its moerge.json \"tasks\" would \
             be [{t:?}]); the report needs one per task",
            dir.join("experts").display()
        );
    }
    let keep = |records: Vec<Record>, limit: Option<usize>| -> Vec<Record> {
        let mut count: BTreeMap<String, usize> = BTreeMap::new();
        records
            .into_iter()
            .filter(|r| {
                let task = r.task.as_deref().unwrap_or_default();
                if !tasks.iter().any(|t| t == task) {
                    return false;
                }
                let n = count.entry(task.to_string()).or_default();
                *n += 1;
                limit.is_none_or(|l| *n <= l)
            })
            .collect()
    };
    let (mut fused, mut fused_metadata) = (Vec::new(), Vec::new());
    for t in &tasks {
        let path = dir.join("experts").join(&experts[private[t]].name);
        let context = || format!("{}", path.display());
        fused.push(Adapter::load(&path).with_context(context)?);
        fused_metadata.push(ExpertMetadata::read(&path).with_context(context)?);
    }
    Ok(Library {
        fused,
        fused_metadata,
        dir: dir.to_path_buf(),
        base_dir,
        experts,
        private,
        cluster,
        shared,
        train: keep(train, None),
        valid: keep(valid, args.records),
        scored: keep(scored, args.records),
        tasks,
    })
}

/// `--tasks`: a count (the first N) or a comma-separated list of task names.
fn pick_tasks(all: &[String], wanted: Option<&str>) -> Result<Vec<String>> {
    let Some(wanted) = wanted else {
        return Ok(all.to_vec());
    };
    if let Ok(n) = wanted.trim().parse::<usize>() {
        if n == 0 || n > all.len() {
            crate::exit::invalid!("--tasks {n}: the data has {} tasks", all.len());
        }
        return Ok(all[..n].to_vec());
    }
    wanted
        .split(',')
        .map(|t| {
            let t = t.trim();
            match all.iter().find(|a| *a == t) {
                Some(a) => Ok(a.clone()),
                None => crate::exit::invalid!(
                    "--tasks: no task {t:?} in the data; it has {}",
                    all.join(", ")
                ),
            }
        })
        .collect()
}

/// Every adapter folder under `dir`, loaded, with its task metadata.
pub(super) fn read_experts(dir: &Path) -> Result<Vec<Expert>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("adapter_config.json").is_file())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    if names.is_empty() {
        bail!("{}: holds no adapter folder", dir.display());
    }
    names
        .into_iter()
        .map(|name| {
            let path = dir.join(&name);
            let adapter = Adapter::load(&path).with_context(|| format!("{}", path.display()))?;
            let tasks = ExpertMetadata::read(&path)
                .with_context(|| format!("{}", path.display()))?
                .map(|m| m.tasks)
                .unwrap_or_default();
            Ok(Expert {
                name,
                adapter,
                tasks,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::pick_tasks;

    #[test]
    fn tasks_by_count_or_name() {
        let all: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        assert_eq!(pick_tasks(&all, None).unwrap(), all);
        assert_eq!(pick_tasks(&all, Some("2")).unwrap(), ["a", "b"]);
        assert_eq!(pick_tasks(&all, Some("c, a")).unwrap(), ["c", "a"]);
        assert!(pick_tasks(&all, Some("0")).is_err());
        assert!(pick_tasks(&all, Some("4")).is_err());
        let e = pick_tasks(&all, Some("a,zz")).unwrap_err().to_string();
        assert!(e.contains("\"zz\""), "{e}");
    }
}
