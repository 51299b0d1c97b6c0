//! `moerge interpolate A B`: the loss of the merge (1-t)·A + t·B of two experts along t, on
//! the records of both experts' tasks, with the per-example oracle (the better of A and B on
//! each record) and the base model as reference lines: the paper's mode-connectivity
//! analysis. Offline, on a library laid out like the tiny library.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moerge_engine::trainer::{self, Example};
use moerge_engine::{BaseModel, FusedModel, Precision, TextTokenizer};
use moerge_library::records::read_jsonl;
use moerge_sdk::plan::{ExpertRef, MergeSpace, ModulePlan, Plan, PLAN_VERSION};
use serde::Serialize;

use super::library::{read_experts, Expert};
use crate::args::{InterpolateArgs, SpaceArg};
use crate::commands::train::tokenize;
use crate::plot::{self, InterpolationCurve};

/// Records scored per forward pass.
const BATCH: usize = 64;

/// What `--json` prints.
#[derive(Debug, Serialize)]
struct Interpolation {
    a: String,
    b: String,
    space: String,
    split: String,
    tasks: Vec<String>,
    records: usize,
    points: Vec<Point>,
    /// Mean over records of min(loss under A, loss under B).
    oracle: f64,
    base: f64,
    seconds: f64,
}

#[derive(Debug, Serialize)]
struct Point {
    t: f64,
    /// Mean over the records of both tasks.
    loss: f64,
    task_losses: BTreeMap<String, f64>,
}

