//! `inspect`: everything that can be said about an adapter folder, even a broken one.
//!
//! [`inspect_adapter`] never fails. A folder that [`Adapter::load`] refuses is reported as
//! `rejected` with the same message, plus whatever could still be read: the config fields,
//! the hash and size of the files, and the LoRA pairs whose shapes make sense.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::keys::{classify, Key};
use super::load::locate;
use super::Adapter;
use crate::base::BaseModelInfo;
use crate::config::{AdapterConfig, TargetModules};
use crate::hash::ContentHash;
use crate::safetensors_header::{self as st, Dtype};

/// Whether an adapter can be served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum AdapterState {
    Ready,
    /// The folder is not an adapter moerge accepts; `reason` names the file and tensor or key.
    Rejected {
        reason: String,
    },
    /// A valid adapter that does not fit the given base model.
    Incompatible {
        reason: String,
    },
}

/// One LoRA'd module as `inspect` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleReport {
    pub module: String,
    pub rank: usize,
    pub alpha: f64,
    pub scale: f64,
    pub a_shape: Vec<usize>,
    pub b_shape: Vec<usize>,
    pub a_dtype: Dtype,
    pub b_dtype: Dtype,
}

/// What `moerge inspect` prints (and `--json` serialises).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdapterReport {
    pub name: String,
    pub dir: PathBuf,
    #[serde(flatten)]
    pub state: AdapterState,
    pub hash: Option<ContentHash>,
    /// Both files, in bytes.
    pub size_bytes: Option<u64>,
    pub peft_type: Option<String>,
    pub base_model_name_or_path: Option<String>,
    /// The config's `r` (modules may differ through `rank_pattern`).
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    /// The scale a module with rank `r` and alpha `lora_alpha` gets.
    pub scale: Option<f64>,
    pub use_rslora: Option<bool>,
    pub target_modules: Option<TargetModules>,
    pub modules: Vec<ModuleReport>,
}

/// Inspects an adapter folder, and its fit to `base` when given. Never fails.
pub fn inspect_adapter(dir: &Path, base: Option<&BaseModelInfo>) -> AdapterReport {
    match Adapter::load(dir) {
        Ok(adapter) => {
            let state = match base.map(|b| adapter.check_compatible(b)) {
                Some(Err(why)) => AdapterState::Incompatible {
                    reason: why.to_string(),
                },
                _ => AdapterState::Ready,
            };
            let modules = adapter
                .modules()
                .values()
                .map(|m| ModuleReport {
                    module: m.module.clone(),
                    rank: m.rank,
                    alpha: m.alpha,
                    scale: m.scale,
                    a_shape: m.a.shape.clone(),
                    b_shape: m.b.shape.clone(),
                    a_dtype: m.a.dtype,
                    b_dtype: m.b.dtype,
                })
                .collect();
            let mut report = from_config(dir, state, Some(adapter.config()));
            report.hash = Some(adapter.hash());
            report.size_bytes = Some(adapter.size_bytes());
            report.modules = modules;
            report
        }
        Err(err) => salvage(
            dir,
            AdapterState::Rejected {
                reason: err.to_string(),
            },
        ),
    }
}

fn from_config(dir: &Path, state: AdapterState, config: Option<&AdapterConfig>) -> AdapterReport {
    AdapterReport {
        name: crate::folder_name(dir),
        dir: dir.to_owned(),
        state,
        hash: None,
        size_bytes: None,
        peft_type: config.map(|c| c.peft_type.clone()),
        base_model_name_or_path: config.and_then(|c| c.base_model_name_or_path.clone()),
        rank: config.map(|c| c.r),
        alpha: config.map(|c| c.lora_alpha),
        scale: config.map(|c| c.scale(c.r, c.lora_alpha)),
        use_rslora: config.map(|c| c.use_rslora),
        target_modules: config.map(|c| c.target_modules.clone()),
        modules: Vec::new(),
    }
}

/// Best effort for a rejected folder: each piece is read independently of the others.
fn salvage(dir: &Path, state: AdapterState) -> AdapterReport {
    let Ok((config_path, weights_path)) = locate(dir) else {
        return from_config(dir, state, None);
    };
    let config_bytes = std::fs::read(&config_path).ok();
    let config = config_bytes
        .as_deref()
        .and_then(|b| AdapterConfig::parse(&config_path, b).ok());
    let mut report = from_config(dir, state, config.as_ref());
    // Reading the whole file is fine here: inspect is an offline, one-off command.
    let Ok(weights) = std::fs::read(&weights_path) else {
        return report;
    };
    if let Some(config_bytes) = &config_bytes {
        report.hash = Some(ContentHash::of_adapter_files(config_bytes, &weights));
        report.size_bytes = Some(config_bytes.len() as u64 + weights.len() as u64);
    }
    if let (Some(config), Ok(header)) = (&config, st::parse_file(&weights)) {
        report.modules = lenient_modules(config, &header);
    }
    report
}

/// The pairs that are complete 2-D matrices with agreeing ranks; everything else is skipped.
fn lenient_modules(config: &AdapterConfig, header: &st::Header) -> Vec<ModuleReport> {
    let mut pairs: std::collections::BTreeMap<&str, [Option<&st::TensorEntry>; 2]> =
        Default::default();
    for t in &header.tensors {
        if let Key::Factor { module, factor, .. } = classify(&t.name) {
            pairs.entry(module).or_default()[factor as usize] = Some(t);
        }
    }
    pairs
        .into_iter()
        .filter_map(|(module, [a, b])| {
            let (a, b) = (a?, b?);
            let ok = a.shape.len() == 2
                && b.shape.len() == 2
                && a.shape[0] == b.shape[1]
                && a.shape[0] > 0;
            ok.then(|| {
                let rank = a.shape[0];
                let alpha = config.alpha_for(module);
                ModuleReport {
                    module: module.to_owned(),
                    rank,
                    alpha,
                    scale: config.scale(rank, alpha),
                    a_shape: a.shape.clone(),
                    b_shape: b.shape.clone(),
                    a_dtype: a.dtype,
                    b_dtype: b.dtype,
                }
            })
        })
        .collect()
}
