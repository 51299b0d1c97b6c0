//! Which layers to route, given their conflict scores: above a threshold, the most conflicted
//! fraction, or one of a few candidate counts that validation chooses among. Each answer is
//! one `bool` per layer, in the layers' order (`true`: routed).

use crate::conflict::LayerConflict;

/// Routes every layer whose score is above `threshold` (a score equal to it is merged).
pub fn above(conflicts: &[LayerConflict], threshold: f64) -> Vec<bool> {
    conflicts.iter().map(|c| c.score > threshold).collect()
}

/// Routes the `count` most conflicted layers (all of them if `count` exceeds their number).
/// Equal scores go in layer order: of two equally conflicted layers the earlier is routed
/// first.
pub fn most_conflicted(conflicts: &[LayerConflict], count: usize) -> Vec<bool> {
    let mut order: Vec<usize> = (0..conflicts.len()).collect();
    order.sort_by(|&i, &j| conflicts[j].score.total_cmp(&conflicts[i].score));
    let mut routed = vec![false; conflicts.len()];
    for &i in order.iter().take(count) {
        routed[i] = true;
    }
    routed
}

/// How many of `layers` layers a route fraction routes: `fraction · layers`, rounded to the
/// nearest integer (halves up, so 0.5 of 5 layers routes 3).
pub fn fraction_count(fraction: f64, layers: usize) -> usize {
    ((fraction * layers as f64).round() as usize).min(layers)
}

/// The numbers of routed layers validation tries, ascending: every count `0..=layers` when
/// there are at most `candidates` of them, else `candidates` counts evenly spaced from 0 to
/// `layers` (rounded, duplicates dropped). `candidates` below 2 counts as 2 (none and all).
pub fn candidate_counts(layers: usize, candidates: usize) -> Vec<usize> {
    if layers < candidates {
        return (0..=layers).collect();
    }
    let steps = candidates.max(2) - 1;
    let mut counts: Vec<usize> = (0..=steps)
        .map(|i| (i as f64 * layers as f64 / steps as f64).round() as usize)
        .collect();
    counts.dedup();
    counts
}
