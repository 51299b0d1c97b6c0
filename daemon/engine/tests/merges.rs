//! Static merges against independent computations: PEFT's own merged adapters and their
//! logits (linear = our low-rank merge with w = sqrt(p), cat = our exact merge), plain-loop
//! deltas, and the export round trip.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use moerge_engine::{inference, merge, BaseModel, ForwardState, Precision};
use moerge_library::Adapter;
use moerge_sdk::plan::{MergeSpace, ModulePlan, Plan};

/// PEFT's order in the fixture merges.
const ORDER: [&str; 5] = ["swapcase", "rot13", "twice", "length", "minus"];
const TOL: f32 = 1e-4;

fn experts(base: &str) -> Vec<Adapter> {
    ORDER
        .iter()
        .map(|n| Adapter::load(&fixtures().join(base).join("adapters").join(n)).unwrap())
        .collect()
}

fn plan(experts: &[Adapter], weights: Vec<f64>, space: MergeSpace) -> Plan {
    plan_of(
        experts,
        ModulePlan::Static {
            weights,
            space,
            svd_rank: None,
        },
    )
}

fn check_against_peft(base_name: &str, file: &str, weights: Vec<f64>, space: MergeSpace) {
    let base = BaseModel::load_dir(&fixtures().join(base_name), Precision::F32).unwrap();
    let experts = experts(base_name);
    let model = base
        .with_plan(
            &plan(&experts, weights, space),
            &experts,
            &Default::default(),
        )
        .unwrap();
    for (ids, want) in reference_sequences(base_name, file, "logits") {
        let diff = max_abs_diff(&inference::logits(&model, &ids).unwrap(), &want);
        assert!(
            diff <= TOL,
            "{base_name} {file} {space:?}: max |diff| {diff}"
        );
    }
}

#[test]
fn exact_and_folded_merges_equal_peft_cat() {
    for base in ["dev-phi", "dev-llama"] {
        check_against_peft(
            base,
            "merge_cat_logits.safetensors",
            vec![0.2; 5],
            MergeSpace::Exact,
        );
        check_against_peft(
            base,
            "merge_cat_logits.safetensors",
            vec![0.2; 5],
            MergeSpace::Folded,
        );
    }
}

#[test]
fn lowrank_merges_equal_peft_linear_with_square_root_weights() {
    // PEFT's linear merge with weight p is our low-rank merge with w = sqrt(p).
    for base in ["dev-phi", "dev-llama"] {
        check_against_peft(
            base,
            "merge_linear_logits.safetensors",
            vec![0.2f64.sqrt(); 5],
            MergeSpace::LowRank,
        );
        check_against_peft(
            base,
            "merge_linear_w1_logits.safetensors",
            vec![1.0; 5],
            MergeSpace::LowRank,
        );
        // p = 1/N^2: the plain average of the sqrt(s)-scaled factors, the paper's uniform merge.
        check_against_peft(
            base,
            "merge_linear_winvn2_logits.safetensors",
            vec![0.2; 5],
            MergeSpace::LowRank,
        );
    }
}

/// One expert's share of a module: weight, scale, rank, A and B (row-major), out features.
struct Part {
    w: f64,
    s: f64,
    r: usize,
    a: Vec<f32>,
    b: Vec<f32>,
    out: usize,
}

/// `Σ_i w_i s_i B_i A_i x` (exact) or `(Σ w_i √s_i B_i)(Σ w_i √s_i A_i) x` (low rank), in f64 loops.
fn delta_by_hand(
    experts: &[Adapter],
    module: &str,
    weights: &[f64],
    space: MergeSpace,
    x: &[f32],
) -> Vec<f64> {
    let mats: Vec<Part> = experts
        .iter()
        .zip(weights)
        .map(|(e, &w)| {
            let m = &e.modules()[module];
            Part {
                w,
                s: m.scale,
                r: m.rank,
                a: e.tensor_f32(&m.a),
                b: e.tensor_f32(&m.b),
                out: m.out_features,
            }
        })
        .collect();
    let inp = x.len();
    let out = mats[0].out;
    let r = mats[0].r;
    let mut y = vec![0f64; out];
    match space {
        MergeSpace::LowRank => {
            let mut a = vec![0f64; r * inp];
            let mut b = vec![0f64; out * r];
            for p in &mats {
                for (acc, v) in a.iter_mut().zip(&p.a) {
                    *acc += p.w * p.s.sqrt() * *v as f64;
                }
                for (acc, v) in b.iter_mut().zip(&p.b) {
                    *acc += p.w * p.s.sqrt() * *v as f64;
                }
            }
            let ax: Vec<f64> = (0..r)
                .map(|k| (0..inp).map(|j| a[k * inp + j] * x[j] as f64).sum())
                .collect();
            for (o, yo) in y.iter_mut().enumerate() {
                *yo = (0..r).map(|k| b[o * r + k] * ax[k]).sum();
            }
        }
        _ => {
            for p in &mats {
                let ax: Vec<f64> = (0..p.r)
                    .map(|k| {
                        (0..inp)
                            .map(|j| p.a[k * inp + j] as f64 * x[j] as f64)
                            .sum()
                    })
                    .collect();
                for (o, yo) in y.iter_mut().enumerate() {
                    *yo += p.w
                        * p.s
                        * (0..p.r)
                            .map(|k| p.b[o * p.r + k] as f64 * ax[k])
                            .sum::<f64>();
                }
            }
        }
    }
    y
}

