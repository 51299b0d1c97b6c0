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

// The layers, bottom first; each names only the ones above it in this list (checked by
// `tests/layering.rs`, drawn in ARCHITECTURE.md).
mod error;
mod fit;
mod models;
mod nn;
mod plan;
mod run;
pub mod services;
mod train;

pub use error::{EngineError, Result};
pub use models::{BaseModel, LanguageModel, Llama, LlamaConfig, Phi, PhiConfig, Precision};
pub use nn::{prefer_data_parallelism, AdapterLinear, ForwardState};
pub use plan::{EnsembleModel, FusedModel};
pub use run::inference;
pub use run::{write_byte_level_tokenizer, ComputeWorker, Pending, StreamDecoder, TextTokenizer};
pub use train::trainable::{write_random_base, LoraSpec, TrainableBase, TrainableLora};

/// Arrow prototypes: each expert module's top right singular vector.
pub mod arrow {
    pub use crate::plan::arrow::prototype;
}

/// Static merges, and their export as a PEFT adapter folder.
pub mod merge {
    pub use crate::plan::export::export_peft;
    pub use crate::plan::merge::{merged_modules, MergedModule};
}

/// Which units routed modules chose, for `explain`.
pub mod routing {
    pub use crate::nn::RoutingRecord;
    pub use crate::run::explain::{explain, trace, ModuleRouting};
}

/// Examples, their loss, and the optimiser loop.
pub mod trainer {
    pub use crate::run::examples::{batch_loss, example_losses, tokenize_records, Example};
    pub use crate::train::trainer::{
        learning_rate, train, train_with_loss, StepReport, TrainOptions, TrainSummary,
    };
}

/// Fitting a plan's parameters (what a policy's `optimize` runs).
pub mod plan_fit {
    pub use crate::fit::plan_fit::{
        evaluate_plan, fit_plan, FittedPlan, PlanFitOptions, RouterInit,
    };
}

/// Distillation: a teacher plan whose distributions a fit learns to match.
pub mod distill {
    pub use crate::fit::distill::{Teacher, TEACHER_CACHE_FLOATS};
}
