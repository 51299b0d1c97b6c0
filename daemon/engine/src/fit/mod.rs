//! Fitting plans (the host's `optimize` for policies): merge weights, routers, group
//! weights, ensemble weights and distillation, through candle autograd with the base and
//! experts frozen. Trainable modules reuse the `plan` layer's stacks and routing maths, and
//! every fit runs the `train` layer's one optimiser loop.

pub(crate) mod distill;
mod ensemble;
mod modules;
pub(crate) mod plan_fit;
