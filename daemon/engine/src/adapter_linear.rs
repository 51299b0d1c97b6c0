//! The adapter-aware linear layer: `W x + b + scale · B (A x)`, the unit every fusion plan acts on.
//!
//! PEFT computes a LoRA'd linear as `base(x) + lora_B(lora_A(x)) * scaling`: the scale
//! multiplies the low-rank path only, never the base output (candle-lora once got this
//! wrong). We store `scale · B` once when an adapter is attached, which is the same
//! product with the scale still outside `A x`, and saves one op per call.

use candle_core::{DType, Module, Tensor, Var};

use crate::error::Result;

/// One low-rank update attached to a linear layer.
#[derive(Debug, Clone)]
enum LoraPath {
    /// Serving: prepared once. `a_t` is `Aᵀ` `[in, r]`, `scaled_b_t` is `(scale · B)ᵀ`
    /// `[r, out]`, both contiguous in the model's compute dtype.
    Frozen { a_t: Tensor, scaled_b_t: Tensor },
    /// Routing: per-token weights over several experts' stacked factors.
    Routed(Box<crate::routing::RoutedModule>),
    /// Fitting a plan: merge weights, group weights or router matrices are variables.
    Fitting(Box<crate::plan_fit::FitModule>),
    /// A stacked ensemble: the batch holds one block of rows per member (in member order) and
    /// each block gets its member's update; the base matmul runs once for all of them.
    Members(Vec<Option<LoraPath>>),
    /// Training: the factors are variables the optimiser updates in place, so every forward
    /// reads them afresh (a prepared copy would go stale after the first step).
    Trainable { a: Var, b: Var, scale: f64 },
}

/// A linear layer of a base model that can carry a LoRA update.
#[derive(Debug, Clone)]
pub struct AdapterLinear {
    /// Module path as PEFT names it, e.g. `model.layers.0.self_attn.q_proj`.
    name: String,
    /// `[out, in]`, as stored in the checkpoint.
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraPath>,
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
            return Err(crate::EngineError::InvalidArgument {
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
        self.lora = Some(LoraPath::Frozen {
            a_t: a.to_dtype(dtype)?.t()?.contiguous()?,
            scaled_b_t: scaled_b.t()?.contiguous()?,
        });
        Ok(())
    }

    /// Attaches trainable factors `a` `[r, in]` and `b` `[out, r]` (f32 variables): the
    /// layer then computes `W x + b + scale · B (A x)` with gradients flowing to `a` and `b`.
    pub(crate) fn set_trainable_lora(&mut self, a: Var, b: Var, scale: f64) {
        self.lora = Some(LoraPath::Trainable { a, b, scale });
    }

    /// Serves this module routed over several experts (replaces any update attached).
    pub(crate) fn set_routed(&mut self, routed: crate::routing::RoutedModule) {
        self.lora = Some(LoraPath::Routed(Box::new(routed)));
    }

    /// Serves this module from a plan's trainable parameters (replaces any update attached).
    pub(crate) fn set_fitting(&mut self, module: crate::plan_fit::FitModule) {
        self.lora = Some(LoraPath::Fitting(Box::new(module)));
    }

    /// Serves a stacked ensemble: this layer of every member, whose base weights must be this
    /// layer's (no folded merges), gives its update to its block of rows.
    pub(crate) fn set_members(&mut self, members: &[&AdapterLinear]) {
        let paths: Vec<Option<LoraPath>> = members.iter().map(|m| m.lora.clone()).collect();
        self.lora = paths
            .iter()
            .any(Option::is_some)
            .then_some(LoraPath::Members(paths));
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

    fn base_2d(&self, x2: &Tensor) -> candle_core::Result<Tensor> {
        // `t()` is a strided view; the CPU gemm reads it without a copy.
        let y = x2.matmul(&self.weight.t()?)?;
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Module for AdapterLinear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (x2, lead) = flatten(x)?;
        let mut y = self.base_2d(&x2)?;
        if let Some(path) = &self.lora {
            if let Some(delta) = lora_delta(path, &self.name, self.shape().0, &x2, &lead)? {
                y = (y + delta)?;
            }
        }
        unflatten(y, &lead)
    }
}

fn engine_error(e: crate::EngineError) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// The low-rank update of `path` for inputs `x2` `[n, in]` (leading dims `lead`).
fn lora_delta(
    path: &LoraPath,
    name: &str,
    out: usize,
    x2: &Tensor,
    lead: &[usize],
) -> candle_core::Result<Option<Tensor>> {
    Ok(Some(match path {
        LoraPath::Frozen { a_t, scaled_b_t } => x2.matmul(a_t)?.matmul(scaled_b_t)?,
        LoraPath::Routed(r) => r.delta(name, x2, lead).map_err(engine_error)?,
        LoraPath::Fitting(m) => m.delta(x2, lead).map_err(engine_error)?,
        LoraPath::Trainable { a, b, scale } => (x2.matmul(&a.t()?)?.matmul(&b.t()?)? * *scale)?,
        LoraPath::Members(paths) => return members_delta(paths, name, out, x2, lead),
    }))
}

/// Each member's update on its own block of rows, stacked back in order.
fn members_delta(
    paths: &[Option<LoraPath>],
    name: &str,
    out: usize,
    x2: &Tensor,
    lead: &[usize],
) -> candle_core::Result<Option<Tensor>> {
    let (first, count) = crate::fused::member_part().unwrap_or((0, paths.len()));
    let rows = lead.first().copied().unwrap_or(1);
    let block = rows / count.max(1);
    let per_row = x2.dim(0)? / rows.max(1);
    let mut block_lead = lead.to_vec();
    if let Some(r) = block_lead.first_mut() {
        *r = block;
    }
    let mut parts = Vec::with_capacity(count);
    for j in 0..count {
        let xj = x2.narrow(0, j * block * per_row, block * per_row)?;
        let delta = match &paths[first + j] {
            // Members keep apart the routing state and traces of the same module.
            Some(path) => lora_delta(
                path,
                &format!("{name}#{}", first + j),
                out,
                &xj,
                &block_lead,
            )?,
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
