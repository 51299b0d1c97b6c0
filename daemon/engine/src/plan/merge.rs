//! Static merges: a plan's per-module weights applied to the experts' LoRA factors, in
//! low-rank space (the paper's "average A and B separately"), exactly (concatenated ranks),
//! or folded into the base weight; and fixed modules, whose factors the plan carries.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use moerge_library::{Adapter, TensorMap};
use moerge_sdk::plan::{MergeSpace, ModulePlan, Plan};

use super::{check_experts, plan_error};
use crate::error::{EngineError, Result};
use crate::nn::linalg;

/// One module's merged update: `ΔW = B A` (scale already folded in), and where it is applied.
pub struct MergedModule {
    pub space: MergeSpace,
    /// `[rank, in]`.
    pub a: Tensor,
    /// `[out, rank]`.
    pub b: Tensor,
}

/// The merged factors, on `device`, of every module a static or fixed part of `plan` touches
/// (fixed modules read their factors from `tensors`, the plan's tensor file).
pub fn merged_modules(
    plan: &Plan,
    experts: &[Adapter],
    tensors: &TensorMap,
    device: &Device,
) -> Result<BTreeMap<String, MergedModule>> {
    check_experts(plan, experts)?;
    let mut out = fixed_modules(plan, tensors, device)?;
    let modules: BTreeSet<&String> = experts.iter().flat_map(|e| e.modules().keys()).collect();
    for module in modules {
        let ModulePlan::Static {
            weights,
            space,
            svd_rank,
        } = plan.module(module)
        else {
            continue;
        };
        // Experts that do not adapt this module contribute nothing to it.
        let parts: Vec<(f64, &Adapter, &moerge_library::LoraModule)> = experts
            .iter()
            .zip(weights)
            .filter_map(|(e, &w)| e.modules().get(module).map(|m| (w, e, m)))
            .collect();
        let (first_in, first_out) = (parts[0].2.in_features, parts[0].2.out_features);
        if let Some((_, e, m)) = parts
            .iter()
            .find(|(_, _, m)| (m.in_features, m.out_features) != (first_in, first_out))
        {
            return Err(plan_error(format!(
                "module {module}: expert {} is [{}→{}] but {} is [{first_in}→{first_out}]",
                e.name(),
                m.in_features,
                m.out_features,
                parts[0].1.name()
            )));
        }
        // Accumulate straight from each adapter's mapped bytes (one pass per factor).
        let (a, b) = match space {
            MergeSpace::LowRank => {
                let rank = parts[0].2.rank;
                if let Some((_, e, m)) = parts.iter().find(|(_, _, m)| m.rank != rank) {
                    return Err(plan_error(format!(
                        "module {module}: a lowrank merge needs equal ranks, but {} has r={} and {} has r={rank}; use space \"exact\"",
                        e.name(),
                        m.rank,
                        parts[0].1.name()
                    )));
                }
                let mut a = vec![0f32; rank * first_in];
                let mut b = vec![0f32; first_out * rank];
                for (w, e, m) in &parts {
                    let c = (w * m.scale.sqrt()) as f32;
                    e.add_scaled_f32(&m.a, c, &mut a);
                    e.add_scaled_f32(&m.b, c, &mut b);
                }
                (
                    Tensor::from_vec(a, (rank, first_in), device)?,
                    Tensor::from_vec(b, (first_out, rank), device)?,
                )
            }
            MergeSpace::Exact | MergeSpace::Folded => {
                let total: usize = parts.iter().map(|(_, _, m)| m.rank).sum();
                let mut a = vec![0f32; total * first_in];
                let mut b = vec![0f32; first_out * total];
                let mut offset = 0;
                for (w, e, m) in &parts {
                    // A_cat stacks the A's as rows; B_cat places w s B as columns.
                    let rows = offset * first_in..(offset + m.rank) * first_in;
                    e.add_scaled_f32(&m.a, 1.0, &mut a[rows]);
                    let mut own = vec![0f32; first_out * m.rank];
                    e.add_scaled_f32(&m.b, (w * m.scale) as f32, &mut own);
                    for (row, src) in b.chunks_exact_mut(total).zip(own.chunks_exact(m.rank)) {
                        row[offset..offset + m.rank].copy_from_slice(src);
                    }
                    offset += m.rank;
                }
                (
                    Tensor::from_vec(a, (total, first_in), device)?,
                    Tensor::from_vec(b, (first_out, total), device)?,
                )
            }
        };
        let (a, b) = match svd_rank {
            Some(k) if *k < a.dim(0)? => truncate(&a, &b, *k)?,
            _ => (a, b),
        };
        out.insert(
            module.clone(),
            MergedModule {
                space: *space,
                a,
                b,
            },
        );
    }
    Ok(out)
}

