//! Learned routers, hierarchical groups, sequence routing and fixed modules, against
//! independent computations: plain-loop router scores on the first layer's input (embedding
//! and layer norm recomputed here from the checkpoint), static merges that a constant routing
//! must equal, a single adapter that a fixed module carrying its factors must equal, and
//! token-by-token decoding that sequence routing must agree with.

mod common;

use candle_core::{Device, Tensor};
use common::*;
use moerge_engine::{inference, routing, BaseModel, ForwardState, LanguageModel, Precision};
use moerge_library::{Adapter, F32Tensor, TensorMap};
use moerge_sdk::plan::{
    fixed_a_name, fixed_b_name, router_bias_name, router_weight_name, Granularity, Group,
    MergeSpace, Mix, ModulePlan, Plan, Router,
};

const ORDER: [&str; 3] = ["swapcase", "rot13", "twice"];
const FAKE_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const TOL: f32 = 1e-4;

fn setup() -> (BaseModel, Vec<Adapter>) {
    let base = BaseModel::load_dir(&fixtures().join("dev-phi"), Precision::F32).unwrap();
    let experts = ORDER
        .iter()
        .map(|n| Adapter::load(&fixtures().join("dev-phi/adapters").join(n)).unwrap())
        .collect();
    (base, experts)
}

fn plan(experts: &[Adapter], default: ModulePlan, tensors: bool) -> Plan {
    Plan {
        tensors: tensors.then(|| FAKE_HASH.to_string()),
        ..plan_of(experts, default)
    }
}

fn routed(
    router: Router,
    top_k: usize,
    granularity: Granularity,
    groups: Vec<Group>,
) -> ModulePlan {
    ModulePlan::Routed {
        router,
        top_k,
        temperature: 1.0,
        granularity,
        groups,
        mix: Default::default(),
    }
}

/// A learned router for every module the experts adapt: `weight(module)` and `bias`.
fn router_tensors(
    experts: &[Adapter],
    units: usize,
    weight: impl Fn(&str, usize) -> Vec<f32>,
    bias: &[f32],
) -> TensorMap {
    let mut out = TensorMap::new();
    for (module, m) in experts[0].modules() {
        out.insert(
            router_weight_name(module),
            F32Tensor {
                shape: vec![units, m.in_features],
                data: weight(module, m.in_features),
            },
        );
        out.insert(
            router_bias_name(module),
            F32Tensor {
                shape: vec![units],
                data: bias.to_vec(),
            },
        );
    }
    out
}

const IDS: [u32; 7] = [5, 77, 3, 140, 9, 200, 31];

fn logits(model: &impl LanguageModel) -> Tensor {
    inference::logits(model, &IDS).unwrap()
}

