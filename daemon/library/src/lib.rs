//! moerge's library layer: PEFT LoRA adapter folders (the "experts"), parsed strictly,
//! validated, memory-mapped and hashed; and base model folders, read from their
//! `config.json` and safetensors headers only.
//!
//! This crate knows nothing of candle, sled or D-Bus. It hands the engine plain bytes and
//! shapes ([`Adapter::tensor_bytes`], [`Adapter::tensor_f32`]) and tells the rest of the
//! daemon whether an adapter is ready, rejected (with a reason naming the file and the
//! tensor or key) or incompatible with a base model.
//!
//! An adapter is identified by its [`ContentHash`] and named after its folder.
//!
//! ```no_run
//! use std::path::Path;
//! use moerge_library::{inspect_adapter, Adapter, BaseModelInfo};
//!
//! let base = BaseModelInfo::from_dir(Path::new("models/dev-phi"))?;
//! let adapter = Adapter::load(Path::new("experts/rot13"))?;
//! adapter.check_compatible(&base)?;
//! for m in adapter.modules().values() {
//!     let a = adapter.tensor_f32(&m.a); // [rank, in_features], row-major
//!     println!("{}: rank {} scale {} ({} values in A)", m.module, m.rank, m.scale, a.len());
//! }
//! println!("{} {}", adapter.name(), adapter.hash().short());
//!
//! // `inspect` never fails: a broken folder comes back as `rejected` with the reason.
//! let report = inspect_adapter(Path::new("experts/broken"), Some(&base));
//! println!("{}", serde_json::to_string_pretty(&report)?);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod adapter;
pub mod base;
pub mod config;
pub mod error;
mod hash;
mod metadata;
mod ordered_json;
pub mod records;
pub mod safetensors_header;
pub mod source;
pub mod tensor_file;
mod write;

pub use adapter::{
    inspect_adapter, update_gram, Adapter, AdapterReport, AdapterState, LoraModule, ModuleReport,
    TensorRef,
};
pub use base::{BaseModelInfo, LinearShape};
pub use config::{AdapterConfig, TargetModules};
pub use error::{AdapterError, BaseError, Incompatibility};
pub use hash::{ContentHash, ParseHashError};
pub use metadata::{ExpertMetadata, METADATA_FILE};
pub use safetensors_header::{Dtype, HeaderError};
pub use tensor_file::{
    parse_tensor_file, read_tensor_file, tensor_file_bytes, tensor_file_hash, write_tensor_file,
    write_tensor_file_bytes, F32Tensor, TensorFileError, TensorMap,
};
pub use write::{write_adapter, NewAdapter, NewModule};

/// The name of a folder as given (`.` and `..` resolved), used to name adapters and bases.
pub(crate) fn folder_name(dir: &std::path::Path) -> String {
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
    // `.` or `..` have no file name; the canonical path does.
    name.or_else(|| {
        dir.canonicalize()
            .ok()?
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
    })
    .unwrap_or_else(|| dir.display().to_string())
}
