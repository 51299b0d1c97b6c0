//! Writing PEFT LoRA adapter folders (what moerge trains or exports), atomically: the files are
//! written into a hidden sibling folder, synced, then renamed into place, so a watcher never
//! sees half an adapter.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::AdapterError;
use crate::hash::ContentHash;

/// One LoRA'd module: `a` is `[rank, in_features]`, `b` is `[out_features, rank]`, row-major.
#[derive(Debug, Clone)]
pub struct NewModule<'a> {
    pub module: String,
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub a: &'a [f32],
    pub b: &'a [f32],
}

/// An adapter to write. `r` and `lora_alpha` are the config's defaults; modules whose rank
/// differs get a `rank_pattern` entry, and `alpha_overrides` become `alpha_pattern`.
#[derive(Debug, Clone)]
pub struct NewAdapter<'a> {
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub target_modules: Vec<String>,
    pub base_model_name_or_path: String,
    pub alpha_overrides: BTreeMap<String, f64>,
    pub modules: Vec<NewModule<'a>>,
}

/// Writes `adapter` as `dir` (`adapter_config.json` + `adapter_model.safetensors`, exactly
/// the layout PEFT's `save_pretrained` produces) and returns its content hash. Refuses to
/// replace an existing folder.
pub fn write_adapter(dir: &Path, adapter: &NewAdapter<'_>) -> Result<ContentHash, AdapterError> {
    if dir.exists() {
        return Err(AdapterError::Io {
            path: dir.to_path_buf(),
            source: std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "already exists; remove it or choose another output folder",
            ),
        });
    }
    let config = config_json(adapter);
    let config = serde_json::to_vec_pretty(&config).expect("a JSON value serialises");
    let weights = safetensors_bytes(adapter, dir)?;
    let hash = ContentHash::of_adapter_files(&config, &weights);

    let staging = staging_dir(dir);
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| AdapterError::Io { path, source }
    };
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    for (name, bytes) in [
        ("adapter_config.json", &config),
        ("adapter_model.safetensors", &weights),
    ] {
        let path = staging.join(name);
        let mut file = std::fs::File::create(&path).map_err(io(&path))?;
        file.write_all(bytes).map_err(io(&path))?;
        file.sync_all().map_err(io(&path))?;
    }
    std::fs::rename(&staging, dir).map_err(io(dir))?;
    Ok(hash)
}

fn staging_dir(dir: &Path) -> PathBuf {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dir.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn config_json(a: &NewAdapter<'_>) -> serde_json::Value {
    let rank_pattern: serde_json::Map<String, serde_json::Value> = a
        .modules
        .iter()
        .filter(|m| m.rank != a.r)
        .map(|m| (m.module.clone(), m.rank.into()))
        .collect();
    let alpha_pattern: serde_json::Map<String, serde_json::Value> = a
        .alpha_overrides
        .iter()
        .map(|(k, v)| (k.clone(), (*v).into()))
        .collect();
    json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": a.base_model_name_or_path,
        "r": a.r,
        "lora_alpha": a.lora_alpha,
        "use_rslora": a.use_rslora,
        "target_modules": a.target_modules,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_dora": false,
        "modules_to_save": null,
        "init_lora_weights": true,
        "inference_mode": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "revision": null,
    })
}

fn safetensors_bytes(a: &NewAdapter<'_>, dir: &Path) -> Result<Vec<u8>, AdapterError> {
    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for m in &a.modules {
        let shapes = [
            (m.a, [m.rank, m.in_features], "lora_A"),
            (m.b, [m.out_features, m.rank], "lora_B"),
        ];
        for (values, shape, factor) in shapes {
            let name = format!("base_model.model.{}.{factor}.weight", m.module);
            if values.len() != shape[0] * shape[1] {
                return Err(AdapterError::Io {
                    path: dir.to_path_buf(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{name}: {} values for shape {shape:?}", values.len()),
                    ),
                });
            }
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            tensors.push((name, shape.to_vec(), bytes));
        }
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .expect("sizes checked above");
            (name.clone(), view)
        })
        .collect();
    let metadata = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| AdapterError::Io {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    })
}
