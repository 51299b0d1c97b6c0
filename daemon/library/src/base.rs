//! What the library layer knows of a base model: its `config.json` and the names, shapes and
//! dtypes in its safetensors headers. No weight is read here (that is the engine's job), so
//! checking an adapter against a multi-gigabyte base costs a few kilobytes of I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::error::BaseError;
use crate::safetensors_header::{self as st, Dtype, Header, HeaderError};

/// Families whose linear layers are recognised by name; others use the generic rule.
const NAMED_FAMILIES: [&str; 4] = ["phi", "llama", "mistral", "qwen2"];
const LINEAR_NAMES: [&str; 11] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "dense",
    "fc1",
    "fc2",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
];

/// A linear layer's weight shape: `[out_features, in_features]` in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct LinearShape {
    pub out_features: usize,
    pub in_features: usize,
    pub dtype: Dtype,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct TensorMeta {
    dtype: Dtype,
    shape: Vec<usize>,
}

/// A base model folder, read from its headers only.
#[derive(Debug, Clone)]
pub struct BaseModelInfo {
    dir: PathBuf,
    name: String,
    model_type: String,
    config: Value,
    weight_files: Vec<PathBuf>,
    tensors: BTreeMap<String, TensorMeta>,
    linear: BTreeMap<String, LinearShape>,
}

impl BaseModelInfo {
    /// Reads `config.json` and the headers of `model.safetensors`, or of the shards named by
    /// `model.safetensors.index.json`.
    pub fn from_dir(dir: &Path) -> Result<BaseModelInfo, BaseError> {
        let config_path = dir.join("config.json");
        if !config_path.is_file() {
            return Err(BaseError::MissingConfig {
                dir: dir.to_owned(),
            });
        }
        let bytes = std::fs::read(&config_path).map_err(|source| BaseError::Io {
            path: config_path.clone(),
            source,
        })?;
        let config: Value = serde_json::from_slice(&bytes).map_err(|e| BaseError::NotJson {
            path: config_path.clone(),
            message: e.to_string(),
        })?;
        let model_type = config
            .get("model_type")
            .and_then(Value::as_str)
            .ok_or_else(|| BaseError::ConfigKey {
                path: config_path.clone(),
                key: "model_type".into(),
                problem: "is missing or not a string".into(),
            })?
            .to_owned();

        let (weight_files, index) = weight_files(dir)?;
        let mut tensors: BTreeMap<String, (TensorMeta, usize)> = BTreeMap::new();
        for (i, file) in weight_files.iter().enumerate() {
            let header = read_header(file)?;
            for t in header.tensors {
                let meta = TensorMeta {
                    dtype: t.dtype,
                    shape: t.shape,
                };
                if let Some((_, other)) = tensors.insert(t.name.clone(), (meta, i)) {
                    return Err(BaseError::DuplicateTensor {
                        path: file.clone(),
                        tensor: t.name,
                        other: weight_files[other].clone(),
                    });
                }
            }
        }
        if let Some(index) = index {
            check_index(dir, index, &weight_files, &tensors)?;
        }
        let tensors: BTreeMap<String, TensorMeta> =
            tensors.into_iter().map(|(k, (m, _))| (k, m)).collect();
        let linear = linear_modules(&model_type, &config, &tensors);
        let name = crate::folder_name(dir);
        Ok(BaseModelInfo {
            dir: dir.to_owned(),
            name,
            model_type,
            config,
            weight_files,
            tensors,
            linear,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder name, used in messages ("base dev-phi has ...").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `model_type` from `config.json`, e.g. `"phi"` or `"llama"`.
    pub fn model_type(&self) -> &str {
        &self.model_type
    }

    pub fn config_json(&self) -> &Value {
        &self.config
    }

    pub fn weight_files(&self) -> &[PathBuf] {
        &self.weight_files
    }

    /// Linear layers by module path (the weight's name without `.weight`). For the Phi and
    /// Llama families (and Mistral, Qwen2, which share Llama's names) these are the 2-D
    /// weights of layers named q/k/v/o_proj, dense, fc1, fc2, gate/up/down_proj and lm_head;
    /// for other families every 2-D `.weight` whose module name holds neither "embed" nor
    /// "norm". A tied `lm_head` (`tie_word_embeddings`, no `lm_head.weight`) is included with
    /// the embedding's shape `[vocab, hidden]`, because PEFT can put a LoRA on it.
    pub fn linear_modules(&self) -> &BTreeMap<String, LinearShape> {
        &self.linear
    }

    /// The shape of any tensor in the weight files.
    pub fn tensor_shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|t| t.shape.as_slice())
    }
}

const SINGLE: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The index's `weight_map` entries: (tensor, shard file name).
type WeightMap = Vec<(String, String)>;

/// `model.safetensors` if present (as transformers prefers), else the index's shards, with
/// the index to check them against.
fn weight_files(dir: &Path) -> Result<(Vec<PathBuf>, Option<WeightMap>), BaseError> {
    let single = dir.join(SINGLE);
    if single.is_file() {
        return Ok((vec![single], None));
    }
    let index_path = dir.join(INDEX);
    if index_path.is_file() {
        let map = weight_map(&index_path)?;
        let shards: BTreeSet<&String> = map.iter().map(|(_, shard)| shard).collect();
        let files = shards.into_iter().map(|s| dir.join(s)).collect();
        return Ok((files, Some(map)));
    }
    for pickle in ["pytorch_model.bin", "pytorch_model.bin.index.json"] {
        if dir.join(pickle).exists() {
            return Err(BaseError::PickleOnly {
                dir: dir.to_owned(),
                file: pickle.to_owned(),
            });
        }
    }
    Err(BaseError::MissingWeights {
        dir: dir.to_owned(),
    })
}

/// The index's `weight_map`, with each shard checked to be a plain file name in the folder.
fn weight_map(index_path: &Path) -> Result<WeightMap, BaseError> {
    let bytes = std::fs::read(index_path).map_err(|source| BaseError::Io {
        path: index_path.to_owned(),
        source,
    })?;
    let index: Value = serde_json::from_slice(&bytes).map_err(|e| BaseError::NotJson {
        path: index_path.to_owned(),
        message: e.to_string(),
    })?;
    let map = index
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| BaseError::ConfigKey {
            path: index_path.to_owned(),
            key: "weight_map".into(),
            problem: "is missing or not an object".into(),
        })?;
    map.iter()
        .map(|(tensor, shard)| {
            let bad = |problem: &str| BaseError::BadShard {
                path: index_path.to_owned(),
                tensor: tensor.clone(),
                shard: shard.to_string(),
                problem: problem.into(),
            };
            let shard = shard
                .as_str()
                .ok_or_else(|| bad("which is not a file name"))?;
            // A shard outside the folder would let an index read arbitrary files.
            let plain =
                !shard.is_empty() && shard != "." && shard != ".." && !shard.contains(['/', '\\']);
            if !plain {
                return Err(bad(
                    "which is not a plain file name inside the model folder",
                ));
            }
            Ok((tensor.clone(), shard.to_owned()))
        })
        .collect()
}

