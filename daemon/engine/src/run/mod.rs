//! Running a fused model: logits, scores, top tokens and generation (`inference`), routing
//! traces (`explain`), examples and their loss (`examples`), the tokenizer, and the compute
//! worker that runs jobs off the caller's threads.

pub(crate) mod examples;
pub(crate) mod explain;
pub mod inference;
mod tokenizer;
mod worker;

pub use tokenizer::{write_byte_level_tokenizer, StreamDecoder, TextTokenizer};
pub use worker::{ComputeWorker, Pending};
