//! Writing adapters: what `write_adapter` produces loads back through the strict reader with
//! the same values, ranks and scales, and the sidecar metadata round-trips.

use std::collections::BTreeMap;

use moerge_library::{write_adapter, Adapter, ExpertMetadata, NewAdapter, NewModule};

#[test]
fn written_adapters_load_back_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("expert");
    let a1: Vec<f32> = (0..4 * 6).map(|i| i as f32 * 0.25 - 3.0).collect();
    let b1: Vec<f32> = (0..5 * 4).map(|i| (i as f32).sin()).collect();
    let a2: Vec<f32> = (0..2 * 6).map(|i| -(i as f32)).collect();
    let b2: Vec<f32> = (0..6 * 2).map(|i| i as f32 / 7.0).collect();
    let adapter = NewAdapter {
        r: 4,
        lora_alpha: 8.0,
        use_rslora: false,
        target_modules: vec!["q_proj".into(), "fc1".into()],
        base_model_name_or_path: "tiny".into(),
        alpha_overrides: BTreeMap::from([("model.layers.0.mlp.fc1".to_string(), 3.0)]),
        modules: vec![
            NewModule {
                module: "model.layers.0.self_attn.q_proj".into(),
                rank: 4,
                in_features: 6,
                out_features: 5,
                a: &a1,
                b: &b1,
            },
            NewModule {
                module: "model.layers.0.mlp.fc1".into(),
                rank: 2,
                in_features: 6,
                out_features: 6,
                a: &a2,
                b: &b2,
            },
        ],
    };
    let hash = write_adapter(&dir, &adapter).unwrap();
    let loaded = Adapter::load(&dir).unwrap();
    assert_eq!(loaded.hash(), hash);
    let q = &loaded.modules()["model.layers.0.self_attn.q_proj"];
    assert_eq!((q.rank, q.scale), (4, 2.0));
    assert_eq!(loaded.tensor_f32(&q.a), a1);
    assert_eq!(loaded.tensor_f32(&q.b), b1);
    let fc1 = &loaded.modules()["model.layers.0.mlp.fc1"];
    // rank_pattern gives rank 2, alpha_pattern alpha 3: scale 3 / 2.
    assert_eq!((fc1.rank, fc1.scale), (2, 1.5));
    assert_eq!(loaded.tensor_f32(&fc1.b), b2);
    // Nothing but the finished folder is left behind.
    let names: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["expert".to_string()]);

    let err = write_adapter(&dir, &adapter).unwrap_err().to_string();
    assert!(
        err.contains("already exists") && err.contains("expert"),
        "{err}"
    );

    let meta = ExpertMetadata {
        tasks: vec!["rev".into()],
        kind: Some("private".into()),
        family: Some("strings".into()),
    };
    assert_eq!(ExpertMetadata::read(&dir).unwrap(), None);
    meta.write(&dir).unwrap();
    assert_eq!(ExpertMetadata::read(&dir).unwrap(), Some(meta));
    // The sidecar is not part of the adapter's identity.
    assert_eq!(Adapter::load(&dir).unwrap().hash(), hash);
}

#[test]
fn add_scaled_accumulates_what_tensor_f32_reads() {
    let fixtures = std::env::var_os("MOERGE_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures")
        });
    let adapter = Adapter::load(&fixtures.join("dev-phi/adapters/rot13")).unwrap();
    let m = adapter.modules().values().next().unwrap();
    let values = adapter.tensor_f32(&m.b);
    let mut out: Vec<f32> = (0..values.len()).map(|i| i as f32).collect();
    adapter.add_scaled_f32(&m.b, -0.5, &mut out);
    for (i, (o, v)) in out.iter().zip(&values).enumerate() {
        assert_eq!(*o, i as f32 + -0.5 * v);
    }
}
