//! Replies across the ABI: how one side allocates a [`FfiReply`] (in a [`ReplyBox`] that the
//! same side frees) and how the other side copies it out before handing it back.

use std::collections::BTreeMap;

use super::{FfiFitted, FfiReply, FfiStr, FfiTensor, STATUS_CANCELLED, STATUS_FAILED, STATUS_OK};
use crate::plan::Plan;
use crate::policy::{Fitted, TensorData};

/// A borrowed C view of a [`Fitted`]: valid while the `Fitted` it was made from is alive and
/// unchanged, and while this view is.
pub(crate) struct FittedView {
    json: String,
    tensors: Vec<FfiTensor>,
}

impl FittedView {
    pub(crate) fn new(fitted: &Fitted) -> FittedView {
        let json = serde_json::to_string(&fitted.plan).expect("plans serialise");
        let tensors = fitted
            .tensors
            .iter()
            .map(|(name, t)| FfiTensor {
                name: FfiStr::new(name),
                shape: t.shape.as_ptr(),
                ndim: t.shape.len(),
                data: t.data.as_ptr(),
                len: t.data.len(),
            })
            .collect();
        FittedView { json, tensors }
    }

    pub(crate) fn ffi(&self) -> FfiFitted {
        FfiFitted {
            plan_json: FfiStr::new(&self.json),
            tensors: self.tensors.as_ptr(),
            n_tensors: self.tensors.len(),
        }
    }
}

/// The allocation behind a reply. `reply` is the first field of a `repr(C)` struct, so the
/// `*mut FfiReply` handed out is also the `*mut ReplyBox` that [`ReplyBox::free`] takes back.
#[repr(C)]
pub(crate) struct ReplyBox {
    reply: FfiReply,
    error: String,
    fitted: Option<Fitted>,
    view: Option<FittedView>,
    text: String,
    values: Vec<f64>,
}

impl ReplyBox {
    fn into_raw(mut boxed: Box<ReplyBox>) -> *mut FfiReply {
        boxed.view = boxed.fitted.as_ref().map(FittedView::new);
        let fitted = match &boxed.view {
            Some(view) => view.ffi(),
            None => FfiFitted {
                plan_json: FfiStr::new(&boxed.text),
                tensors: std::ptr::null(),
                n_tensors: 0,
            },
        };
        boxed.reply.error = FfiStr::new(&boxed.error);
        boxed.reply.fitted = fitted;
        boxed.reply.values = boxed.values.as_ptr();
        boxed.reply.n_values = boxed.values.len();
        Box::into_raw(boxed).cast::<FfiReply>()
    }

    fn empty(status: u32) -> Box<ReplyBox> {
        Box::new(ReplyBox {
            reply: FfiReply {
                status,
                error: FfiStr::new(""),
                fitted: FfiFitted {
                    plan_json: FfiStr::new(""),
                    tensors: std::ptr::null(),
                    n_tensors: 0,
                },
                values: std::ptr::null(),
                n_values: 0,
            },
            error: String::new(),
            fitted: None,
            view: None,
            text: String::new(),
            values: Vec::new(),
        })
    }

    pub(crate) fn fitted(fitted: Fitted) -> *mut FfiReply {
        let mut b = Self::empty(STATUS_OK);
        b.fitted = Some(fitted);
        Self::into_raw(b)
    }

    /// A reply carrying JSON text (in `fitted.plan_json`).
    pub(crate) fn text(text: String) -> *mut FfiReply {
        let mut b = Self::empty(STATUS_OK);
        b.text = text;
        Self::into_raw(b)
    }

    pub(crate) fn values(values: Vec<f64>) -> *mut FfiReply {
        let mut b = Self::empty(STATUS_OK);
        b.values = values;
        Self::into_raw(b)
    }

    pub(crate) fn failed(message: String) -> *mut FfiReply {
        let mut b = Self::empty(STATUS_FAILED);
        b.error = message;
        Self::into_raw(b)
    }

    pub(crate) fn cancelled() -> *mut FfiReply {
        Self::into_raw(Self::empty(STATUS_CANCELLED))
    }

    /// # Safety
    /// `reply` must come from one of this module's constructors, in this very binary, and
    /// not have been freed.
    pub(crate) unsafe fn free(reply: *mut FfiReply) {
        if !reply.is_null() {
            // SAFETY: per the contract, `reply` is the start of a leaked `Box<ReplyBox>`.
            drop(unsafe { Box::from_raw(reply.cast::<ReplyBox>()) });
        }
    }
}

/// Why the other side's reply gives no value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum ReplyError {
    Failed(String),
    Cancelled,
}

/// Reads `reply` with `read` (on success), then frees it with `free` in every case.
///
/// # Safety
/// `reply` must be null or a reply the other side made and has not freed, whose pointers
/// follow the ABI's rules; `free` must be that side's free function.
pub(crate) unsafe fn read_reply<T>(
    reply: *mut FfiReply,
    read: impl FnOnce(&FfiReply) -> Result<T, String>,
    free: impl FnOnce(*mut FfiReply),
) -> Result<T, ReplyError> {
    if reply.is_null() {
        return Err(ReplyError::Failed(
            "returned no reply (a null pointer)".into(),
        ));
    }
    // SAFETY: non-null and valid until freed, per the contract.
    let r = unsafe { &*reply };
    let out = match r.status {
        STATUS_OK => read(r).map_err(|e| ReplyError::Failed(format!("malformed reply: {e}"))),
        STATUS_CANCELLED => Err(ReplyError::Cancelled),
        STATUS_FAILED => Err(ReplyError::Failed(
            // SAFETY: the error string is valid while the reply is.
            unsafe { r.error.to_str() }.map_or_else(|e| e, str::to_owned),
        )),
        other => Err(ReplyError::Failed(format!("unknown reply status {other}"))),
    };
    free(reply);
    out
}

/// Copies a fitted plan and its tensors out of a C view.
///
/// # Safety
/// Every pointer in `f` must follow the ABI's rules and be valid for the call.
pub(crate) unsafe fn read_fitted(f: &FfiFitted) -> Result<Fitted, String> {
    // SAFETY: per the contract.
    let json = unsafe { f.plan_json.to_str() }?;
    let plan: Plan = serde_json::from_str(json).map_err(|e| format!("plan JSON: {e}"))?;
    let mut tensors = BTreeMap::new();
    if f.n_tensors > 0 {
        if f.tensors.is_null() {
            return Err("a null tensor list".into());
        }
        // SAFETY: `n_tensors` entries at `tensors`, per the contract.
        for t in unsafe { std::slice::from_raw_parts(f.tensors, f.n_tensors) } {
            // SAFETY: per the contract.
            let name = unsafe { t.name.to_str() }?.to_owned();
            // SAFETY: per the contract: `ndim` and `len` entries.
            let shape = unsafe { slice(t.shape, t.ndim) }?.to_vec();
            let data = unsafe { slice(t.data, t.len) }?.to_vec();
            if tensors
                .insert(name.clone(), TensorData { shape, data })
                .is_some()
            {
                return Err(format!("tensor {name:?} is given twice"));
            }
        }
    }
    Ok(Fitted { plan, tensors })
}

/// A slice from a C pointer and length, refusing null with a non-zero length.
///
/// # Safety
/// `ptr` must be valid for `len` reads for `'a`.
pub(crate) unsafe fn slice<'a, T>(ptr: *const T, len: usize) -> Result<&'a [T], String> {
    if len == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err("a null pointer with a non-zero length".into());
    }
    // SAFETY: per the contract.
    Ok(unsafe { std::slice::from_raw_parts(ptr, len) })
}
