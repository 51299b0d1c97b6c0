//! `moerge`: the command-line front end. Parsing lives in `args`, each command in `commands`;
//! this file only wires them together and turns errors into an exit code.

mod args;
mod commands;

use std::process::ExitCode;

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
    let result = match cli.command {
        args::Command::Inspect(a) => commands::inspect::run(&a),
        args::Command::Logits(a) => commands::model::logits(&a),
        args::Command::Score(a) => commands::model::score(&a),
        args::Command::Generate(a) => commands::model::generate(&a),
        args::Command::Train(a) => commands::train::train(&a),
        args::Command::Eval(a) => commands::train::eval(&a),
        args::Command::Plan(args::PlanCommand::Merge(a)) => commands::plan::merge(&a),
        args::Command::Plan(args::PlanCommand::Arrow(a)) => commands::plan::arrow(&a),
        args::Command::Plan(args::PlanCommand::Ensemble(a)) => commands::plan::ensemble(&a),
        args::Command::Policies(a) => commands::policies::list(&a),
        args::Command::Fit(a) => commands::policies::fit(&a),
        args::Command::Explain(a) => commands::explain::explain(&a),
        args::Command::Export(a) => commands::plan::export(&a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
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