/// Every tensor the index names must be in the shard it names.
fn check_index(
    dir: &Path,
    index: WeightMap,
    files: &[PathBuf],
    tensors: &BTreeMap<String, (TensorMeta, usize)>,
) -> Result<(), BaseError> {
    let index_path = dir.join(INDEX);
    for (tensor, shard) in index {
        let in_shard = tensors
            .get(&tensor)
            .is_some_and(|(_, i)| files[*i] == dir.join(&shard));
        if !in_shard {
            return Err(BaseError::BadShard {
                path: index_path.clone(),
                tensor,
                shard,
                problem: "which does not contain it".into(),
            });
        }
    }
    Ok(())
}

/// Reads only the length prefix and the header, never the data.
fn read_header(path: &Path) -> Result<Header, BaseError> {
    let io = |source| BaseError::Io {
        path: path.to_owned(),
        source,
    };
    let bad = |source: HeaderError| BaseError::Safetensors {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut prefix = [0u8; 8];
    if len < 8 {
        return Err(bad(HeaderError::TooShort { len }));
    }
    file.read_exact(&mut prefix).map_err(io)?;
    let n = st::header_len(&prefix, len).map_err(bad)?;
    let mut json = vec![0u8; n as usize];
    file.read_exact(&mut json).map_err(io)?;
    st::parse_header(&json, len - 8 - n).map_err(bad)
}

fn linear_modules(
    model_type: &str,
    config: &Value,
    tensors: &BTreeMap<String, TensorMeta>,
) -> BTreeMap<String, LinearShape> {
    let named = NAMED_FAMILIES.contains(&model_type);
    let mut linear: BTreeMap<String, LinearShape> = tensors
        .iter()
        .filter(|(_, t)| t.shape.len() == 2)
        .filter_map(|(name, t)| {
            let module = name.strip_suffix(".weight")?;
            let last = module.rsplit('.').next().unwrap_or(module);
            let is_linear = if named {
                LINEAR_NAMES.contains(&last)
            } else {
                !module.contains("embed") && !module.contains("norm")
            };
            is_linear.then(|| (module.to_owned(), shape_of(t)))
        })
        .collect();
    let tied = config.get("tie_word_embeddings").and_then(Value::as_bool) == Some(true);
    if tied && !linear.contains_key("lm_head") {
        let embed = tensors.get("model.embed_tokens.weight").or_else(|| {
            tensors
                .iter()
                .find(|(n, _)| n.ends_with("embed_tokens.weight"))
                .map(|(_, t)| t)
        });
        if let Some(t) = embed.filter(|t| t.shape.len() == 2) {
            linear.insert("lm_head".to_owned(), shape_of(t));
        }
    }
    linear
}

fn shape_of(t: &TensorMeta) -> LinearShape {
    LinearShape {
        out_features: t.shape[0],
        in_features: t.shape[1],
        dtype: t.dtype,
    }
}
