//! Parity with transformers + PEFT on the shared fixtures: models and adapters written by
//! those libraries, logits computed by them, compared with ours within 1e-4.

mod common;

use common::{fixtures, max_abs_diff, reference_sequences};
use moerge_engine::{inference, BaseModel, Precision};
use moerge_library::Adapter;

const TOL: f32 = 1e-4;
const ADAPTERS: [&str; 5] = ["swapcase", "rot13", "twice", "length", "minus"];

fn check(base: &str) {
    let dir = fixtures().join(base);
    let model = BaseModel::load_dir(&dir, Precision::F32).unwrap();
    let mut checked = 0;
    for (ids, want) in reference_sequences(base, "base_logits.safetensors", "logits") {
        let got = inference::logits(&model, &ids).unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= TOL, "{base} base: max |diff| {diff}");
        checked += 1;
    }
    for name in ADAPTERS {
        let adapter = Adapter::load(&dir.join("adapters").join(name)).unwrap();
        let adapted = model.with_adapter(&adapter).unwrap();
        for (ids, want) in reference_sequences(
            base,
            &format!("adapter_{name}_logits.safetensors"),
            "logits",
        ) {
            let got = inference::logits(&adapted, &ids).unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff <= TOL, "{base} + {name}: max |diff| {diff}");
            checked += 1;
        }
    }
    assert_eq!(checked, 18);
}

#[test]
fn dev_phi_matches_transformers_and_peft() {
    check("dev-phi");
}

#[test]
fn dev_llama_matches_transformers_and_peft() {
    check("dev-llama");
}

#[test]
fn an_adapter_for_another_base_is_refused_with_shapes() {
    let llama = BaseModel::load_dir(&fixtures().join("dev-llama"), Precision::F32).unwrap();
    let phi_adapter = Adapter::load(&fixtures().join("dev-phi/adapters/swapcase")).unwrap();
    let err = match llama.with_adapter(&phi_adapter) {
        Ok(_) => panic!("a phi adapter attached to a llama base"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("swapcase"), "{err}");
    assert!(err.contains("model.layers."), "names no module: {err}");
}
