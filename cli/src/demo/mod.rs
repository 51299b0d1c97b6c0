//! `moerge demo`: starts a private `moerged` on the tiny library, and on a few tasks fuses a
//! model with every built-in policy (fitting the learned ones briefly), generates a sample
//! answer with each, scores the tasks' test records, and prints a table with the base model
//! and the task's own expert (the oracle) as references. The daemon stops when the demo
//! ends, also on error or Ctrl-C.

mod daemon;
mod measure;
mod setup;

pub use daemon::tiny_library;

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moerge_sdk::plan::ModulePlan;
use serde::Serialize;

use crate::args::{ConnectArgs, DemoArgs};
use crate::commands::train::{eval_report, mean_and_standard_error};
use crate::exit::{Cancelled, DaemonError};
use crate::remote::connect::{connect, Session};
use crate::remote::model::Source;
use crate::remote::{self, jobs};
use measure::{FitInfo, Row, Scored};

/// The policies fused directly, with their parameters and a label.
const FUSED: [(&str, &str, &str); 3] = [
    (
        "uniform-merge",
        r#"{"space":"lowrank"}"#,
        "uniform-merge (lowrank)",
    ),
    ("arrow", r#"{"top_k":2}"#, "arrow (top-2)"),
    ("ensemble", "{}", "ensemble (uniform)"),
];
/// The policies that need a fit first.
const FITTED: [&str; 3] = ["learned-merge", "sgd-router", "hierarchical"];

#[derive(Serialize)]
struct Report {
    tasks: Vec<String>,
    records_per_task: usize,
    sample_prompt: String,
    sample_expected: String,
    rows: Vec<Row>,
    seconds: f64,
}

pub fn run(args: &DemoArgs) -> Result<ExitCode> {
    let started = Instant::now();
    let tiny = daemon::tiny_library(args.tiny.as_deref())?;
    let tasks = setup::pick_tasks(&tiny, args.tasks)?;
    let tmp = tempfile::Builder::new()
        .prefix("moerge-demo-")
        .tempdir()
        .context("cannot make a temporary folder")?;
    let (library, data) = (tmp.path().join("library"), tmp.path().join("data"));
    let setup = setup::prepare(&tiny, tasks, args.records, &library, &data)?;
    let moerged = daemon::moerged_path(args.moerged.as_deref());
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new((2 + FUSED.len() + FITTED.len()) as u64)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:24} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar.set_message("starting moerged");
    let private = daemon::PrivateDaemon::start(&moerged, &library, &tiny.join("base"), tmp.path())?;
    let connect_args = ConnectArgs {
        address: Some(format!("unix:path={}", private.socket.display())),
        ..ConnectArgs::default()
    };
    let outcome = remote::block_on(async {
        tokio::select! {
            r = demo(&connect_args, &setup, &data, args, &bar) => r,
            _ = tokio::signal::ctrl_c() => Err(anyhow::Error::new(Cancelled("demo stopped".into()))),
        }
    });
    bar.finish_and_clear();
    let rows = match outcome {
        Ok(rows) => rows,
        Err(e) if e.is::<Cancelled>() => return Err(e),
        Err(e) => {
            eprintln!("moerged's log ends:\n{}\n", private.log_tail());
            return Err(e);
        }
    };
    drop(private);
    let first = &setup.test[0];
    let report = Report {
        tasks: setup.tasks.clone(),
        records_per_task: args.records,
        sample_prompt: first.prompt.clone(),
        sample_expected: first.completion.trim_end().to_string(),
        rows,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        remote::output::json(&report)?;
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

/// Every row, in table order: the references, the fused policies, the fitted ones.
async fn demo(
    connect_args: &ConnectArgs,
    setup: &setup::Setup,
    data: &std::path::Path,
    args: &DemoArgs,
    bar: &ProgressBar,
) -> Result<Vec<Row>> {
    // The socket file appears as the daemon binds it; give it a moment to listen.
    let mut tries = 0;
    let session = loop {
        match connect(connect_args).await {
            Ok(session) => break session,
            Err(_) if tries < 20 => tries += 1,
            Err(e) => return Err(e),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let listed = session
        .daemon
        .list_experts()
        .await
        .map_err(DaemonError::from)?;
    let experts: Vec<(String, String)> = setup
        .tasks
        .iter()
        .map(|t| {
            listed
                .iter()
                .find(|e| &e.name == t && e.state == "ready")
                .map(|e| (e.name.clone(), e.hash.clone()))
                .with_context(|| format!("the daemon did not index expert {t}"))
        })
        .collect::<Result<_>>()?;
    let names: Vec<String> = setup.tasks.clone();
    let sample = setup.test[0].prompt.as_str();
    let mut rows: Vec<(String, Scored, Option<FitInfo>)> = Vec::new();

    bar.set_message("base model");
    let base = measure::plan_json(&experts, ModulePlan::None);
    rows.push((
        "base model".into(),
        measure::run(&session, &base, &setup.test, Some(sample)).await?,
        None,
    ));
    bar.inc(1);

    bar.set_message("one expert per task (oracle)");
    let mut oracle = Scored::default();
    for expert in &experts {
        let records: Vec<_> = setup
            .test
            .iter()
            .filter(|r| r.task.as_deref() == Some(expert.0.as_str()))
            .cloned()
            .collect();
        let prompt = records
            .first()
            .map(|r| r.prompt.as_str())
            .filter(|p| *p == sample);
        oracle.add(measure::run(&session, &measure::single(expert), &records, prompt).await?);
    }
    rows.push(("one expert (oracle)".into(), oracle, None));
    bar.inc(1);

    for (policy, params, label) in FUSED {
        bar.set_message(format!("fusing with {label}"));
        let source = Source::Policy {
            policy: policy.into(),
            params_json: params.into(),
            experts: names.clone(),
        };
        rows.push((
            label.into(),
            measure::run(&session, &source, &setup.test, Some(sample)).await?,
            None,
        ));
        bar.inc(1);
    }

    let data = remote::absolute(data, "data")?;
    let params = serde_json::json!({ "steps": args.fit_steps }).to_string();
    for policy in FITTED {
        let (source, info) = fit(&session, policy, &params, &names, &data, bar).await?;
        bar.set_message(format!("scoring {policy}"));
        let label = format!("{policy} (fitted)");
        rows.push((
            label,
            measure::run(&session, &source, &setup.test, Some(sample)).await?,
            Some(info),
        ));
        bar.inc(1);
    }
    Ok(finish_rows(rows))
}

/// Fits `policy` in the daemon, returning the stored plan to fuse.
async fn fit(
    session: &Session,
    policy: &str,
    params: &str,
    experts: &[String],
    data: &str,
    bar: &ProgressBar,
) -> Result<(Source, FitInfo)> {
    bar.set_message(format!("fitting {policy}"));
    let started = Instant::now();
    let name = format!("demo-{policy}");
    let experts: Vec<&str> = experts.iter().map(String::as_str).collect();
    let path = session
        .daemon
        .fit(policy, params, &experts, data, &name)
        .await
        .map_err(DaemonError::from)
        .with_context(|| format!("fitting {policy}"))?;
    let report = |progress: f64, message: &str| {
        bar.set_message(format!(
            "fitting {policy} {:>3.0}% {message}",
            progress * 100.0
        ));
    };
    let finished = jobs::follow(session, path, "fit", &report, false).await?;
    let result: serde_json::Value = serde_json::from_str(&finished.result)
        .with_context(|| format!("fitting {policy}: the result is not JSON"))?;
    let plan_name = result["plan_name"].as_str().unwrap_or(&name).to_string();
    let info = FitInfo {
        plan_name: plan_name.clone(),
        valid_loss: result["valid_loss"].as_f64(),
        seconds: started.elapsed().as_secs_f64(),
    };
    Ok((Source::Saved(plan_name), info))
}

/// Per-row means and standard errors, and times relative to the oracle row (the second).
fn finish_rows(rows: Vec<(String, Scored, Option<FitInfo>)>) -> Vec<Row> {
    let per_token = |s: &Scored| s.seconds / s.tokens.max(1) as f64;
    let oracle = rows.get(1).map(|r| per_token(&r.1)).unwrap_or(f64::NAN);
    rows.into_iter()
        .map(|(policy, scored, fit)| {
            let report = eval_report(scored.losses.iter().cloned());
            let task_losses: Vec<(String, f64)> = report
                .tasks
                .iter()
                .map(|(t, l)| (t.clone(), l.mean_loss))
                .collect();
            let means: Vec<f64> = task_losses.iter().map(|t| t.1).collect();
            let (mean_loss, standard_error) = mean_and_standard_error(&means);
            Row {
                policy,
                mean_loss,
                standard_error,
                task_losses,
                passes_per_token: scored.passes_per_token.max(1),
                seconds_per_token: per_token(&scored),
                time_vs_one_expert: per_token(&scored) / oracle,
                sample: scored.sample.unwrap_or_default(),
                fit,
            }
        })
        .collect()
}

fn print_table(report: &Report) {
    println!(
        "moerge demo: {} tasks ({}), {} test records each, on a private moerged\n",
        report.tasks.len(),
        report.tasks.join(", "),
        report.records_per_task
    );
    let rows: Vec<Vec<String>> = report
        .rows
        .iter()
        .map(|r| {
            vec![
                r.policy.clone(),
                format!("{:.3} ± {:.3}", r.mean_loss, r.standard_error),
                r.passes_per_token.to_string(),
                format!("{:.2}×", r.time_vs_one_expert),
                format!("{:?}", r.sample),
            ]
        })
        .collect();
    remote::output::table(
        &[
            "policy",
            "test loss (nats/token)",
            "passes/token",
            "time/token vs one expert",
            "answer",
        ],
        &rows,
    );
    println!(
        "\nsample prompt {:?} (expected {:?}); loss is the mean over tasks ± its standard error.",
        report.sample_prompt, report.sample_expected
    );
    println!(
        "The oracle is each task's own expert, known only in hindsight: the bound to approach. \
         Took {:.0} s.\nNext: `moerged --library DIR --base DIR`, then `moerge status`.",
        report.seconds
    );
}