#[test]
fn merged_deltas_match_plain_loops_including_negative_weights() {
    let base = BaseModel::load_dir(&fixtures().join("dev-phi"), Precision::F32).unwrap();
    let experts = experts("dev-phi");
    let weights = vec![0.7, -0.4, 0.3, 1.1, -0.2];
    let module = "model.layers.1.mlp.fc1";
    let mut w = Weights::new(3);
    let x = w.values(96, 0.0, 1.0);
    let xt = Tensor::from_vec(x.clone(), (1, 96), &Device::Cpu).unwrap();
    for space in [MergeSpace::LowRank, MergeSpace::Exact, MergeSpace::Folded] {
        let model = base
            .with_plan(
                &plan(&experts, weights.clone(), space),
                &experts,
                &Default::default(),
            )
            .unwrap();
        let merged = model.linear(module).unwrap();
        let state = &mut ForwardState::new();
        let got = (merged.forward(&xt, state).unwrap()
            - base.linear(module).unwrap().forward(&xt, state).unwrap())
        .unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = delta_by_hand(&experts, module, &weights, space, &x);
        let worst = got
            .iter()
            .zip(&want)
            .map(|(g, w)| (*g as f64 - w).abs())
            .fold(0.0, f64::max);
        assert!(worst < 1e-4, "{space:?}: max |diff| {worst}");
        assert_eq!(
            merged.has_lora(),
            space != MergeSpace::Folded,
            "{space:?}: folded merges carry no LoRA path"
        );
    }
}

#[test]
fn exported_merges_load_back_as_plain_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let base = BaseModel::load_dir(&fixtures().join("dev-llama"), Precision::F32).unwrap();
    let experts = experts("dev-llama");
    let ids = [72u32, 101, 76, 76, 111, 62];
    for (i, space) in [MergeSpace::LowRank, MergeSpace::Exact, MergeSpace::Folded]
        .into_iter()
        .enumerate()
    {
        let p = plan(&experts, vec![0.5, 0.3, 0.1, -0.2, 0.4], space);
        let dir = tmp.path().join(format!("export-{i}"));
        merge::export_peft(&p, &experts, &Default::default(), &dir).unwrap();
        let exported = Adapter::load(&dir).unwrap();
        let rank = exported.modules().values().next().unwrap().rank;
        assert_eq!(
            rank,
            if space == MergeSpace::LowRank { 8 } else { 40 },
            "{space:?}"
        );
        let want = inference::logits(
            &base.with_plan(&p, &experts, &Default::default()).unwrap(),
            &ids,
        )
        .unwrap();
        let got = inference::logits(&base.with_adapter(&exported).unwrap(), &ids).unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff <= TOL, "{space:?}: exported adapter differs by {diff}");
    }
}

#[test]
fn bad_plans_are_refused_by_name() {
    let base = BaseModel::load_dir(&fixtures().join("dev-phi"), Precision::F32).unwrap();
    let experts = experts("dev-phi");
    let err = |p: &Plan, e: &[Adapter]| match base.with_plan(p, e, &Default::default()) {
        Ok(_) => panic!("accepted {p:?}"),
        Err(e) => e.to_string(),
    };
    let mut p = plan(&experts, vec![0.2; 5], MergeSpace::Exact);
    p.experts[2].hash = "0".repeat(64);
    let msg = err(&p, &experts);
    assert!(
        msg.contains("experts[2].hash") && msg.contains("twice"),
        "{msg}"
    );
    let p = plan(&experts[..4], vec![0.25; 4], MergeSpace::Exact);
    assert!(err(&p, &experts).contains("4 experts but 5"));

    // Unequal ranks: a rank-4 adapter next to the rank-8 fixtures.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("small");
    let specs = vec![LoraSpec {
        module: "model.layers.0.mlp.fc1".into(),
        rank: 4,
        in_features: 96,
        out_features: 192,
    }];
    write_adapter(&dir, lora_config(4, 8.0, &["fc1"]), &specs, 9);
    let mixed = vec![
        Adapter::load(&fixtures().join("dev-phi/adapters/swapcase")).unwrap(),
        Adapter::load(&dir).unwrap(),
    ];
    let p = plan(&mixed, vec![0.5, 0.5], MergeSpace::LowRank);
    let msg = err(&p, &mixed);
    assert!(
        msg.contains("model.layers.0.mlp.fc1")
            && msg.contains("equal ranks")
            && msg.contains("exact"),
        "{msg}"
    );
    // The same pair merges fine exactly.
    base.with_plan(
        &plan(&mixed, vec![0.5, 0.5], MergeSpace::Exact),
        &mixed,
        &Default::default(),
    )
    .unwrap();
}

#[test]
fn svd_truncated_merges_equal_peft_svd() {
    // PEFT's svd merge (weights 1/N, svd_rank 8): the best rank-8 approximation of the exact
    // merge, which our exact merge truncated to rank 8 reproduces.
    for base_name in ["dev-phi", "dev-llama"] {
        let base = BaseModel::load_dir(&fixtures().join(base_name), Precision::F32).unwrap();
        let experts = experts(base_name);
        let mut p = plan(&experts, vec![0.2; 5], MergeSpace::Exact);
        p.default = ModulePlan::Static {
            weights: vec![0.2; 5],
            space: MergeSpace::Exact,
            svd_rank: Some(8),
        };
        let model = base.with_plan(&p, &experts, &Default::default()).unwrap();
        for (ids, want) in reference_sequences(base_name, "merge_svd8_logits.safetensors", "logits")
        {
            let diff = max_abs_diff(&inference::logits(&model, &ids).unwrap(), &want);
            assert!(diff <= TOL, "{base_name}: max |diff| {diff}");
        }
        // Exported, it is a rank-8 adapter.
        let tmp = tempfile::tempdir().unwrap();
        merge::export_peft(&p, &experts, &Default::default(), &tmp.path().join("svd")).unwrap();
        let exported = Adapter::load(&tmp.path().join("svd")).unwrap();
        assert!(exported.modules().values().all(|m| m.rank == 8));
    }
}
