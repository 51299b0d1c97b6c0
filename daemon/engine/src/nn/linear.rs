//! The adapter-aware linear layer: `W x + b + scale · B (A x)`, the unit every fusion plan acts on.
//!
//! PEFT computes a LoRA'd linear as `base(x) + lora_B(lora_A(x)) * scaling`: the scale
//! multiplies the low-rank path only, never the base output (candle-lora once got this
//! wrong). We store `scale · B` once when an adapter is attached, which is the same
//! product with the scale still outside `A x`, and saves one op per call.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::state::ForwardState;
use crate::error::{EngineError, Result};

/// A low-rank update `Δ(x)` added to a linear layer's output: what a routed module (the
/// `plan` layer) or a plan being fitted (the `fit` layer) attaches to a layer.
pub(crate) trait LowRankUpdate: std::fmt::Debug + Send + Sync {
    /// The update `[n, out]` for `input`'s rows, reading and updating the request's `state`.
    fn delta(&self, input: &UpdateInput<'_>, state: &mut ForwardState) -> Result<Tensor>;
}

/// The rows a [`LowRankUpdate`] sees.
pub(crate) struct UpdateInput<'a> {
    /// `[n, in]`.
    pub x: &'a Tensor,
    /// The leading dims the `n` rows came from (`[b, t]` for a batch of sequences).
    pub lead: &'a [usize],
    /// The layer's module path (`#j` appended for member `j` of a stacked ensemble): the key
    /// of the request state the update keeps and of the records it traces.
    pub key: &'a str,
}

impl UpdateInput<'_> {
    /// Sequences in the batch and positions per sequence.
    pub(crate) fn sequences(&self) -> Result<(usize, usize)> {
        let n = self.x.dim(0)?;
        let b = if self.lead.len() >= 2 {
            self.lead[0]
        } else {
            1
        };
        Ok((b, n / b.max(1)))
    }
}

/// One low-rank update attached to a linear layer.
#[derive(Debug, Clone)]
enum Update {
    /// Serving: prepared once. `a_t` is `Aᵀ` `[in, r]`, `scaled_b_t` is `(scale · B)ᵀ`
    /// `[r, out]`, both contiguous in the model's compute dtype.
    Frozen { a_t: Tensor, scaled_b_t: Tensor },
    /// Routed modules, plans being fitted: computed by a higher layer.
    Computed(Arc<dyn LowRankUpdate>),
    /// A stacked ensemble: the batch holds one block of rows per member (in member order) and
    /// each block gets its member's update; the base matmul runs once for all of them.
    Members(Vec<Option<Update>>),
    /// Training: the factors are variables the optimiser updates in place, so every forward
    /// reads them afresh (a prepared copy would go stale after the first step).
    Variables { a: Var, b: Var, scale: f64 },
}

/// A linear layer of a base model that can carry a LoRA update.
#[derive(Debug, Clone)]
pub struct AdapterLinear {
    /// Module path as PEFT names it, e.g. `model.layers.0.self_attn.q_proj`.
    name: String,
    /// `[out, in]`, as stored in the checkpoint.
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<Update>,
}

