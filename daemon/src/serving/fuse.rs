//! The async operations of [`Serving`]: fusing (from a plan or a policy), the model calls,
//! library changes and jobs. Each checks rights and limits first, then hands heavy work to
//! the compute threads or a job thread.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moerge_library::{parse_tensor_file, Adapter, TensorMap};
use moerge_sdk::plan::{Plan, PlanError};

use super::hooks::{FitRequest, HookError, SelectRequest};
use super::jobs::{self, JobKind, JobReporter};
use super::model::{BuiltModel, GenerateRequest, LoadedModel, RoutingExplanation, ScoreOutput};
use super::rights::{self, Caller, Privileged};
use super::{admin, lock, Job, ServeError, Serving};
use crate::index::{ExpertRecord, PlanExpert, PlanRecord};
use crate::service::{ExpertChange, LeaseError, Service};

const PLAN_ARG: &str = "plan_json";

fn plan_error(e: PlanError) -> ServeError {
    match e {
        PlanError::Field { field, message } => {
            ServeError::invalid(format!("{PLAN_ARG}: {field}"), message)
        }
        other => ServeError::invalid(PLAN_ARG, other.to_string()),
    }
}

fn hook_error(e: HookError) -> ServeError {
    match e {
        HookError::InvalidArgument { argument, message } => ServeError::invalid(argument, message),
        HookError::Cancelled => ServeError::PluginFailed("the policy was cancelled".into()),
        other => ServeError::PluginFailed(other.to_string()),
    }
}

fn absolute_file(argument: &str, path: &str) -> Result<PathBuf, ServeError> {
    let p = PathBuf::from(path);
    if !p.is_absolute() {
        return Err(ServeError::invalid(
            argument,
            format!("{path:?} is not an absolute path (the daemon does not know your working directory)"),
        ));
    }
    if !p.is_file() {
        return Err(ServeError::invalid(
            argument,
            format!("{path} is not a readable file"),
        ));
    }
    Ok(p)
}

impl Serving {
    /// Builds the model `plan_json` describes, from the experts of the current library
    /// generation (which the model keeps leased).
    ///
    /// A plan that names a tensor file (learned routers, fixed modules) finds it among the
    /// stored plans' tensors, by hash: store the plan first with `SavePlan` (a fit stores
    /// its own).
    pub async fn fuse_plan(
        &self,
        caller: &Caller,
        plan_json: &str,
    ) -> Result<Arc<LoadedModel>, ServeError> {
        let plan = Plan::from_json(plan_json).map_err(plan_error)?;
        let tensors = match &plan.tensors {
            Some(hash) => self.stored_tensors(hash)?.ok_or_else(|| {
                ServeError::invalid(
                    format!("{PLAN_ARG}: tensors"),
                    format!(
                        "no stored plan has the tensor file {hash}.safetensors; SavePlan the plan \
                         first (`moerge plans save NAME PLAN.json`)"
                    ),
                )
            })?,
            None => TensorMap::new(),
        };
        self.fuse_parsed(caller, plan, plan_json.to_string(), tensors)
            .await
    }

    /// Fuses the stored plan `name`.
    pub async fn fuse_saved(
        &self,
        caller: &Caller,
        name: &str,
    ) -> Result<Arc<LoadedModel>, ServeError> {
        let record = self.stored_plan(name)?;
        if let Some(reason) = &record.stale {
            return Err(ServeError::invalid(
                "name",
                format!("plan {name:?} is stale: {reason}; fit it again or SavePlan a new one"),
            ));
        }
        let plan = Plan::from_json(&record.body).map_err(|e| {
            ServeError::Internal(format!("stored plan {name:?} does not parse: {e}"))
        })?;
        let tensors = match &plan.tensors {
            Some(hash) => self.stored_tensors(hash)?.ok_or_else(|| {
                ServeError::Internal(format!("stored plan {name:?}: its tensor file is missing"))
            })?,
            None => TensorMap::new(),
        };
        self.fuse_parsed(caller, plan, record.body.clone(), tensors)
            .await
    }

