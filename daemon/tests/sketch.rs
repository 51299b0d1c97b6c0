//! The update sketch keeps the cosine similarity of experts' updates `s B A` (multiplied
//! out here with plain loops), which is what clustering compares.

mod support;

use moerge_daemon::service::sketch::{decode_sketch, parameter_sketch, SKETCH_DIM};
use moerge_library::Adapter;
use support::*;

/// Every module's dense `s B A`, concatenated.
fn flat(adapter: &Adapter) -> Vec<f64> {
    let mut values = Vec::new();
    for m in adapter.modules().values() {
        let a = adapter.tensor_f32(&m.a);
        let b = adapter.tensor_f32(&m.b);
        for o in 0..m.out_features {
            for c in 0..m.in_features {
                let mut x = 0.0f64;
                for p in 0..m.rank {
                    x += f64::from(b[o * m.rank + p]) * f64::from(a[p * m.in_features + c]);
                }
                values.push(m.scale * x);
            }
        }
    }
    values
}

fn cosine(a: &[f64], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

#[test]
fn sketch_cosines_track_parameter_cosines() {
    let adapters: Vec<Adapter> = TASKS
        .iter()
        .map(|t| Adapter::load(&fixture_adapter(t)).unwrap())
        .collect();
    let sketches: Vec<Vec<f64>> = adapters
        .iter()
        .map(|a| {
            let s = decode_sketch(&parameter_sketch(a)).unwrap();
            assert_eq!(s.len(), SKETCH_DIM);
            s.into_iter().map(f64::from).collect()
        })
        .collect();
    for i in 0..adapters.len() {
        assert!((cosine(&sketches[i], &sketches[i]) - 1.0).abs() < 1e-9);
        assert_eq!(
            parameter_sketch(&adapters[i]),
            parameter_sketch(&adapters[i]),
            "deterministic"
        );
        for j in i + 1..adapters.len() {
            let exact = cosine(&flat(&adapters[i]), &flat(&adapters[j]));
            let sketched = cosine(&sketches[i], &sketches[j]);
            // Random projections and a count sketch: errors shrink as 1/sqrt(size).
            assert!(
                (exact - sketched).abs() < 0.15,
                "{} vs {}: {exact} vs {sketched}",
                TASKS[i],
                TASKS[j]
            );
        }
    }
    // Same factors, other alpha: the update is scaled, so is the sketch (cosine 1).
    let dir = tempfile::tempdir().unwrap();
    variant(&fixture_adapter("rot13"), dir.path(), 3);
    let scaled = Adapter::load(dir.path()).unwrap();
    let ratio = scaled.modules().values().next().unwrap().scale
        / adapters[2].modules().values().next().unwrap().scale;
    let s = decode_sketch(&parameter_sketch(&scaled)).unwrap();
    for (x, y) in s.iter().zip(&sketches[2]) {
        assert!(
            (f64::from(*x) - ratio * y).abs() <= 1e-5 * y.abs().max(1e-3),
            "{x} vs {y}"
        );
    }
}