#[test]
fn a_constant_routing_equals_the_static_merge_of_its_weights() {
    let (base, experts) = setup();
    // Zero weights and a bias: every token gets softmax(bias) over the top 2 (third dropped).
    let bias = [1.0f32, 0.25, -3.0];
    let tensors = router_tensors(&experts, 3, |_, inp| vec![0.0; 3 * inp], &bias);
    let p = plan(
        &experts,
        routed(Router::Learned, 2, Granularity::Token, vec![]),
        true,
    );
    let got = base.fuse_with(&p, &experts, &tensors).unwrap();
    let (e0, e1) = ((bias[0] as f64).exp(), (bias[1] as f64).exp());
    let merge = ModulePlan::Static {
        weights: vec![e0 / (e0 + e1), e1 / (e0 + e1), 0.0],
        space: MergeSpace::Exact,
        svd_rank: None,
    };
    let want = base.fuse(&plan(&experts, merge, false), &experts).unwrap();
    let diff = max_abs_diff(&logits(&got), &logits(&want));
    assert!(diff <= TOL, "max |diff| {diff}");

    // Groups are units: group 1 = 0.3·swapcase + 0.7·twice wins every token at top-1.
    let groups = vec![
        Group {
            name: Some("first".into()),
            weights: vec![1.0, 0.0, 0.0],
        },
        Group {
            name: Some("mix".into()),
            weights: vec![0.3, 0.0, 0.7],
        },
    ];
    let tensors = router_tensors(&experts, 2, |_, inp| vec![0.0; 2 * inp], &[0.0, 5.0]);
    let p = plan(
        &experts,
        routed(Router::Learned, 1, Granularity::Token, groups.clone()),
        true,
    );
    let got = base.fuse_with(&p, &experts, &tensors).unwrap();
    let merge = ModulePlan::Static {
        weights: vec![0.3, 0.0, 0.7],
        space: MergeSpace::Exact,
        svd_rank: None,
    };
    let want = base.fuse(&plan(&experts, merge, false), &experts).unwrap();
    let diff = max_abs_diff(&logits(&got), &logits(&want));
    assert!(diff <= TOL, "groups: max |diff| {diff}");
    // The trace names the groups.
    let (_, records) = routing::trace(&got, &IDS).unwrap();
    assert_eq!(
        records[0].units,
        vec!["first".to_string(), "mix".to_string()]
    );

    // An Arrow router over a single group is that group's static merge.
    let p = plan(
        &experts,
        routed(Router::Arrow, 1, Granularity::Token, groups[1..].to_vec()),
        false,
    );
    let got = base.fuse(&p, &experts).unwrap();
    let diff = max_abs_diff(&logits(&got), &logits(&want));
    assert!(diff <= TOL, "arrow group: max |diff| {diff}");
}

/// Factor mixing with a constant routing `c` is the low-rank merge with weights `c` (the
/// factors averaged), while output mixing is the exact merge; top-1 is the expert alone in both.
#[test]
fn factor_mixing_is_the_low_rank_merge_of_its_weights() {
    let (base, experts) = setup();
    let bias = [0.5f32, 1.5, -0.25];
    let tensors = router_tensors(&experts, 3, |_, inp| vec![0.0; 3 * inp], &bias);
    let z: f64 = bias.iter().map(|&b| f64::from(b).exp()).sum();
    let c: Vec<f64> = bias.iter().map(|&b| f64::from(b).exp() / z).collect();
    let served = |top_k, mix| {
        let mut p = plan(
            &experts,
            routed(Router::Learned, top_k, Granularity::Token, vec![]),
            true,
        );
        if let ModulePlan::Routed { mix: m, .. } = &mut p.default {
            *m = mix;
        }
        logits(&base.fuse_with(&p, &experts, &tensors).unwrap())
    };
    let merged = |weights: Vec<f64>, space| {
        let merge = ModulePlan::Static {
            weights,
            space,
            svd_rank: None,
        };
        logits(&base.fuse(&plan(&experts, merge, false), &experts).unwrap())
    };
    let lowrank = merged(c.clone(), MergeSpace::LowRank);
    let exact = merged(c, MergeSpace::Exact);
    let factors = served(3, Mix::Factors);
    let diff = max_abs_diff(&factors, &lowrank);
    assert!(diff <= TOL, "factors vs lowrank merge: max |diff| {diff}");
    let diff = max_abs_diff(&served(3, Mix::Outputs), &exact);
    assert!(diff <= TOL, "outputs vs exact merge: max |diff| {diff}");
    // The two modes differ once several experts mix (else this test could not fail).
    assert!(max_abs_diff(&factors, &exact) > 100.0 * TOL);
    let alone = merged(vec![0.0, 1.0, 0.0], MergeSpace::Exact);
    for mix in [Mix::Factors, Mix::Outputs] {
        let diff = max_abs_diff(&served(1, mix), &alone);
        assert!(diff <= TOL, "{mix:?} top-1: max |diff| {diff}");
    }
}

