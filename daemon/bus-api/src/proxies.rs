//! zbus proxies of the three interfaces. Methods return [`MoergeError`], so a client
//! matches on the error's kind instead of parsing names.

use std::collections::HashMap;

use zbus::{proxy, OwnedObjectPath, OwnedVariant};

use crate::error::MoergeError;
use crate::types::{
    ExpertInfo, Explanation, ModelInfo, PlanInfo, PolicyInfo, ScoreResult, TokenProbability,
};

type Result<T> = std::result::Result<T, MoergeError>;

/// `org.moerge.Daemon1` at `/org/moerge/Daemon1`: the library, fusing, jobs.
#[proxy(
    interface = "org.moerge.Daemon1",
    default_service = "org.moerge.Daemon1",
    default_path = "/org/moerge/Daemon1"
)]
pub trait Daemon1 {
    /// Every expert of the current library generation, ready or not.
    fn list_experts(&self) -> Result<Vec<ExpertInfo>>;
    /// One expert by name (`NoSuchExpert` otherwise).
    fn get_expert(&self, name: &str) -> Result<ExpertInfo>;
    /// Copies the adapter folder at `path` (on the daemon's machine) into the library under
    /// its folder name, atomically, after validating it; returns the expert once indexed.
    /// Own user or root only.
    fn add_expert(&self, path: &str) -> Result<ExpertInfo>;
    /// Removes an expert's folder from the library. Own user or root only.
    fn remove_expert(&self, name: &str) -> Result<()>;
    /// The fusion policies the daemon's policy host offers.
    fn list_policies(&self) -> Result<Vec<PolicyInfo>>;
    /// The stored plans.
    fn list_plans(&self) -> Result<Vec<PlanInfo>>;
    /// The live model objects.
    fn list_models(&self) -> Result<Vec<ModelInfo>>;
    /// Builds the model a plan (JSON, format 1) describes; returns its object path.
    fn fuse_plan(&self, plan_json: &str) -> Result<OwnedObjectPath>;
    /// Runs `policy` (with JSON `params`) over `experts` (all ready experts when empty) and
    /// fuses the plan it makes.
    fn fuse(&self, policy: &str, params: &str, experts: &[&str]) -> Result<OwnedObjectPath>;
    /// Starts fitting `policy` on `data` (a JSONL file, or a folder with `train.jsonl` and
    /// `valid.jsonl`); the plan is stored as `name` (empty: `<policy>-<job id>`). Returns a
    /// job. Own user or root only.
    fn fit(
        &self,
        policy: &str,
        params: &str,
        experts: &[&str],
        data: &str,
        name: &str,
    ) -> Result<OwnedObjectPath>;
    /// Fuses the stored plan `name`.
    fn fuse_saved(&self, name: &str) -> Result<OwnedObjectPath>;
    /// Stores the plan file at the absolute `path` (and its tensor file next to it) as
    /// `name`. Own user or root only.
    fn save_plan(&self, name: &str, path: &str) -> Result<PlanInfo>;
    /// Forgets the stored plan `name`. Own user or root only.
    fn remove_plan(&self, name: &str) -> Result<()>;
    /// The latest greedy selection (JSON: order, curve, active set, evaluated rows), or an
    /// empty string when the daemon has none.
    fn get_selection(&self) -> Result<String>;
    /// The latest clustering of the library (JSON: experts, labels, clusters, similarity),
    /// or an empty string when the daemon has none.
    fn get_clusters(&self) -> Result<String>;
    /// Starts a greedy selection over the JSONL file `data`; returns a job. Own user or root.
    fn select(&self, params: &str, data: &str) -> Result<OwnedObjectPath>;

    /// One library change: expert names added, removed and changed (renames are a removal and
    /// an addition), and the new library generation.
    #[zbus(signal)]
    fn library_changed(
        &self,
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
        generation: u64,
    ) -> zbus::Result<()>;
    /// The active set changed (a selection finished): the experts now selected.
    #[zbus(signal)]
    fn selection_changed(&self, experts: Vec<String>) -> zbus::Result<()>;

