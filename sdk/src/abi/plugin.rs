//! The plugin side of the ABI, instantiated by [`crate::export_policy!`]: the declaration,
//! the `extern "C"` trampolines that turn C input into a [`FitContext`] and a result into a
//! reply, and the host services seen through C function pointers. Not for direct use.

use std::ffi::{c_char, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::OnceLock;

use super::reply::{read_fitted, read_reply, slice, FittedView, ReplyBox, ReplyError};
use super::{
    panic_message, FfiFitInput, FfiHostServices, FfiReply, FfiStr, PolicyDeclaration, ABI_VERSION,
    SDK_VERSION, SPLIT_TRAIN, SPLIT_VALID,
};
use crate::optimize::OptimizeOptions;
use crate::params::Params;
use crate::policy::{
    ExpertView, FitContext, FitInputs, Fitted, HostServices, ModuleFactors, Policy, PolicyError,
    Record, ServiceError, Split,
};

/// Where `export_policy!` keeps the declaration: built on the first call of the entry symbol.
pub struct DeclarationSlot(OnceLock<DeclarationPtr>);

struct DeclarationPtr(*const PolicyDeclaration);
// SAFETY: the declaration is immutable after construction and lives forever.
unsafe impl Send for DeclarationPtr {}
// SAFETY: as above.
unsafe impl Sync for DeclarationPtr {}

impl DeclarationSlot {
    #[allow(clippy::new_without_default)]
    pub const fn new() -> Self {
        DeclarationSlot(OnceLock::new())
    }

    /// The declaration, constructing the policy with `make` the first time; null if that
    /// panicked (the panic is reported on stderr by the panic hook).
    pub fn get<P: Policy + 'static>(&self, make: impl FnOnce() -> P) -> *const PolicyDeclaration {
        catch_unwind(AssertUnwindSafe(|| {
            self.0.get_or_init(|| DeclarationPtr(declare(make()))).0
        }))
        .unwrap_or(std::ptr::null())
    }
}

fn declare<P: Policy + 'static>(policy: P) -> *const PolicyDeclaration {
    let policy: &'static P = Box::leak(Box::new(policy));
    let c_string = |s: &str| -> *const c_char {
        CString::new(s.replace('\0', ""))
            .expect("NULs removed")
            .into_raw()
    };
    let declaration = PolicyDeclaration {
        abi_version: ABI_VERSION,
        sdk_version: c_string(SDK_VERSION),
        name: c_string(policy.name()),
        version: c_string(policy.version()),
        instance: (policy as *const P).cast::<c_void>(),
        parameters: parameters::<P>,
        fit: fit::<P>,
        free_reply,
    };
    Box::leak(Box::new(declaration))
}

unsafe extern "C" fn parameters<P: Policy>(instance: *const c_void) -> *mut FfiReply {
    let run = AssertUnwindSafe(|| {
        // SAFETY: `instance` is the `&'static P` this declaration was built with.
        let policy = unsafe { &*instance.cast::<P>() };
        serde_json::to_string(&policy.parameters()).expect("parameter specs serialise")
    });
    match catch_unwind(run) {
        Ok(json) => ReplyBox::text(json),
        Err(payload) => ReplyBox::failed(panic_message(&*payload)),
    }
}

unsafe extern "C" fn fit<P: Policy>(
    instance: *const c_void,
    input: *const FfiFitInput,
) -> *mut FfiReply {
    // SAFETY: the host passes this declaration's instance and a valid input (ABI contract).
    let run = AssertUnwindSafe(|| unsafe { fit_inner(&*instance.cast::<P>(), &*input) });
    match catch_unwind(run) {
        Ok(Ok(fitted)) => ReplyBox::fitted(fitted),
        Ok(Err(PolicyError::Cancelled)) => ReplyBox::cancelled(),
        Ok(Err(e)) => ReplyBox::failed(e.to_string()),
        Err(payload) => ReplyBox::failed(panic_message(&*payload)),
    }
}

unsafe extern "C" fn free_reply(reply: *mut FfiReply) {
    // SAFETY: the host hands back a reply this plugin made, once (ABI contract).
    let _ = catch_unwind(|| unsafe { ReplyBox::free(reply) });
}