/// The first layer's attention input for `ids`, from the checkpoint in plain loops:
/// LayerNorm(embedding).
fn first_layer_input(ids: &[u32]) -> Vec<Vec<f64>> {
    let weights =
        candle_core::safetensors::load(fixtures().join("dev-phi/model.safetensors"), &Device::Cpu)
            .unwrap();
    let get = |n: &str| -> Vec<f64> {
        weights[n]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .into_iter()
            .map(f64::from)
            .collect()
    };
    let (emb, g, b) = (
        get("model.embed_tokens.weight"),
        get("model.layers.0.input_layernorm.weight"),
        get("model.layers.0.input_layernorm.bias"),
    );
    let d = g.len();
    ids.iter()
        .map(|&t| {
            let x = &emb[t as usize * d..(t as usize + 1) * d];
            let mean = x.iter().sum::<f64>() / d as f64;
            let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / d as f64;
            (0..d)
                .map(|i| (x[i] - mean) / (var + 1e-5).sqrt() * g[i] + b[i])
                .collect()
        })
        .collect()
}

/// Top-k softmax of `scores` in plain loops.
fn top_k_softmax(scores: &[f64], k: usize) -> Vec<f64> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&i, &j| scores[j].total_cmp(&scores[i]));
    let max = scores[order[0]];
    let z: f64 = order[..k].iter().map(|&i| (scores[i] - max).exp()).sum();
    let mut out = vec![0.0; scores.len()];
    for &i in &order[..k] {
        out[i] = (scores[i] - max).exp() / z;
    }
    out
}

fn pseudo_random(module: &str, n: usize) -> Vec<f32> {
    let seed = module
        .bytes()
        .fold(7u64, |h, b| h.wrapping_mul(31).wrapping_add(b as u64));
    (0..n)
        .map(|i| {
            let v = (seed.wrapping_add(i as u64).wrapping_mul(2654435761) % 1000) as f32;
            (v / 1000.0 - 0.5) * 0.8
        })
        .collect()
}

#[test]
fn learned_router_weights_equal_plain_loop_scores_per_token_and_per_sequence() {
    let (base, experts) = setup();
    let bias = [0.1f32, -0.2, 0.05];
    let tensors = router_tensors(&experts, 3, |m, inp| pseudo_random(m, 3 * inp), &bias);
    let module = "model.layers.0.self_attn.q_proj";
    let w = pseudo_random(module, 3 * 96);
    let token_ids = IDS;
    let x = first_layer_input(&token_ids);
    for granularity in [Granularity::Token, Granularity::Sequence] {
        let p = plan(
            &experts,
            routed(Router::Learned, 2, granularity, vec![]),
            true,
        );
        let model = base.fuse_with(&p, &experts, &tensors).unwrap();
        let (_, records) = routing::trace(&model, &IDS).unwrap();
        let record = records.iter().find(|r| r.module == module).unwrap();
        let got = record.weights.to_vec2::<f32>().unwrap();
        for (t, row) in got.iter().enumerate() {
            // Sequence routing scores the mean of the inputs up to and including t.
            let input: Vec<f64> = match granularity {
                Granularity::Token => x[t].clone(),
                Granularity::Sequence => (0..96)
                    .map(|i| x[..=t].iter().map(|v| v[i]).sum::<f64>() / (t + 1) as f64)
                    .collect(),
            };
            let scores: Vec<f64> = (0..3)
                .map(|u| {
                    (0..96)
                        .map(|i| input[i] * f64::from(w[u * 96 + i]))
                        .sum::<f64>()
                        + f64::from(bias[u])
                })
                .collect();
            let want = top_k_softmax(&scores, 2);
            for (g, w) in row.iter().zip(&want) {
                assert!(
                    (f64::from(*g) - w).abs() < 1e-4,
                    "{granularity:?} token {t}: {row:?} vs {want:?}"
                );
            }
        }
    }
}

