//! `moerged`, the moerge daemon. Thin on purpose: parse the arguments, start tracing, start
//! the service, the serving core and the bus, wait for SIGINT or SIGTERM, shut down cleanly.
//! Everything else is in the `moerge-daemon` library.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use moerge_daemon::bus::{self, BusConfig, BusTarget};
use moerge_daemon::fitting::PluginRunner;
use moerge_daemon::selection::{self, AutoRefresh, EngineRows, GreedySelector};
use moerge_daemon::service::{default_state_dir, Service, ServiceConfig};
use moerge_daemon::serving::{ClientLimits, Serving, ServingConfig};
use moerge_engine::Precision;
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
    /// Serve on the system bus instead of the session bus.
    #[arg(long, conflicts_with_all = ["bus_address", "address"])]
    system: bool,
    /// Serve on the bus daemon at this address instead of the session bus.
    #[arg(long, value_name = "ADDRESS", conflicts_with = "address")]
    bus_address: Option<String>,
    /// Serve a private socket instead of a bus: `unix:path=/run/moerge.sock`. Each client
    /// gets its own peer-to-peer connection.
    #[arg(long, value_name = "unix:path=PATH")]
    address: Option<String>,
    /// Compute threads (scoring, generating, fusing) [default: one per core].
    #[arg(long, value_name = "N")]
    compute_threads: Option<usize>,
    /// The base's compute precision: auto is the checkpoint's own (bf16 for a bf16
    /// checkpoint, else f32).
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    precision: PrecisionArg,
    /// Live models per client.
    #[arg(long, value_name = "N", default_value_t = ClientLimits::default().models)]
    max_models: usize,
    /// Jobs (fits, selections) per client.
    #[arg(long, value_name = "N", default_value_t = ClientLimits::default().jobs)]
    max_jobs: usize,
    /// Calls per client running at once.
    #[arg(long, value_name = "N", default_value_t = ClientLimits::default().concurrent_calls)]
    max_calls: usize,
    /// The largest max_tokens a generation may ask for.
    #[arg(long, value_name = "N", default_value_t = ClientLimits::default().max_tokens)]
    max_tokens: u32,
    /// Also load fusion-policy plugins from this folder (repeatable), after the built-ins
    /// and $XDG_DATA_HOME/moerge/policies.
    #[arg(long, value_name = "DIR")]
    policy_dir: Vec<PathBuf>,
    /// Validation data (JSONL with a task on every record, or a folder's valid.jsonl) on
    /// which greedy selection and clustering are kept current after every library change.
    /// Without it they run only when asked (Select).
    #[arg(long, value_name = "PATH")]
    eval_data: Option<PathBuf>,
    /// The active set's tolerance, relative to the full library's loss.
    #[arg(long, value_name = "FRACTION", default_value_t = selection::DEFAULT_TOLERANCE)]
    select_tolerance: f64,
}

