//! What the user typed: the `moerge` command line, parsed by clap. `offline` holds the
//! commands that work on folders directly, `dual` those that run offline with a local model
//! (`--base` / `--library`) and ask the daemon otherwise, `daemon` the daemon-only ones.

mod daemon;
mod dual;
mod offline;

pub use daemon::*;
pub use dual::*;
pub use offline::*;

use clap::{Parser, Subcommand};

/// moerge keeps a library of LoRA experts fine-tuned from one base model and serves fused
/// models built from them.
///
/// Offline commands (inspect, logits, train, plan) work on folders directly. The daemon
/// commands (status, experts, plans, fuse, select) talk to a running `moerged`. score,
/// generate, explain, eval, export, fit and policies do either: offline when given a local
/// model (`--base`, `--library`, `--local`), through the daemon otherwise. New here? Run
/// `moerge demo`.
///
/// Exit codes: 0 ok, 1 failure, 2 usage, 3 daemon unreachable, 4 access denied, 5 no such
/// expert/plan/object, 6 invalid argument, 7 limit exceeded, 8 plugin failed, 130 cancelled.
#[derive(Debug, Parser)]
#[command(name = "moerge", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start a private daemon on the tiny library and compare every built-in policy on a few
    /// tasks: loss, cost and a sample answer each. The place to start.
    Demo(DemoArgs),
    /// Show the daemon: base model, library generation, experts, policies, live models.
    Status(StatusArgs),
    /// List, show, add or remove the daemon's experts (the library's adapters).
    #[command(subcommand)]
    Experts(ExpertsCommand),
    /// List, save or remove the daemon's stored plans (what `fit` makes; use one with
    /// `--saved NAME`).
    Plans(PlansArgs),
    /// Fuse a model in the daemon (from a policy, a plan file or a stored plan), show what
    /// it is, and release it: a check that it fuses.
    Fuse(FuseArgs),
    /// Start a greedy selection of experts on data in the daemon (a job, like `fit`).
    Select(SelectArgs),
    /// Show the daemon's latest greedy selection: the order experts were added in, the loss
    /// curve and the active set (`moerged --eval-data`, or the last `moerge select`).
    Selection(Common),
    /// Show the daemon's latest clustering of its experts (model-based, on their updates).
    Clusters(Common),
    /// Describe a PEFT LoRA adapter folder: rank, alpha, scale, targets, shapes, hash, state.
    Inspect(InspectArgs),
    /// Write the logits of one forward pass over TEXT to a safetensors file (offline).
    Logits(LogitsArgs),
    /// Mean negative log-likelihood per token of COMPLETION after PROMPT.
    Score(ScoreArgs),
    /// Continue PROMPT, streaming the text to stdout (greedy unless --temperature > 0).
    Generate(GenerateArgs),
    /// Train a LoRA adapter on JSONL records and write it as a PEFT adapter folder.
    Train(TrainArgs),
    /// Mean loss per completion token, per task, with the mean over tasks and its standard
    /// error; with --policies all, the paper's table of every policy and baseline (offline).
    Eval(EvalArgs),
    /// Write fusion plans (reviewable JSON recipes) from a library of experts (offline).
    #[command(subcommand)]
    Plan(PlanCommand),
    /// List the fusion policies (the daemon's, or with --local the plugins found here).
    Policies(PoliciesArgs),
    /// Fit a fusion policy: in the daemon as a job (stored as a plan), or offline with
    /// --base/--library (written to --out).
    Fit(FitArgs),
    /// Show which experts a routed plan gives each token of PROMPT, per layer.
    Explain(ExplainArgs),
    /// Draw the figures of a saved `moerge eval --policies ... --json` report as SVG and PNG.
    Plot(PlotArgs),
    /// Evaluate the merges (1-t)·A + t·B of two experts on both tasks' data, with the
    /// per-example best of A and B as reference: the paper's mode-connectivity curve (offline).
    Interpolate(InterpolateArgs),
    /// Export a plan for PEFT: a static merge as one adapter folder, an Arrow plan (offline)
    /// as its adapter list and ArrowConfig values.
    Export(ExportArgs),
}
