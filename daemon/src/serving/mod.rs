//! Serving: what the bus layer calls, with no D-Bus types. It owns the compute threads and
//! the loaded base model, the live models and jobs (each owned by a client), the rights
//! check and the per-client limits, and it builds models from plans through leases on the
//! [`Service`]'s library generations.
//!
//! ```no_run
//! use std::sync::Arc;
//! use moerge_daemon::service::{Service, ServiceConfig};
//! use moerge_daemon::serving::{Caller, Serving, ServingConfig};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let config = ServiceConfig::new("experts".into(), "base".into(), "/tmp/state".into());
//! let service = Arc::new(Service::start(config.clone())?);
//! let serving = Serving::new(service, ServingConfig::new(&config))?;
//! let me = Caller { client: "local".into(), uid: Some(0) };
//! let model = serving.fuse_plan(&me, &std::fs::read_to_string("plan.json")?).await?;
//! let score = serving.score(&me, &model, "abc>", "ABC\n").await?;
//! println!("{:?}", score.nll);
//! # Ok(()) }
//! ```

mod admin;
mod compute;
mod error;
mod fuse;
pub mod hooks;
mod jobs;
mod model;
pub mod rights;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::broadcast;

pub use error::ServeError;
pub use hooks::{
    Engine, FitOutcome, FitRequest, HookError, PolicyDescription, PolicyRunner, SelectOutcome,
    SelectRequest, Selector,
};
pub use jobs::{Job, JobKind, JobPhase, JobReporter, JobStatus};
pub use model::{GenerateRequest, LoadedModel, ModuleRouting, RoutingExplanation, ScoreOutput};
pub use rights::{Caller, ClientLimits, Privileged};

use crate::index::{ExpertRecord, PlanRecord};
use crate::service::{Lease, LibraryEvent, Service, ServiceConfig};
use compute::Compute;
use rights::CallCounter;

/// How to serve. Build with [`ServingConfig::new`].
#[derive(Clone)]
pub struct ServingConfig {
    /// The adapter folder (as given to the service).
    pub library: PathBuf,
    /// The base model folder (as given to the service).
    pub base: PathBuf,
    /// Compute threads (fusing, scoring, generating run there, one request per thread).
    pub compute_threads: usize,
    /// The base's compute precision; `None`: the checkpoint's own.
    pub precision: Option<moerge_engine::Precision>,
    pub limits: ClientLimits,
    /// The policy plugin host; `None`: `Fuse` and `Fit` are not supported.
    pub policies: Option<Arc<dyn PolicyRunner>>,
    /// Greedy selection; `None`: `Select` is not supported.
    pub selector: Option<Arc<dyn Selector>>,
    /// How long `AddExpert` and `RemoveExpert` wait for the index to show their change.
    pub index_wait: Duration,
}

impl ServingConfig {
    pub fn new(service: &ServiceConfig) -> ServingConfig {
        ServingConfig {
            library: service.library.clone(),
            base: service.base.clone(),
            compute_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            precision: None,
            limits: ClientLimits::default(),
            policies: None,
            selector: None,
            index_wait: Duration::from_secs(30),
        }
    }
}

