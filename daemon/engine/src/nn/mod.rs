//! The bottom layer: the linear layer with its low-rank update, attention, rotary embeddings,
//! norms, the fused CPU kernels, small linear algebra, the per-request forward state and how
//! a multi-row forward is split over threads. It knows nothing of plans, routing or training:
//! those attach their updates through [`LowRankUpdate`].

mod attention;
pub(crate) mod kernels;
pub(crate) mod linalg;
mod linear;
mod matmul;
mod norm;
mod rope;
mod state;
pub(crate) mod threads;
mod top_k;

pub(crate) use attention::{Heads, SelfAttention};
pub use linear::AdapterLinear;
pub(crate) use linear::{LowRankUpdate, UpdateInput};
pub(crate) use matmul::uses_kernels;
pub(crate) use norm::Norm;
pub(crate) use rope::{default_inv_freq, RotaryTables};
pub use state::{ForwardState, RoutingRecord};
pub use threads::prefer_data_parallelism;
pub(crate) use top_k::top_k_softmax;
