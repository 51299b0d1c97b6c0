//! TIES merging (Yadav et al. 2023) of dense deltas, with PEFT's `ties` semantics. The
//! truncated SVD that turns the merged delta back into LoRA factors (PEFT's `ties_svd`) is
//! `moerge_sdk::linalg::low_rank`.

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