    fn stored_plan(&self, name: &str) -> Result<PlanRecord, ServeError> {
        self.service
            .index()
            .plan(name)
            .map_err(|e| ServeError::Internal(e.to_string()))?
            .ok_or_else(|| {
                ServeError::NoSuchObject(format!(
                    "name: no stored plan named {name:?} (see ListPlans)"
                ))
            })
    }

    /// The tensor file `hash` from the stored plans, if one of them has it.
    fn stored_tensors(&self, hash: &str) -> Result<Option<TensorMap>, ServeError> {
        let index = self.service.index();
        let file = format!("{hash}.safetensors");
        let internal = |e: &dyn std::fmt::Display| ServeError::Internal(e.to_string());
        for plan in index.plans().map_err(|e| internal(&e))? {
            if let Some(blob) = plan.tensors.get(&file) {
                let bytes = index.blob(blob).map_err(|e| internal(&e))?;
                let tensors =
                    parse_tensor_file(Path::new(&file), &bytes, hash).map_err(|e| internal(&e))?;
                return Ok(Some(tensors));
            }
        }
        Ok(None)
    }

    /// Stores the plan file at `path` (and its tensor file next to it) as `name`
    /// (privileged). Its experts must be in the current library with the hashes it names.
    pub async fn save_plan(
        &self,
        caller: &Caller,
        name: &str,
        path: &str,
    ) -> Result<PlanRecord, ServeError> {
        rights::check(caller, self.daemon_uid, Privileged::SavePlan)?;
        check_plan_name(name)?;
        let path = absolute_file("path", path)?;
        let body = std::fs::read_to_string(&path)
            .map_err(|e| ServeError::invalid("path", format!("{}: {e}", path.display())))?;
        let plan = Plan::from_json(&body)
            .map_err(|e| ServeError::invalid("path", format!("{}: {e}", path.display())))?;
        let tensors = match &plan.tensors {
            Some(hash) => {
                let dir = path.parent().unwrap_or(Path::new("/"));
                let file = moerge_library::tensor_file::tensor_file_path(dir, hash);
                let bytes = std::fs::read(&file)
                    .map_err(|e| ServeError::invalid("path", format!("{}: {e}", file.display())))?;
                parse_tensor_file(&file, &bytes, hash)
                    .map_err(|e| ServeError::invalid("path", e.to_string()))?;
                Some((format!("{hash}.safetensors"), bytes))
            }
            None => None,
        };
        store_plan(&self.service, name, &plan, &body, tensors)
    }

    /// Forgets a stored plan (privileged).
    pub fn remove_plan(&self, caller: &Caller, name: &str) -> Result<(), ServeError> {
        rights::check(caller, self.daemon_uid, Privileged::RemovePlan)?;
        let removed = self
            .service
            .index()
            .remove_plan(name)
            .map_err(|e| ServeError::Internal(e.to_string()))?;
        if !removed {
            return Err(ServeError::NoSuchObject(format!(
                "name: no stored plan named {name:?} (see ListPlans)"
            )));
        }
        Ok(())
    }

