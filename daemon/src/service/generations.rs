//! Generations and leases (the mistral.rs pattern). Each library change publishes a new,
//! immutable [`LibraryGeneration`]; a request takes a [`Lease`] on the current one and keeps
//! seeing exactly that library, and the experts it opens through the lease keep exactly the
//! bytes that generation indexed, however the folder changes meanwhile. A generation is freed
//! when the service has moved on and its last lease ends.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock, Weak};

use moerge_library::{AdapterState, ContentHash};

use super::pins::{PinStore, PinnedAdapter};
use crate::index::ExpertRecord;

/// One immutable state of the library.
pub struct LibraryGeneration {
    number: u64,
    experts: BTreeMap<String, ExpertRecord>,
    library: PathBuf,
    pins: Arc<PinStore>,
    opened: Mutex<HashMap<String, Arc<PinnedAdapter>>>,
}

impl std::fmt::Debug for LibraryGeneration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibraryGeneration")
            .field("number", &self.number)
            .field("experts", &self.experts.len())
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    #[error("no expert named {name} in library generation {generation}")]
    Unknown { name: String, generation: u64 },
    #[error("expert {name} is not ready: {state:?}")]
    NotReady { name: String, state: AdapterState },
    /// The folder changed after this generation was made and before the expert was first
    /// opened through it: take a new lease.
    #[error("expert {name} changed since this generation (expected {}, found {})", expected.short(), found.short())]
    Changed {
        name: String,
        expected: ContentHash,
        found: ContentHash,
    },
    #[error("expert {name} no longer loads (it changed since this generation): {message}")]
    Load { name: String, message: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A hold on one library generation. Cheap to clone; the generation lives while any clone
/// does.
#[derive(Debug, Clone)]
pub struct Lease {
    generation: Arc<LibraryGeneration>,
}

impl Lease {
    pub fn generation(&self) -> u64 {
        self.generation.number
    }

    /// Every expert of this generation, ready or not, by name.
    pub fn experts(&self) -> &BTreeMap<String, ExpertRecord> {
        &self.generation.experts
    }

    pub fn expert(&self, name: &str) -> Option<&ExpertRecord> {
        self.generation.experts.get(name)
    }

    /// Loads a ready expert as this generation indexed it. The first open copies its files
    /// aside (see `pins.rs`); later opens, through any lease on a generation where the
    /// expert has the same content, share that copy.
    pub fn open(&self, name: &str) -> Result<Arc<PinnedAdapter>, LeaseError> {
        let g = &self.generation;
        let record = g.experts.get(name).ok_or_else(|| LeaseError::Unknown {
            name: name.to_owned(),
            generation: g.number,
        })?;
        let hash = match (&record.state, record.hash) {
            (AdapterState::Ready, Some(hash)) => hash,
            (state, _) => {
                return Err(LeaseError::NotReady {
                    name: name.to_owned(),
                    state: state.clone(),
                })
            }
        };
        let mut opened = g.opened.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(adapter) = opened.get(name) {
            return Ok(adapter.clone());
        }
        let adapter = g.pins.pin(name, hash, &g.library.join(name))?;
        opened.insert(name.to_owned(), adapter.clone());
        Ok(adapter)
    }
}

/// The current generation and the older ones still leased.
pub(crate) struct Generations {
    current: RwLock<Arc<LibraryGeneration>>,
    all: Mutex<Vec<Weak<LibraryGeneration>>>,
    library: PathBuf,
    pins: Arc<PinStore>,
}

impl Generations {
    pub(crate) fn new(
        library: PathBuf,
        pins: PinStore,
        number: u64,
        experts: BTreeMap<String, ExpertRecord>,
    ) -> Generations {
        let pins = Arc::new(pins);
        let first = Arc::new(LibraryGeneration {
            number,
            experts,
            library: library.clone(),
            pins: pins.clone(),
            opened: Mutex::default(),
        });
        Generations {
            all: Mutex::new(vec![Arc::downgrade(&first)]),
            current: RwLock::new(first),
            library,
            pins,
        }
    }

    pub(crate) fn lease(&self) -> Lease {
        let generation = self
            .current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Lease { generation }
    }

    /// Makes a new generation current. The previous one stays alive only through leases.
    pub(crate) fn publish(&self, number: u64, experts: BTreeMap<String, ExpertRecord>) {
        let next = Arc::new(LibraryGeneration {
            number,
            experts,
            library: self.library.clone(),
            pins: self.pins.clone(),
            opened: Mutex::default(),
        });
        self.all
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Arc::downgrade(&next));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = next;
    }

    /// Numbers of the generations still alive: the current one and those still leased.
    pub(crate) fn live(&self) -> Vec<u64> {
        let mut all = self.all.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|w| w.strong_count() > 0);
        all.iter()
            .filter_map(|w| w.upgrade())
            .map(|g| g.number)
            .collect()
    }
}