/// # Safety
/// Every pointer in `input` must follow the ABI's rules for the duration of the call.
unsafe fn fit_inner<P: Policy>(policy: &P, input: &FfiFitInput) -> Result<Fitted, PolicyError> {
    let malformed = |e: String| PolicyError::invalid(format!("the host sent malformed input: {e}"));
    // SAFETY (all reads below): the host guarantees the ABI's rules for the call.
    let experts = unsafe { slice(input.experts, input.n_experts) }.map_err(malformed)?;
    let mut views = Vec::with_capacity(experts.len());
    for e in experts {
        let tasks = unsafe { e.tasks_json.to_str() }.map_err(malformed)?;
        let mut modules = Vec::new();
        for m in unsafe { slice(e.modules, e.n_modules) }.map_err(malformed)? {
            modules.push(ModuleFactors {
                module: unsafe { m.module.to_str() }.map_err(malformed)?,
                rank: m.rank,
                in_features: m.in_features,
                out_features: m.out_features,
                scale: m.scale,
                a: unsafe { slice(m.a, m.rank * m.in_features) }.map_err(malformed)?,
                b: unsafe { slice(m.b, m.out_features * m.rank) }.map_err(malformed)?,
            });
        }
        views.push(ExpertView {
            name: unsafe { e.name.to_str() }.map_err(malformed)?.to_owned(),
            hash: unsafe { e.hash.to_str() }.map_err(malformed)?.to_owned(),
            tasks: serde_json::from_str(tasks).map_err(|e| malformed(e.to_string()))?,
            modules,
        });
    }
    let records = |s: FfiStr| -> Result<Vec<Record>, PolicyError> {
        let text = unsafe { s.to_str() }.map_err(malformed)?;
        serde_json::from_str(text).map_err(|e| malformed(format!("records: {e}")))
    };
    let train = records(input.train_json)?;
    let valid = records(input.valid_json)?;
    let values =
        Params::values_from_json(unsafe { input.params_json.to_str() }.map_err(malformed)?)?;
    let params = Params::resolve(&policy.parameters(), values)?;
    let services = AbiServices(&input.services);
    let inputs = FitInputs {
        experts: &views,
        train: &train,
        valid: &valid,
    };
    policy.fit(&FitContext::new(inputs, &services), &params)
}

/// The host's services through the C table.
struct AbiServices<'a>(&'a FfiHostServices);

fn service_error(e: ReplyError) -> ServiceError {
    match e {
        ReplyError::Cancelled => ServiceError::Cancelled,
        ReplyError::Failed(m) => ServiceError::Failed(m),
    }
}

impl HostServices for AbiServices<'_> {
    fn evaluate(&self, fitted: &Fitted, split: Split) -> Result<Vec<f64>, ServiceError> {
        let t = self.0;
        let view = FittedView::new(fitted);
        let split = match split {
            Split::Train => SPLIT_TRAIN,
            Split::Valid => SPLIT_VALID,
        };
        // SAFETY: the table is valid during fit; `view` outlives the call; the reply is read
        // before it is handed back to the host's free function.
        unsafe {
            let reply = (t.evaluate)(t.host, &view.ffi(), split);
            read_reply(
                reply,
                |r| slice(r.values, r.n_values).map(<[f64]>::to_vec),
                |r| (t.free_reply)(t.host, r),
            )
        }
        .map_err(service_error)
    }

    fn optimize(
        &self,
        template: &Fitted,
        options: &OptimizeOptions,
    ) -> Result<Fitted, ServiceError> {
        let t = self.0;
        let view = FittedView::new(template);
        let options = serde_json::to_string(options).expect("options serialise");
        // SAFETY: as in `evaluate`.
        unsafe {
            let reply = (t.optimize)(t.host, &view.ffi(), FfiStr::new(&options));
            read_reply(
                reply,
                |r| read_fitted(&r.fitted),
                |r| (t.free_reply)(t.host, r),
            )
        }
        .map_err(service_error)
    }

    fn progress(&self, fraction: f64, message: &str) {
        // SAFETY: the table is valid during fit; the message is borrowed for the call.
        unsafe { (self.0.progress)(self.0.host, fraction, FfiStr::new(message)) }
    }

    fn cancelled(&self) -> bool {
        // SAFETY: the table is valid during fit.
        unsafe { (self.0.cancelled)(self.0.host) != 0 }
    }
}

/// Exports a [`Policy`](crate::policy::Policy) as a moerge plugin: defines the entry symbol
/// `moerge_policy_declaration` and everything behind it (the function table, panic catching,
/// conversions between C and the safe types). Write it once, at the crate root of a
/// `cdylib`:
///
/// ```
/// # use moerge_sdk::{params::*, policy::*};
/// # struct Arrow { top_k: usize }
/// # impl Arrow { fn new(top_k: usize) -> Arrow { Arrow { top_k } } }
/// # impl Policy for Arrow {
/// #     fn name(&self) -> &str { "arrow" }
/// #     fn version(&self) -> &str { "0.1.0" }
/// #     fn parameters(&self) -> Vec<ParamSpec> { vec![] }
/// #     fn fit(&self, _: &FitContext<'_>, _: &Params) -> Result<Fitted, PolicyError> {
/// #         Err(PolicyError::invalid("not in this example"))
/// #     }
/// # }
/// // `export_policy!(Arrow);` when the policy is `Default`; else a constructor expression:
/// moerge_sdk::export_policy!(Arrow, Arrow::new(4));
/// # assert!(!moerge_policy_declaration().is_null());
/// ```
///
/// The policy is constructed once, on the host's first look at the declaration.
#[macro_export]
macro_rules! export_policy {
    ($policy:ty) => {
        $crate::export_policy!($policy, <$policy as ::core::default::Default>::default());
    };
    ($policy:ty, $make:expr) => {
        /// The moerge plugin entry point (see `moerge_sdk::abi`).
        #[no_mangle]
        pub extern "C" fn moerge_policy_declaration() -> *const $crate::abi::PolicyDeclaration {
            static SLOT: $crate::abi::plugin::DeclarationSlot =
                $crate::abi::plugin::DeclarationSlot::new();
            SLOT.get::<$policy>(|| $make)
        }
    };
}
