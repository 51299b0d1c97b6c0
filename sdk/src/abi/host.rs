//! The host side of the ABI: checks a declaration ([`DeclaredPolicy::from_raw`]) and calls a
//! policy through its function table ([`DeclaredPolicy::fit`]), serving the host services
//! back through C function pointers. The daemon's plugin host and the `testing` harness both
//! go through here, so a policy tested with the harness runs exactly as it will in the daemon.

use std::ffi::{c_void, CStr};
use std::panic::{catch_unwind, AssertUnwindSafe};

use super::reply::{read_fitted, read_reply, ReplyBox, ReplyError};
use super::{
    panic_message, FfiExpert, FfiFitInput, FfiFitted, FfiHostServices, FfiModule, FfiReply, FfiStr,
    PolicyDeclaration, ABI_VERSION, SPLIT_TRAIN, SPLIT_VALID,
};
use crate::checks::{check_fitted, RouterTensors};
use crate::optimize::{split_teacher_tensors, OptimizeOptions, TEACHER_TENSOR_PREFIX};
use crate::params::{ParamSpec, Params};
use crate::policy::{ExpertView, FitInputs, Fitted, HostServices, ServiceError, Split};

/// Why a declaration is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DeclarationError {
    #[error("the entry symbol returned no declaration (the policy's constructor panicked; see the plugin's stderr)")]
    Null,
    #[error(
        "expected ABI {expected}, got {found}; rebuild the plugin against moerge-sdk {}",
        super::SDK_VERSION
    )]
    Abi { expected: u32, found: u32 },
    #[error("declaration field {field}: {message}")]
    Field {
        field: &'static str,
        message: String,
    },
    #[error("parameter schema: {0}")]
    Parameters(String),
}

/// Why a call to `fit` gave no plan.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum FitCallError {
    /// The policy returned an error or panicked; the message says which, with the panic text.
    #[error("{0}")]
    Failed(String),
    #[error("cancelled")]
    Cancelled,
    /// The policy returned a plan that does not fit its experts.
    #[error("invalid result: {0}")]
    InvalidResult(String),
}

/// A checked declaration: ABI version matched, strings read, parameter schema fetched.
#[derive(Debug)]
pub struct DeclaredPolicy {
    declaration: &'static PolicyDeclaration,
    name: String,
    version: String,
    sdk_version: String,
    parameters: Vec<ParamSpec>,
}

// SAFETY: the declaration is immutable and its functions may be called from any thread (the
// SDK's trampolines hold no thread-bound state; the policy is `Send + Sync`).
unsafe impl Send for DeclaredPolicy {}
// SAFETY: as above.
unsafe impl Sync for DeclaredPolicy {}

