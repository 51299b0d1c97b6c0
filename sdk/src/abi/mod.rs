//! The plugin C ABI (version [`ABI_VERSION`]): the only contract between the host and a
//! policy library, so a plugin built with another compiler version still loads.
//!
//! A plugin exports one symbol, [`ENTRY_SYMBOL`] (`moerge_policy_declaration`), an
//! `extern "C" fn() -> *const PolicyDeclaration`. Plugin authors never write it by hand:
//! [`crate::export_policy!`] does. The host reads `abi_version` — the first field, in every
//! ABI version — and refuses a mismatch before it reads or calls anything else.
//!
//! Only C types cross: `(pointer, length)` UTF-8 strings ([`FfiStr`]), JSON text for plans,
//! parameters, options, records and metadata, and raw `*const f32` with shapes for factors
//! and tensors. Host services are C function pointers with an opaque `host` pointer.
//!
//! # Ownership
//! - The declaration, its strings and the policy instance are the plugin's, live until the
//!   process ends (libraries are never unloaded), and are read-only.
//! - Everything in a [`FfiFitInput`] (expert views, factor slices, JSON text, the services
//!   table) is the host's and borrowed by the plugin for the duration of the `fit` call only.
//! - A [`FfiReply`] returned by the plugin (`parameters`, `fit`) is the plugin's: the host
//!   copies what it needs and passes it back to the declaration's `free_reply`, exactly once.
//! - A [`FfiReply`] returned by a host service (`evaluate`, `optimize`) is the host's: the
//!   plugin copies it and passes it back to the services' `free_reply`, exactly once.
//! - A [`FfiFitted`] passed to a host service is the plugin's, borrowed for that call only.
//!
//! Every function on both sides catches panics and reports them as a failed reply; no panic
//! unwinds across the boundary.

pub mod host;
#[doc(hidden)]
pub mod plugin;
mod reply;

use std::ffi::{c_char, c_void};

pub use host::{DeclarationError, DeclaredPolicy, FitCallError};

/// The ABI this SDK speaks.
pub const ABI_VERSION: u32 = 1;

/// The one symbol a plugin exports.
pub const ENTRY_SYMBOL: &str = "moerge_policy_declaration";

/// The version of this SDK crate, recorded in every declaration.
pub const SDK_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The type of [`ENTRY_SYMBOL`]. Returns null if the policy could not be constructed.
pub type EntryFn = unsafe extern "C" fn() -> *const PolicyDeclaration;

/// What a plugin declares. `abi_version` stays the first field in every ABI version.
#[repr(C)]
#[derive(Debug)]
pub struct PolicyDeclaration {
    pub abi_version: u32,
    /// NUL-terminated UTF-8, owned by the plugin, static.
    pub sdk_version: *const c_char,
    pub name: *const c_char,
    pub version: *const c_char,
    /// The policy instance, passed back to every function below.
    pub instance: *const c_void,
    /// The parameter schema: a reply whose `json` is a JSON array of
    /// [`crate::params::ParamSpec`]. Free with `free_reply`.
    pub parameters: unsafe extern "C" fn(instance: *const c_void) -> *mut FfiReply,
    /// Runs the policy. `input` is borrowed for the call. The reply carries the plan JSON and
    /// tensors in `fitted`, or an error. Free with `free_reply`.
    pub fit:
        unsafe extern "C" fn(instance: *const c_void, input: *const FfiFitInput) -> *mut FfiReply,
    /// Frees a reply this plugin returned.
    pub free_reply: unsafe extern "C" fn(reply: *mut FfiReply),
}

/// A borrowed UTF-8 string: `len` bytes at `ptr`, not NUL-terminated; `ptr` may be null when
/// `len` is 0.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct FfiStr {
    pub ptr: *const u8,
    pub len: usize,
}