    async fn fuse_parsed(
        &self,
        caller: &Caller,
        plan: Plan,
        plan_json: String,
        tensors: TensorMap,
    ) -> Result<Arc<LoadedModel>, ServeError> {
        self.check_model_limit(caller)?;
        let _permit = self
            .calls
            .begin(&caller.client, self.config.limits.concurrent_calls)?;
        let lease = self.lease();
        let mut pins = Vec::with_capacity(plan.experts.len());
        for (i, e) in plan.experts.iter().enumerate() {
            let field = |f: &str| format!("{PLAN_ARG}: experts[{i}].{f}");
            let record = lease.expert(&e.name).ok_or_else(|| {
                ServeError::NoSuchExpert(format!(
                    "{}: no expert named {:?} in library generation {}",
                    field("name"),
                    e.name,
                    lease.generation()
                ))
            })?;
            let have = record.hash.map(|h| h.to_string()).unwrap_or_default();
            if have != e.hash {
                return Err(ServeError::invalid(
                    field("hash"),
                    format!(
                        "expert {:?} has content {} in library generation {}, the plan names {}; re-create the plan",
                        e.name,
                        &have[..12.min(have.len())],
                        lease.generation(),
                        &e.hash[..12.min(e.hash.len())]
                    ),
                ));
            }
            let pin = lease.open(&e.name).map_err(|err| match err {
                LeaseError::NotReady { .. } | LeaseError::Changed { .. } => {
                    ServeError::invalid(field("name"), err.to_string())
                }
                other => ServeError::Internal(other.to_string()),
            })?;
            pins.push(pin);
        }
        let base = self.compute.base.clone();
        let dirs: Vec<PathBuf> = pins.iter().map(|p| p.dir().to_path_buf()).collect();
        let job_plan = plan.clone();
        let (adapters, fused) = self
            .compute
            .run(move || {
                // The engine takes owned adapters; reopening the pinned copies maps the same
                // files again (no copy) and re-checks their hashes.
                let adapters = dirs
                    .iter()
                    .map(|d| Adapter::load(d))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| ServeError::Internal(format!("reopening a pinned expert: {e}")))?;
                let fused = base
                    .fuse_with(&job_plan, &adapters, &tensors)
                    .map_err(|e| ServeError::from_engine(e, PLAN_ARG))?;
                Ok((adapters, fused))
            })
            .await?;
        // Checked again: other calls of this client may have finished meanwhile.
        self.check_model_limit(caller)?;
        let built = BuiltModel {
            plan,
            plan_json,
            lease,
            pins,
            adapters,
            fused,
        };
        let model = Arc::new(LoadedModel::new(
            self.next_id(),
            caller.client.clone(),
            built,
        ));
        lock(&self.models).insert(model.id, model.clone());
        Ok(model)
    }

    /// Runs a policy without data (`Fuse`) and fuses the plan it makes.
    pub async fn fuse_policy(
        &self,
        caller: &Caller,
        policy: &str,
        params_json: &str,
        experts: Vec<String>,
    ) -> Result<Arc<LoadedModel>, ServeError> {
        let runner = self.config.policies.clone().ok_or_else(|| {
            ServeError::NotSupported(
                "Fuse: this daemon runs without a policy host; send a plan with FusePlan".into(),
            )
        })?;
        let request = FitRequest {
            policy: policy.to_string(),
            params_json: params_json.to_string(),
            experts,
            data: None,
            lease: self.lease(),
            engine: self.engine(),
        };
        let outcome = {
            let _permit = self
                .calls
                .begin(&caller.client, self.config.limits.concurrent_calls)?;
            self.compute
                .run(move || {
                    runner
                        .fit(request, &JobReporter::detached())
                        .map_err(hook_error)
                })
                .await?
        };
        let plan = Plan::from_json(&outcome.plan_json).map_err(|e| {
            ServeError::PluginFailed(format!(
                "policy {policy} returned a plan that does not parse: {e}"
            ))
        })?;
        let tensors = match (&plan.tensors, &outcome.tensors) {
            (Some(hash), Some(bytes)) => {
                parse_tensor_file(Path::new("fitted tensors"), bytes, hash)
                    .map_err(|e| ServeError::PluginFailed(format!("policy {policy}: {e}")))?
            }
            _ => TensorMap::new(),
        };
        self.fuse_parsed(caller, plan, outcome.plan_json, tensors)
            .await
    }

    async fn on_model<T, F>(
        &self,
        caller: &Caller,
        model: &Arc<LoadedModel>,
        f: F,
    ) -> Result<T, ServeError>
    where
        T: Send + 'static,
        F: FnOnce(&LoadedModel, &moerge_engine::TextTokenizer) -> Result<T, ServeError>
            + Send
            + 'static,
    {
        let _permit = self
            .calls
            .begin(&caller.client, self.config.limits.concurrent_calls)?;
        let model = model.clone();
        let tok = self.compute.tokenizer.clone();
        self.compute.run(move || f(&model, &tok)).await
    }

    pub async fn score(
        &self,
        caller: &Caller,
        model: &Arc<LoadedModel>,
        prompt: &str,
        completion: &str,
    ) -> Result<ScoreOutput, ServeError> {
        let (p, c) = (prompt.to_string(), completion.to_string());
        self.on_model(caller, model, move |m, tok| m.score(tok, &p, &c))
            .await
    }

    pub async fn top_tokens(
        &self,
        caller: &Caller,
        model: &Arc<LoadedModel>,
        prompt: &str,
        k: u32,
    ) -> Result<Vec<(u32, String, f32)>, ServeError> {
        if k == 0 {
            return Err(ServeError::invalid("k", "must be at least 1"));
        }
        let p = prompt.to_string();
        self.on_model(caller, model, move |m, tok| {
            m.top_tokens(tok, &p, k as usize)
        })
        .await
    }

    pub async fn explain(
        &self,
        caller: &Caller,
        model: &Arc<LoadedModel>,
        prompt: &str,
    ) -> Result<RoutingExplanation, ServeError> {
        let p = prompt.to_string();
        self.on_model(caller, model, move |m, tok| m.explain(tok, &p))
            .await
    }

    /// Checks a generation request against the limits.
    pub fn check_generate(&self, request: &GenerateRequest) -> Result<(), ServeError> {
        let limit = self.config.limits.max_tokens;
        if request.max_tokens > limit as usize {
            return Err(ServeError::LimitExceeded {
                limit: "max_tokens",
                value: u64::from(limit),
                message: format!("options.max_tokens asks for {}", request.max_tokens),
            });
        }
        Ok(())
    }

    /// Generates; `on_text` gets each piece of text as it is decided (on a compute thread).
    pub async fn generate(
        &self,
        caller: &Caller,
        model: &Arc<LoadedModel>,
        prompt: &str,
        request: GenerateRequest,
        mut on_text: impl FnMut(&str) -> ControlFlow<()> + Send + 'static,
    ) -> Result<String, ServeError> {
        self.check_generate(&request)?;
        let p = prompt.to_string();
        self.on_model(caller, model, move |m, tok| {
            m.generate(tok, &p, &request, &mut on_text)
        })
        .await
    }

    /// Writes a merge plan's model as a PEFT folder (privileged: it writes files as the
    /// daemon's user).
    pub async fn export_peft(
        &self,
        caller: &Caller,
        model: &Arc<LoadedModel>,
        dir: &str,
    ) -> Result<String, ServeError> {
        rights::check(caller, self.daemon_uid, Privileged::ExportPeft)?;
        let dir = PathBuf::from(dir);
        if !dir.is_absolute() {
            return Err(ServeError::invalid(
                "dir",
                format!("{} is not an absolute path", dir.display()),
            ));
        }
        self.on_model(caller, model, move |m, _| m.export_peft(&dir))
            .await
    }

    /// Copies an adapter folder into the library and waits until it is indexed.
    pub async fn add_expert(
        &self,
        caller: &Caller,
        path: &str,
    ) -> Result<(u64, ExpertRecord), ServeError> {
        rights::check(caller, self.daemon_uid, Privileged::AddExpert)?;
        let mut events = self.subscribe();
        let library = self.config.library.clone();
        let base = self.compute.base.info().clone();
        let source = PathBuf::from(path);
        let (name, _hash) =
            tokio::task::spawn_blocking(move || admin::add_expert(&library, &base, &source))
                .await
                .map_err(|e| ServeError::Internal(format!("AddExpert: {e}")))??;
        // A backstop, as for removals: the expert is indexed whatever the watcher reports.
        self.service.rescan();
        let wanted = name.clone();
        self.wait_for_change(&mut events, move |c| {
            matches!(c, ExpertChange::Added { name, .. } | ExpertChange::Updated { name, .. } if *name == wanted)
        })
        .await?;
        self.expert(&name)
    }

    /// Removes an expert's folder and waits until the index has dropped it.
    pub async fn remove_expert(&self, caller: &Caller, name: &str) -> Result<(), ServeError> {
        rights::check(caller, self.daemon_uid, Privileged::RemoveExpert)?;
        let mut events = self.subscribe();
        let library = self.config.library.clone();
        let n = name.to_string();
        let trash = tokio::task::spawn_blocking(move || admin::move_out(&library, &n))
            .await
            .map_err(|e| ServeError::Internal(format!("RemoveExpert: {e}")))??;
        // The trash is deleted only once the index has dropped the expert: a rename followed
        // at once by the deletion of its target can reach the watcher as events on the
        // hidden name alone. The rescan makes the removal seen whatever the watcher reports.
        self.service.rescan();
        let wanted = name.to_string();
        let seen = self
            .wait_for_change(
                &mut events,
                move |c| matches!(c, ExpertChange::Removed { name, .. } if *name == wanted),
            )
            .await;
        tokio::task::spawn_blocking(move || admin::delete_moved(&trash))
            .await
            .map_err(|e| ServeError::Internal(format!("RemoveExpert: {e}")))??;
        seen
    }

    async fn wait_for_change(
        &self,
        events: &mut tokio::sync::broadcast::Receiver<crate::service::LibraryEvent>,
        wanted: impl Fn(&ExpertChange) -> bool,
    ) -> Result<(), ServeError> {
        let wait = async {
            loop {
                match events.recv().await {
                    Ok(event) if event.changes.iter().any(&wanted) => return Ok(()),
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                    Err(e) => return Err(ServeError::Internal(format!("library events: {e}"))),
                }
            }
        };
        tokio::time::timeout(self.config.index_wait, wait)
            .await
            .map_err(|_| {
                ServeError::Internal(format!(
                    "the library folder changed but the index did not show it within {:?}",
                    self.config.index_wait
                ))
            })?
    }

    /// Starts fitting `policy` on `data` (privileged).
    pub fn fit(
        &self,
        caller: &Caller,
        policy: &str,
        params_json: &str,
        experts: Vec<String>,
        data: &str,
        name: &str,
    ) -> Result<Arc<Job>, ServeError> {
        rights::check(caller, self.daemon_uid, Privileged::Fit)?;
        let runner = self.config.policies.clone().ok_or_else(|| {
            ServeError::NotSupported("Fit: this daemon runs without a policy host".into())
        })?;
        if !name.is_empty() {
            check_plan_name(name)?;
        }
        let data = absolute_data("data", data)?;
        let request = FitRequest {
            policy: policy.to_string(),
            params_json: params_json.to_string(),
            experts,
            data: Some(data),
            lease: self.lease(),
            engine: self.engine(),
        };
        let job = self.insert_job(caller, JobKind::Fit)?;
        let name = if name.is_empty() {
            format!("{policy}-{}", job.id)
        } else {
            name.to_string()
        };
        let service = self.service.clone();
        jobs::spawn(job.clone(), move |reporter| {
            let outcome = runner.fit(request, reporter)?;
            let plan = Plan::from_json(&outcome.plan_json).map_err(|e| {
                HookError::Failed(format!(
                    "the policy returned a plan that does not parse: {e}"
                ))
            })?;
            let tensors = outcome
                .tensors
                .map(|bytes| (plan.tensors_file().unwrap_or_default(), bytes));
            store_plan(&service, &name, &plan, &outcome.plan_json, tensors)
                .map_err(|e| HookError::Failed(format!("storing the plan as {name:?}: {e}")))?;
            let result = serde_json::json!({
                "plan_name": name,
                "plan": serde_json::from_str::<serde_json::Value>(&outcome.plan_json)
                    .unwrap_or_default(),
                "valid_loss": outcome.valid_loss,
                "summary": format!(
                    "{} over {} experts{}",
                    request_summary(&plan),
                    plan.experts.len(),
                    outcome
                        .valid_loss
                        .map(|l| format!(", validation loss {l:.4}"))
                        .unwrap_or_default()
                ),
            });
            Ok((result.to_string(), Vec::new()))
        })?;
        Ok(job)
    }

    /// Starts a greedy selection over `data` (privileged).
    pub fn select(
        &self,
        caller: &Caller,
        params_json: &str,
        data: &str,
    ) -> Result<Arc<Job>, ServeError> {
        rights::check(caller, self.daemon_uid, Privileged::Select)?;
        let selector = self.config.selector.clone().ok_or_else(|| {
            ServeError::NotSupported(
                "Select: greedy selection is not available in this daemon yet".into(),
            )
        })?;
        let data = absolute_file("data", data)?;
        let request = SelectRequest {
            params_json: params_json.to_string(),
            data,
            lease: self.lease(),
            engine: self.engine(),
        };
        let job = self.insert_job(caller, JobKind::Select)?;
        jobs::spawn(job.clone(), move |reporter| {
            let outcome = selector.select(request, reporter)?;
            Ok((outcome.result_json, outcome.selected))
        })?;
        Ok(job)
    }
}

