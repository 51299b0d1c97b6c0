//! The safe side of a policy plugin: the [`Policy`] trait a plugin implements, the
//! [`FitContext`] it is given (experts as borrowed f32 views, data, host services) and the
//! [`Fitted`] result it returns. Nothing here knows about loading or the C ABI, so a policy
//! could as well run in-process or out of process.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::optimize::OptimizeOptions;
use crate::params::{ParamError, ParamSpec, Params};
use crate::plan::{ExpertRef, ModulePlan, Plan, PLAN_VERSION};

/// A fusion policy: declares its parameters and turns experts (and optional data) into a plan.
pub trait Policy: Send + Sync {
    /// A short, stable, kebab-case name (`uniform-merge`); two plugins may not share one.
    fn name(&self) -> &str;
    /// The policy's own version (semver).
    fn version(&self) -> &str;
    /// The parameters `fit` accepts; the host checks and defaults values against them.
    fn parameters(&self) -> Vec<ParamSpec>;
    /// Builds the plan. Parameters arrive checked and with defaults applied.
    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError>;
}

/// One example of training or validation data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Record {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<String>,
    pub prompt: String,
    pub completion: String,
}

/// Which data a service works on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Split {
    #[default]
    Train,
    Valid,
}

/// One expert as a policy sees it: identity, metadata, and its LoRA factors per module.
#[derive(Debug, Clone)]
pub struct ExpertView<'a> {
    pub name: String,
    /// Lowercase hex of the 32-byte content hash.
    pub hash: String,
    /// The tasks its sidecar metadata names (empty when it has none).
    pub tasks: Vec<String>,
    /// Sorted by module path.
    pub modules: Vec<ModuleFactors<'a>>,
}

impl ExpertView<'_> {
    /// The plan's reference to this expert.
    pub fn to_ref(&self) -> ExpertRef {
        ExpertRef {
            name: self.name.clone(),
            hash: self.hash.clone(),
        }
    }

    /// The factors of `module`, if this expert adapts it.
    pub fn module(&self, module: &str) -> Option<&ModuleFactors<'_>> {
        self.modules.iter().find(|m| m.module == module)
    }
}

/// Two experts adapting one module at different ranks: what a low-rank merge (which averages
/// the factors elementwise) cannot take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankMismatch {
    pub module: String,
    /// The first expert adapting the module, and its rank there.
    pub first: (String, usize),
    /// The first expert after it with another rank, and that rank.
    pub other: (String, usize),
}

impl RankMismatch {
    /// The refusal of a policy whose parameter `param` asked for `lowrank`.
    pub fn refusal(&self, param: &str) -> PolicyError {
        let ((name, rank), (other, other_rank)) = (&self.first, &self.other);
        PolicyError::invalid(format!(
            "{param}=lowrank needs equal ranks, but module {} has rank {rank} in {name} and \
             {other_rank} in {other}; use {param}=exact",
            self.module
        ))
    }
}

/// The first module of `modules` that `experts` adapt at different ranks, if any.
pub fn rank_mismatch<'m>(
    experts: &[ExpertView<'_>],
    modules: impl IntoIterator<Item = &'m str>,
) -> Option<RankMismatch> {
    for module in modules {
        let mut first: Option<(usize, &str)> = None;
        for e in experts {
            let Some(m) = e.module(module) else { continue };
            match first {
                None => first = Some((m.rank, &e.name)),
                Some((rank, name)) if rank != m.rank => {
                    return Some(RankMismatch {
                        module: module.to_string(),
                        first: (name.to_string(), rank),
                        other: (e.name.clone(), m.rank),
                    })
                }
                Some(_) => {}
            }
        }
    }
    None
}

/// One LoRA'd module of an expert: `ΔW = scale · B A`, borrowed read-only.
#[derive(Debug, Clone, Copy)]
pub struct ModuleFactors<'a> {
    pub module: &'a str,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f64,
    /// `[rank, in_features]`, row-major.
    pub a: &'a [f32],
    /// `[out_features, rank]`, row-major.
    pub b: &'a [f32],
}

/// A large tensor a policy produced, row-major f32.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl TensorData {
    /// A tensor of zeros.
    pub fn zeros(shape: &[usize]) -> TensorData {
        TensorData {
            shape: shape.to_vec(),
            data: vec![0.0; shape.iter().product()],
        }
    }
}

/// What a fit produces: the plan plus the large tensors it refers to (learned routers under
/// [`crate::plan::router_weight_name`] / [`crate::plan::router_bias_name`], fixed factors under
/// [`crate::plan::fixed_a_name`] / [`crate::plan::fixed_b_name`]). Policies leave
/// `plan.tensors` as `None`: the host stores the tensors and sets it to their file's hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    pub plan: Plan,
    pub tensors: BTreeMap<String, TensorData>,
}

impl Fitted {
    /// A plan with no tensors.
    pub fn plan(plan: Plan) -> Fitted {
        Fitted {
            plan,
            tensors: BTreeMap::new(),
        }
    }
}

/// Why a host service failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
}