impl DeclaredPolicy {
    /// Checks the declaration: the ABI version first (reading nothing else before it matches),
    /// then the strings, then the parameter schema (the first call into the plugin).
    ///
    /// # Safety
    /// `declaration` must be null or point to a declaration whose first field is a `u32` ABI
    /// version and which, if that version is [`ABI_VERSION`], follows this ABI and stays
    /// valid for the rest of the process (its library is never unloaded).
    pub unsafe fn from_raw(
        declaration: *const PolicyDeclaration,
    ) -> Result<DeclaredPolicy, DeclarationError> {
        if declaration.is_null() {
            return Err(DeclarationError::Null);
        }
        // SAFETY: every ABI version starts with the u32 version.
        let found = unsafe { declaration.cast::<u32>().read() };
        if found != ABI_VERSION {
            return Err(DeclarationError::Abi {
                expected: ABI_VERSION,
                found,
            });
        }
        // SAFETY: the version matches, so the layout is ours and lives forever.
        let declaration: &'static PolicyDeclaration = unsafe { &*declaration };
        let text = |field: &'static str, ptr: *const std::ffi::c_char| {
            if ptr.is_null() {
                return Err(DeclarationError::Field {
                    field,
                    message: "is null".into(),
                });
            }
            // SAFETY: a NUL-terminated static string per the ABI.
            let s = unsafe { CStr::from_ptr(ptr) }.to_str();
            s.map(str::to_owned).map_err(|e| DeclarationError::Field {
                field,
                message: format!("is not UTF-8: {e}"),
            })
        };
        let name = text("name", declaration.name)?;
        if name.is_empty() {
            return Err(DeclarationError::Field {
                field: "name",
                message: "is empty".into(),
            });
        }
        let version = text("version", declaration.version)?;
        let sdk_version = text("sdk_version", declaration.sdk_version)?;
        // SAFETY: the declaration's own function, freed by its own free function.
        let parameters = unsafe {
            read_reply(
                (declaration.parameters)(declaration.instance),
                |r| {
                    let json = r.fitted.plan_json.to_str()?;
                    serde_json::from_str::<Vec<ParamSpec>>(json).map_err(|e| e.to_string())
                },
                |r| (declaration.free_reply)(r),
            )
        }
        .map_err(|e| match e {
            ReplyError::Failed(m) => DeclarationError::Parameters(m),
            ReplyError::Cancelled => DeclarationError::Parameters("cancelled".into()),
        })?;
        Ok(DeclaredPolicy {
            declaration,
            name,
            version,
            sdk_version,
            parameters,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn version(&self) -> &str {
        &self.version
    }

    /// The SDK version the plugin was built with.
    pub fn sdk_version(&self) -> &str {
        &self.sdk_version
    }

    pub fn parameters(&self) -> &[ParamSpec] {
        &self.parameters
    }

    /// Runs the policy's `fit` through the C table and checks its result against `inputs`.
    /// A panic inside the plugin comes back as [`FitCallError::Failed`] with its message.
    pub fn fit(
        &self,
        inputs: FitInputs<'_>,
        params: &Params,
        services: &dyn HostServices,
    ) -> Result<Fitted, FitCallError> {
        let tasks: Vec<String> = inputs
            .experts
            .iter()
            .map(|e| serde_json::to_string(&e.tasks).expect("strings serialise"))
            .collect();
        let modules: Vec<Vec<FfiModule>> = inputs
            .experts
            .iter()
            .map(|e| e.modules.iter().map(ffi_module).collect())
            .collect();
        let experts: Vec<FfiExpert> = (inputs.experts.iter().zip(&tasks).zip(&modules))
            .map(|((e, tasks), modules)| FfiExpert {
                name: FfiStr::new(&e.name),
                hash: FfiStr::new(&e.hash),
                tasks_json: FfiStr::new(tasks),
                modules: modules.as_ptr(),
                n_modules: modules.len(),
            })
            .collect();
        let train = serde_json::to_string(inputs.train).expect("records serialise");
        let valid = serde_json::to_string(inputs.valid).expect("records serialise");
        let params = params.to_json();
        let state = HostState {
            services,
            experts: inputs.experts,
        };
        let input = FfiFitInput {
            experts: experts.as_ptr(),
            n_experts: experts.len(),
            train_json: FfiStr::new(&train),
            valid_json: FfiStr::new(&valid),
            params_json: FfiStr::new(&params),
            services: FfiHostServices {
                host: (&state as *const HostState<'_>).cast_mut().cast::<c_void>(),
                evaluate: host_evaluate,
                optimize: host_optimize,
                progress: host_progress,
                cancelled: host_cancelled,
                free_reply: host_free_reply,
            },
        };
        let d = self.declaration;
        // SAFETY: everything `input` points to lives until after the call; the reply is
        // copied before it goes back to the plugin's free function.
        let fitted = unsafe {
            read_reply(
                (d.fit)(d.instance, &input),
                |r| read_fitted(&r.fitted),
                |r| (d.free_reply)(r),
            )
        }
        .map_err(|e| match e {
            ReplyError::Failed(m) => FitCallError::Failed(m),
            ReplyError::Cancelled => FitCallError::Cancelled,
        })?;
        check_fitted(&fitted, inputs.experts, RouterTensors::Required)
            .map_err(FitCallError::InvalidResult)?;
        Ok(fitted)
    }
}

fn ffi_module(m: &crate::policy::ModuleFactors<'_>) -> FfiModule {
    FfiModule {
        module: FfiStr::new(m.module),
        rank: m.rank,
        in_features: m.in_features,
        out_features: m.out_features,
        scale: m.scale,
        a: m.a.as_ptr(),
        b: m.b.as_ptr(),
    }
}

/// What the `host` pointer of the services table points to during one fit.
struct HostState<'a> {
    services: &'a dyn HostServices,
    experts: &'a [ExpertView<'a>],
}

/// Runs a service body, turning its outcome (or a panic) into a host-owned reply.
///
/// # Safety
/// `host` must be the `HostState` of the running fit.
unsafe fn serve(
    host: *mut c_void,
    body: impl FnOnce(&HostState<'_>) -> Result<*mut FfiReply, ServiceError>,
) -> *mut FfiReply {
    // SAFETY: per the contract.
    let state = unsafe { &*host.cast::<HostState<'_>>() };
    match catch_unwind(AssertUnwindSafe(|| body(state))) {
        Ok(Ok(reply)) => reply,
        Ok(Err(ServiceError::Cancelled)) => ReplyBox::cancelled(),
        Ok(Err(ServiceError::Failed(m))) => ReplyBox::failed(m),
        Err(payload) => ReplyBox::failed(format!("the host {}", panic_message(&*payload))),
    }
}

/// Copies a plan passed to a service.
///
/// # Safety
/// `fitted` must be a valid view for the call.
unsafe fn plan_argument(fitted: *const FfiFitted) -> Result<Fitted, ServiceError> {
    if fitted.is_null() {
        return Err(ServiceError::Failed("the plugin passed a null plan".into()));
    }
    // SAFETY: per the contract.
    unsafe { read_fitted(&*fitted) }
        .map_err(|e| ServiceError::Failed(format!("the plugin passed a malformed plan: {e}")))
}

unsafe extern "C" fn host_evaluate(
    host: *mut c_void,
    fitted: *const FfiFitted,
    split: u32,
) -> *mut FfiReply {
    // SAFETY: the plugin passes back our host pointer and a view valid for the call.
    unsafe {
        serve(host, |s| {
            let fitted = plan_argument(fitted)?;
            let split = match split {
                SPLIT_TRAIN => Split::Train,
                SPLIT_VALID => Split::Valid,
                other => return Err(ServiceError::Failed(format!("unknown split code {other}"))),
            };
            s.services.evaluate(&fitted, split).map(ReplyBox::values)
        })
    }
}

unsafe extern "C" fn host_optimize(
    host: *mut c_void,
    template: *const FfiFitted,
    options: FfiStr,
) -> *mut FfiReply {
    // SAFETY: as in `host_evaluate`.
    unsafe {
        serve(host, |s| {
            let template = plan_argument(template)?;
            let failed = |m: String| ServiceError::Failed(m);
            let options = options.to_str().map_err(failed)?;
            let options: OptimizeOptions = serde_json::from_str(options)
                .map_err(|e| failed(format!("optimize options: {e}")))?;
            check_template(&template, &options, s.experts).map_err(failed)?;
            let mut fitted = s.services.optimize(&template, &options)?;
            // The teacher's tensors are an input only, whatever the services returned.
            fitted
                .tensors
                .retain(|name, _| !name.starts_with(TEACHER_TENSOR_PREFIX));
            Ok(ReplyBox::fitted(fitted))
        })
    }
}

/// Checks an optimisation template, and its teacher's plan and tensors (which travel in the
/// template's tensors under a prefix) when it distils.
fn check_template(
    template: &Fitted,
    options: &OptimizeOptions,
    experts: &[ExpertView<'_>],
) -> Result<(), String> {
    let (own, teacher_tensors) = split_teacher_tensors(&template.tensors);
    let own = Fitted {
        plan: template.plan.clone(),
        tensors: own,
    };
    check_fitted(&own, experts, RouterTensors::Optional)
        .map_err(|e| format!("optimize template: {e}"))?;
    match &options.teacher {
        Some(teacher) => {
            let teacher = Fitted {
                plan: (**teacher).clone(),
                tensors: teacher_tensors,
            };
            check_fitted(&teacher, experts, RouterTensors::Required)
                .map_err(|e| format!("optimize options: teacher: {e}"))
        }
        None if !teacher_tensors.is_empty() => Err(format!(
            "optimize template: tensors under {TEACHER_TENSOR_PREFIX:?} are a teacher's, but \
             the options name no teacher"
        )),
        None => Ok(()),
    }
}

unsafe extern "C" fn host_progress(host: *mut c_void, fraction: f64, message: FfiStr) {
    let run = AssertUnwindSafe(|| {
        // SAFETY: as in `host_evaluate`.
        let state = unsafe { &*host.cast::<HostState<'_>>() };
        let message = unsafe { message.to_str() }.unwrap_or("(a message that is not UTF-8)");
        state.services.progress(fraction, message);
    });
    let _ = catch_unwind(run);
}

unsafe extern "C" fn host_cancelled(host: *mut c_void) -> u8 {
    // SAFETY: as in `host_evaluate`.
    let run = AssertUnwindSafe(|| {
        unsafe { &*host.cast::<HostState<'_>>() }
            .services
            .cancelled()
    });
    // A host that cannot answer is treated as asking to stop.
    u8::from(catch_unwind(run).unwrap_or(true))
}

unsafe extern "C" fn host_free_reply(_host: *mut c_void, reply: *mut FfiReply) {
    // SAFETY: the plugin hands back a reply a service of ours made, once.
    let _ = catch_unwind(|| unsafe { ReplyBox::free(reply) });
}