    /// `serving`, or `stopping` during shutdown.
    #[zbus(property)]
    fn status(&self) -> zbus::Result<String>;
    /// The base model's folder name.
    #[zbus(property)]
    fn base_model(&self) -> zbus::Result<String>;
    /// The base model's compute precision: `f32` or `bf16`.
    #[zbus(property)]
    fn precision(&self) -> zbus::Result<String>;
    /// The daemon's resident memory in bytes.
    #[zbus(property)]
    fn resident_bytes(&self) -> zbus::Result<u64>;
    /// How many experts the library has (ready or not).
    #[zbus(property)]
    fn expert_count(&self) -> zbus::Result<u32>;
    /// The current library generation.
    #[zbus(property)]
    fn generation(&self) -> zbus::Result<u64>;
    /// The names of the fusion policies on offer.
    #[zbus(property)]
    fn policies(&self) -> zbus::Result<Vec<String>>;
}

/// `org.moerge.Model1` at `/org/moerge/Model/<n>`: a fused model.
#[proxy(
    interface = "org.moerge.Model1",
    default_service = "org.moerge.Daemon1"
)]
pub trait Model1 {
    /// The negative log-likelihood of each token of `completion` after `prompt`.
    fn score(&self, prompt: &str, completion: &str) -> Result<ScoreResult>;
    /// Generates text after `prompt`; see [`crate::GenerateOptions`] for `options`.
    fn generate(&self, prompt: &str, options: HashMap<String, OwnedVariant>) -> Result<String>;
    /// Like `Generate`, but returns a request id at once and sends the text as `Token`
    /// signals (to the caller only), then `Done`.
    fn generate_stream(&self, prompt: &str, options: HashMap<String, OwnedVariant>) -> Result<u64>;
    /// The `k` most likely next tokens after `prompt`, best first.
    fn top_tokens(&self, prompt: &str, k: u32) -> Result<Vec<TokenProbability>>;
    /// Which experts got weight for each prompt token in each routed module.
    fn explain(&self, prompt: &str) -> Result<Explanation>;
    /// Writes a static (merge) plan's model as a PEFT adapter folder `dir`, which must not
    /// exist; returns the new adapter's content hash. Own user or root only.
    fn export_peft(&self, dir: &str) -> Result<String>;
    /// Frees the model (its owner, the daemon's user or root only).
    fn release(&self) -> Result<()>;

    /// A piece of a `GenerateStream` reply's text.
    #[zbus(signal)]
    fn token(&self, request: u64, text: String) -> zbus::Result<()>;
    /// A `GenerateStream` request ended: its whole text, and `error` (empty on success).
    #[zbus(signal)]
    fn done(&self, request: u64, text: String, error: String) -> zbus::Result<()>;

    /// The plan this model was built from (JSON).
    #[zbus(property(emits_changed_signal = "const"))]
    fn plan(&self) -> zbus::Result<String>;
    /// The library generation the model leased.
    #[zbus(property(emits_changed_signal = "const"))]
    fn generation(&self) -> zbus::Result<u64>;
    /// True once an expert the model uses changed or was removed from the library.
    #[zbus(property)]
    fn stale(&self) -> zbus::Result<bool>;
}

/// `org.moerge.Job1` at `/org/moerge/Job/<n>`: a fit or a selection.
#[proxy(interface = "org.moerge.Job1", default_service = "org.moerge.Daemon1")]
pub trait Job1 {
    /// Asks the job to stop; it ends `cancelled` at its next check.
    fn cancel(&self) -> Result<()>;
    /// Forgets a finished job (cancels it first if it still runs).
    fn release(&self) -> Result<()>;

    /// 0 to 1.
    #[zbus(property)]
    fn progress(&self) -> zbus::Result<f64>;
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled` ([`crate::JobState`]).
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    /// What the job is doing, or why it failed.
    #[zbus(property)]
    fn message(&self) -> zbus::Result<String>;
    /// The result (JSON) once succeeded; empty before.
    #[zbus(property)]
    fn result(&self) -> zbus::Result<String>;
    /// `fit` or `select`.
    #[zbus(property(emits_changed_signal = "const"))]
    fn kind(&self) -> zbus::Result<String>;
}
