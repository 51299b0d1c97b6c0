//! One expert: a PEFT LoRA adapter folder, loaded strictly, memory-mapped, hashed.

mod keys;
mod load;
mod report;
mod updates;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

pub use report::{inspect_adapter, AdapterReport, AdapterState, ModuleReport};
pub use updates::update_gram;

use crate::base::BaseModelInfo;
use crate::config::AdapterConfig;
use crate::error::{AdapterError, Incompatibility};
use crate::hash::ContentHash;
use crate::safetensors_header::Dtype;

/// A tensor inside an adapter's safetensors file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorRef {
    /// The full key as stored in the file.
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Absolute byte range in the file; validated against the file on load.
    range: std::ops::Range<usize>,
}

impl TensorRef {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// The LoRA update of one linear layer: `W x + scale · B (A x)`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// The module path as the base model names it, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub rank: usize,
    /// `lora_alpha`, or the module's `alpha_pattern` entry.
    pub alpha: f64,
    /// `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
    pub scale: f64,
    /// `[rank, in_features]`.
    pub a: TensorRef,
    /// `[out_features, rank]`.
    pub b: TensorRef,
    pub in_features: usize,
    pub out_features: usize,
}

/// A validated LoRA adapter. Its factors are read from a read-only memory map of
/// `adapter_model.safetensors`, so loading costs one pass over the file (hash and
/// finite-value check) and no copy.
pub struct Adapter {
    dir: PathBuf,
    name: String,
    hash: ContentHash,
    config: AdapterConfig,
    modules: BTreeMap<String, LoraModule>,
    map: Mmap,
    size_bytes: u64,
}

impl Adapter {
    /// Loads and validates an adapter folder. Strict: anything moerge cannot honour exactly
    /// is an error naming the file and the tensor or key at fault.
    pub fn load(dir: &Path) -> Result<Adapter, AdapterError> {
        load::load(dir)
    }

    /// The folder name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The identity: see [`ContentHash`] for exactly what is hashed.
    pub fn hash(&self) -> ContentHash {
        self.hash
    }

    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Keyed by module path as the base model names it.
    pub fn modules(&self) -> &BTreeMap<String, LoraModule> {
        &self.modules
    }

    /// The tensor's raw little-endian bytes.
    ///
    /// # Panics
    /// If `t` does not come from this adapter and lies outside its file.
    pub fn tensor_bytes(&self, t: &TensorRef) -> &[u8] {
        &self.map[t.range.clone()]
    }

    /// The tensor's values as f32, row-major, converted from F32, F16 or BF16.
    ///
    /// # Panics
    /// If `t` does not come from this adapter (see [`tensor_bytes`](Self::tensor_bytes)) or
    /// has a dtype other than F32, F16 or BF16, which a loaded adapter never holds.
    pub fn tensor_f32(&self, t: &TensorRef) -> Vec<f32> {
        let bytes = self.tensor_bytes(t);
        match t.dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => u16s(bytes)
                .map(|b| half::f16::from_bits(b).to_f32())
                .collect(),
            Dtype::BF16 => u16s(bytes)
                .map(|b| half::bf16::from_bits(b).to_f32())
                .collect(),
            other => panic!(
                "tensor {} has dtype {other}, which is not a LoRA factor dtype",
                t.name
            ),
        }
    }

    /// `out[i] += scale · t[i]` for every value of `t` (row-major), converting from the
    /// stored dtype on the fly: one pass over the mapped bytes, no intermediate copy, which
    /// is what keeps merging many experts close to memory speed.
    ///
    /// Panics if `out` does not have exactly `t`'s number of values.
    pub fn add_scaled_f32(&self, t: &TensorRef, scale: f32, out: &mut [f32]) {
        let bytes = self.tensor_bytes(t);
        assert_eq!(
            out.len(),
            t.numel(),
            "tensor {}: output has the wrong length",
            t.name
        );
        match t.dtype {
            Dtype::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o += scale * f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            Dtype::F16 => {
                for (o, b) in out.iter_mut().zip(u16s(bytes)) {
                    *o += scale * half::f16::from_bits(b).to_f32();
                }
            }
            Dtype::BF16 => {
                for (o, b) in out.iter_mut().zip(u16s(bytes)) {
                    *o += scale * half::bf16::from_bits(b).to_f32();
                }
            }
            other => panic!(
                "tensor {} has dtype {other}, which is not a LoRA factor dtype",
                t.name
            ),
        }
    }

    /// Whether every module exists in `base` as a linear layer of the right shape.
    ///
    /// A shape mismatch on a module both share is reported before a module the base lacks:
    /// it is the clearer sign that the adapter was trained for another base model.
    pub fn check_compatible(&self, base: &BaseModelInfo) -> Result<(), Incompatibility> {
        let linear = base.linear_modules();
        for m in self.modules.values() {
            if let Some(shape) = linear.get(&m.module) {
                if shape.in_features != m.in_features || shape.out_features != m.out_features {
                    return Err(Incompatibility::ShapeMismatch {
                        adapter: self.name.clone(),
                        base: base.name().to_owned(),
                        module: m.module.clone(),
                        adapter_in: m.in_features,
                        adapter_out: m.out_features,
                        base_in: shape.in_features,
                        base_out: shape.out_features,
                    });
                }
            }
        }
        match self.modules.keys().find(|m| !linear.contains_key(*m)) {
            Some(module) => Err(Incompatibility::MissingModule {
                adapter: self.name.clone(),
                base: base.name().to_owned(),
                module: module.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Bytes on disk of both files.
    pub fn size_bytes(&self) -> u64 {
        self.size_bytes
    }
}

impl fmt::Debug for Adapter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Adapter")
            .field("name", &self.name)
            .field("dir", &self.dir)
            .field("hash", &self.hash.short())
            .field("modules", &self.modules.len())
            .field("size_bytes", &self.size_bytes)
            .finish_non_exhaustive()
    }
}

fn u16s(bytes: &[u8]) -> impl Iterator<Item = u16> + Clone + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
}
