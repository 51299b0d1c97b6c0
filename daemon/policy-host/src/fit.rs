//! Running a loaded policy on library adapters: f32 views of every expert's factors, the
//! parameters checked against the policy's schema, the call through the ABI, the result
//! checked against the experts.

use moerge_library::{Adapter, ExpertMetadata};
use moerge_sdk::abi::FitCallError;
use moerge_sdk::params::{ParamError, Params};
use moerge_sdk::policy::{ExpertView, FitInputs, Fitted, HostServices, ModuleFactors, Record};

use crate::LoadedPolicy;

/// One expert to fit on: a loaded adapter and its sidecar metadata, if any.
#[derive(Debug, Clone, Copy)]
pub struct ExpertInput<'a> {
    pub adapter: &'a Adapter,
    pub metadata: Option<&'a ExpertMetadata>,
}

/// What to fit on.
#[derive(Debug, Clone, Copy)]
pub struct FitRequest<'a> {
    pub experts: &'a [ExpertInput<'a>],
    /// Training and validation data; either may be empty.
    pub train: &'a [Record],
    pub valid: &'a [Record],
    /// `key=value` pairs as the user typed them.
    pub params: &'a [(String, String)],
}

/// Why a fit gave no plan. A failure here fails this fit only: the host keeps working.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FitError {
    // Not a `source`: the message already carries it, and error chains would repeat it.
    #[error("policy {policy}: {problem}; see `moerge policies show {policy}`")]
    Params { policy: String, problem: ParamError },
    #[error("policy {policy}: needs at least one expert")]
    NoExperts { policy: String },
    /// The plugin returned an error or panicked (the message then has the panic's text).
    #[error("policy {policy} failed: {message}")]
    PluginFailed { policy: String, message: String },
    /// The plugin returned a plan that does not fit its experts: a bug in the plugin.
    #[error("policy {policy} returned an invalid plan: {message}")]
    InvalidPlan { policy: String, message: String },
    #[error("policy {policy}: cancelled")]
    Cancelled { policy: String },
}

impl LoadedPolicy {
    /// Checks `request.params` against the schema and runs the policy's `fit`.
    pub fn fit(
        &self,
        request: &FitRequest<'_>,
        services: &dyn HostServices,
    ) -> Result<Fitted, FitError> {
        let policy = self.name().to_owned();
        let params = Params::parse(self.parameters(), request.params).map_err(|problem| {
            FitError::Params {
                policy: policy.clone(),
                problem,
            }
        })?;
        if request.experts.is_empty() {
            return Err(FitError::NoExperts { policy });
        }
        let factors: Vec<Vec<(Vec<f32>, Vec<f32>)>> = request
            .experts
            .iter()
            .map(|e| {
                let modules = e.adapter.modules().values();
                let f = |m: &moerge_library::LoraModule| {
                    (e.adapter.tensor_f32(&m.a), e.adapter.tensor_f32(&m.b))
                };
                modules.map(f).collect()
            })
            .collect();
        let views: Vec<ExpertView<'_>> = request
            .experts
            .iter()
            .zip(&factors)
            .map(|(e, factors)| expert_view(e, factors))
            .collect();
        let inputs = FitInputs {
            experts: &views,
            train: request.train,
            valid: request.valid,
        };
        self.declared
            .fit(inputs, &params, services)
            .map_err(|e| match e {
                FitCallError::Cancelled => FitError::Cancelled { policy },
                FitCallError::InvalidResult(message) => FitError::InvalidPlan { policy, message },
                FitCallError::Failed(message) => FitError::PluginFailed { policy, message },
                other => FitError::PluginFailed {
                    policy,
                    message: other.to_string(),
                },
            })
    }
}

fn expert_view<'a>(e: &ExpertInput<'a>, factors: &'a [(Vec<f32>, Vec<f32>)]) -> ExpertView<'a> {
    let adapter: &'a Adapter = e.adapter;
    let modules = adapter
        .modules()
        .values()
        .zip(factors)
        .map(|(m, (a, b))| ModuleFactors {
            module: &m.module,
            rank: m.rank,
            in_features: m.in_features,
            out_features: m.out_features,
            scale: m.scale,
            a,
            b,
        })
        .collect();
    ExpertView {
        name: adapter.name().to_owned(),
        hash: adapter.hash().to_string(),
        tasks: e.metadata.map(|m| m.tasks.clone()).unwrap_or_default(),
        modules,
    }
}

/// Converts the library's data records into the SDK's.
pub fn records_from_library(records: &[moerge_library::records::Record]) -> Vec<Record> {
    records
        .iter()
        .map(|r| Record {
            task: r.task.clone(),
            prompt: r.prompt.clone(),
            completion: r.completion.clone(),
        })
        .collect()
}

/// A fit ready to store or serve: the plan (naming its tensor file by hash when it has
/// tensors), that file's bytes, and the mean validation loss when there were validation
/// records.
#[derive(Debug, Clone, PartialEq)]
pub struct FittedPlan {
    pub plan: moerge_sdk::plan::Plan,
    pub tensor_file: Option<Vec<u8>>,
    pub valid_loss: Option<f64>,
}

impl LoadedPolicy {
    /// [`LoadedPolicy::fit`], then what every caller does next: the validation loss through
    /// `services`, the tensors packed into a tensor file named in the plan, the plan checked.
    /// The CLI's `moerge fit` and the daemon's `Fit` both go through here.
    pub fn fit_plan(
        &self,
        request: &FitRequest<'_>,
        services: &dyn HostServices,
    ) -> Result<FittedPlan, FitError> {
        let fitted = self.fit(request, services)?;
        let policy = self.name().to_owned();
        let failed = |message: String| FitError::PluginFailed {
            policy: policy.clone(),
            message,
        };
        let valid_loss = if request.valid.is_empty() {
            None
        } else {
            let losses = services
                .evaluate(&fitted, moerge_sdk::policy::Split::Valid)
                .map_err(|e| failed(format!("evaluating the fitted plan: {e}")))?;
            Some(losses.iter().sum::<f64>() / losses.len().max(1) as f64)
        };
        let mut plan = fitted.plan;
        let tensor_file = if fitted.tensors.is_empty() {
            None
        } else {
            let map: moerge_library::TensorMap = fitted
                .tensors
                .iter()
                .map(|(name, t)| {
                    let tensor = moerge_library::F32Tensor {
                        shape: t.shape.clone(),
                        data: t.data.clone(),
                    };
                    (name.clone(), tensor)
                })
                .collect();
            let bytes = moerge_library::tensor_file_bytes(&map)
                .map_err(|e| failed(format!("its tensors: {e}")))?;
            plan.tensors = Some(moerge_library::tensor_file_hash(&bytes));
            Some(bytes)
        };
        plan.validate().map_err(|e| FitError::InvalidPlan {
            policy: policy.clone(),
            message: e.to_string(),
        })?;
        Ok(FittedPlan {
            plan,
            tensor_file,
            valid_loss,
        })
    }
}
