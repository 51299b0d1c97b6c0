//! The real PEFT adapters and base models of the fixtures: loaded, checked against their own
//! configs and headers (read independently here), and matched against the bases.

mod support;

use std::path::Path;

use moerge_library::{
    inspect_adapter, Adapter, AdapterState, BaseModelInfo, ContentHash, Dtype, Incompatibility,
};
use support::*;

/// (base, modules per adapter, targeted layer names, linear layers in the base).
const MODELS: [(&str, usize, &[&str], usize); 2] = [
    (
        "dev-phi",
        18,
        &["dense", "fc1", "fc2", "k_proj", "q_proj", "v_proj"],
        19,
    ),
    (
        "dev-llama",
        14,
        &[
            "down_proj",
            "gate_proj",
            "k_proj",
            "o_proj",
            "q_proj",
            "up_proj",
            "v_proj",
        ],
        15,
    ),
];

#[test]
fn every_fixture_adapter_loads_as_its_config_and_header_say() {
    for (model, module_count, targets, _) in MODELS {
        let names = adapter_names(model);
        assert_eq!(names.len(), 5, "{model}: {names:?}");
        for name in names {
            let dir = adapter_dir(model, &name);
            let adapter = Adapter::load(&dir).unwrap_or_else(|e| panic!("{e}"));
            let config = read_json(&dir.join("adapter_config.json"));
            let alpha = config["lora_alpha"].as_f64().unwrap();
            assert_eq!(adapter.name(), name);
            assert_eq!(adapter.dir(), dir);
            assert_eq!(adapter.config().r, 8);
            assert_eq!(adapter.config().lora_alpha, alpha);
            assert_eq!(adapter.modules().len(), module_count, "{model}/{name}");

            let tensors = read_tensors(&dir.join("adapter_model.safetensors"));
            assert_eq!(tensors.len(), 2 * module_count);
            for (key, m) in adapter.modules() {
                assert_eq!(key, &m.module);
                assert!(
                    targets.iter().any(|t| key.ends_with(&format!(".{t}"))),
                    "{key}"
                );
                assert_eq!(
                    (m.rank, m.alpha, m.scale),
                    (8, alpha, alpha / 8.0),
                    "{model}/{name} {key}"
                );
                assert_eq!(m.a.name, format!("base_model.model.{key}.lora_A.weight"));
                assert_eq!(m.b.name, format!("base_model.model.{key}.lora_B.weight"));
                assert_eq!(m.a.shape, [8, m.in_features]);
                assert_eq!(m.b.shape, [m.out_features, 8]);
                assert_eq!((m.a.dtype, m.b.dtype), (Dtype::F32, Dtype::F32));
                for t in [&m.a, &m.b] {
                    let raw = tensors.iter().find(|r| r.name == t.name).unwrap();
                    assert_eq!(raw.shape, t.shape);
                    assert_eq!(adapter.tensor_bytes(t), raw.data.as_slice());
                }
            }
            let size = std::fs::metadata(dir.join("adapter_config.json"))
                .unwrap()
                .len()
                + std::fs::metadata(dir.join("adapter_model.safetensors"))
                    .unwrap()
                    .len();
            assert_eq!(adapter.size_bytes(), size);
        }
    }
}

#[test]
fn known_shapes_of_the_fixture_modules() {
    let phi = Adapter::load(&adapter_dir("dev-phi", "rot13")).unwrap();
    let fc1 = &phi.modules()["model.layers.0.mlp.fc1"];
    assert_eq!((fc1.in_features, fc1.out_features), (96, 192));
    let fc2 = &phi.modules()["model.layers.2.mlp.fc2"];
    assert_eq!((fc2.in_features, fc2.out_features), (192, 96));
    let llama = Adapter::load(&adapter_dir("dev-llama", "rot13")).unwrap();
    let k = &llama.modules()["model.layers.1.self_attn.k_proj"];
    assert_eq!(
        (k.in_features, k.out_features),
        (96, 48),
        "GQA: 3 KV heads of 16"
    );
    let down = &llama.modules()["model.layers.0.mlp.down_proj"];
    assert_eq!((down.in_features, down.out_features), (200, 96));
}