/// The serving core. Share it as `Arc<Serving>`.
pub struct Serving {
    service: Arc<Service>,
    compute: Compute,
    config: ServingConfig,
    models: Mutex<BTreeMap<u64, Arc<LoadedModel>>>,
    jobs: Mutex<BTreeMap<u64, Arc<Job>>>,
    calls: CallCounter,
    next_id: AtomicU64,
    daemon_uid: u32,
    /// The active set of the latest selection (see [`Serving::set_active_set`]).
    active_set: tokio::sync::watch::Sender<Option<Vec<String>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Serving {
    /// Loads the base model and starts the compute threads.
    pub fn new(service: Arc<Service>, mut config: ServingConfig) -> Result<Serving, ServeError> {
        config.library = config.library.canonicalize().map_err(|e| {
            ServeError::Internal(format!("library {}: {e}", config.library.display()))
        })?;
        let compute = Compute::load(&config.base, config.compute_threads, config.precision)?;
        Ok(Serving {
            service,
            compute,
            config,
            models: Mutex::default(),
            jobs: Mutex::default(),
            calls: CallCounter::default(),
            next_id: AtomicU64::new(1),
            daemon_uid: rustix::process::getuid().as_raw(),
            active_set: tokio::sync::watch::channel(None).0,
        })
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    /// The uid the daemon runs as (with root, the privileged callers).
    pub fn daemon_uid(&self) -> u32 {
        self.daemon_uid
    }

    pub fn limits(&self) -> &ClientLimits {
        &self.config.limits
    }

    /// The base model's folder name.
    pub fn base_name(&self) -> String {
        self.compute.base.info().name().to_string()
    }

    /// The base model's compute precision: `f32` or `bf16`.
    pub fn base_precision(&self) -> &'static str {
        self.compute.base.precision().name()
    }

    /// The daemon's resident memory in bytes (`VmRSS` of `/proc/self/status`; 0 where the
    /// kernel does not say).
    pub fn resident_bytes(&self) -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    /// The loaded base model and tokenizer, for the hooks.
    pub fn engine(&self) -> hooks::Engine {
        hooks::Engine {
            base: self.compute.base.clone(),
            tokenizer: self.compute.tokenizer.clone(),
        }
    }

    pub fn lease(&self) -> Lease {
        self.service.lease()
    }

    pub fn subscribe(&self) -> broadcast::Receiver<LibraryEvent> {
        self.service.subscribe()
    }

    /// Every expert of the current generation, with the generation.
    pub fn experts(&self) -> (u64, Vec<ExpertRecord>) {
        let lease = self.lease();
        (
            lease.generation(),
            lease.experts().values().cloned().collect(),
        )
    }

    pub fn expert(&self, name: &str) -> Result<(u64, ExpertRecord), ServeError> {
        let lease = self.lease();
        match lease.expert(name) {
            Some(record) => Ok((lease.generation(), record.clone())),
            None => Err(ServeError::NoSuchExpert(format!(
                "name: no expert named {name:?} in library generation {}",
                lease.generation()
            ))),
        }
    }

    pub fn policies(&self) -> Vec<PolicyDescription> {
        self.config
            .policies
            .as_ref()
            .map(|p| p.policies())
            .unwrap_or_default()
    }

    /// Publishes a new active set (from the selection refresher); a set equal to the last
    /// one is not a change.
    pub fn set_active_set(&self, active: Vec<String>) {
        self.active_set.send_if_modified(|current| {
            let changed = current.as_ref() != Some(&active);
            *current = Some(active);
            changed
        });
    }

    /// Every change of the active set (what the bus turns into `SelectionChanged`).
    pub fn watch_active_set(&self) -> tokio::sync::watch::Receiver<Option<Vec<String>>> {
        self.active_set.subscribe()
    }

    /// The stored selection, with experts named as in the current library, as JSON; empty
    /// when there is none.
    pub fn selection_json(&self) -> String {
        let lease = self.lease();
        let name_of = names_by_hash(&lease);
        let Ok(selections) = self.service.index().selections() else {
            return String::new();
        };
        let Some(s) = selections
            .into_iter()
            .find(|s| s.name == crate::selection::ACTIVE_SELECTION)
        else {
            return String::new();
        };
        let order: Vec<String> = s.order.iter().map(&name_of).collect();
        serde_json::json!({
            "order": order,
            "curve": s.curve,
            "active": s.active,
            "active_set": order[..s.active.min(order.len())],
            "stale": s.stale,
        })
        .to_string()
    }

    /// The stored clustering, with experts named as in the current library, as JSON; empty
    /// when there is none.
    pub fn clusters_json(&self) -> String {
        let lease = self.lease();
        let name_of = names_by_hash(&lease);
        let Ok(clusterings) = self.service.index().clusters() else {
            return String::new();
        };
        let Some(c) = clusterings
            .into_iter()
            .find(|c| c.name == crate::clustering::CLUSTERING)
        else {
            return String::new();
        };
        let clusters: Vec<Vec<String>> = c
            .clusters
            .iter()
            .map(|members| members.iter().map(&name_of).collect())
            .collect();
        serde_json::json!({"clusters": clusters, "stale": c.stale}).to_string()
    }

    pub fn plans(&self) -> Result<Vec<PlanRecord>, ServeError> {
        self.service
            .index()
            .plans()
            .map_err(|e| ServeError::Internal(e.to_string()))
    }

    pub fn model(&self, id: u64) -> Result<Arc<LoadedModel>, ServeError> {
        lock(&self.models).get(&id).cloned().ok_or_else(|| {
            ServeError::NoSuchObject(format!("model {id} does not exist (any more)"))
        })
    }

    pub fn models(&self) -> Vec<Arc<LoadedModel>> {
        lock(&self.models).values().cloned().collect()
    }

    pub fn job(&self, id: u64) -> Result<Arc<Job>, ServeError> {
        lock(&self.jobs)
            .get(&id)
            .cloned()
            .ok_or_else(|| ServeError::NoSuchObject(format!("job {id} does not exist (any more)")))
    }

    /// Frees a model: its owner, the daemon's user and root may.
    pub fn release_model(&self, caller: &Caller, id: u64) -> Result<(), ServeError> {
        let mut models = lock(&self.models);
        let model = models.get(&id).ok_or_else(|| {
            ServeError::NoSuchObject(format!("model {id} does not exist (any more)"))
        })?;
        if model.owner != caller.client && !rights::may(caller.uid, self.daemon_uid) {
            return Err(ServeError::AccessDenied(format!(
                "Release: model {id} belongs to another client"
            )));
        }
        models.remove(&id);
        Ok(())
    }

    /// Forgets a job (cancelling it if it still runs): its owner, the daemon's user and root.
    pub fn release_job(&self, caller: &Caller, id: u64) -> Result<(), ServeError> {
        let mut jobs = lock(&self.jobs);
        let job = jobs.get(&id).ok_or_else(|| {
            ServeError::NoSuchObject(format!("job {id} does not exist (any more)"))
        })?;
        if job.owner != caller.client && !rights::may(caller.uid, self.daemon_uid) {
            return Err(ServeError::AccessDenied(format!(
                "Release: job {id} belongs to another client"
            )));
        }
        job.cancel();
        jobs.remove(&id);
        Ok(())
    }

    /// Cancels a job: its owner, the daemon's user and root may.
    pub fn cancel_job(&self, caller: &Caller, id: u64) -> Result<(), ServeError> {
        let job = self.job(id)?;
        if job.owner != caller.client && !rights::may(caller.uid, self.daemon_uid) {
            return Err(ServeError::AccessDenied(format!(
                "Cancel: job {id} belongs to another client"
            )));
        }
        job.cancel();
        Ok(())
    }

    /// A client left: frees its models and cancels and forgets its jobs. Returns their ids.
    pub fn release_client(&self, client: &str) -> (Vec<u64>, Vec<u64>) {
        let mut models = lock(&self.models);
        let model_ids: Vec<u64> = models
            .values()
            .filter(|m| m.owner == client)
            .map(|m| m.id)
            .collect();
        for id in &model_ids {
            models.remove(id);
        }
        drop(models);
        let mut jobs = lock(&self.jobs);
        let job_ids: Vec<u64> = jobs
            .values()
            .filter(|j| j.owner == client)
            .map(|j| j.id)
            .collect();
        for id in &job_ids {
            if let Some(job) = jobs.remove(id) {
                job.cancel();
            }
        }
        (model_ids, job_ids)
    }

    /// Marks the models `event` makes stale; returns those it just made stale.
    pub fn note_library_event(&self, event: &LibraryEvent) -> Vec<Arc<LoadedModel>> {
        self.models()
            .into_iter()
            .filter(|m| m.note_library_event(event))
            .collect()
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    fn count_owned_models(&self, client: &str) -> usize {
        lock(&self.models)
            .values()
            .filter(|m| m.owner == client)
            .count()
    }

    fn check_model_limit(&self, caller: &Caller) -> Result<(), ServeError> {
        let limit = self.config.limits.models;
        if self.count_owned_models(&caller.client) >= limit {
            return Err(ServeError::LimitExceeded {
                limit: "models",
                value: limit as u64,
                message: format!(
                    "{} already has {limit} live models; release one first",
                    caller.client
                ),
            });
        }
        Ok(())
    }

    fn insert_job(&self, caller: &Caller, kind: JobKind) -> Result<Arc<Job>, ServeError> {
        let mut jobs = lock(&self.jobs);
        let limit = self.config.limits.jobs;
        if jobs.values().filter(|j| j.owner == caller.client).count() >= limit {
            return Err(ServeError::LimitExceeded {
                limit: "jobs",
                value: limit as u64,
                message: format!(
                    "{} already has {limit} jobs; release one first",
                    caller.client
                ),
            });
        }
        let job = Job::new(self.next_id(), caller.client.clone(), kind);
        jobs.insert(job.id, job.clone());
        Ok(job)
    }
}

/// Names experts by content hash as the lease knows them (the hash's short form otherwise:
/// an expert no longer in the library).
fn names_by_hash(lease: &Lease) -> impl Fn(&moerge_library::ContentHash) -> String {
    let names: BTreeMap<moerge_library::ContentHash, String> = lease
        .experts()
        .iter()
        .filter_map(|(name, r)| r.hash.map(|h| (h, name.clone())))
        .collect();
    move |h| names.get(h).cloned().unwrap_or_else(|| h.short())
}
