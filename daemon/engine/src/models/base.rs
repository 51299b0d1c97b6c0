//! A base model of any supported family, loaded from a Hugging Face folder, with adapters
//! attached to its linear layers.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use moerge_library::{Adapter, BaseModelInfo};

use super::llama::Llama;
use super::phi::Phi;
use crate::error::{EngineError, Result};
use crate::nn::{threads, AdapterLinear, ForwardState};

/// Compute precision of a loaded model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// 32-bit floats everywhere (the reference precision).
    #[default]
    F32,
    /// bfloat16 weights and activations; attention scores and logits stay f32.
    Bf16,
}

impl Precision {
    /// The precision a checkpoint is stored in: bf16 when its linear weights are bf16, else
    /// f32 (an f16 checkpoint is served in f32: bf16 would drop three bits of every weight).
    pub fn of_checkpoint(info: &BaseModelInfo) -> Precision {
        let bf16 = info
            .linear_modules()
            .values()
            .any(|l| l.dtype == moerge_library::Dtype::BF16);
        if bf16 {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }

    /// `f32` or `bf16`, as `--precision` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    pub(crate) fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

#[derive(Clone)]
pub(crate) enum Family {
    Phi(Phi),
    Llama(Llama),
}

impl Family {
    /// The implementation `model_type` names, built from `json` and the tensors in `vb`.
    pub(crate) fn load(
        model_type: &str,
        json: &serde_json::Value,
        config_path: &Path,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        Ok(match model_type {
            "phi" => Family::Phi(Phi::load(json, config_path, vb)?),
            "llama" | "mistral" | "qwen2" => {
                Family::Llama(Llama::load(json, config_path, model_type, vb)?)
            }
            other => {
                return Err(EngineError::UnsupportedModel {
                    path: config_path.to_path_buf(),
                    model_type: other.to_string(),
                })
            }
        })
    }
}

/// A base model plus whatever adapters are attached to it.
///
/// Cloning is cheap: tensors are reference-counted, so a clone with an adapter attached
/// shares every base weight with the original.
#[derive(Clone)]
pub struct BaseModel {
    info: Arc<BaseModelInfo>,
    family: Family,
    precision: Precision,
    device: Device,
    vocab_size: usize,
    /// Whether some layer is big enough for the engine's parallel kernels (see
    /// [`BaseModel::rows_apart`]); fixed by the base's shapes and device.
    kernel_sized: bool,
    /// Name of the attached adapter, if any.
    adapter: Option<String>,
}

impl BaseModel {
    /// Loads `config.json` and the safetensors weights described by `info` (memory-mapped)
    /// onto the CPU.
    pub fn load(info: BaseModelInfo, precision: Precision) -> Result<Self> {
        Self::load_on(info, precision, &Device::Cpu)
    }

    /// [`BaseModel::load`] onto `device`: every tensor of every request on this model lives
    /// there.
    pub fn load_on(info: BaseModelInfo, precision: Precision, device: &Device) -> Result<Self> {
        // Tensors are copied out of the files as they are read, so later edits of the files
        // cannot tear a forward, and the mapped checkpoint is never resident beside them.
        let tensors = super::load::read_weights(info.weight_files(), precision.dtype(), device)?;
        let vb = VarBuilder::from_tensors(tensors, precision.dtype(), device);
        Self::from_var_builder(info, precision, vb)
    }

    /// Builds the family `info` names from whatever `vb` provides (mapped files, or
    /// variables when training), on `vb`'s device.
    pub(crate) fn from_var_builder(
        info: BaseModelInfo,
        precision: Precision,
        vb: VarBuilder<'_>,
    ) -> Result<Self> {
        let config_path = info.dir().join("config.json");
        let device = vb.device().clone();
        let family = Family::load(info.model_type(), info.config_json(), &config_path, vb)?;
        let vocab_size = match &family {
            Family::Phi(m) => m.config().vocab_size,
            Family::Llama(m) => m.config().vocab_size,
        };
        let mut model = Self {
            info: Arc::new(info),
            family,
            precision,
            device,
            vocab_size,
            kernel_sized: false,
            adapter: None,
        };
        model.kernel_sized = model
            .linears()
            .iter()
            .any(|l| crate::nn::uses_kernels(l.shape(), &model.device));
        Ok(model)
    }

    /// Reads the folder's headers and loads it; see [`BaseModel::load`].
    pub fn load_dir(dir: &Path, precision: Precision) -> Result<Self> {
        Self::load(BaseModelInfo::from_dir(dir)?, precision)
    }

    /// [`BaseModel::load_dir`] in `precision`, or in the checkpoint's own when `None`.
    pub fn load_dir_in(dir: &Path, precision: Option<Precision>) -> Result<Self> {
        let info = BaseModelInfo::from_dir(dir)?;
        let precision = precision.unwrap_or_else(|| Precision::of_checkpoint(&info));
        Self::load(info, precision)
    }

    /// What the folder's headers said about this model.
    pub fn info(&self) -> &BaseModelInfo {
        &self.info
    }

    /// The device tensors live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute precision.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// Size of the output vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The end-of-sequence ids `config.json` declares (`eos_token_id`: one id or a list).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        let ids = &self.info.config_json()["eos_token_id"];
        let one = |v: &serde_json::Value| v.as_u64().and_then(|id| u32::try_from(id).ok());
        match ids.as_array() {
            Some(list) => list.iter().filter_map(one).collect(),
            None => one(ids).into_iter().collect(),
        }
    }

    /// Name of the attached adapter, if any.
    pub fn adapter_name(&self) -> Option<&str> {
        self.adapter.as_deref()
    }

    /// Logits `[b, t, vocab]` (f32) for token ids `[b, t]` continuing the request `state`.
    pub fn forward(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        threads::split_batch(ids, state, self.rows_apart(ids)?, |ids, state| {
            self.forward_rows(ids, state)
        })
    }

    /// Logits of the last position only, `[b, vocab]` (f32): what generation needs, without
    /// projecting every prompt position onto the vocabulary.
    pub fn forward_last(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        threads::split_batch(ids, state, self.rows_apart(ids)?, |ids, state| {
            self.forward_last_rows(ids, state)
        })
    }

    /// Whether a forward of `ids` `[b, t]` should split its rows over threads. A model with
    /// layers big enough for the engine's kernels (which spread each product over every
    /// core) splits only a prompt (`t > 1`, where the products are compute-bound and the rest
    /// of the step gains from the split too); one decoding step (`t = 1`) is memory-bound, and
    /// split rows would read every weight once per part.
    pub(crate) fn rows_apart(&self, ids: &Tensor) -> Result<bool> {
        Ok(!self.kernel_sized || ids.dim(1)? > 1)
    }

    /// [`BaseModel::forward`] on the calling thread only (the caller splits the batch).
    pub(crate) fn forward_rows(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, state)?;
        Ok(self
            .lm_head()
            .forward(&hidden, state)?
            .to_dtype(DType::F32)?)
    }

