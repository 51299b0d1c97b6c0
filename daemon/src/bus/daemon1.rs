//! `org.moerge.Daemon1` at `/org/moerge/Daemon1`: the library, fusing, jobs, and the
//! library signals.

use std::sync::Arc;

use moerge_bus::{ExpertInfo, ModelInfo, MoergeError, PlanInfo, PolicyInfo};
use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::{interface, Connection, OwnedObjectPath};

use super::caller::identify;
use super::convert::{self, error};
use super::{job1, model1, BusState};
use crate::serving::Caller;

/// The daemon object. One per connection: the bus's, or each peer's.
pub struct Daemon1 {
    state: Arc<BusState>,
    /// The client id of a peer-to-peer connection.
    p2p: Option<String>,
}

impl Daemon1 {
    pub(crate) fn new(state: Arc<BusState>, p2p: Option<String>) -> Daemon1 {
        Daemon1 { state, p2p }
    }

    async fn caller(&self, header: &Header<'_>, conn: &Connection) -> Result<Caller> {
        identify(&self.state, header, conn, &self.p2p).await
    }
}

type Result<T> = std::result::Result<T, MoergeError>;

#[interface(name = "org.moerge.Daemon1")]
impl Daemon1 {
    /// Every expert of the current library generation, ready or not.
    #[zbus(out_args("experts"))]
    async fn list_experts(&self) -> Vec<ExpertInfo> {
        let (generation, experts) = self.state.serving.experts();
        experts
            .into_iter()
            .map(|r| convert::expert(generation, r))
            .collect()
    }

    /// One expert by name.
    #[zbus(out_args("expert"))]
    async fn get_expert(&self, name: &str) -> Result<ExpertInfo> {
        let (generation, record) = self.state.serving.expert(name).map_err(error)?;
        Ok(convert::expert(generation, record))
    }

