//! One module's merge in either of PEFT's two spaces (`peft/tuners/lora/model.py`):
//! [`merge_low_rank`] follows `_generalized_task_arithmetic_weighted_adapter` (the `A`s and the
//! `B`s merged separately), [`merge_svd`] follows
//! `_svd_generalized_task_arithmetic_weighted_adapter` (dense deltas merged, then a truncated
//! SVD). An expert lacking the module takes part as zeros, which every merge function treats
//! exactly like PEFT's skipping it (zeros are pruned to zeros, never win or join a sign vote,
//! and add nothing to a sum).

use moerge_sdk::linalg::{dense_delta, low_rank};
use moerge_sdk::policy::{ExpertView, ModuleFactors, PolicyError};

use crate::mask::DropMask;
use crate::merge::Merge;

/// A module's merged factors, applied with scale 1: `ΔW = B A`.
#[derive(Debug, Clone, PartialEq)]
pub struct Factors {
    pub rank: usize,
    pub in_features: usize,
    pub out_features: usize,
    /// `[rank, in_features]`, row-major.
    pub a: Vec<f64>,
    /// `[out_features, rank]`, row-major.
    pub b: Vec<f64>,
}

/// The experts' factors of `module` (`None` where an expert lacks it), after checking that
/// every expert that has it agrees on its shape.
fn views<'e>(
    module: &str,
    experts: &'e [ExpertView<'e>],
) -> Result<(Vec<Option<&'e ModuleFactors<'e>>>, usize, usize), PolicyError> {
    let views: Vec<_> = experts.iter().map(|e| e.module(module)).collect();
    let mut present = experts
        .iter()
        .zip(&views)
        .filter_map(|(e, v)| Some((e, (*v)?)));
    let (first_expert, first) = present
        .next()
        .ok_or_else(|| PolicyError::invalid(format!("no expert adapts module {module}")))?;
    for (e, m) in present {
        if (m.in_features, m.out_features) != (first.in_features, first.out_features) {
            return Err(PolicyError::invalid(format!(
                "module {module} is {}x{} (out x in) in expert {} but {}x{} in expert {}",
                first.out_features,
                first.in_features,
                first_expert.name,
                m.out_features,
                m.in_features,
                e.name
            )));
        }
    }
    Ok((views, first.in_features, first.out_features))
}

/// PEFT's low-rank path: with `wsᵢ = weightᵢ · scaleᵢ` (line 910), the `A`s are merged with
/// weights `sign(wsᵢ) · sqrt(|wsᵢ|)` and the `B`s with `sqrt(|wsᵢ|)` (lines 911-914), each by
/// `merge` on its own (lines 922-932); the result keeps the experts' rank. `combination` names
/// the user's choice in the error when ranks differ.
pub fn merge_low_rank(
    module: &str,
    experts: &[ExpertView<'_>],
    weights: &[f64],
    merge: &Merge,
    mask: &mut DropMask,
    combination: &str,
) -> Result<Factors, PolicyError> {
    let (views, in_features, out_features) = views(module, experts)?;
    let mut present = experts
        .iter()
        .zip(&views)
        .filter_map(|(e, v)| Some((e, (*v)?)));
    let (first_expert, first) = present.next().expect("views checked one is present");
    let rank = first.rank;
    for (e, m) in present {
        if m.rank != rank {
            return Err(PolicyError::invalid(format!(
                "combination_type={combination} merges A and B separately, which needs equal \
                 ranks, but module {module} has rank {rank} in expert {} and rank {} in expert \
                 {}; use combination_type={combination}_svd",
                first_expert.name, m.rank, e.name
            )));
        }
    }
    let (mut a_weights, mut b_weights) = (Vec::new(), Vec::new());
    let (mut a_tensors, mut b_tensors) = (Vec::new(), Vec::new());
    for (view, w) in views.iter().zip(weights) {
        let f64s = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>();
        let (ws, a, b) = match view {
            Some(m) => (w * m.scale, f64s(m.a), f64s(m.b)),
            None => (
                *w,
                vec![0.0; rank * in_features],
                vec![0.0; out_features * rank],
            ),
        };
        let sign = if ws >= 0.0 { 1.0 } else { -1.0 };
        a_weights.push(ws.abs().sqrt() * sign);
        b_weights.push(ws.abs().sqrt());
        a_tensors.push(a);
        b_tensors.push(b);
    }
    let a = merge.apply(&a_tensors, &a_weights, mask);
    let b = merge.apply(&b_tensors, &b_weights, mask);
    Ok(Factors {
        rank,
        in_features,
        out_features,
        a,
        b,
    })
}

/// PEFT's SVD path: the dense deltas `scaleᵢ · Bᵢ Aᵢ` (`get_delta_weight`, line 844) merged by
/// `merge` with weights `weightᵢ`, each scale applied once, which is what PEFT 0.21.2's `svd`
/// merge computes (the engine's parity test against its output; PEFT's main branch multiplies
/// the weights by the scale again at line 839), then truncated to `min(rank, in, out)` by SVD with PEFT's split of the factors:
/// `A = Vhᵣ` (orthonormal rows), `B = Uᵣ Σᵣ` (lines 870-874, 884).
pub fn merge_svd(
    module: &str,
    experts: &[ExpertView<'_>],
    weights: &[f64],
    merge: &Merge,
    mask: &mut DropMask,
    rank: usize,
) -> Result<Factors, PolicyError> {
    let (views, in_features, out_features) = views(module, experts)?;
    let (mut deltas, mut delta_weights) = (Vec::new(), Vec::new());
    for (view, w) in views.iter().zip(weights) {
        match view {
            Some(m) => {
                deltas.push(dense_delta(m));
                delta_weights.push(*w);
            }
            None => {
                deltas.push(vec![0.0; out_features * in_features]);
                delta_weights.push(*w);
            }
        }
    }
    let merged = merge.apply(&deltas, &delta_weights, mask);
    let rank = rank.min(in_features).min(out_features);
    let (mut a, mut b) = low_rank(&merged, out_features, in_features, rank);
    singular_values_into_b(&mut a, &mut b, rank, in_features);
    Ok(Factors {
        rank,
        in_features,
        out_features,
        a,
        b,
    })
}

/// `low_rank` may leave the singular values in `A`'s rows; PEFT keeps them in `B`'s columns.
/// Rescales each nonzero row of `a` to unit length and its column of `b` by the inverse, which
/// leaves `B A` unchanged.
fn singular_values_into_b(a: &mut [f64], b: &mut [f64], rank: usize, in_features: usize) {
    for t in 0..rank {
        let row = &mut a[t * in_features..(t + 1) * in_features];
        let norm = row.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 0.0 {
            row.iter_mut().for_each(|x| *x /= norm);
            b.iter_mut().skip(t).step_by(rank).for_each(|x| *x *= norm);
        }
    }
}
