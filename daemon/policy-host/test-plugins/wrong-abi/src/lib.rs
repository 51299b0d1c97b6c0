//! A test plugin built "for ABI 2": its declaration starts with `abi_version: 2`, and nothing
//! after that field follows ABI 1. The host must refuse it having read only that field.

use std::ffi::c_void;

/// What a future ABI might declare: the version first, then a different layout.
#[repr(C)]
pub struct FutureDeclaration {
    pub abi_version: u32,
    pub something_else: *const c_void,
}

struct Declaration(FutureDeclaration);
// SAFETY: immutable, and the pointer is null.
unsafe impl Sync for Declaration {}

static DECLARATION: Declaration = Declaration(FutureDeclaration {
    abi_version: 2,
    something_else: std::ptr::null(),
});

/// The entry symbol, by hand.
#[no_mangle]
pub extern "C" fn moerge_policy_declaration() -> *const FutureDeclaration {
    &DECLARATION.0
}