/// What the host offers a running fit. The daemon implements it with its engine; tests
/// implement it with closures (see the `testing` feature).
pub trait HostServices {
    /// Per-example mean NLL over completion tokens of `fitted` on `split`, in record order.
    fn evaluate(&self, fitted: &Fitted, split: Split) -> Result<Vec<f64>, ServiceError>;
    /// Trains the parts of `template` that `options` name (base and experts frozen) and
    /// returns the trained plan and tensors.
    fn optimize(
        &self,
        template: &Fitted,
        options: &OptimizeOptions,
    ) -> Result<Fitted, ServiceError>;
    /// Reports progress, `fraction` in `[0, 1]`.
    fn progress(&self, fraction: f64, message: &str);
    /// Whether the caller asked to stop; a policy should then return
    /// [`PolicyError::Cancelled`].
    fn cancelled(&self) -> bool;
}

/// Why a fit failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PolicyError {
    #[error(transparent)]
    Param(#[from] ParamError),
    /// The policy cannot work on these inputs; the message says what to change.
    #[error("{0}")]
    Invalid(String),
    /// A host service (`evaluate`, `optimize`) failed.
    #[error("{service} failed: {message}")]
    Service {
        service: &'static str,
        message: String,
    },
    #[error("cancelled")]
    Cancelled,
}

impl PolicyError {
    pub fn invalid(message: impl Into<String>) -> PolicyError {
        PolicyError::Invalid(message.into())
    }

    fn service(service: &'static str, e: ServiceError) -> PolicyError {
        match e {
            ServiceError::Cancelled => PolicyError::Cancelled,
            ServiceError::Failed(message) => PolicyError::Service { service, message },
        }
    }
}

/// The inputs of one fit, as borrowed by [`FitContext`].
#[derive(Debug, Clone, Copy)]
pub struct FitInputs<'a> {
    pub experts: &'a [ExpertView<'a>],
    pub train: &'a [Record],
    pub valid: &'a [Record],
}

/// Everything a policy's `fit` may read or ask for.
pub struct FitContext<'a> {
    inputs: FitInputs<'a>,
    services: &'a dyn HostServices,
}

impl<'a> FitContext<'a> {
    pub fn new(inputs: FitInputs<'a>, services: &'a dyn HostServices) -> FitContext<'a> {
        FitContext { inputs, services }
    }

    /// The experts, in the order the caller gave them (plans refer to them in this order).
    pub fn experts(&self) -> &'a [ExpertView<'a>] {
        self.inputs.experts
    }

    /// The plan's expert list for all experts, in order.
    pub fn expert_refs(&self) -> Vec<ExpertRef> {
        self.inputs.experts.iter().map(ExpertView::to_ref).collect()
    }

    /// A single-pass plan over all experts, in order, with `default` for every module.
    pub fn plan(&self, default: ModulePlan) -> Plan {
        Plan {
            version: PLAN_VERSION,
            experts: self.expert_refs(),
            default,
            modules: BTreeMap::new(),
            ensemble: None,
            tensors: None,
        }
    }

    /// The module paths any expert adapts, sorted.
    pub fn module_paths(&self) -> Vec<&'a str> {
        let mut paths: Vec<&str> = self
            .inputs
            .experts
            .iter()
            .flat_map(|e| e.modules.iter().map(|m| m.module))
            .collect();
        paths.sort_unstable();
        paths.dedup();
        paths
    }

    /// The data of `split` (empty when the caller gave none).
    pub fn records(&self, split: Split) -> &'a [Record] {
        match split {
            Split::Train => self.inputs.train,
            Split::Valid => self.inputs.valid,
        }
    }

    /// The distinct task labels of the data (both splits), sorted.
    pub fn tasks(&self) -> Vec<&'a str> {
        let mut tasks: Vec<&str> = self
            .inputs
            .train
            .iter()
            .chain(self.inputs.valid)
            .filter_map(|r| r.task.as_deref())
            .collect();
        tasks.sort_unstable();
        tasks.dedup();
        tasks
    }

    pub fn evaluate(&self, fitted: &Fitted, split: Split) -> Result<Vec<f64>, PolicyError> {
        self.services
            .evaluate(fitted, split)
            .map_err(|e| PolicyError::service("evaluate", e))
    }

    pub fn optimize(
        &self,
        template: &Fitted,
        options: &OptimizeOptions,
    ) -> Result<Fitted, PolicyError> {
        self.services
            .optimize(template, options)
            .map_err(|e| PolicyError::service("optimize", e))
    }

    pub fn progress(&self, fraction: f64, message: &str) {
        self.services.progress(fraction.clamp(0.0, 1.0), message);
    }

    pub fn cancelled(&self) -> bool {
        self.services.cancelled()
    }

    /// `Err(Cancelled)` if the caller asked to stop: `ctx.check_cancelled()?` between steps.
    pub fn check_cancelled(&self) -> Result<(), PolicyError> {
        if self.cancelled() {
            Err(PolicyError::Cancelled)
        } else {
            Ok(())
        }
    }
}