#[test]
fn tensor_f32_matches_an_independent_read() {
    let dir = adapter_dir("dev-llama", "swapcase");
    let adapter = Adapter::load(&dir).unwrap();
    let m = &adapter.modules()["model.layers.1.mlp.up_proj"];
    // Parse the file here with serde_json and plain byte conversion.
    let bytes = std::fs::read(dir.join("adapter_model.safetensors")).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let entry = &header[m.b.name.as_str()];
    assert_eq!(entry["shape"], serde_json::json!([200, 8]));
    let start = 8 + n + entry["data_offsets"][0].as_u64().unwrap() as usize;
    let end = 8 + n + entry["data_offsets"][1].as_u64().unwrap() as usize;
    let expected: Vec<f32> = bytes[start..end]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let got = adapter.tensor_f32(&m.b);
    assert_eq!(got.len(), 200 * 8);
    assert_eq!(got, expected);
    assert!(
        got.iter().any(|v| *v != 0.0),
        "B was trained away from zero"
    );
}

#[test]
fn bases_list_their_linear_layers_from_headers() {
    for (model, _, _, linear_count) in MODELS {
        let base = BaseModelInfo::from_dir(&base_dir(model)).unwrap();
        assert_eq!(base.name(), model);
        assert_eq!(base.model_type(), model.trim_start_matches("dev-"));
        assert_eq!(
            base.weight_files(),
            [base_dir(model).join("model.safetensors")]
        );
        assert_eq!(base.config_json()["hidden_size"], 96);
        assert_eq!(
            base.linear_modules().len(),
            linear_count,
            "{model}: {:?}",
            base.linear_modules().keys()
        );
        assert!(!base
            .linear_modules()
            .keys()
            .any(|k| k.contains("norm") || k.contains("embed")));
        let lm_head = base.linear_modules()["lm_head"];
        assert_eq!(
            (lm_head.out_features, lm_head.in_features, lm_head.dtype),
            (256, 96, Dtype::F32)
        );
    }
    let llama = BaseModelInfo::from_dir(&base_dir("dev-llama")).unwrap();
    // Tied: lm_head is listed although the file has no lm_head.weight.
    assert_eq!(llama.tensor_shape("lm_head.weight"), None);
    assert_eq!(
        llama.tensor_shape("model.embed_tokens.weight"),
        Some(&[256, 96][..])
    );
    let k = llama.linear_modules()["model.layers.0.self_attn.k_proj"];
    assert_eq!((k.out_features, k.in_features), (48, 96));
    let phi = BaseModelInfo::from_dir(&base_dir("dev-phi")).unwrap();
    assert_eq!(phi.tensor_shape("lm_head.bias"), Some(&[256][..]));
    assert!(phi
        .linear_modules()
        .contains_key("model.layers.2.self_attn.dense"));
}

#[test]
fn fixture_adapters_fit_their_own_base_only() {
    let phi = BaseModelInfo::from_dir(&base_dir("dev-phi")).unwrap();
    let llama = BaseModelInfo::from_dir(&base_dir("dev-llama")).unwrap();
    for (model, own, other) in [("dev-phi", &phi, &llama), ("dev-llama", &llama, &phi)] {
        for name in adapter_names(model) {
            let adapter = Adapter::load(&adapter_dir(model, &name)).unwrap();
            assert_eq!(adapter.check_compatible(own), Ok(()), "{model}/{name}");
            assert!(
                adapter.check_compatible(other).is_err(),
                "{model}/{name} on {}",
                other.name()
            );
        }
    }
    let adapter = Adapter::load(&adapter_dir("dev-phi", "minus")).unwrap();
    let err = adapter.check_compatible(&llama).unwrap_err();
    assert_eq!(
        err,
        Incompatibility::ShapeMismatch {
            adapter: "minus".into(),
            base: "dev-llama".into(),
            module: "model.layers.0.self_attn.k_proj".into(),
            adapter_in: 96,
            adapter_out: 96,
            base_in: 96,
            base_out: 48,
        }
    );
    let msg = err.to_string();
    for part in [
        "model.layers.0.self_attn.k_proj",
        "in=96,out=96",
        "dev-llama has in=96,out=48",
    ] {
        assert!(msg.contains(part), "{msg:?} lacks {part:?}");
    }
    // The other way round, the adapter's k_proj is the narrow one.
    let llama_adapter = Adapter::load(&adapter_dir("dev-llama", "minus")).unwrap();
    let msg = llama_adapter
        .check_compatible(&phi)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("in=96,out=48 but base dev-phi has in=96,out=96"),
        "{msg}"
    );
}

