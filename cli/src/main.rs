//! `moerge`: the command-line front end. Parsing lives in `args`, the offline commands in
//! `commands`, the daemon front end in `remote`, the demo in `demo`; this file only wires
//! them together and turns errors into a message and an exit code (see `exit`).

mod args;
mod commands;
mod demo;
mod exit;
mod plot;
mod remote;
mod report;

use std::process::ExitCode;

use anyhow::Result;
use args::{Command, PoliciesCommand};
use clap::Parser;

// glibc's allocator hands large tensor buffers back to the kernel between ops; the page
// faults that follow cost about a fifth of a small model's forward pass.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before any thread exists: it sets environment variables.
    moerge_engine::prefer_data_parallelism();
    let cli = args::Cli::parse();
    init_tracing(cli.verbose);
    match dispatch(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("moerge: {err:#}");
            ExitCode::from(exit::code(&err))
        }
    }
}

fn dispatch(command: Command) -> Result<ExitCode> {
    use commands::*;
    match command {
        Command::Demo(a) => demo::run(&a),
        Command::Status(a) => remote::run(remote::library::status(&a)),
        Command::Experts(c) => remote::run(remote::library::experts(&c)),
        Command::Plans(a) => remote::run(remote::library::plans(&a)),
        Command::Fuse(a) => remote::run(remote::use_model::fuse_check(&a)),
        Command::Select(a) => remote::run(remote::jobs::select(&a)),
        Command::Selection(a) => remote::run(remote::library::selection(&a)),
        Command::Clusters(a) => remote::run(remote::library::clusters(&a)),
        Command::Inspect(a) => inspect::run(&a),
        Command::Logits(a) => model::logits(&a),
        Command::Score(a) => match a.model.local() {
            Some(local) => model::score(&a, &local),
            None => remote::run(remote::use_model::score(&a)),
        },
        Command::Generate(a) => match a.model.local() {
            Some(local) => model::generate(&a, &local),
            None => remote::run(remote::use_model::generate(&a)),
        },
        Command::Explain(a) => match a.model.local() {
            Some(local) => explain::explain(&a, &local),
            None => remote::run(remote::use_model::explain(&a)),
        },
        Command::Eval(a) if a.report.policies.is_some() => report::run(&a),
        Command::Plot(a) => report::plot(&a),
        Command::Interpolate(a) => report::interpolate::run(&a),
        Command::Eval(a) => match a.model.local() {
            Some(local) => train::eval(&a, &local),
            None => remote::run(remote::use_model::eval(&a)),
        },
        Command::Export(a) => match &a.library {
            Some(_) => plan::export(&a),
            None => remote::run(remote::use_model::export(&a)),
        },
        Command::Fit(a) => match (&a.base, &a.library) {
            (None, None) => remote::run(remote::jobs::fit(&a)),
            _ => policies::fit(&a),
        },
        Command::Policies(a) if a.local || !a.policy_dir.is_empty() => policies::list(&a),
        Command::Policies(a) => {
            let only = a
                .command
                .as_ref()
                .map(|PoliciesCommand::Show { name }| name.as_str());
            remote::run(remote::library::policies(&a.connect, only, a.json))
        }
        Command::Train(a) => train::train(&a),
        Command::Plan(args::PlanCommand::Merge(a)) => plan::merge(&a),
        Command::Plan(args::PlanCommand::Arrow(a)) => plan::arrow(&a),
        Command::Plan(args::PlanCommand::Ensemble(a)) => plan::ensemble(&a),
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
