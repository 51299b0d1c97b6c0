//! TIES merging (Yadav et al. 2023) of dense deltas, with PEFT's `ties` semantics, and the
//! truncated SVD that turns the merged delta back into LoRA factors (PEFT's `ties_svd`).

use moerge_sdk::linalg::symmetric_eigen;

/// Keeps the `density` fraction of largest-magnitude entries (`floor(density · len)`, as
/// PEFT's magnitude pruning), zeroing the rest.
pub fn trim(delta: &[f64], density: f64) -> Vec<f64> {
    let keep = ((delta.len() as f64) * density) as usize;
    let mut order: Vec<usize> = (0..delta.len()).collect();
    order.sort_by(|&i, &j| delta[j].abs().total_cmp(&delta[i].abs()));
    let mut out = vec![0.0; delta.len()];
    for &i in &order[..keep.min(delta.len())] {
        out[i] = delta[i];
    }
    out
}

/// TIES of equally shaped deltas: trim each to `density`, elect each entry's sign as the sign
/// of the sum of the trimmed deltas (ties go to +), then average the weighted entries that
/// agree with it (`Σ wᵢ tᵢ` over agreeing `i`, divided by their count, at least 1).
pub fn ties(deltas: &[Vec<f64>], weights: &[f64], density: f64) -> Vec<f64> {
    let trimmed: Vec<Vec<f64>> = deltas.iter().map(|d| trim(d, density)).collect();
    let len = deltas.first().map_or(0, Vec::len);
    (0..len)
        .map(|k| {
            let total: f64 = trimmed.iter().map(|t| t[k]).sum();
            let sign = if total >= 0.0 { 1.0 } else { -1.0 };
            let agree = trimmed
                .iter()
                .zip(weights)
                .filter(|(t, _)| t[k] * sign > 0.0);
            let (sum, count) = agree.fold((0.0, 0usize), |(s, c), (t, w)| (s + w * t[k], c + 1));
            sum / count.max(1) as f64
        })
        .collect()
}

/// The best rank-`rank` factors of the `out × in` matrix `m` (row-major): `(a, b)` with `a`
/// `[rank, in]` and `b` `[out, rank]`, `b a` the truncated SVD of `m`. Computed from the
/// eigenvectors of the smaller Gram matrix, so no division by small singular values.
pub fn low_rank(m: &[f64], out: usize, inputs: usize, rank: usize) -> (Vec<f64>, Vec<f64>) {
    let at = |i: usize, j: usize| m[i * inputs + j];
    if inputs <= out {
        // mᵀm = V Σ² Vᵀ: a = V_rᵀ, b = m V_r.
        let gram: Vec<f64> = (0..inputs * inputs)
            .map(|k| {
                (0..out)
                    .map(|t| at(t, k / inputs) * at(t, k % inputs))
                    .sum()
            })
            .collect();
        let (_, v) = symmetric_eigen(&gram, inputs);
        let a: Vec<f64> = (0..rank * inputs)
            .map(|k| v[(k % inputs) * inputs + k / inputs])
            .collect();
        let b = (0..out * rank)
            .map(|k| {
                (0..inputs)
                    .map(|j| at(k / rank, j) * a[(k % rank) * inputs + j])
                    .sum()
            })
            .collect();
        (a, b)
    } else {
        // m mᵀ = U Σ² Uᵀ: b = U_r, a = U_rᵀ m.
        let gram: Vec<f64> = (0..out * out)
            .map(|k| (0..inputs).map(|t| at(k / out, t) * at(k % out, t)).sum())
            .collect();
        let (_, u) = symmetric_eigen(&gram, out);
        let b: Vec<f64> = (0..out * rank)
            .map(|k| u[(k / rank) * out + k % rank])
            .collect();
        let a = (0..rank * inputs)
            .map(|k| {
                (0..out)
                    .map(|i| b[i * rank + k / inputs] * at(i, k % inputs))
                    .sum()
            })
            .collect();
        (a, b)
    }
}