impl Args {
    fn bus_target(&self) -> anyhow::Result<BusTarget> {
        Ok(if let Some(address) = &self.address {
            let path = address.strip_prefix("unix:path=").with_context(|| {
                format!("--address {address}: only unix:path=<socket path> is supported")
            })?;
            BusTarget::Listen(PathBuf::from(path))
        } else if let Some(address) = &self.bus_address {
            BusTarget::Bus(address.clone())
        } else if self.system {
            BusTarget::System
        } else {
            BusTarget::Session
        })
    }
}

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before any thread starts: candle ops single-threaded, parallelism across requests.
    moerge_engine::prefer_data_parallelism();
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
    let target = args.bus_target()?;
    let state = match args.state {
        Some(dir) => dir,
        None => default_state_dir()
            .context("no --state given and neither XDG_STATE_HOME nor HOME is set")?,
    };
    let mut config = ServiceConfig::new(args.library, args.base, state.clone());
    config.debounce = Duration::from_millis(args.debounce_ms);
    config.settle = Duration::from_millis(args.settle_ms);
    let mut serving_config = ServingConfig::new(&config);
    if let Some(n) = args.compute_threads {
        serving_config.compute_threads = n.max(1);
    }
    serving_config.precision = match args.precision {
        PrecisionArg::Auto => None,
        PrecisionArg::F32 => Some(Precision::F32),
        PrecisionArg::Bf16 => Some(Precision::Bf16),
    };
    serving_config.limits = ClientLimits {
        models: args.max_models,
        jobs: args.max_jobs,
        concurrent_calls: args.max_calls,
        max_tokens: args.max_tokens,
    };

    // Signal handlers go in before anything is announced: a SIGTERM that arrives once we
    // say "serving" must mean a clean shutdown, not the default instant death. Method calls
    // run as tasks on this runtime; heavy compute never does (it goes to compute threads).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("moerge-bus")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let signals = {
        let _entered = runtime.enter();
        Signals::install()?
    };
    let service = Arc::new(Service::start(config)?);

    let startup = service.startup();
    if let Some(recovery) = &startup.recovery {
        tracing::warn!(
            reason = %recovery.reason,
            moved_to = %recovery.moved_to.display(),
            lost_plans = ?recovery.lost_plans,
            "the index was damaged and has been rebuilt from the library folder"
        );
    }
    let generation = startup.generation;
    let runner = PluginRunner::discover(&args.policy_dir);
    for p in runner.registry().policies() {
        tracing::info!(policy = p.name(), version = p.version(), path = %p.path().display(), "policy loaded");
    }
    for refusal in runner.registry().refusals() {
        tracing::warn!(path = %refusal.path().display(), reason = %refusal, "policy refused");
    }
    serving_config.policies = Some(Arc::new(runner));
    serving_config.selector = Some(Arc::new(GreedySelector::new(service.index().clone())));
    let serving = Arc::new(Serving::new(service.clone(), serving_config)?);
    let _refresher = match &args.eval_data {
        Some(path) => Some(start_refresher(
            &service,
            &serving,
            path,
            args.select_tolerance,
        )?),
        None => None,
    };
    let bus = runtime
        .block_on(bus::serve(serving.clone(), BusConfig::new(target.clone())))
        .context("cannot serve on D-Bus")?;
    tracing::info!(
        state = %state.display(),
        experts = service.lease().experts().len(),
        generation,
        bus = ?target,
        "serving"
    );

    let signal_name = runtime.block_on(signals.wait());
    tracing::info!(signal = signal_name, "shutting down");
    drop(bus);
    // Ends every task (and with them the connections and what they hold) before the service.
    drop(runtime);
    drop(_refresher);
    drop(serving);
    match Arc::try_unwrap(service) {
        Ok(service) => service.shutdown(),
        Err(service) => drop(service),
    }
    tracing::info!("stopped");
    Ok(())
}

/// Keeps the selection and the clustering current on `path`, publishing each new active set
/// to the bus (`SelectionChanged`).
fn start_refresher(
    service: &Arc<Service>,
    serving: &Arc<Serving>,
    path: &std::path::Path,
    tolerance: f64,
) -> anyhow::Result<AutoRefresh> {
    let data = selection::read_eval_data(path)
        .with_context(|| format!("--eval-data {}", path.display()))?;
    let engine = serving.engine();
    let evaluator = EngineRows::new(engine.base.clone(), &engine.tokenizer, &data)
        .map_err(|e| anyhow::anyhow!("--eval-data {}: {e}", path.display()))?;
    let refresher = AutoRefresh::start(
        service.clone(),
        data,
        Box::new(evaluator),
        tolerance,
        Default::default(),
    )
    .context("cannot start the selection thread")?;
    let mut updates = refresher.subscribe();
    let serving = serving.clone();
    std::thread::Builder::new()
        .name("moerge-selection-publish".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread().build();
            let Ok(runtime) = runtime else { return };
            runtime.block_on(async move {
                while updates.changed().await.is_ok() {
                    let active = updates
                        .borrow_and_update()
                        .as_ref()
                        .and_then(|r| r.active_set().map(<[String]>::to_vec));
                    if let Some(active) = active {
                        serving.set_active_set(active);
                    }
                }
            })
        })
        .context("cannot start the selection thread")?;
    Ok(refresher)
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

/// `--precision`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum PrecisionArg {
    Auto,
    F32,
    Bf16,
}
