//! PEFT's merge functions (`peft/utils/merge_utils.py`) on flat, equally shaped `f64` tensors:
//! one line of Rust per line of PEFT where possible, so the two can be read side by side. The
//! tensors of one merge are "task tensors" stacked on a leading expert axis in PEFT; here they
//! are a slice of `Vec`s, one per expert.

use crate::mask::DropMask;

/// How `ties` and `dare_ties` elect each entry's sign (PEFT's `majority_sign_method`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignMethod {
    /// The sign of the sum of the (pruned, unweighted) entries.
    Total,
    /// The sign of the sum of their signs: the more frequent sign wins.
    Frequency,
}

/// Which of PEFT's merge functions to apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeFn {
    /// `task_arithmetic`: `Σ wᵢ tᵢ`.
    Linear,
    /// `ties`: magnitude prune, elect sign, disjoint mean of the weighted tensors.
    Ties,
    /// `dare_linear`: random prune with rescale, then `Σ wᵢ tᵢ`.
    DareLinear,
    /// `dare_ties`: random prune with rescale, elect sign, disjoint mean.
    DareTies,
    /// `magnitude_prune`: magnitude prune, then `Σ wᵢ tᵢ`.
    MagnitudePrune,
}

/// A merge function with its settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Merge {
    pub function: MergeFn,
    /// The fraction of entries kept, in `[0, 1]` (PEFT's `density`).
    pub density: f64,
    pub sign_method: SignMethod,
}

impl Merge {
    /// Merges `tensors` with one weight each; `mask` feeds DARE's random pruning.
    ///
    /// # Panics
    /// If `weights` and `tensors` differ in length or the tensors in shape.
    pub fn apply(&self, tensors: &[Vec<f64>], weights: &[f64], mask: &mut DropMask) -> Vec<f64> {
        assert_eq!(tensors.len(), weights.len(), "one weight per tensor");
        let len = tensors.first().map_or(0, Vec::len);
        assert!(tensors.iter().all(|t| t.len() == len), "equal shapes");
        let density = self.density;
        match self.function {
            MergeFn::Linear => weighted_sum(tensors, weights),
            MergeFn::MagnitudePrune => {
                let pruned: Vec<_> = tensors
                    .iter()
                    .map(|t| prune_magnitude(t, density))
                    .collect();
                weighted_sum(&pruned, weights)
            }
            MergeFn::DareLinear => {
                let pruned: Vec<_> = tensors
                    .iter()
                    .map(|t| prune_random(t, density, mask))
                    .collect();
                weighted_sum(&pruned, weights)
            }
            MergeFn::Ties => {
                let pruned: Vec<_> = tensors
                    .iter()
                    .map(|t| prune_magnitude(t, density))
                    .collect();
                elect_and_merge(&pruned, weights, self.sign_method)
            }
            MergeFn::DareTies => {
                let pruned: Vec<_> = tensors
                    .iter()
                    .map(|t| prune_random(t, density, mask))
                    .collect();
                elect_and_merge(&pruned, weights, self.sign_method)
            }
        }
    }
}

/// `prune(method="magnitude")`: unchanged when `density ≥ 1`; else keeps the
/// `k = int(density · numel)` largest-magnitude entries (`torch.topk`) and zeroes the rest.
/// `torch.topk` leaves the order among equal magnitudes unspecified; we keep the lower index.
pub fn prune_magnitude(tensor: &[f64], density: f64) -> Vec<f64> {
    if density >= 1.0 {
        return tensor.to_vec();
    }
    // Python's int() truncates toward zero, as `as usize` does for these non-negative values.
    let k = (density * tensor.len() as f64) as usize;
    let mut out = vec![0.0; tensor.len()];
    if k == 0 {
        return out;
    }
    let mut order: Vec<usize> = (0..tensor.len()).collect();
    let larger_first = |i: &usize, j: &usize| {
        let (x, y) = (tensor[*i].abs(), tensor[*j].abs());
        y.total_cmp(&x).then(i.cmp(j))
    };
    // A strict total order, so the selected set is the same whatever the selection does.
    order.select_nth_unstable_by(k - 1, larger_first);
    for &i in &order[..k] {
        out[i] = tensor[i];
    }
    out
}

/// `prune(method="random", rescale=True)`: unchanged when `density ≥ 1` (no draws); else each
/// entry kept with probability `density` and the kept ones divided by `density`. PEFT draws
/// the mask with `torch.bernoulli`; we draw it from `mask` (see [`crate::mask`]).
pub fn prune_random(tensor: &[f64], density: f64, mask: &mut DropMask) -> Vec<f64> {
    if density >= 1.0 {
        return tensor.to_vec();
    }
    tensor
        .iter()
        .map(|&x| if mask.keep(density) { x / density } else { 0.0 })
        .collect()
}

/// `task_arithmetic` after pruning: `Σᵢ wᵢ tᵢ`.
fn weighted_sum(tensors: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let len = tensors.first().map_or(0, Vec::len);
    (0..len)
        .map(|k| tensors.iter().zip(weights).map(|(t, w)| w * t[k]).sum())
        .collect()
}

/// `calculate_majority_sign_mask` on the pruned, *unweighted* tensors, then `disjoint_merge`
/// of the weighted ones, per entry `k`:
/// `sᵢ = sign(tᵢ[k])`; `total`: `m = Σ tᵢ[k]`, `frequency`: `m = Σ sᵢ`;
/// `elected = +1 if m ≥ 0 else −1`; `maskᵢ = (sᵢ == elected)` (so zeros never count);
/// `merged[k] = Σ maskᵢ wᵢ tᵢ[k] / max(Σ maskᵢ, 1)`.
fn elect_and_merge(pruned: &[Vec<f64>], weights: &[f64], method: SignMethod) -> Vec<f64> {
    let len = pruned.first().map_or(0, Vec::len);
    (0..len)
        .map(|k| {
            let magnitude: f64 = match method {
                SignMethod::Total => pruned.iter().map(|t| t[k]).sum(),
                SignMethod::Frequency => pruned.iter().map(|t| sign(t[k])).sum(),
            };
            let elected = if magnitude >= 0.0 { 1.0 } else { -1.0 };
            let (mut sum, mut count) = (0.0, 0usize);
            for (t, w) in pruned.iter().zip(weights) {
                if sign(t[k]) == elected {
                    sum += w * t[k];
                    count += 1;
                }
            }
            sum / count.max(1) as f64
        })
        .collect()
}

/// `torch.sign`: −1, 0 or +1.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_prune_keeps_int_of_density_times_len() {
        let t = [0.5, -3.0, 2.0, -1.0, 0.0];
        // int(0.5 * 5) = 2: -3 and 2 survive.
        assert_eq!(prune_magnitude(&t, 0.5), [0.0, -3.0, 2.0, 0.0, 0.0]);
        assert_eq!(prune_magnitude(&t, 0.1), [0.0; 5]);
        assert_eq!(prune_magnitude(&t, 1.0), t);
        // Equal magnitudes: the lower index wins.
        assert_eq!(prune_magnitude(&[1.0, -1.0, 1.0], 0.5), [1.0, 0.0, 0.0]);
    }
}