    /// Copies the adapter folder at the absolute path `path` into the library, atomically,
    /// after validating it; returns the expert once indexed. The daemon's user and root only.
    #[zbus(out_args("expert"))]
    async fn add_expert(
        &self,
        path: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<ExpertInfo> {
        let caller = self.caller(&header, conn).await?;
        let (generation, record) = self
            .state
            .serving
            .add_expert(&caller, path)
            .await
            .map_err(error)?;
        Ok(convert::expert(generation, record))
    }

    /// Removes an expert's folder from the library. The daemon's user and root only.
    async fn remove_expert(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        let caller = self.caller(&header, conn).await?;
        self.state
            .serving
            .remove_expert(&caller, name)
            .await
            .map_err(error)
    }

    /// The fusion policies on offer.
    #[zbus(out_args("policies"))]
    async fn list_policies(&self) -> Vec<PolicyInfo> {
        self.state
            .serving
            .policies()
            .into_iter()
            .map(convert::policy)
            .collect()
    }

    /// The stored plans.
    #[zbus(out_args("plans"))]
    async fn list_plans(&self) -> Result<Vec<PlanInfo>> {
        let plans = self.state.serving.plans().map_err(error)?;
        Ok(plans.into_iter().map(convert::plan).collect())
    }

    /// The live model objects.
    #[zbus(out_args("models"))]
    async fn list_models(&self) -> Vec<ModelInfo> {
        self.state
            .serving
            .models()
            .iter()
            .map(|m| model1::info(m))
            .collect()
    }

    /// Builds the model a plan (JSON, format 1) describes from the current library
    /// generation; returns its object path.
    #[zbus(out_args("model"))]
    async fn fuse_plan(
        &self,
        plan_json: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        let caller = self.caller(&header, conn).await?;
        let model = self
            .state
            .serving
            .fuse_plan(&caller, plan_json)
            .await
            .map_err(error)?;
        model1::publish(&self.state, conn, &caller, model, self.p2p.clone()).await
    }

    /// Runs `policy` with JSON `params` over `experts` (all ready ones when empty) and fuses
    /// the plan it makes.
    #[zbus(out_args("model"))]
    async fn fuse(
        &self,
        policy: &str,
        params: &str,
        experts: Vec<String>,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        let caller = self.caller(&header, conn).await?;
        let model = self
            .state
            .serving
            .fuse_policy(&caller, policy, params, experts)
            .await
            .map_err(error)?;
        model1::publish(&self.state, conn, &caller, model, self.p2p.clone()).await
    }

    /// Starts fitting `policy` on the JSONL file `data` (absolute path); returns a job.
    /// The daemon's user and root only.
    #[zbus(out_args("job"))]
    #[allow(clippy::too_many_arguments)] // the D-Bus signature, plus zbus's injected values
    async fn fit(
        &self,
        policy: &str,
        params: &str,
        experts: Vec<String>,
        data: &str,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        let caller = self.caller(&header, conn).await?;
        let job = self
            .state
            .serving
            .fit(&caller, policy, params, experts, data, name)
            .map_err(error)?;
        job1::publish(&self.state, conn, &caller, job, self.p2p.clone()).await
    }

    /// Fuses the stored plan `name`; returns the model's object path.
    #[zbus(out_args("model"))]
    async fn fuse_saved(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        let caller = self.caller(&header, conn).await?;
        let model = self
            .state
            .serving
            .fuse_saved(&caller, name)
            .await
            .map_err(error)?;
        model1::publish(&self.state, conn, &caller, model, self.p2p.clone()).await
    }

    /// Stores the plan file at the absolute `path` (and its tensor file next to it) as
    /// `name`. The daemon's user and root only.
    #[zbus(out_args("plan"))]
    async fn save_plan(
        &self,
        name: &str,
        path: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<PlanInfo> {
        let caller = self.caller(&header, conn).await?;
        let record = self
            .state
            .serving
            .save_plan(&caller, name, path)
            .await
            .map_err(error)?;
        Ok(convert::plan(record))
    }

    /// Forgets the stored plan `name`. The daemon's user and root only.
    async fn remove_plan(
        &self,
        name: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<()> {
        let caller = self.caller(&header, conn).await?;
        self.state.serving.remove_plan(&caller, name).map_err(error)
    }

    /// The latest greedy selection, JSON (empty when there is none yet).
    #[zbus(out_args("selection"))]
    async fn get_selection(&self) -> String {
        self.state.serving.selection_json()
    }

    /// The latest clustering of the library, JSON (empty when there is none yet).
    #[zbus(out_args("clusters"))]
    async fn get_clusters(&self) -> String {
        self.state.serving.clusters_json()
    }

    /// Starts a greedy selection over the JSONL file `data` (absolute path); returns a job.
    /// The daemon's user and root only.
    #[zbus(out_args("job"))]
    async fn select(
        &self,
        params: &str,
        data: &str,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath> {
        let caller = self.caller(&header, conn).await?;
        let job = self
            .state
            .serving
            .select(&caller, params, data)
            .map_err(error)?;
        job1::publish(&self.state, conn, &caller, job, self.p2p.clone()).await
    }

    /// One library change: the names added, removed and changed, and the new generation.
    #[zbus(signal)]
    pub(crate) async fn library_changed(
        emitter: &SignalEmitter<'_>,
        added: Vec<String>,
        removed: Vec<String>,
        changed: Vec<String>,
        generation: u64,
    ) -> zbus::Result<()>;

    /// A selection finished: the experts now selected (the active set).
    #[zbus(signal)]
    pub(crate) async fn selection_changed(
        emitter: &SignalEmitter<'_>,
        experts: Vec<String>,
    ) -> zbus::Result<()>;

    /// `serving`.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn status(&self) -> String {
        "serving".into()
    }

    /// The base model's folder name.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn base_model(&self) -> String {
        self.state.serving.base_name()
    }

    /// The base model's compute precision: `f32` or `bf16` (`moerged --precision`).
    #[zbus(property(emits_changed_signal = "const"))]
    async fn precision(&self) -> String {
        self.state.serving.base_precision().into()
    }

    /// The daemon's resident memory in bytes, read when asked.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn resident_bytes(&self) -> u64 {
        self.state.serving.resident_bytes()
    }

    /// How many experts the library has, ready or not.
    #[zbus(property)]
    async fn expert_count(&self) -> u32 {
        self.state.serving.lease().experts().len() as u32
    }

    /// The current library generation.
    #[zbus(property)]
    async fn generation(&self) -> u64 {
        self.state.serving.lease().generation()
    }

    /// The names of the fusion policies on offer.
    #[zbus(property(emits_changed_signal = "const"))]
    async fn policies(&self) -> Vec<String> {
        self.state
            .serving
            .policies()
            .into_iter()
            .map(|p| p.name)
            .collect()
    }
}
