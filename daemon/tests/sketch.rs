//! The parameter sketch keeps the cosine similarity of experts' flattened LoRA factors,
//! which is what clustering will compare.

mod support;

use moerge_daemon::service::sketch::{decode_sketch, parameter_sketch, SKETCH_DIM};
use moerge_library::Adapter;
use support::*;

fn flat(adapter: &Adapter) -> Vec<f64> {
    let mut values = Vec::new();
    for m in adapter.modules().values() {
        values.extend(adapter.tensor_f32(&m.a).into_iter().map(f64::from));
        values.extend(adapter.tensor_f32(&m.b).into_iter().map(f64::from));
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
            // A count sketch's error shrinks as 1/sqrt(dim): about 0.03 here.
            assert!(
                (exact - sketched).abs() < 0.15,
                "{} vs {}: {exact} vs {sketched}",
                TASKS[i],
                TASKS[j]
            );
        }
    }
    // Same factors, other alpha: the sketch is of the factors, so it is the same.
    let dir = tempfile::tempdir().unwrap();
    variant(&fixture_adapter("rot13"), dir.path(), 3);
    assert_eq!(
        parameter_sketch(&Adapter::load(dir.path()).unwrap()),
        parameter_sketch(&adapters[2])
    );
}
