//! Training: the one optimiser loop (`trainer`), and what can be trained (`trainable`: fresh
//! LoRA factors saved as PEFT, a whole base, a random base checkpoint to start from).

pub(crate) mod trainable;
pub(crate) mod trainer;
