//! Library clustering on the real tiny library: the Gram matrix of the flattened factors
//! against a plain computation straight from the safetensors files, the sketch-based
//! similarity against the exact one, and the stored clustering.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moerge_daemon::clustering::{self, ClusterOptions, GramSource};
use moerge_daemon::service::{Service, ServiceConfig};
use moerge_library::Adapter;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-library")
}

fn expert_names() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(tiny().join("experts"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// Every tensor of an adapter file as f32, by key (the tiny experts are f32).
fn tensors(name: &str) -> Vec<(String, Vec<f32>)> {
    let bytes = std::fs::read(
        tiny()
            .join("experts")
            .join(name)
            .join("adapter_model.safetensors"),
    )
    .unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<(String, Vec<f32>)> = file
        .tensors()
        .into_iter()
        .map(|(key, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let values = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            (key, values)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Dense `ΔW = s B A` of every module of an expert, from the files (plain loops).
fn dense_updates(name: &str) -> Vec<(String, Vec<f64>)> {
    let config: serde_json::Value = serde_json::from_slice(
        &std::fs::read(
            tiny()
                .join("experts")
                .join(name)
                .join("adapter_config.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let rank = config["r"].as_u64().unwrap() as usize;
    let scale = config["lora_alpha"].as_f64().unwrap() / rank as f64;
    assert_eq!(config["use_rslora"].as_bool(), Some(false));
    let all = tensors(name);
    let mut out = Vec::new();
    for (key, a) in &all {
        let Some(module) = key.strip_suffix(".lora_A.weight") else {
            continue;
        };
        let b = &all
            .iter()
            .find(|(k, _)| *k == format!("{module}.lora_B.weight"))
            .unwrap()
            .1;
        let (din, dout) = (a.len() / rank, b.len() / rank);
        let mut delta = vec![0.0f64; dout * din];
        for o in 0..dout {
            for c in 0..din {
                for p in 0..rank {
                    delta[o * din + c] +=
                        scale * f64::from(b[o * rank + p]) * f64::from(a[p * din + c]);
                }
            }
        }
        out.push((module.to_string(), delta));
    }
    out
}

#[test]
fn the_update_gram_equals_dense_updates_multiplied_out() {
    let names = ["reverse", "upper", "cluster-strings", "add", "shared"];
    let adapters: Vec<Adapter> = names
        .iter()
        .map(|n| Adapter::load(&tiny().join("experts").join(n)).unwrap())
        .collect();
    let gram = moerge_library::update_gram(&adapters.iter().collect::<Vec<_>>());
    let dense: Vec<_> = names.iter().map(|n| dense_updates(n)).collect();
    let n = names.len();
    for i in 0..n {
        for j in 0..n {
            let mut want = 0.0f64;
            for (module, x) in &dense[i] {
                let y = &dense[j].iter().find(|(m, _)| m == module).unwrap().1;
                want += x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
            }
            let got = gram[i * n + j];
            assert!(
                (got - want).abs() <= 1e-9 * want.abs().max(1e-12),
                "{} · {}: {got} vs {want}",
                names[i],
                names[j]
            );
        }
    }
}

fn wait_ready(service: &Service, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120); // a hang guard only
    while service
        .lease()
        .experts()
        .values()
        .filter(|r| r.is_ready())
        .count()
        < count
    {
        assert!(Instant::now() < deadline, "the library was not indexed");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_library_is_clustered_from_factors_or_sketches_and_stored() {
    let tmp = tempfile::tempdir().unwrap();
    let config = ServiceConfig::new(
        tiny().join("experts"),
        tiny().join("base"),
        tmp.path().join("state"),
    );
    let service = Service::start(config).unwrap();
    let names = expert_names();
    wait_ready(&service, names.len());
    let lease = service.lease();

    let exact =
        clustering::cluster_library(service.index(), &lease, &ClusterOptions::default()).unwrap();
    assert_eq!(exact.source, GramSource::Factors);
    assert_eq!(exact.experts, names);
    let sketched = clustering::cluster_library(
        service.index(),
        &lease,
        &ClusterOptions {
            exact_budget: 0.0,
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    assert_eq!(sketched.source, GramSource::Sketches);

    // Sketches keep inner products in expectation: the plain cosines of the two Gram
    // matrices agree closely (the projected similarities may differ more: directions with
    // little variance are where sketch noise lands).
    let n = names.len();
    let adapters: Vec<Adapter> = names
        .iter()
        .map(|n| Adapter::load(&tiny().join("experts").join(n)).unwrap())
        .collect();
    let exact_gram = moerge_library::update_gram(&adapters.iter().collect::<Vec<_>>());
    let sketches: Vec<Vec<f32>> = lease
        .experts()
        .values()
        .map(|r| {
            let bytes = service
                .index()
                .derived(
                    &r.hash.unwrap(),
                    moerge_daemon::service::sketch::SKETCH_KIND,
                )
                .unwrap()
                .unwrap();
            moerge_daemon::service::sketch::decode_sketch(&bytes).unwrap()
        })
        .collect();
    let sketch_gram = clustering::sketch_gram(&sketches);
    let cosine =
        |g: &[f64], i: usize, j: usize| g[i * n + j] / (g[i * n + i] * g[j * n + j]).sqrt();
    let mut worst = 0.0f64;
    for i in 0..n {
        for j in 0..n {
            worst = worst.max((cosine(&exact_gram, i, j) - cosine(&sketch_gram, i, j)).abs());
        }
    }
    assert!(worst < 0.2, "sketch vs exact cosine differ by {worst}");
    // The similarity is a cosine matrix: unit diagonal, symmetric.
    for i in 0..n {
        assert!((exact.similarity[i * n + i] - 1.0).abs() < 1e-9);
        for j in 0..n {
            assert!((exact.similarity[i * n + j] - exact.similarity[j * n + i]).abs() < 1e-9);
        }
    }
    // The stored record (the last run's) names every ready expert exactly once, by hash.
    let stored = service
        .index()
        .clusters()
        .unwrap()
        .into_iter()
        .find(|c| c.name == clustering::CLUSTERING)
        .unwrap();
    let mut hashes: Vec<_> = stored.clusters.iter().flatten().copied().collect();
    hashes.sort();
    let mut want: Vec<_> = lease.experts().values().filter_map(|r| r.hash).collect();
    want.sort();
    assert_eq!(hashes, want);
    assert_eq!(stored.clusters.len(), sketched.clusters().len());
    eprintln!("{:#?}", exact.clusters());

    // A fixed k is honoured.
    let four = clustering::cluster_library(
        service.index(),
        &lease,
        &ClusterOptions {
            k: Some(4),
            ..ClusterOptions::default()
        },
    )
    .unwrap();
    assert_eq!(four.clusters().len(), 4);
}

#[test]
fn update_clusters_recover_the_task_families() {
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("manifest.json")).unwrap()).unwrap();
    let families: Vec<Vec<String>> = manifest["families"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            f["tasks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap().to_string())
                .collect()
        })
        .collect();
    let names: Vec<String> = families.iter().flatten().cloned().collect();
    let adapters: Vec<Adapter> = names
        .iter()
        .map(|n| Adapter::load(&tiny().join("experts").join(n)).unwrap())
        .collect();
    let n = names.len();
    let gram = moerge_library::update_gram(&adapters.iter().collect::<Vec<_>>());
    let similarity = moerge_sdk::cluster::similarity_from_gram(&gram, n, 16);
    // Updates of one family point more the same way than updates of different families.
    let cosine = |i: usize, j: usize| gram[i * n + j] / (gram[i * n + i] * gram[j * n + j]).sqrt();
    let family_of = |i: usize| i / families[0].len();
    let (mut within, mut across) = ((0.0, 0), (0.0, 0));
    for i in 0..n {
        for j in 0..n {
            if i == j {
                continue;
            }
            let slot = if family_of(i) == family_of(j) {
                &mut within
            } else {
                &mut across
            };
            slot.0 += cosine(i, j);
            slot.1 += 1;
        }
    }
    let (within, across) = (within.0 / within.1 as f64, across.0 / across.1 as f64);
    eprintln!("mean cosine within families {within:.3}, across {across:.3}");
    assert!(
        within > 4.0 * across.abs(),
        "within {within}, across {across}"
    );
    // And k-means on the similarity puts most experts with their family.
    let labels = moerge_sdk::cluster::cluster(&similarity, n, Some(families.len()), 0);
    // An expert is placed right when it shares its cluster with most of its family.
    let mut right = 0;
    for (f, family) in families.iter().enumerate() {
        for (i, name) in family.iter().enumerate() {
            let me = labels[f * family.len() + i];
            let same = (0..family.len())
                .filter(|&k| k != i && labels[f * family.len() + k] == me)
                .count();
            if same * 2 >= family.len() - 1 {
                right += 1;
            } else {
                eprintln!("{name} is away from its family");
            }
        }
    }
    assert!(
        right >= 15,
        "only {right} of {n} experts sit with their family"
    );
}