#[test]
fn inspect_reports_ready_and_incompatible() {
    let dir = adapter_dir("dev-phi", "length");
    let phi = BaseModelInfo::from_dir(&base_dir("dev-phi")).unwrap();
    let llama = BaseModelInfo::from_dir(&base_dir("dev-llama")).unwrap();
    let ready = inspect_adapter(&dir, Some(&phi));
    assert_eq!(ready.state, AdapterState::Ready);
    assert_eq!(
        (ready.rank, ready.alpha, ready.scale),
        (Some(8), Some(32.0), Some(4.0))
    );
    assert_eq!(ready.modules.len(), 18);
    assert_eq!(ready.hash, Some(Adapter::load(&dir).unwrap().hash()));
    assert_eq!(ready.base_model_name_or_path.as_deref(), Some("dev-phi"));
    let json = serde_json::to_value(&ready).unwrap();
    assert_eq!(json["state"], "ready");
    assert_eq!(json["target_modules"][0], "dense");
    assert_eq!(json["modules"][0]["a_dtype"], "F32");
    assert_eq!(json["hash"].as_str().unwrap().len(), 64);

    let AdapterState::Incompatible { reason } = inspect_adapter(&dir, Some(&llama)).state else {
        panic!("expected incompatible");
    };
    assert!(
        reason.contains("self_attn.k_proj") && reason.contains("out=48"),
        "{reason}"
    );
    assert_eq!(inspect_adapter(&dir, None).state, AdapterState::Ready);
}

/// The hash, recomputed here from its documented definition.
fn expected_hash(dir: &Path) -> ContentHash {
    let mut h = blake3::Hasher::new();
    h.update(b"moerge adapter content v1\0");
    for name in ["adapter_config.json", "adapter_model.safetensors"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        h.update(&(name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(&(bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
    }
    ContentHash(*h.finalize().as_bytes())
}

#[test]
fn hash_is_the_documented_content_hash_and_ignores_the_folder_name() {
    let mut hashes = Vec::new();
    for (model, ..) in MODELS {
        for name in adapter_names(model) {
            let dir = adapter_dir(model, &name);
            let hash = Adapter::load(&dir).unwrap().hash();
            assert_eq!(hash, expected_hash(&dir), "{model}/{name}");
            assert_eq!(hash.short(), hash.to_string()[..12]);
            hashes.push(hash);
        }
    }
    hashes.sort();
    hashes.dedup();
    assert_eq!(hashes.len(), 10, "every fixture adapter has its own hash");

    let tmp = tempfile::tempdir().unwrap();
    let src = adapter_dir("dev-phi", "twice");
    let renamed = tmp.path().join("another-name");
    copy_adapter(&src, &renamed);
    let original = Adapter::load(&src).unwrap().hash();
    let copy = Adapter::load(&renamed).unwrap();
    assert_eq!((copy.name(), copy.hash()), ("another-name", original));
    // One byte of the config changes the identity.
    let config = renamed.join("adapter_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replacen("\"bias\": \"none\"", "\"bias\":  \"none\"", 1),
    )
    .unwrap();
    assert_ne!(Adapter::load(&renamed).unwrap().hash(), original);
}