/// Checks `plan`'s experts against the current library and stores it.
fn store_plan(
    service: &Service,
    name: &str,
    plan: &Plan,
    body: &str,
    tensors: Option<(String, Vec<u8>)>,
) -> Result<PlanRecord, ServeError> {
    let lease = service.lease();
    let mut experts = Vec::with_capacity(plan.experts.len());
    for (i, e) in plan.experts.iter().enumerate() {
        let record = lease.expert(&e.name).ok_or_else(|| {
            ServeError::NoSuchExpert(format!(
                "experts[{i}].name: no expert named {:?} in library generation {}",
                e.name,
                lease.generation()
            ))
        })?;
        let hash = record
            .hash
            .filter(|h| h.to_string() == e.hash)
            .ok_or_else(|| {
                ServeError::invalid(
                    format!("experts[{i}].hash"),
                    format!("expert {:?} has other content in the library now", e.name),
                )
            })?;
        experts.push(PlanExpert {
            name: e.name.clone(),
            hash,
        });
    }
    let tensors: Vec<(&str, &[u8])> = tensors
        .iter()
        .map(|(file, bytes)| (file.as_str(), bytes.as_slice()))
        .collect();
    service
        .index()
        .put_plan(name, &experts, body, &tensors)
        .map_err(|e| ServeError::Internal(e.to_string()))
}