impl AdapterLinear {
    /// A plain linear layer (`weight` is `[out, in]`, `bias` is `[out]`).
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            name: name.into(),
            weight,
            bias,
            lora: None,
        }
    }

    /// Loads `weight` `[out, in]` (and `bias` `[out]`) under the builder's prefix, which
    /// becomes the layer's module path; shapes are checked against the checkpoint.
    pub(crate) fn load(
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        vb: candle_nn::VarBuilder<'_>,
    ) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self::new(vb.prefix(), weight, bias))
    }

    /// The module path PEFT would use for this layer.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `(out_features, in_features)`.
    pub fn shape(&self) -> (usize, usize) {
        let dims = self.weight.dims();
        (dims[0], dims[1])
    }

    /// The base weight `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The base bias, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// Whether a low-rank update is attached.
    pub fn has_lora(&self) -> bool {
        self.lora.is_some()
    }

    /// Attaches `scale · B A` given as `a` `[r, in]` and `b` `[out, r]` (any float dtype;
    /// converted to the layer's dtype). Replaces any update already attached.
    pub fn set_lora(&mut self, a: &Tensor, b: &Tensor, scale: f64) -> Result<()> {
        let dtype = self.weight.dtype();
        let (out, inp) = self.shape();
        let (r, a_in) = a.dims2()?;
        let (b_out, b_r) = b.dims2()?;
        if a_in != inp || b_out != out || b_r != r {
            return Err(EngineError::InvalidArgument {
                argument: "lora factors",
                message: format!(
                    "module {}: A is [{r}, {a_in}] and B is [{b_out}, {b_r}], \
                     but the layer needs A [r, {inp}] and B [{out}, r]",
                    self.name
                ),
            });
        }
        // Scale in f32 before any narrowing so a bf16 model rounds once, not twice.
        let scaled_b = (b.to_dtype(DType::F32)? * scale)?.to_dtype(dtype)?;
        self.lora = Some(Update::Frozen {
            a_t: a.to_dtype(dtype)?.t()?.contiguous()?,
            scaled_b_t: scaled_b.t()?.contiguous()?,
        });
        Ok(())
    }

    /// Attaches trainable factors `a` `[r, in]` and `b` `[out, r]` (f32 variables): the
    /// layer then computes `W x + b + scale · B (A x)` with gradients flowing to `a` and `b`.
    pub(crate) fn set_trainable_lora(&mut self, a: Var, b: Var, scale: f64) {
        self.lora = Some(Update::Variables { a, b, scale });
    }

    /// Serves this module with an update a higher layer computes (a routed module, a plan
    /// being fitted); replaces any update attached.
    pub(crate) fn set_update(&mut self, update: Arc<dyn LowRankUpdate>) {
        self.lora = Some(Update::Computed(update));
    }

    /// Serves a stacked ensemble: this layer of every member, whose base weights must be this
    /// layer's (no folded merges), gives its update to its block of rows.
    pub(crate) fn set_members(&mut self, members: &[&AdapterLinear]) {
        let updates: Vec<Option<Update>> = members.iter().map(|m| m.lora.clone()).collect();
        self.lora = updates
            .iter()
            .any(Option::is_some)
            .then_some(Update::Members(updates));
    }

    /// Adds `delta` `[out, in]` into the base weight itself (a folded merge): the layer then
    /// serves the merged model at exactly the cost of the base.
    pub(crate) fn fold_into_weight(&mut self, delta: &Tensor) -> Result<()> {
        let dtype = self.weight.dtype();
        let merged = (self.weight.to_dtype(DType::F32)? + delta.to_dtype(DType::F32)?)?;
        self.weight = merged.to_dtype(dtype)?;
        Ok(())
    }

    /// Removes the low-rank update, leaving the base layer.
    pub fn clear_lora(&mut self) {
        self.lora = None;
    }

    /// The base output `x Wᵀ + b` only, ignoring any update.
    pub fn forward_base(&self, x: &Tensor) -> Result<Tensor> {
        let (x2, lead) = flatten(x)?;
        let y = self.base_2d(&x2)?;
        Ok(unflatten(y, &lead)?)
    }

    fn base_2d(&self, x2: &Tensor) -> Result<Tensor> {
        let y = match super::matmul::linear(x2, &self.weight)? {
            Some(y) => y,
            // `t()` is a strided view; the CPU gemm reads it without a copy.
            None => x2.matmul(&self.weight.t()?)?,
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

impl AdapterLinear {
    /// `x Wᵀ + b` plus the attached update, for `x` `[..., in]`, within the request `state`.
    pub fn forward(&self, x: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        let (x2, lead) = flatten(x)?;
        let mut y = self.base_2d(&x2)?;
        if let Some(update) = &self.lora {
            state.count_call();
            let input = UpdateInput {
                x: &x2,
                lead: &lead,
                key: &self.name,
            };
            if let Some(delta) = update_delta(update, self.shape().0, &input, state)? {
                y = (y + delta)?;
            }
        }
        Ok(unflatten(y, &lead)?)
    }
}

/// The update of `update` for `input`'s rows (`None`: nothing to add).
fn update_delta(
    update: &Update,
    out: usize,
    input: &UpdateInput<'_>,
    state: &mut ForwardState,
) -> Result<Option<Tensor>> {
    let x2 = input.x;
    Ok(Some(match update {
        Update::Frozen { a_t, scaled_b_t } => x2.matmul(a_t)?.matmul(scaled_b_t)?,
        Update::Computed(u) => u.delta(input, state)?,
        Update::Variables { a, b, scale } => (x2.matmul(&a.t()?)?.matmul(&b.t()?)? * *scale)?,
        Update::Members(updates) => return members_delta(updates, out, input, state),
    }))
}

/// Each member's update on its own block of rows, stacked back in order.
fn members_delta(
    updates: &[Option<Update>],
    out: usize,
    input: &UpdateInput<'_>,
    state: &mut ForwardState,
) -> Result<Option<Tensor>> {
    let (first, count) = state
        .member_part()
        .map_or((0, updates.len()), |p| (p.first, p.count));
    let (x2, lead) = (input.x, input.lead);
    let rows = lead.first().copied().unwrap_or(1);
    let block = rows / count.max(1);
    let per_row = x2.dim(0)? / rows.max(1);
    let mut block_lead = lead.to_vec();
    if let Some(r) = block_lead.first_mut() {
        *r = block;
    }
    let mut parts = Vec::with_capacity(count);
    for j in 0..count {
        let member = first + j;
        let xj = x2.narrow(0, j * block * per_row, block * per_row)?;
        let delta = match &updates[member] {
            // Members keep apart the routing state and traces of the same module.
            Some(update) => {
                let key = format!("{}#{member}", input.key);
                let member_input = UpdateInput {
                    x: &xj,
                    lead: &block_lead,
                    key: &key,
                };
                state.as_member(member, |state| {
                    update_delta(update, out, &member_input, state)
                })?
            }
            None => None,
        };
        let delta = match delta {
            Some(d) => d,
            None => Tensor::zeros((block * per_row, out), x2.dtype(), x2.device())?,
        };
        parts.push(delta);
    }
    Ok(Some(Tensor::cat(&parts, 0)?))
}

/// `[..., in]` → `[n, in]` plus the leading dims, so every matmul is one 2-D gemm.
fn flatten(x: &Tensor) -> candle_core::Result<(Tensor, Vec<usize>)> {
    let dims = x.dims();
    let (lead, last) = dims.split_at(dims.len() - 1);
    let n = lead.iter().product::<usize>();
    Ok((x.reshape((n, last[0]))?, lead.to_vec()))
}

fn unflatten(y: Tensor, lead: &[usize]) -> candle_core::Result<Tensor> {
    let mut dims = lead.to_vec();
    dims.push(y.dim(1)?);
    y.reshape(dims)
}