/// The modules `plan` marks fixed: their factors are named in `tensors` by module path, so
/// the tensor names say which modules exist (a fixed module may be one no expert adapts).
fn fixed_modules(
    plan: &Plan,
    tensors: &TensorMap,
    device: &Device,
) -> Result<BTreeMap<String, MergedModule>> {
    let out: BTreeMap<String, MergedModule> = fixed_factors(plan, tensors, "plan", device)?
        .into_iter()
        .map(|(module, (a, b))| {
            let merged = MergedModule {
                space: MergeSpace::Exact,
                a,
                b,
            };
            (module, merged)
        })
        .collect();
    let fixed_somewhere = std::iter::once(&plan.default)
        .chain(plan.modules.values())
        .any(|p| *p == ModulePlan::Fixed);
    if fixed_somewhere && out.is_empty() {
        return Err(plan_error(
            "marks modules fixed but the plan's tensors hold no <module>.lora_A.weight factors"
                .into(),
        ));
    }
    Ok(out)
}

/// The factors `(A [r, in], B [out, r])` of every module `plan` marks fixed, read from
/// `tensors` (`<module>.lora_A.weight` / `.lora_B.weight`) onto `device`; errors name
/// `argument`.
pub(crate) fn fixed_factors(
    plan: &Plan,
    tensors: &TensorMap,
    argument: &'static str,
    device: &Device,
) -> Result<BTreeMap<String, (Tensor, Tensor)>> {
    use moerge_sdk::plan::{fixed_a_name, fixed_b_name};
    let error = |message| EngineError::InvalidArgument { argument, message };
    let mut out = BTreeMap::new();
    for name in tensors.keys() {
        let Some(module) = name.strip_suffix(".lora_A.weight") else {
            continue;
        };
        if plan.module(module) != &ModulePlan::Fixed {
            continue;
        }
        let (a_name, b_name) = (fixed_a_name(module), fixed_b_name(module));
        let a = &tensors[&a_name];
        let b = tensors.get(&b_name).ok_or_else(|| {
            error(format!(
                "module {module} is fixed: the {argument}'s tensors have {a_name} but no {b_name}"
            ))
        })?;
        let (&[r, inp], &[out_features, rb]) = (a.shape.as_slice(), b.shape.as_slice()) else {
            return Err(error(format!(
                "module {module}: fixed factors must be 2-D, got {a_name} {:?} and {b_name} {:?}",
                a.shape, b.shape
            )));
        };
        if rb != r {
            return Err(error(format!(
                "module {module}: {a_name} has rank {r} but {b_name} has {rb}"
            )));
        }
        let a = Tensor::from_vec(a.data.clone(), (r, inp), device)?;
        let b = Tensor::from_vec(b.data.clone(), (out_features, r), device)?;
        out.insert(module.to_string(), (a, b));
    }
    Ok(out)
}

/// The best rank-`k` approximation of `ΔW = B A` (`b` `[out, R]`, `a` `[R, in]`) as new
/// factors, without forming `ΔW`: thin QR of `B` and `Aᵀ`, SVD of the `R × R` core
/// `R_b R_aᵀ`, then `B' = Q_b U_k Σ_k` and `A' = (Q_a V_k)ᵀ` (PEFT's `svd` merge).
fn truncate(a: &Tensor, b: &Tensor, k: usize) -> Result<(Tensor, Tensor)> {
    let (r, inp) = a.dims2()?;
    let out = b.dim(0)?;
    let to64 = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(t.flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(f64::from)
            .collect())
    };
    let a_t = to64(&a.t()?.contiguous()?)?; // in × R
    let b64 = to64(b)?; // out × R
    let linalg::ProductSvd {
        qa,
        qb,
        m,
        values,
        v,
    } = linalg::product_svd(&a_t, &b64, r, inp, out);
    // U = M V / σ.
    let mut new_b = vec![0f32; out * k];
    let mut new_a = vec![0f32; k * inp];
    for c in 0..k {
        let sigma = values[c].max(0.0).sqrt();
        // u = M v / σ (zero when σ vanishes: that direction carries nothing).
        let u: Vec<f64> = (0..r)
            .map(|i| {
                if sigma > 0.0 {
                    (0..r).map(|t| m[i * r + t] * v[t * r + c]).sum::<f64>() / sigma
                } else {
                    0.0
                }
            })
            .collect();
        for o in 0..out {
            new_b[o * k + c] = ((0..r).map(|i| qb[o * r + i] * u[i]).sum::<f64>() * sigma) as f32;
        }
        for j in 0..inp {
            new_a[c * inp + j] = (0..r).map(|i| qa[j * r + i] * v[i * r + c]).sum::<f64>() as f32;
        }
    }
    Ok((
        Tensor::from_vec(new_a, (k, inp), a.device())?,
        Tensor::from_vec(new_b, (out, k), a.device())?,
    ))
}
