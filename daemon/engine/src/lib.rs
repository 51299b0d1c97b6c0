//! moerge's engine: the only layer that knows candle.
//!
//! It builds base models of the supported families (Phi, Llama-style) from Hugging Face
//! folders, attaches LoRA adapters read by `moerge-library` to their linear layers, and
//! computes logits, completion scores, top tokens and generations on dedicated compute
//! threads.
//!
//! ```no_run
//! use moerge_engine::{BaseModel, Precision, TextTokenizer, inference};
//! use moerge_library::Adapter;
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let base = BaseModel::load_dir("path/to/base-model".as_ref(), Precision::F32)?;
//! let tokenizer = TextTokenizer::from_dir(base.info().dir())?;
//! let adapter = Adapter::load("path/to/peft-adapter".as_ref())?;
//! let model = base.with_adapter(&adapter)?;
//! let score = inference::score(&model, &tokenizer.encode("abc>")?, &tokenizer.encode("ABC\n")?)?;
//! println!("mean NLL {:.3}", score.mean_nll());
//! # Ok(()) }
//! ```

mod adapter_linear;
pub mod arrow;
mod config;
pub mod distill;
mod ensemble_fit;
mod error;
mod fused;
pub mod inference;
mod kernels;
mod layers;
mod linalg;
mod llama;
pub mod merge;
mod model;
mod phi;
pub mod plan_fit;
pub mod routing;
pub mod services;
mod threads;
mod tokenizer;
mod trainable;
pub mod trainer;
mod worker;

pub use adapter_linear::AdapterLinear;
pub use error::{EngineError, Result};
pub use fused::{EnsembleModel, FusedModel, LanguageModel};
pub use layers::KvCache;
pub use llama::{Llama, LlamaConfig};
pub use model::{BaseModel, Precision};
pub use phi::{Phi, PhiConfig};
pub use threads::prefer_data_parallelism;
pub use tokenizer::{write_byte_level_tokenizer, StreamDecoder, TextTokenizer};
pub use trainable::{write_random_base, LoraSpec, TrainableBase, TrainableLora};
pub use worker::{ComputeWorker, Pending};