    /// [`BaseModel::forward_last`] on the calling thread only.
    pub(crate) fn forward_last_rows(
        &self,
        ids: &Tensor,
        state: &mut ForwardState,
    ) -> Result<Tensor> {
        let hidden = self.forward_hidden(ids, state)?;
        let t = hidden.dim(1)?;
        let last = hidden.narrow(1, t - 1, 1)?.squeeze(1)?;
        Ok(self.lm_head().forward(&last, state)?.to_dtype(DType::F32)?)
    }

    fn forward_hidden(&self, ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        match &self.family {
            Family::Phi(m) => m.forward_hidden(ids, state),
            Family::Llama(m) => m.forward_hidden(ids, state),
        }
    }

    fn lm_head(&self) -> &AdapterLinear {
        match &self.family {
            Family::Phi(m) => m.lm_head(),
            Family::Llama(m) => m.lm_head(),
        }
    }

    /// Module path → `(out_features, in_features)` of every layer an adapter may target.
    pub fn linear_modules(&self) -> BTreeMap<String, (usize, usize)> {
        self.linears()
            .into_iter()
            .map(|l| (l.name().to_string(), l.shape()))
            .collect()
    }

    /// The linear layer with this module path, if the model has one.
    pub fn linear(&self, module: &str) -> Option<&AdapterLinear> {
        self.linears().into_iter().find(|l| l.name() == module)
    }

    pub(crate) fn linears(&self) -> Vec<&AdapterLinear> {
        match &self.family {
            Family::Phi(m) => m.linears(),
            Family::Llama(m) => m.linears(),
        }
    }

    /// The linear layers by module path, to attach updates to.
    pub(crate) fn linears_by_name_mut(&mut self) -> BTreeMap<String, &mut AdapterLinear> {
        self.linears_mut()
            .into_iter()
            .map(|l| (l.name().to_string(), l))
            .collect()
    }

    pub(crate) fn linears_mut(&mut self) -> Vec<&mut AdapterLinear> {
        match &mut self.family {
            Family::Phi(m) => m.linears_mut(),
            Family::Llama(m) => m.linears_mut(),
        }
    }

    /// Names what is attached (an adapter, or a plan).
    pub(crate) fn set_adapter_name(&mut self, name: String) {
        self.adapter = Some(name);
    }

    /// Whether `adapter` fits this base (every module exists with matching shapes).
    pub(crate) fn check_fits(&self, adapter: &Adapter) -> Result<()> {
        adapter
            .check_compatible(&self.info)
            .map_err(|e| EngineError::Incompatible {
                adapter: adapter.name().to_string(),
                reason: e.to_string(),
            })
    }

    /// A copy of this model with `adapter` attached (unmerged: `W x + scale · B (A x)` in every
    /// module it targets). Base weights are shared, not copied. Fails, naming the module and
    /// both shapes, when the adapter does not fit.
    pub fn with_adapter(&self, adapter: &Adapter) -> Result<BaseModel> {
        self.check_fits(adapter)?;
        let mut model = self.clone();
        let mut by_name = model.linears_by_name_mut();
        for (module, lora) in adapter.modules() {
            let layer =
                by_name
                    .get_mut(module.as_str())
                    .ok_or_else(|| EngineError::Incompatible {
                        adapter: adapter.name().to_string(),
                        reason: format!(
                            "module {module} is not a linear layer this engine can adapt \
                         (embeddings and norms cannot carry LoRA here)"
                        ),
                    })?;
            let a = Tensor::from_vec(
                adapter.tensor_f32(&lora.a),
                lora.a.shape.clone(),
                &self.device,
            )?;
            let b = Tensor::from_vec(
                adapter.tensor_f32(&lora.b),
                lora.b.shape.clone(),
                &self.device,
            )?;
            layer.set_lora(&a, &b, lora.scale)?;
        }
        drop(by_name);
        model.set_adapter_name(adapter.name().to_string());
        Ok(model)
    }
}