#[test]
fn sequence_routing_decodes_token_by_token_as_it_scores_the_whole_text() {
    let (base, experts) = setup();
    for router in [Router::Arrow, Router::Learned] {
        let tensors = router_tensors(&experts, 3, |m, inp| pseudo_random(m, 3 * inp), &[0.0; 3]);
        let learned = router == Router::Learned;
        let p = plan(
            &experts,
            routed(router, 2, Granularity::Sequence, vec![]),
            learned,
        );
        let model = base.fuse_with(&p, &experts, &tensors).unwrap();
        let whole = logits(&model);
        let token_ids = IDS;
        let mut cache = ForwardState::new();
        // Prompt of 3 in one step, then one token at a time.
        let mut rows = Vec::new();
        let first = Tensor::new(&token_ids[..3], &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        rows.push(
            model
                .forward(&first, &mut cache)
                .unwrap()
                .squeeze(0)
                .unwrap(),
        );
        for &t in &token_ids[3..] {
            let step = Tensor::new(&[[t]], &Device::Cpu).unwrap();
            rows.push(
                model
                    .forward(&step, &mut cache)
                    .unwrap()
                    .squeeze(0)
                    .unwrap(),
            );
        }
        let stepped = Tensor::cat(&rows, 0).unwrap();
        let diff = max_abs_diff(&whole, &stepped);
        assert!(diff <= TOL, "{router:?}: max |diff| {diff}");
        // And sequence routing is not token routing: the decisions differ somewhere.
        let p = plan(
            &experts,
            routed(router, 2, Granularity::Token, vec![]),
            learned,
        );
        let token = base.fuse_with(&p, &experts, &tensors).unwrap();
        assert!(max_abs_diff(&whole, &logits(&token)) > 1e-3);
    }
}

#[test]
fn a_fixed_module_carrying_an_adapters_factors_is_that_adapter() {
    let (base, experts) = setup();
    let rot13 = &experts[1];
    let mut tensors = TensorMap::new();
    for (module, m) in rot13.modules() {
        let a = rot13.tensor_f32(&m.a);
        let b: Vec<f32> = rot13
            .tensor_f32(&m.b)
            .into_iter()
            .map(|v| v * m.scale as f32)
            .collect();
        tensors.insert(
            fixed_a_name(module),
            F32Tensor {
                shape: m.a.shape.clone(),
                data: a,
            },
        );
        tensors.insert(
            fixed_b_name(module),
            F32Tensor {
                shape: m.b.shape.clone(),
                data: b,
            },
        );
    }
    let p = plan(&experts, ModulePlan::Fixed, true);
    let got = base.fuse_with(&p, &experts, &tensors).unwrap();
    let want = base.with_adapter(rot13).unwrap();
    let diff = max_abs_diff(&logits(&got), &logits(&want));
    assert!(diff <= TOL, "max |diff| {diff}");
}

#[test]
fn missing_or_misshapen_plan_tensors_are_named() {
    let (base, experts) = setup();
    let p = plan(
        &experts,
        routed(Router::Learned, 2, Granularity::Token, vec![]),
        true,
    );
    let err = |tensors: &TensorMap| match base.fuse_with(&p, &experts, tensors) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    let msg = err(&TensorMap::new());
    assert!(
        msg.contains(".router.weight") && msg.contains("learned"),
        "{msg}"
    );
    let wrong = router_tensors(&experts, 2, |_, inp| vec![0.0; 2 * inp], &[0.0, 0.0]);
    let msg = err(&wrong);
    assert!(msg.contains("[2, 96]") && msg.contains("[3, 96]"), "{msg}");
    let fixed = plan(&experts, ModulePlan::Fixed, true);
    let mut only_a = TensorMap::new();
    only_a.insert(
        fixed_a_name("model.layers.0.mlp.fc1"),
        F32Tensor {
            shape: vec![1, 96],
            data: vec![0.0; 96],
        },
    );
    let msg = match base.fuse_with(&fixed, &experts, &only_a) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string(),
    };
    assert!(
        msg.contains("model.layers.0.mlp.fc1.lora_B.weight"),
        "{msg}"
    );
}
