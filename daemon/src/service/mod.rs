//! The service core the bus layer builds on: it owns the state directory (under a lock),
//! the index, the watcher and the events loop; hands out [`Lease`]s on library generations;
//! and publishes a [`LibraryEvent`] per library change on a broadcast channel.
//!
//! ```no_run
//! use moerge_daemon::service::{Service, ServiceConfig};
//! let config = ServiceConfig::new("experts".into(), "models/dev-phi".into(), "/tmp/moerge-state".into());
//! let service = Service::start(config)?;
//! let mut events = service.subscribe();
//! let lease = service.lease(); // this library generation, whatever happens next
//! for (name, expert) in lease.experts() {
//!     println!("{name}: {:?} (generation {})", expert.state, expert.generation);
//! }
//! let change = events.blocking_recv()?; // the next library change
//! println!("library generation {}: {:?}", change.generation, change.changes);
//! service.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod background;
mod change;
mod events;
mod examine;
mod generations;
mod lock;
mod pins;
mod reconcile;
pub mod sketch;

use std::path::PathBuf;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use moerge_library::{BaseError, BaseModelInfo};
use tokio::sync::broadcast;

pub use background::BackgroundWork;
pub use change::{ChangeCause, ExpertChange, LibraryEvent};
pub use generations::{Lease, LeaseError, LibraryGeneration};
pub use lock::default_state_dir;
pub use pins::PinnedAdapter;
pub use reconcile::ReconcileReport;

use crate::index::{Index, IndexError, Recovery};
use crate::watch::{LibraryWatcher, WatchError};
use events::Msg;
use generations::Generations;
use reconcile::LibraryState;

/// Where things are and how patient to be. Build with [`ServiceConfig::new`].
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// The adapter folder: one sub-folder per expert.
    pub library: PathBuf,
    /// The base model folder the experts must fit.
    pub base: PathBuf,
    /// Where the index, pinned copies and the lock file live.
    pub state: PathBuf,
    /// Quiet time the watcher waits for before reporting a burst of file events.
    pub debounce: Duration,
    /// How long a folder that does not load must stay unchanged before it is declared
    /// rejected (until then it may be half-copied, and is left out of the index).
    pub settle: Duration,
    /// Events buffered per subscriber before a slow one starts missing them.
    pub event_capacity: usize,
}

impl ServiceConfig {
    pub fn new(library: PathBuf, base: PathBuf, state: PathBuf) -> ServiceConfig {
        ServiceConfig {
            library,
            base,
            state,
            debounce: Duration::from_millis(200),
            settle: Duration::from_secs(2),
            event_capacity: 1024,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("state directory {} is in use by another moerged{} (lock file {})",
        state.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default(), lock.display())]
    StateInUse {
        state: PathBuf,
        lock: PathBuf,
        pid: Option<u32>,
    },
    #[error("library folder {path}: {message}")]
    Library { path: PathBuf, message: String },
    #[error("base model: {0}")]
    Base(#[from] BaseError),
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error(transparent)]
    Watch(#[from] WatchError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What happened while the service started.
#[derive(Debug, Clone)]
pub struct StartupReport {
    /// Set when the index was damaged and has been rebuilt from the folder.
    pub recovery: Option<Recovery>,
    pub reconcile: ReconcileReport,
    /// The differences between the index as found and the folder.
    pub changes: Vec<ExpertChange>,
    /// The library generation the service started at.
    pub generation: u64,
}

pub(crate) struct Shared {
    generations: Generations,
    events: broadcast::Sender<LibraryEvent>,
}

/// The running service. [`Service::shutdown`] (or dropping it) stops the watcher and the
/// threads and releases the state directory.
pub struct Service {
    shared: Arc<Shared>,
    index: Arc<Index>,
    tx: Sender<Msg>,
    watcher: Option<LibraryWatcher>,
    threads: Vec<JoinHandle<()>>,
    startup: StartupReport,
    _lock: lock::StateLock,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Service {
    pub fn start(config: ServiceConfig) -> Result<Service, ServiceError> {
        Service::start_with(config, Vec::new())
    }

    /// Starts with background hooks, run after every library change.
    pub fn start_with(
        config: ServiceConfig,
        background: Vec<Box<dyn BackgroundWork>>,
    ) -> Result<Service, ServiceError> {
        let io = |path: &PathBuf| {
            let path = path.clone();
            move |source| ServiceError::Io { path, source }
        };
        std::fs::create_dir_all(&config.state).map_err(io(&config.state))?;
        let lock = lock::StateLock::acquire(&config.state)?;
        let library = config
            .library
            .canonicalize()
            .map_err(|e| ServiceError::Library {
                path: config.library.clone(),
                message: e.to_string(),
            })?;
        if !library.is_dir() {
            let message = "not a folder".into();
            return Err(ServiceError::Library {
                path: library,
                message,
            });
        }
        let base = BaseModelInfo::from_dir(&config.base)?;
        let (index, recovery) = Index::open_or_rebuild(&config.state.join("index"))?;
        let index = Arc::new(index);
        let pins_dir = config.state.join("pins");
        let pins = pins::PinStore::open(&pins_dir).map_err(io(&pins_dir))?;

        // Watch before the first reconcile, so a change made meanwhile is seen afterwards.
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = tx.clone();
        let watcher = LibraryWatcher::start(&library, config.debounce, move |batch| {
            let _ = sink.send(Msg::Watch(batch));
        })?;

        let mut state = LibraryState::new(library.clone(), base, config.settle, index.clone())?;
        let (event, reconcile) = state.full(ChangeCause::Startup)?;
        let generation = index.library_generation()?;
        tracing::info!(?reconcile, generation, "library reconciled");
        let startup = StartupReport {
            recovery,
            reconcile,
            changes: event.map(|e| e.changes).unwrap_or_default(),
            generation,
        };
        let shared = Arc::new(Shared {
            generations: Generations::new(library, pins, generation, state.records().clone()),
            events: broadcast::channel(config.event_capacity.max(1)).0,
        });
        let (background_tx, background_thread) =
            background::spawn(background, index.clone()).map_err(io(&config.state))?;
        let loop_shared = shared.clone();
        let events_thread = std::thread::Builder::new()
            .name("moerge-events".into())
            .spawn(move || events::run(state, rx, loop_shared, background_tx))
            .map_err(io(&config.state))?;
        Ok(Service {
            shared,
            index,
            tx,
            watcher: Some(watcher),
            threads: vec![events_thread, background_thread],
            startup,
            _lock: lock,
        })
    }

    /// Change events from now on, one per library change.
    pub fn subscribe(&self) -> broadcast::Receiver<LibraryEvent> {
        self.shared.events.subscribe()
    }

    /// A lease on the current library generation.
    pub fn lease(&self) -> Lease {
        self.shared.generations.lease()
    }

    /// The generations still alive: the current one and any older one still leased.
    pub fn live_generations(&self) -> Vec<u64> {
        self.shared.generations.live()
    }

    /// The index, for plans, clusterings, evaluation rows and selections.
    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    pub fn startup(&self) -> &StartupReport {
        &self.startup
    }

    /// Asks for a full reconcile of the folder (as after a watcher overflow).
    pub fn rescan(&self) {
        let _ = self.tx.send(Msg::Rescan);
    }

    /// Stops watching, finishes the change in progress, and waits for the threads.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(watcher) = self.watcher.take() {
            watcher.stop();
        }
        let _ = self.tx.send(Msg::Shutdown);
        // The events thread ends first; its end drops the background sender, ending that one.
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop();
    }
}