pub fn run(args: &InterpolateArgs) -> Result<ExitCode> {
    let started = Instant::now();
    if args.steps < 2 {
        crate::exit::invalid!("--steps {}: needs at least 2 (t = 0 and t = 1)", args.steps);
    }
    let space = match args.space {
        SpaceArg::Lowrank => MergeSpace::LowRank,
        SpaceArg::Exact => MergeSpace::Exact,
        SpaceArg::Folded => MergeSpace::Folded,
    };
    let dir = crate::demo::tiny_library(args.tiny.as_deref())?;
    let mut experts = read_experts(&dir.join("experts"))?;
    let pick = |experts: &mut Vec<Expert>, name: &str, which: &str| -> Result<Expert> {
        match experts.iter().position(|e| e.name == name) {
            Some(i) => Ok(experts.remove(i)),
            None => {
                let names: Vec<&str> = experts.iter().map(|e| e.name.as_str()).collect();
                crate::exit::invalid!(
                    "{which} {name:?} is not an expert of {}; it has {}",
                    dir.join("experts").display(),
                    names.join(", ")
                )
            }
        }
    };
    if args.a == args.b {
        crate::exit::invalid!("A and B are both {:?}; name two different experts", args.a);
    }
    let a = pick(&mut experts, &args.a, "A")?;
    let b = pick(&mut experts, &args.b, "B")?;
    let mut tasks: Vec<String> = Vec::new();
    for e in [&a, &b] {
        if e.tasks.is_empty() {
            crate::exit::invalid!(
                "expert {:?} names no task in its moerge.json, so there is no data to score it on",
                e.name
            );
        }
        for t in &e.tasks {
            if !tasks.contains(t) {
                tasks.push(t.clone());
            }
        }
    }
    let split = args.split.file_stem();
    let path = dir.join("data").join(format!("{split}.jsonl"));
    let mut per_task: BTreeMap<&str, usize> = BTreeMap::new();
    let records: Vec<_> = read_jsonl(&path)
        .with_context(|| format!("{}", path.display()))?
        .into_iter()
        .filter(|r| {
            let Some(task) = r
                .task
                .as_deref()
                .and_then(|t| tasks.iter().find(|x| *x == t))
            else {
                return false;
            };
            let seen = per_task.entry(task).or_default();
            *seen += 1;
            args.records.is_none_or(|n| *seen <= n)
        })
        .collect();
    if records.is_empty() {
        crate::exit::invalid!(
            "{}: no record of task {}",
            path.display(),
            tasks.join(" or ")
        );
    }

    let base_dir = dir.join("base");
    let base = BaseModel::load_dir(&base_dir, Precision::F32)
        .with_context(|| format!("{}", base_dir.display()))?;
    let tokenizer = TextTokenizer::from_dir(&base_dir)?;
    let examples = tokenize(&tokenizer, &records)?;
    let pair = [a.adapter, b.adapter];
    let refs: Vec<ExpertRef> = pair
        .iter()
        .map(|e| ExpertRef {
            name: e.name().to_string(),
            hash: e.hash().to_string(),
        })
        .collect();
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.steps as u64 + 1)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:24} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    let cancelled = crate::exit::cancel_on_ctrl_c();
    let check = || -> Result<()> {
        if cancelled.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(anyhow::Error::new(crate::exit::Cancelled(
                "interpolation stopped".into(),
            )));
        }
        Ok(())
    };
    bar.set_message("base model");
    let base_losses = losses(&FusedModel::Single(base.clone()), &examples)?;
    bar.inc(1);
    let mut curves: Vec<Vec<f64>> = Vec::with_capacity(args.steps);
    let ts: Vec<f64> = (0..args.steps)
        .map(|i| i as f64 / (args.steps - 1) as f64)
        .collect();
    for &t in &ts {
        check()?;
        bar.set_message(format!("t = {t:.2}"));
        let plan = Plan {
            version: PLAN_VERSION,
            experts: refs.clone(),
            default: ModulePlan::Static {
                weights: vec![1.0 - t, t],
                space,
                svd_rank: None,
            },
            modules: Default::default(),
            ensemble: None,
            tensors: None,
        };
        let model = base
            .fuse(&plan, &pair)
            .with_context(|| format!("merging at t = {t}"))?;
        curves.push(losses(&model, &examples)?);
        bar.inc(1);
    }
    bar.finish_and_clear();

    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let by_task = |losses: &[f64]| -> BTreeMap<String, f64> {
        let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for (e, l) in examples.iter().zip(losses) {
            let s = sums.entry(e.task.clone().unwrap_or_default()).or_default();
            *s = (s.0 + l, s.1 + 1);
        }
        sums.into_iter()
            .map(|(t, (s, n))| (t, s / n as f64))
            .collect()
    };
    // Both ends are the experts alone, so the oracle takes each record's better end.
    let (first, last) = (&curves[0], &curves[args.steps - 1]);
    let best: Vec<f64> = first.iter().zip(last).map(|(x, y)| x.min(*y)).collect();
    let result = Interpolation {
        a: args.a.clone(),
        b: args.b.clone(),
        space: format!("{space:?}").to_lowercase(),
        split: split.to_string(),
        tasks: tasks.clone(),
        records: examples.len(),
        points: ts
            .iter()
            .zip(&curves)
            .map(|(&t, l)| Point {
                t,
                loss: mean(l),
                task_losses: by_task(l),
            })
            .collect(),
        oracle: mean(&best),
        base: mean(&base_losses),
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        crate::remote::output::json(&result)?;
    } else {
        print(&result);
    }
    if let Some(out) = &args.plot {
        let curve = InterpolationCurve {
            a: result.a.clone(),
            b: result.b.clone(),
            space: result.space.clone(),
            t: ts.clone(),
            loss: result.points.iter().map(|p| p.loss).collect(),
            tasks: tasks
                .iter()
                .map(|t| {
                    (
                        t.clone(),
                        result.points.iter().map(|p| p.task_losses[t]).collect(),
                    )
                })
                .collect(),
            oracle: result.oracle,
            base: Some(result.base),
        };
        let written = plot::draw_interpolation(&curve, out)
            .with_context(|| format!("--plot {}", out.display()))?;
        if !args.json {
            println!("\nwrote {} into {}", written.len(), out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Per-example mean NLL per completion token, in record order.
fn losses(model: &FusedModel, examples: &[Example]) -> Result<Vec<f64>> {
    Ok(trainer::example_losses(model, examples, BATCH)?
        .into_iter()
        .map(f64::from)
        .collect())
}

fn print(r: &Interpolation) {
    println!(
        "moerge interpolate: (1-t)·{} + t·{} ({} space), {} {} records of {}\n",
        r.a,
        r.b,
        r.space,
        r.records,
        r.split,
        r.tasks.join(" and ")
    );
    let mut headers = vec!["t".to_string(), "both tasks".to_string()];
    headers.extend(r.tasks.iter().cloned());
    let rows: Vec<Vec<String>> = r
        .points
        .iter()
        .map(|p| {
            let mut row = vec![format!("{:.2}", p.t), format!("{:.3}", p.loss)];
            row.extend(r.tasks.iter().map(|t| format!("{:.3}", p.task_losses[t])));
            row
        })
        .collect();
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    crate::remote::output::table(&headers, &rows);
    println!(
        "\nper-example best of {} and {}: {:.3}; base model: {:.3}",
        r.a, r.b, r.oracle, r.base
    );
}
