//! The async operations of [`Serving`]: fusing (from a plan or a policy), the model calls,
//! library changes and jobs. Each checks rights and limits first, then hands heavy work to
//! the compute threads or a job thread.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use moerge_library::Adapter;
use moerge_sdk::plan::{Plan, PlanError};

use super::hooks::{FitRequest, HookError, SelectRequest};
use super::jobs::{self, JobKind, JobReporter};
use super::model::{BuiltModel, GenerateRequest, LoadedModel, RoutingExplanation, ScoreOutput};
use super::rights::{self, Caller, Privileged};
use super::{admin, lock, Job, ServeError, Serving};
use crate::index::ExpertRecord;
use crate::service::{ExpertChange, LeaseError};

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
    pub async fn fuse_plan(
        &self,
        caller: &Caller,
        plan_json: &str,
    ) -> Result<Arc<LoadedModel>, ServeError> {
        let plan = Plan::from_json(plan_json).map_err(plan_error)?;
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
                    .fuse(&job_plan, &adapters)
                    .map_err(|e| ServeError::from_engine(e, PLAN_ARG))?;
                Ok((adapters, fused))
            })
            .await?;
        // Checked again: other calls of this client may have finished meanwhile.
        self.check_model_limit(caller)?;
        let built = BuiltModel {
            plan,
            plan_json: plan_json.to_string(),
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
        self.fuse_plan(caller, &outcome.plan_json).await
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
    ) -> Result<Arc<Job>, ServeError> {
        rights::check(caller, self.daemon_uid, Privileged::Fit)?;
        let runner = self.config.policies.clone().ok_or_else(|| {
            ServeError::NotSupported("Fit: this daemon runs without a policy host".into())
        })?;
        let data = absolute_file("data", data)?;
        let request = FitRequest {
            policy: policy.to_string(),
            params_json: params_json.to_string(),
            experts,
            data: Some(data),
            lease: self.lease(),
        };
        let job = self.insert_job(caller, JobKind::Fit)?;
        jobs::spawn(job.clone(), move |reporter| {
            let outcome = runner.fit(request, reporter)?;
            let plan: serde_json::Value =
                serde_json::from_str(&outcome.plan_json).map_err(|e| {
                    HookError::Failed(format!("the policy returned a plan that is not JSON: {e}"))
                })?;
            let result = serde_json::json!({
                "plan": plan,
                "tensors": outcome.tensors.as_deref().map(Path::display).map(|d| d.to_string()),
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
        };
        let job = self.insert_job(caller, JobKind::Select)?;
        jobs::spawn(job.clone(), move |reporter| {
            let outcome = selector.select(request, reporter)?;
            Ok((outcome.result_json, outcome.selected))
        })?;
        Ok(job)
    }
}
