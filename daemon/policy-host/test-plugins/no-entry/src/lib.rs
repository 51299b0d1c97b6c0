//! A test library that is not a moerge plugin: it exports a function, but not the entry
//! symbol.

/// Some other symbol.
#[no_mangle]
pub extern "C" fn not_a_moerge_policy() -> u32 {
    7
}