impl FfiStr {
    /// Borrows `s`; the result is valid while `s` is.
    pub fn new(s: &str) -> FfiStr {
        FfiStr {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// # Safety
    /// `ptr` must point to `len` readable bytes that stay valid and unchanged for `'a`.
    pub unsafe fn to_str<'a>(self) -> Result<&'a str, String> {
        if self.len == 0 {
            return Ok("");
        }
        if self.ptr.is_null() {
            return Err("a null string pointer with a non-zero length".into());
        }
        // SAFETY: the caller guarantees `len` readable bytes at `ptr` for `'a`.
        let bytes = unsafe { std::slice::from_raw_parts(self.ptr, self.len) };
        std::str::from_utf8(bytes).map_err(|e| format!("a string that is not UTF-8: {e}"))
    }
}

/// One module's factors, borrowed: `a` holds `rank × in_features` values, `b` holds
/// `out_features × rank`, both row-major.
#[repr(C)]
pub struct FfiModule {
    pub module: FfiStr,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub scale: f64,
    pub a: *const f32,
    pub b: *const f32,
}

/// One expert, borrowed. `tasks_json` is a JSON array of strings.
#[repr(C)]
pub struct FfiExpert {
    pub name: FfiStr,
    pub hash: FfiStr,
    pub tasks_json: FfiStr,
    pub modules: *const FfiModule,
    pub n_modules: usize,
}

/// A tensor: `shape` has `ndim` entries, `data` has their product of values, row-major.
#[repr(C)]
pub struct FfiTensor {
    pub name: FfiStr,
    pub shape: *const usize,
    pub ndim: usize,
    pub data: *const f32,
    pub len: usize,
}

/// A plan (JSON) with its tensors.
#[repr(C)]
pub struct FfiFitted {
    pub plan_json: FfiStr,
    pub tensors: *const FfiTensor,
    pub n_tensors: usize,
}

/// Outcome codes of a [`FfiReply`].
pub const STATUS_OK: u32 = 0;
pub const STATUS_FAILED: u32 = 1;
pub const STATUS_CANCELLED: u32 = 2;

/// A reply owned by the side that made it (see the module docs for who frees it).
#[repr(C)]
pub struct FfiReply {
    /// [`STATUS_OK`], [`STATUS_FAILED`] (then `error` says why) or [`STATUS_CANCELLED`].
    pub status: u32,
    pub error: FfiStr,
    /// `parameters`: the schema JSON in `fitted.plan_json`; `fit`, `optimize`: the result.
    pub fitted: FfiFitted,
    /// `evaluate`: the per-example losses.
    pub values: *const f64,
    pub n_values: usize,
}

/// Split codes for `evaluate`.
pub const SPLIT_TRAIN: u32 = 0;
pub const SPLIT_VALID: u32 = 1;

/// The host's services, as C function pointers; `host` is passed back to each. Valid for the
/// duration of one `fit` call, on the thread that called `fit`.
#[repr(C)]
pub struct FfiHostServices {
    pub host: *mut c_void,
    /// Reply `values`: per-example losses. Free with `free_reply`.
    pub evaluate: unsafe extern "C" fn(
        host: *mut c_void,
        fitted: *const FfiFitted,
        split: u32,
    ) -> *mut FfiReply,
    /// `options_json` is an [`crate::optimize::OptimizeOptions`]. Reply `fitted`: the result.
    pub optimize: unsafe extern "C" fn(
        host: *mut c_void,
        template: *const FfiFitted,
        options_json: FfiStr,
    ) -> *mut FfiReply,
    pub progress: unsafe extern "C" fn(host: *mut c_void, fraction: f64, message: FfiStr),
    /// Non-zero when the caller asked to stop.
    pub cancelled: unsafe extern "C" fn(host: *mut c_void) -> u8,
    /// Frees a reply a service returned.
    pub free_reply: unsafe extern "C" fn(host: *mut c_void, reply: *mut FfiReply),
}

/// The inputs of one `fit` call, all borrowed from the host for the call.
#[repr(C)]
pub struct FfiFitInput {
    pub experts: *const FfiExpert,
    pub n_experts: usize,
    /// JSON arrays of [`crate::policy::Record`].
    pub train_json: FfiStr,
    pub valid_json: FfiStr,
    /// A JSON object of parameter values (checked again against the schema by the plugin).
    pub params_json: FfiStr,
    pub services: FfiHostServices,
}

/// The text of a caught panic's payload.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        format!("panicked: {s}")
    } else if let Some(s) = payload.downcast_ref::<String>() {
        format!("panicked: {s}")
    } else {
        "panicked (with a payload that is not a string)".to_owned()
    }
}
