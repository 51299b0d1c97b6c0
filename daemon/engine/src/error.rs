//! The engine's typed error: every variant says which file, tensor or argument is at fault.

use std::path::PathBuf;

/// What went wrong while loading a model or running one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// The base model folder could not be read (missing files, bad headers).
    #[error(transparent)]
    Base(#[from] moerge_library::BaseError),
    /// `config.json` does not describe a model this engine can build.
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    /// The model family named by `model_type` is not implemented.
    #[error(
        "{path}: model_type \"{model_type}\" is not supported (supported: phi, llama, mistral, qwen2)"
    )]
    UnsupportedModel { path: PathBuf, model_type: String },
    /// `tokenizer.json` is missing or unreadable.
    #[error("{path}: cannot load the tokenizer: {message}")]
    Tokenizer { path: PathBuf, message: String },
    /// An adapter does not fit this base model.
    #[error("adapter {adapter}: {reason}")]
    Incompatible { adapter: String, reason: String },
    /// A caller passed an argument the engine cannot use.
    #[error("invalid argument {argument}: {message}")]
    InvalidArgument {
        argument: &'static str,
        message: String,
    },
    /// The compute worker is gone (it panicked or was shut down).
    #[error("the compute worker stopped: {0}")]
    WorkerGone(String),
    /// A tensor operation failed; the message names the tensor where candle knows it.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Shorthand used throughout the engine.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;
