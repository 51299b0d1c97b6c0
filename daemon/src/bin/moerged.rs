//! `moerged`, the moerge daemon. Thin on purpose: parse the arguments, start tracing, start
//! the service, wait for SIGINT or SIGTERM, shut down cleanly. Everything else is in the
//! `moerge-daemon` library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moerge_daemon::service::{default_state_dir, Service, ServiceConfig};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tracing_subscriber::EnvFilter;

/// Keeps a library of LoRA experts indexed and watched, and serves fused models from it.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The adapter folder: one PEFT LoRA adapter per sub-folder.
    #[arg(long, value_name = "DIR")]
    library: PathBuf,
    /// The base model folder the experts were trained from.
    #[arg(long, value_name = "DIR")]
    base: PathBuf,
    /// Where the index lives [default: $XDG_STATE_HOME/moerge, else ~/.local/state/moerge].
    #[arg(long, value_name = "DIR")]
    state: Option<PathBuf>,
    /// Quiet time before a burst of file events is acted on.
    #[arg(long, value_name = "MS", default_value_t = 200)]
    debounce_ms: u64,
    /// How long a folder that does not load must stay unchanged before it is rejected.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    settle_ms: u64,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not for journald or a log file.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("moerged: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let state = match args.state {
        Some(dir) => dir,
        None => default_state_dir()
            .context("no --state given and neither XDG_STATE_HOME nor HOME is set")?,
    };
    let mut config = ServiceConfig::new(args.library, args.base, state.clone());
    config.debounce = Duration::from_millis(args.debounce_ms);
    config.settle = Duration::from_millis(args.settle_ms);

    // Signal handlers go in before anything is announced: a SIGTERM that arrives once we
    // say "serving" must mean a clean shutdown, not the default instant death.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let signals = {
        let _entered = runtime.enter();
        Signals::install()?
    };
    let service = Service::start(config)?;

    let startup = service.startup();
    if let Some(recovery) = &startup.recovery {
        tracing::warn!(
            reason = %recovery.reason,
            moved_to = %recovery.moved_to.display(),
            lost_plans = ?recovery.lost_plans,
            "the index was damaged and has been rebuilt from the library folder"
        );
    }
    tracing::info!(
        state = %state.display(),
        experts = service.lease().experts().len(),
        generation = startup.generation,
        "serving"
    );

    let signal_name = runtime.block_on(signals.wait());
    tracing::info!(signal = signal_name, "shutting down");
    service.shutdown();
    tracing::info!("stopped");
    Ok(())
}

struct Signals {
    terminate: Signal,
    interrupt: Signal,
}

impl Signals {
    fn install() -> anyhow::Result<Signals> {
        Ok(Signals {
            terminate: signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?,
            interrupt: signal(SignalKind::interrupt()).context("cannot listen for SIGINT")?,
        })
    }

    async fn wait(mut self) -> &'static str {
        tokio::select! {
            _ = self.terminate.recv() => "SIGTERM",
            _ = self.interrupt.recv() => "SIGINT",
        }
    }
}
