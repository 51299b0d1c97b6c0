//! `moerge eval --policies all`: the paper's table, offline. On a library laid out like the
//! tiny library it scores the baselines (base, shared expert, oracle, oracle cluster expert)
//! and every fusion through the real policy plugins (fitting the learned ones on the
//! training split), each as the mean over tasks ± standard error with its cost; runs greedy
//! selection over the library's validation losses; clusters the fused experts' updates; and
//! records a routed model's weights on one text. `--json` prints it all, `--plot DIR` draws
//! the figures, and `moerge plot` draws them again from the JSON.

mod analysis;
pub mod interpolate;
mod library;
mod rows;
mod table;

use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moerge_engine::{BaseModel, Precision, TextTokenizer};
use moerge_policy_host::{standard_folders, PolicyRegistry};
use serde::{Deserialize, Serialize};

use crate::args::{EvalArgs, PlotArgs};
use crate::exit::Cancelled;
use crate::plot::{self, CostPoint, Figures, GreedyCurve, RoutingMap, SimilarityMatrix};
pub use rows::RowResult;

/// Everything the report found; `--json` prints it and `moerge plot` reads it back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub library: String,
    /// The split the table was scored on.
    pub split: String,
    pub tasks: Vec<String>,
    /// Records scored (all tasks together).
    pub records: usize,
    /// The experts the fusions combine: each task's own expert.
    pub fused_experts: Vec<String>,
    pub fit_steps: usize,
    pub rows: Vec<RowResult>,
    /// The paper's orderings, checked on `rows`.
    pub findings: Vec<Finding>,
    pub greedy: Option<GreedyCurve>,
    pub similarity: Option<SimilarityMatrix>,
    pub routing: Option<RoutingMap>,
    pub seconds: f64,
}

/// One of the paper's claims and whether this table agrees.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Finding {
    pub claim: String,
    pub holds: bool,
}

impl Report {
    /// The figures this report can draw.
    pub fn figures(&self) -> Figures {
        Figures {
            tradeoff: self
                .rows
                .iter()
                .filter_map(|r| {
                    Some(CostPoint {
                        label: r.label.clone(),
                        mean_loss: r.mean_loss,
                        standard_error: r.standard_error,
                        passes_per_token: r.passes_per_token,
                        time_vs_one_expert: r.time_vs_one_expert?,
                    })
                })
                .collect(),
            greedy: self.greedy.clone(),
            routing: self.routing.clone(),
            similarity: self.similarity.clone(),
        }
    }
}

pub fn run(args: &EvalArgs) -> Result<ExitCode> {
    let report_args = &args.report;
    let started = Instant::now();
    let dir = crate::demo::tiny_library(report_args.tiny.as_deref())?;
    let specs = rows::chosen(report_args)?;
    let lib = library::read(&dir, report_args)?;
    let registry = PolicyRegistry::discover(&standard_folders(&report_args.policy_dir));
    let base = BaseModel::load_dir(&lib.base_dir, Precision::F32)
        .with_context(|| format!("{}", lib.base_dir.display()))?;
    let tokenizer = TextTokenizer::from_dir(&lib.base_dir)?;

    let cancelled = crate::exit::cancel_on_ctrl_c();
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(specs.len() as u64 + lib.experts.len() as u64 + 1)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:24} {pos}/{len} {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    let check = || -> Result<()> {
        if cancelled.load(Ordering::SeqCst) {
            return Err(anyhow::Error::new(Cancelled("report stopped".into())));
        }
        Ok(())
    };

    let runner = rows::Runner::new(&lib, &base, &tokenizer, &registry, &bar, &cancelled)?;
    let mut results = Vec::with_capacity(specs.len());
    let mut routed = None;
    for spec in &specs {
        check()?;
        let (row, model) = runner.run(spec)?;
        // The routing figure: the SGD router's weights, else Arrow's.
        let wanted = ["sgd-router", "arrow"];
        if let (Some(model), Some(rank)) = (model, wanted.iter().position(|k| *k == spec.key)) {
            if routed.as_ref().is_none_or(|(r, _, _)| rank < *r) {
                routed = Some((rank, row.label.clone(), model));
            }
        }
        results.push(row);
        bar.inc(1);
    }
    relative_times(&mut results);

    let greedy = analysis::greedy_curve(&lib, &base, &tokenizer, |name| {
        bar.set_message(format!("validation losses of {name}"));
        bar.inc(1);
    })?;
    check()?;
    bar.set_message("clustering the experts' updates");
    let similarity = analysis::similarity(&lib);
    bar.inc(1);
    let routing = match (&routed, lib.scored.first()) {
        (Some((_, label, model)), Some(record)) => {
            let text = format!("{}{}", record.prompt, record.completion);
            analysis::routing_map(model, &tokenizer, &text, label)?
        }
        _ => None,
    };
    bar.finish_and_clear();

    let report = Report {
        library: lib.dir.display().to_string(),
        split: report_args.split.file_stem().to_string(),
        tasks: lib.tasks.clone(),
        records: lib.scored.len(),
        fused_experts: lib.fused.iter().map(|a| a.name().to_string()).collect(),
        fit_steps: report_args.steps,
        findings: table::findings(&results),
        rows: results,
        greedy: Some(greedy),
        similarity: Some(similarity),
        routing,
        seconds: started.elapsed().as_secs_f64(),
    };
    if args.json {
        crate::remote::output::json(&report)?;
    } else {
        table::print(&report);
    }
    if let Some(out) = &report_args.plot {
        let written = draw(&report, out)?;
        if !args.json {
            println!("\nwrote {} figures into {}", written.len(), out.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Each row's time per token over the oracle's (one adapter per task), when there is one.
fn relative_times(rows: &mut [RowResult]) {
    let one = rows
        .iter()
        .find(|r| r.key == "oracle")
        .map(|r| r.seconds_per_token);
    for r in rows {
        r.time_vs_one_expert = one.map(|one| r.seconds_per_token / one);
    }
}

fn draw(report: &Report, dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    plot::draw(&report.figures(), dir).with_context(|| format!("--plot {}", dir.display()))
}

/// `moerge plot REPORT.json --out DIR`: draws the figures of a saved `--json` report.
pub fn plot(args: &PlotArgs) -> Result<ExitCode> {
    let text = std::fs::read_to_string(&args.report)
        .with_context(|| format!("{}", args.report.display()))?;
    let report: Report = serde_json::from_str(&text).with_context(|| {
        format!(
            "{}: not a report of `moerge eval --policies ... --json`",
            args.report.display()
        )
    })?;
    let written = draw(&report, &args.out)?;
    for path in &written {
        println!("{}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}