/// A one-line description of what a plan does, for job results.
fn request_summary(plan: &Plan) -> String {
    if plan.ensemble.is_some() {
        "an ensemble".into()
    } else {
        match &plan.default {
            moerge_sdk::plan::ModulePlan::Routed { top_k, .. } => format!("routing (top {top_k})"),
            moerge_sdk::plan::ModulePlan::Static { .. } => "a static merge".into(),
            _ => "a plan".into(),
        }
    }
}

/// A stored plan's name: 1 to 128 characters, no `/`, no control characters.
fn check_plan_name(name: &str) -> Result<(), ServeError> {
    if name.is_empty() || name.chars().count() > 128 {
        return Err(ServeError::invalid(
            "name",
            "a plan name has 1 to 128 characters",
        ));
    }
    if let Some(c) = name.chars().find(|c| c.is_control() || *c == '/') {
        return Err(ServeError::invalid(
            "name",
            format!("{name:?}: a plan name may not contain {c:?}"),
        ));
    }
    Ok(())
}

/// An absolute path to a data file or folder.
fn absolute_data(argument: &str, path: &str) -> Result<PathBuf, ServeError> {
    let p = PathBuf::from(path);
    if p.is_dir() && p.is_absolute() {
        return Ok(p);
    }
    absolute_file(argument, path)
}
