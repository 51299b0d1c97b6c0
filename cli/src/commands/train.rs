//! `moerge train` and `moerge eval`: fit a LoRA on JSONL records; report per-task losses.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::Path;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moerge_engine::trainer::{self, Example, StepReport, TrainOptions};
use moerge_engine::{BaseModel, ComputeWorker, FusedModel, LoraSpec, Precision, TextTokenizer};
use moerge_library::records::{self, Record};
use moerge_library::source::{self, HubSettings, ModelKind};
use serde::Serialize;

use crate::args::{EvalArgs, LocalModelArgs, TrainArgs};
use crate::commands::model;

/// Records as token ids, for the trainer and for scoring.
pub(crate) fn tokenize(tokenizer: &TextTokenizer, records: &[Record]) -> Result<Vec<Example>> {
    records
        .iter()
        .map(|r| {
            Ok(Example {
                task: r.task.clone(),
                prompt: tokenizer.encode(&r.prompt)?,
                completion: tokenizer.encode(&r.completion)?,
            })
        })
        .collect()
}

#[derive(Serialize)]
struct TrainReport {
    out: String,
    hash: String,
    examples: usize,
    steps: usize,
    first_loss: f32,
    final_loss: f32,
    seconds: f64,
}

pub fn train(args: &TrainArgs) -> Result<ExitCode> {
    if args.out.exists() {
        bail!(
            "--out {}: already exists; choose a new folder",
            args.out.display()
        );
    }
    let base_dir = source::resolve(&args.base, ModelKind::Base, &HubSettings::from_env())
        .with_context(|| format!("--base {}", args.base))?;
    let mut records = records::read_jsonl(&args.data).context("--data")?;
    if let Some(task) = &args.task {
        records.retain(|r| r.task.as_deref() == Some(task));
        if records.is_empty() {
            bail!(
                "--task {task}: no record of {} has this task",
                args.data.display()
            );
        }
    }
    let tokenizer = TextTokenizer::from_dir(&base_dir)?;
    let data = tokenize(&tokenizer, &records)?;
    let spec = LoraSpec {
        rank: args.r,
        alpha: args.alpha,
        use_rslora: false,
        targets: args.targets.clone(),
        seed: args.seed,
    };
    let opts = TrainOptions {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        seed: args.seed,
        ..Default::default()
    };
    let (out, examples) = (args.out.clone(), data.len());
    let worker = ComputeWorker::spawn(1)?;
    // Steps travel to this thread for the progress bar; training runs on the compute thread.
    let (tx, rx) = mpsc::channel::<StepReport>();
    let started = Instant::now();
    let done = worker.submit(move || {
        let base = BaseModel::load_dir(&base_dir, Precision::F32)?;
        let (model, lora) = base.with_trainable_lora(&spec)?;
        let summary = trainer::train(&model, lora.vars(), &data, &opts, |s| {
            let _ = tx.send(s.clone());
            ControlFlow::Continue(())
        })?;
        let hash = lora.save_peft(&out)?;
        Ok((summary, hash))
    });
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.steps as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps  loss {msg}  {per_sec}  eta {eta}",
        )
        .expect("valid template"),
    );
    for step in rx {
        bar.set_position(step.step as u64);
        bar.set_message(format!("{:.4}", step.loss));
    }
    bar.finish_and_clear();
    let (summary, hash) = done.wait()?;
    let report = TrainReport {
        out: args.out.display().to_string(),
        hash: hash.to_string(),
        examples,
        steps: summary.steps,
        first_loss: summary.first_loss,
        final_loss: summary.final_loss,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "wrote {} ({} steps on {} examples, loss {:.4} -> {:.4}, {:.1} s)",
            report.out,
            report.steps,
            report.examples,
            report.first_loss,
            report.final_loss,
            report.seconds
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Debug, Serialize)]
pub(crate) struct EvalReport {
    pub tasks: BTreeMap<String, TaskLoss>,
    pub mean_over_tasks: f64,
    pub standard_error: f64,
}

#[derive(Debug, Serialize)]
pub(crate) struct TaskLoss {
    pub mean_loss: f64,
    pub examples: usize,
}

pub fn eval(args: &EvalArgs, local: &LocalModelArgs) -> Result<ExitCode> {
    let records = read_eval_records(args.data_file()?)?;
    let model::Loaded {
        model,
        tokenizer,
        worker,
    } = model::load(local)?;
    let data = tokenize(&tokenizer, &records)?;
    let report = run_eval(&worker, model, data)?;
    print_eval(&report, args.json)?;
    Ok(ExitCode::SUCCESS)
}

/// The records of an eval data file, each with a task.
pub(crate) fn read_eval_records(path: &Path) -> Result<Vec<Record>> {
    let records = records::read_jsonl(path).context("--data")?;
    if let Some(i) = records.iter().position(|r| r.task.is_none()) {
        bail!(
            "--data {}: record {} has no \"task\"; per-task reports need one on every record",
            path.display(),
            i + 1
        );
    }
    Ok(records)
}

/// Prints an eval report: a table of per-task losses and the mean over tasks, or JSON.
pub(crate) fn print_eval(report: &EvalReport, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    let width = report
        .tasks
        .keys()
        .map(String::len)
        .max()
        .unwrap_or(4)
        .max(4);
    println!("{:<width$}  {:>9}  {:>8}", "task", "mean loss", "examples");
    for (task, t) in &report.tasks {
        println!("{task:<width$}  {:>9.4}  {:>8}", t.mean_loss, t.examples);
    }
    println!(
        "\nmean over {} tasks: {:.4} ± {:.4} (standard error)",
        report.tasks.len(),
        report.mean_over_tasks,
        report.standard_error
    );
    Ok(())
}

fn run_eval(worker: &ComputeWorker, model: FusedModel, data: Vec<Example>) -> Result<EvalReport> {
    let losses = {
        let data = data.clone();
        worker
            .submit(move || trainer::example_losses(&model, &data, 64))
            .wait()?
    };
    Ok(eval_report(data.iter().zip(losses).map(
        |(example, loss)| (example.task.clone().unwrap_or_default(), f64::from(loss)),
    )))
}

/// Per-task mean losses, and their mean with its standard error, from (task, loss) pairs.
pub(crate) fn eval_report(losses: impl IntoIterator<Item = (String, f64)>) -> EvalReport {
    let mut by_task: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for (task, loss) in losses {
        by_task.entry(task).or_default().push(loss);
    }
    let tasks: BTreeMap<String, TaskLoss> = by_task
        .into_iter()
        .map(|(t, l)| {
            (
                t,
                TaskLoss {
                    mean_loss: l.iter().sum::<f64>() / l.len() as f64,
                    examples: l.len(),
                },
            )
        })
        .collect();
    let means: Vec<f64> = tasks.values().map(|t| t.mean_loss).collect();
    let (mean, se) = mean_and_standard_error(&means);
    EvalReport {
        tasks,
        mean_over_tasks: mean,
        standard_error: se,
    }
}

/// Mean and standard error of the mean (sample standard deviation / sqrt(n)).
pub(crate) fn mean_and_standard_error(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    if values.len() < 2 {
        return (mean, 0.0);
    }
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, (var / n).sqrt())
}

#[cfg(test)]
mod tests {
    use super::mean_and_standard_error;

    #[test]
    fn standard_error_of_the_mean() {
        let (m, se) = mean_and_standard_error(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12);
        // sample sd = sqrt(5/3); se = sd / 2
        assert!((se - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12);
        assert_eq!(mean_and_standard_error(&[3.0]), (3.0, 0.0));
    }
}
