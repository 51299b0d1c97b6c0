//! Writing LoRA factors as a PEFT adapter folder: a static merge exported for other tools,
//! and (through [`write_factors`]) the factors the `train` layer trains.

use std::collections::BTreeSet;
use std::path::Path;

use candle_core::{Device, Tensor};
use moerge_library::{Adapter, ContentHash, NewAdapter, NewModule, TensorMap};
use moerge_sdk::plan::{ModulePlan, Plan};

use super::merge::merged_modules;
use super::plan_error;
use crate::error::{EngineError, Result};

/// Writes the static merge of `plan` as a PEFT LoRA folder: low-rank merges keep their rank,
/// exact (and folded) merges get the concatenated rank, every module with scale 1
/// (`lora_alpha` = its rank, through `alpha_pattern` where ranks differ).
pub fn export_peft(
    plan: &Plan,
    experts: &[Adapter],
    tensors: &TensorMap,
    dir: &Path,
) -> Result<ContentHash> {
    if let Some((m, _)) = std::iter::once(("default", &plan.default))
        .chain(plan.modules.iter().map(|(k, v)| (k.as_str(), v)))
        .find(|(_, p)| {
            !matches!(
                p,
                ModulePlan::Static { .. } | ModulePlan::Fixed | ModulePlan::None
            )
        })
    {
        return Err(plan_error(format!(
            "module plan {m} is not a static merge; only static merges export as one PEFT adapter"
        )));
    }
    let merged = merged_modules(plan, experts, tensors, &Device::Cpu)?;
    if merged.is_empty() {
        return Err(plan_error(
            "merges no module, so there is nothing to export".into(),
        ));
    }
    // Every module gets scale 1: lora_alpha equals its rank, through alpha_pattern where the
    // rank differs from the first module's.
    let factors: Vec<(String, Tensor, Tensor)> =
        merged.into_iter().map(|(m, f)| (m, f.a, f.b)).collect();
    let ranks = factors
        .iter()
        .map(|(m, a, _)| Ok((m.clone(), a.dim(0)?)))
        .collect::<Result<Vec<_>>>()?;
    let r = ranks[0].1;
    let targets: BTreeSet<String> = ranks
        .iter()
        .map(|(m, _)| m.rsplit('.').next().unwrap_or(m).to_string())
        .collect();
    let header = NewAdapter {
        r,
        lora_alpha: r as f64,
        use_rslora: false,
        target_modules: targets.into_iter().collect(),
        base_model_name_or_path: experts[0]
            .config()
            .base_model_name_or_path
            .clone()
            .unwrap_or_default(),
        alpha_overrides: ranks
            .iter()
            .filter(|(_, k)| *k != r)
            .map(|(m, k)| (m.clone(), *k as f64))
            .collect(),
        modules: Vec::new(),
    };
    write_factors(dir, header, &factors)
}

/// Writes `(module, A [r, in], B [out, r])` factors under the settings of `header` (whose
/// `modules` are ignored) as a PEFT adapter folder, atomically; returns its content hash.
pub(crate) fn write_factors(
    dir: &Path,
    header: NewAdapter<'_>,
    factors: &[(String, Tensor, Tensor)],
) -> Result<ContentHash> {
    let values = factors
        .iter()
        .map(|(m, a, b)| {
            let (r, inp) = a.dims2()?;
            let out = b.dim(0)?;
            let a = a.flatten_all()?.to_vec1::<f32>()?;
            let b = b.flatten_all()?.to_vec1::<f32>()?;
            Ok((m.clone(), r, inp, out, a, b))
        })
        .collect::<Result<Vec<_>>>()?;
    let adapter = NewAdapter {
        modules: values
            .iter()
            .map(|(module, rank, inp, out, a, b)| NewModule {
                module: module.clone(),
                rank: *rank,
                in_features: *inp,
                out_features: *out,
                a,
                b,
            })
            .collect(),
        ..header
    };
    moerge_library::write_adapter(dir, &adapter).map_err(|e| EngineError::InvalidArgument {
        argument: "out",
        message: e.to_string(),
    })
}
