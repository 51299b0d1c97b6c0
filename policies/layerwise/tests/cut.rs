//! The cut rules: threshold, most conflicted count (ties in layer order), rounding of a route
//! fraction, and validation's candidate counts.

use moerge_policy_layerwise::conflict::{Layer, LayerConflict};
use moerge_policy_layerwise::cut::{above, candidate_counts, fraction_count, most_conflicted};

fn conflicts(scores: &[f64]) -> Vec<LayerConflict> {
    scores
        .iter()
        .enumerate()
        .map(|(i, &score)| LayerConflict {
            layer: Layer {
                key: format!("model.layers.{i}"),
                index: Some(i),
                modules: vec![],
            },
            score,
        })
        .collect()
}

#[test]
fn threshold_routes_strictly_above() {
    let c = conflicts(&[0.1, 0.5, 0.9, 0.5]);
    assert_eq!(above(&c, 0.5), [false, false, true, false]);
    assert_eq!(above(&c, 0.0), [true; 4]);
    assert_eq!(above(&c, 1.0), [false; 4]);
}

#[test]
fn most_conflicted_breaks_ties_by_layer_order() {
    let c = conflicts(&[0.1, 0.5, 0.9, 0.5]);
    assert_eq!(most_conflicted(&c, 0), [false; 4]);
    assert_eq!(most_conflicted(&c, 1), [false, false, true, false]);
    assert_eq!(most_conflicted(&c, 2), [false, true, true, false]);
    assert_eq!(most_conflicted(&c, 3), [false, true, true, true]);
    assert_eq!(most_conflicted(&c, 9), [true; 4]);
}

#[test]
fn fractions_round_to_the_nearest_count() {
    for (fraction, layers, want) in [
        (0.5, 4, 2),
        (0.5, 5, 3),
        (0.5, 1, 1),
        (0.0, 7, 0),
        (1.0, 7, 7),
        (0.25, 6, 2),
        (0.2, 6, 1),
    ] {
        assert_eq!(
            fraction_count(fraction, layers),
            want,
            "{fraction} of {layers}"
        );
    }
}

#[test]
fn candidates_are_every_cut_or_evenly_spaced() {
    for (layers, candidates, want) in [
        (4, 9, vec![0, 1, 2, 3, 4]),
        (8, 9, vec![0, 1, 2, 3, 4, 5, 6, 7, 8]),
        (12, 4, vec![0, 4, 8, 12]),
        (32, 5, vec![0, 8, 16, 24, 32]),
        (10, 4, vec![0, 3, 7, 10]),
        (2, 2, vec![0, 2]),
        (0, 9, vec![0]),
    ] {
        assert_eq!(
            candidate_counts(layers, candidates),
            want,
            "{layers}, {candidates}"
        );
    }
}
