//! The policy plugin host as the daemon's [`PolicyRunner`]: policies discovered by
//! `moerge-policy-host` (built-ins, the user's folder, configured folders), run on experts
//! opened from the lease's pinned copies with the engine's host services
//! (`moerge_engine::services::EngineServices`) on the serving base model. What comes back is
//! the plan JSON, the bytes of its tensor file and the validation loss; `serving` stores it.

mod data;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use moerge_engine::services::{EngineServices, ServicesInput};
use moerge_library::Adapter;
use moerge_policy_host::{
    records_from_library, standard_folders, ExpertInput, FitError, FitRequest as HostRequest,
    PolicyFolder, PolicyRegistry,
};

pub use data::{hold_out, read_fit_data, FitData, HOLD_OUT};

use crate::serving::{
    FitOutcome, FitRequest, HookError, JobReporter, PolicyDescription, PolicyRunner,
};

/// The plugin host behind `Fuse` and `Fit`.
pub struct PluginRunner {
    registry: PolicyRegistry,
}

impl PluginRunner {
    /// Discovers the policies in the standard folders, then in `extra` folders.
    pub fn discover(extra: &[PathBuf]) -> PluginRunner {
        PluginRunner {
            registry: PolicyRegistry::discover(&standard_folders(extra)),
        }
    }

    /// Only the policies of `folders` (tests, embedders).
    pub fn from_folders(folders: &[PolicyFolder]) -> PluginRunner {
        PluginRunner {
            registry: PolicyRegistry::discover(folders),
        }
    }

    pub fn registry(&self) -> &PolicyRegistry {
        &self.registry
    }

    /// To add single plugin files before serving.
    pub fn registry_mut(&mut self) -> &mut PolicyRegistry {
        &mut self.registry
    }
}

fn invalid(argument: &str, message: impl Into<String>) -> HookError {
    HookError::InvalidArgument {
        argument: argument.into(),
        message: message.into(),
    }
}

/// `{"top_k": 2, "space": "exact"}` (or an empty string) as the host's `key=value` pairs.
pub fn params_from_json(json: &str) -> Result<Vec<(String, String)>, HookError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        invalid(
            "params",
            format!("not JSON: {e} (expected an object such as {{\"top_k\": 2}})"),
        )
    })?;
    let serde_json::Value::Object(map) = value else {
        return Err(invalid(
            "params",
            format!("expected a JSON object such as {{\"top_k\": 2}}, got {value}"),
        ));
    };
    map.into_iter()
        .map(|(key, value)| match value {
            serde_json::Value::String(s) => Ok((key, s)),
            serde_json::Value::Number(n) => Ok((key, n.to_string())),
            serde_json::Value::Bool(b) => Ok((key, b.to_string())),
            other => Err(invalid(
                "params",
                format!("{key}: expected a string, number or boolean, got {other}"),
            )),
        })
        .collect()
}

impl PolicyRunner for PluginRunner {
    fn policies(&self) -> Vec<PolicyDescription> {
        self.registry
            .policies()
            .iter()
            .map(|p| PolicyDescription {
                name: p.name().to_owned(),
                version: p.version().to_owned(),
                description: format!(
                    "parameters: {}",
                    p.parameters()
                        .iter()
                        .map(|s| s.name.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            })
            .collect()
    }

    fn fit(&self, request: FitRequest, reporter: &JobReporter) -> Result<FitOutcome, HookError> {
        let policy = self.registry.get(&request.policy).ok_or_else(|| {
            let known: Vec<&str> = self.registry.policies().iter().map(|p| p.name()).collect();
            invalid(
                "policy",
                format!(
                    "no policy named {:?}; on offer: {}",
                    request.policy,
                    known.join(", ")
                ),
            )
        })?;
        let params = params_from_json(&request.params_json)?;
        let lease = &request.lease;
        let names: Vec<String> = if request.experts.is_empty() {
            lease
                .experts()
                .iter()
                .filter(|(_, r)| r.is_ready())
                .map(|(n, _)| n.clone())
                .collect()
        } else {
            request.experts.clone()
        };
        let mut adapters = Vec::with_capacity(names.len());
        for (i, name) in names.iter().enumerate() {
            let pin = lease
                .open(name)
                .map_err(|e| invalid(&format!("experts[{i}]"), e.to_string()))?;
            adapters.push(Adapter::load(pin.dir()).map_err(|e| {
                HookError::Failed(format!("reopening the pinned copy of {name:?}: {e}"))
            })?);
        }
        let data = match &request.data {
            Some(path) => read_fit_data(path).map_err(|e| invalid("data", e))?,
            None => FitData {
                train: Vec::new(),
                valid: Vec::new(),
            },
        };
        let (train, valid) = (
            records_from_library(&data.train),
            records_from_library(&data.valid),
        );
        let cancelled = AtomicBool::new(reporter.is_cancelled());
        let engine = &request.engine;
        let input = ServicesInput {
            base: &engine.base,
            experts: &adapters,
            tokenizer: &engine.tokenizer,
            train: &train,
            valid: &valid,
            cancelled: &cancelled,
        };
        let services = EngineServices::new(input, |fraction, message| {
            reporter.progress(fraction, message);
            if reporter.is_cancelled() {
                cancelled.store(true, Ordering::SeqCst);
            }
        })
        .map_err(|e| invalid("data", e.to_string()))?;
        let inputs: Vec<ExpertInput<'_>> = adapters
            .iter()
            .map(|adapter| ExpertInput {
                adapter,
                metadata: None,
            })
            .collect();
        let host_request = HostRequest {
            experts: &inputs,
            train: &train,
            valid: &valid,
            params: &params,
        };
        let fitted = policy
            .fit_plan(&host_request, &services)
            .map_err(|e| match e {
                FitError::Params { .. } => invalid("params", e.to_string()),
                FitError::NoExperts { .. } => invalid("experts", e.to_string()),
                FitError::Cancelled { .. } => HookError::Cancelled,
                other => HookError::Failed(other.to_string()),
            })?;
        if cancelled.load(Ordering::SeqCst) || reporter.is_cancelled() {
            return Err(HookError::Cancelled);
        }
        Ok(FitOutcome {
            plan_json: fitted.plan.to_json(),
            tensors: fitted.tensor_file,
            valid_loss: fitted.valid_loss,
        })
    }
}
