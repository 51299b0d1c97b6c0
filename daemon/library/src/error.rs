//! Typed errors of the library layer: why an adapter folder or a base model folder is refused,
//! and why a valid adapter does not fit a base model.
//!
//! Every message names the file at fault and the tensor or key inside it, says what is wrong
//! and, where there is one, what to do about it: these strings reach admins verbatim through
//! `moerge inspect` and the daemon's "rejected" state.

use std::path::PathBuf;

use crate::safetensors_header::{Dtype, HeaderError};

/// Why an adapter folder cannot be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdapterError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: no adapter_config.json; a PEFT LoRA adapter folder holds adapter_config.json and adapter_model.safetensors")]
    MissingConfig { dir: PathBuf },
    #[error("{dir}: adapter_model.safetensors is missing and adapter_model.bin is a pickle, which moerge never reads because loading a pickle can run arbitrary code; convert it with PEFT: model.save_pretrained(dir, safe_serialization=True)")]
    PickleOnly { dir: PathBuf },
    #[error("{dir}: no adapter_model.safetensors; save the adapter with PEFT's save_pretrained")]
    MissingWeights { dir: PathBuf },
    #[error("{path}: not valid JSON: {message}")]
    ConfigNotJson { path: PathBuf, message: String },
    #[error("{path}: key {key:?} {problem}")]
    ConfigKey {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error(
        "{path}: key {key:?} holds {pattern:?}, which is not a valid regular expression: {message}"
    )]
    InvalidPattern {
        path: PathBuf,
        key: String,
        pattern: String,
        message: String,
    },
    #[error("{path}: key \"peft_type\" is {peft_type:?}; moerge only serves LoRA adapters (peft_type \"LORA\")")]
    UnsupportedPeftType { path: PathBuf, peft_type: String },
    #[error("{path}: key \"use_dora\" is true; DoRA adapters are not supported (their magnitude vectors change the base weight, not only add B·A)")]
    Dora { path: PathBuf },
    #[error("{path}: key \"modules_to_save\" lists {modules:?}; fully saved modules are not supported and moerge will not drop them silently; retrain without modules_to_save")]
    ModulesToSave { path: PathBuf, modules: Vec<String> },
    #[error("{path}: key \"trainable_token_indices\" is set ({value}); trainable token embeddings are not supported and moerge will not drop them silently")]
    TrainableTokens { path: PathBuf, value: String },
    #[error("{path}: key {key:?} is {value}; {why}")]
    UnsupportedOption {
        path: PathBuf,
        key: String,
        value: String,
        why: String,
    },
    #[error("{path}: {source}")]
    Safetensors { path: PathBuf, source: HeaderError },
    #[error("{path}: tensor {tensor} is {what}, which moerge does not support; only lora_A/lora_B weights of linear layers are (keys base_model.model.<module>.lora_A[.<adapter>].weight)")]
    UnsupportedTensor {
        path: PathBuf,
        tensor: String,
        what: String,
    },
    #[error("{path}: tensor {tensor} has dtype {dtype}; LoRA factors must be F32, F16 or BF16")]
    UnsupportedDtype {
        path: PathBuf,
        tensor: String,
        dtype: Dtype,
    },
    #[error("{path}: tensors {first} and {second} carry different adapter names; a file must hold exactly one adapter")]
    MixedAdapterNames {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("{path}: tensor {present} has no matching {missing} tensor for module {module} (incomplete LoRA pair)")]
    IncompletePair {
        path: PathBuf,
        module: String,
        present: String,
        missing: &'static str,
    },
    #[error("{path}: tensor {tensor} has shape {shape:?}; a LoRA {factor} factor must be a 2-D matrix with no zero dimension ({expected})")]
    FactorNotMatrix {
        path: PathBuf,
        tensor: String,
        factor: &'static str,
        shape: Vec<usize>,
        expected: &'static str,
    },
    #[error("{path}: ranks disagree: {a} has shape {a_shape:?} (rank {}) but {b} has shape {b_shape:?} (rank {})", .a_shape[0], .b_shape[1])]
    RankMismatch {
        path: PathBuf,
        a: String,
        a_shape: [usize; 2],
        b: String,
        b_shape: [usize; 2],
    },
    #[error("{path}: tensor {tensor} has rank {rank} but adapter_config.json sets {source_key} = {expected} for module {module}")]
    RankDisagreesWithConfig {
        path: PathBuf,
        module: String,
        tensor: String,
        rank: usize,
        expected: usize,
        source_key: String,
    },
    #[error("{path}: tensor {tensor} adapts module {module}, which adapter_config.json does not target (see target_modules, exclude_modules, layers_to_transform)")]
    NotTargeted {
        path: PathBuf,
        module: String,
        tensor: String,
    },
    #[error("{path}: tensor {tensor} holds a non-finite value ({value}) at element {index}")]
    NonFinite {
        path: PathBuf,
        tensor: String,
        index: usize,
        value: f32,
    },
    #[error(
        "{path}: no LoRA tensors at all (no base_model.model.<module>.lora_A/.lora_B weights)"
    )]
    NoLoraTensors { path: PathBuf },
}

/// Why a base model folder cannot be read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BaseError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir}: no config.json; a base model folder holds config.json and model.safetensors (or model.safetensors.index.json and its shards)")]
    MissingConfig { dir: PathBuf },
    #[error("{path}: not valid JSON: {message}")]
    NotJson { path: PathBuf, message: String },
    #[error("{path}: key {key:?} {problem}")]
    ConfigKey {
        path: PathBuf,
        key: String,
        problem: String,
    },
    #[error("{dir}: only pickle weights ({file}) found, which moerge never reads because loading a pickle can run arbitrary code; save the model with safe_serialization=True")]
    PickleOnly { dir: PathBuf, file: String },
    #[error("{dir}: no model.safetensors and no model.safetensors.index.json")]
    MissingWeights { dir: PathBuf },
    #[error("{path}: {source}")]
    Safetensors { path: PathBuf, source: HeaderError },
    #[error("{path}: weight_map sends tensor {tensor} to shard {shard:?}, {problem}")]
    BadShard {
        path: PathBuf,
        tensor: String,
        shard: String,
        problem: String,
    },
    #[error("{path}: tensor {tensor} also appears in {other}")]
    DuplicateTensor {
        path: PathBuf,
        tensor: String,
        other: PathBuf,
    },
}

/// Why a valid adapter cannot be applied to a given base model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Incompatibility {
    #[error("adapter {adapter}: module {module}: base {base} has no such linear layer; the adapter was probably trained for another base model")]
    MissingModule {
        adapter: String,
        base: String,
        module: String,
    },
    #[error("adapter {adapter}: module {module}: adapter expects in={adapter_in},out={adapter_out} but base {base} has in={base_in},out={base_out}")]
    ShapeMismatch {
        adapter: String,
        base: String,
        module: String,
        adapter_in: usize,
        adapter_out: usize,
        base_in: usize,
        base_out: usize,
    },
}
