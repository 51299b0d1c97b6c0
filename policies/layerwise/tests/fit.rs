//! `layerwise` through the SDK's testing harness (the host's ABI path), on crafted experts
//! whose layer conflicts are known in closed form.

use std::collections::BTreeMap;

use moerge_policy_layerwise::moerge_policy_declaration;
use moerge_sdk::optimize::RouterInit;
use moerge_sdk::plan::{router_weight_name, Granularity, MergeSpace, ModulePlan, Plan, Router};
use moerge_sdk::policy::{Fitted, Record, Split};
use moerge_sdk::testing::{
    fake_hash, random_expert, FitRequest, Harness, Rng, ServiceCall, TestExpert, TestModule,
    TestServices,
};

const IN: usize = 6;
const SHAPES: [(&str, usize); 2] = [("self_attn.q", 4), ("mlp.fc1", 5)];

/// Three experts over four layers; expert `e`'s delta on every module of layer `l` is
/// `sign · b eₖᵀ` (rank 1, `b` shared, `eₖ` a unit vector), so deltas with the same `k` are
/// parallel and different `k`s orthogonal. Cosine dispersions: layer 0 all equal → 0; layer
/// 1 one orthogonal → 1 - 1/3 = 2/3; layer 2 one opposite → 1 + 1/3 = 4/3; layer 3 all
/// orthogonal → 1. Sign disagreement: only layer 2's entries disagree (2:1 → 2/3), else 0.
fn crafted() -> Vec<TestExpert> {
    let recipe: [([usize; 3], [f32; 3]); 4] = [
        ([0, 0, 0], [1.0, 1.0, 1.0]),
        ([0, 0, 1], [1.0, 1.0, 1.0]),
        ([0, 0, 0], [1.0, 1.0, -1.0]),
        ([0, 1, 2], [1.0, 1.0, 1.0]),
    ];
    let mut rng = Rng(3);
    let bs: Vec<Vec<f32>> = (0..recipe.len() * SHAPES.len())
        .map(|i| {
            let out = SHAPES[i % SHAPES.len()].1;
            (0..out).map(|_| 0.5 + rng.uniform().abs()).collect()
        })
        .collect();
    (0..3)
        .map(|e| {
            let mut modules = Vec::new();
            for (l, (columns, signs)) in recipe.iter().enumerate() {
                for (s, (name, out)) in SHAPES.iter().enumerate() {
                    let mut a = vec![0.0; IN];
                    a[columns[e]] = 1.0;
                    let b = bs[l * SHAPES.len() + s].iter().map(|x| x * signs[e]);
                    modules.push(TestModule {
                        module: format!("model.layers.{l}.{name}"),
                        rank: 1,
                        in_features: IN,
                        out_features: *out,
                        scale: 1.0,
                        a,
                        b: b.collect(),
                    });
                }
            }
            let name = format!("e{e}");
            TestExpert {
                hash: fake_hash(&name),
                name,
                tasks: vec![],
                modules,
            }
        })
        .collect()
}

fn routed_layers(plan: &Plan) -> Vec<usize> {
    (0..4)
        .filter(|l| {
            matches!(
                plan.modules[&format!("model.layers.{l}")],
                ModulePlan::Routed { .. }
            )
        })
        .collect()
}

/// The plan of a cut that routes `routed`: default none, one override per layer.
fn expected(
    routed: &[usize],
    space: MergeSpace,
    router: Router,
    top_k: usize,
) -> BTreeMap<String, ModulePlan> {
    (0..4)
        .map(|l| {
            let plan = if routed.contains(&l) {
                ModulePlan::Routed {
                    router,
                    top_k,
                    temperature: 1.0,
                    granularity: Granularity::Token,
                    groups: vec![],
                    mix: Default::default(),
                }
            } else {
                ModulePlan::Static {
                    weights: vec![1.0 / 3.0; 3],
                    space,
                    svd_rank: None,
                }
            };
            (format!("model.layers.{l}"), plan)
        })
        .collect()
}

fn fit(
    experts: &[TestExpert],
    params: &[(&str, &str)],
    services: &TestServices,
) -> Result<Fitted, String> {
    let harness = Harness::new(moerge_policy_declaration);
    let valid = records(2);
    let request = FitRequest::new(experts).params(params).data(&[], &valid);
    harness.fit(&request, services).map_err(|e| e.to_string())
}

fn records(n: usize) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            task: None,
            prompt: format!("p{i}"),
            completion: format!("c{i}"),
        })
        .collect()
}

fn last_progress(services: &TestServices) -> String {
    let calls = services.calls();
    let mut messages = calls.iter().rev().filter_map(|c| match c {
        ServiceCall::Progress(_, m) => Some(m.clone()),
        _ => None,
    });
    messages.next().unwrap()
}

#[test]
fn the_cut_routes_the_conflicting_layers() {
    let check = |params: &[(&str, &str)], routed: &[usize], space: MergeSpace, top_k: usize| {
        let services = TestServices::new();
        let fitted = fit(&crafted(), params, &services).unwrap();
        assert!(fitted.plan.default.is_none(), "{params:?}");
        assert!(fitted.tensors.is_empty());
        assert_eq!(
            fitted.plan.modules,
            expected(routed, space, Router::Arrow, top_k),
            "{params:?}"
        );
        assert!(!services
            .calls()
            .iter()
            .any(|c| !matches!(c, ServiceCall::Progress(..))));
    };
    let low = MergeSpace::LowRank;
    check(&[], &[2, 3], low, 3);
    check(&[("route_fraction", "0.25")], &[2], low, 3);
    check(&[("route_fraction", "0")], &[], low, 3);
    check(&[("route_fraction", "1")], &[0, 1, 2, 3], low, 3);
    check(&[("threshold", "0.8")], &[2, 3], low, 3);
    check(&[("threshold", "0.5")], &[1, 2, 3], low, 3);
    check(&[("threshold", "1.5")], &[], low, 3);
    check(&[("threshold", "-1")], &[0, 1, 2, 3], low, 3);
    // Signs disagree only in layer 2; equal scores are routed in layer order.
    check(&[("measure", "sign"), ("threshold", "0.1")], &[2], low, 3);
    check(
        &[("measure", "sign"), ("route_fraction", "0.5")],
        &[0, 2],
        low,
        3,
    );
    check(
        &[("merge_space", "exact"), ("top_k", "2")],
        &[2, 3],
        MergeSpace::Exact,
        2,
    );
    check(&[("top_k", "7")], &[2, 3], low, 3);
}

#[test]
fn the_last_message_reports_every_layer_with_its_score() {
    let services = TestServices::new();
    fit(&crafted(), &[], &services).unwrap();
    assert_eq!(
        last_progress(&services),
        "cosine dispersion: merged model.layers.0 (0.0000), model.layers.1 (0.6667); \
         routed model.layers.2 (1.3333), model.layers.3 (1.0000)"
    );
    let services = TestServices::new();
    fit(
        &crafted(),
        &[("measure", "sign"), ("threshold", "0.1")],
        &services,
    )
    .unwrap();
    assert_eq!(
        last_progress(&services),
        "sign disagreement: merged model.layers.0 (0.0000), model.layers.1 (0.0000), \
         model.layers.3 (0.0000); routed model.layers.2 (0.6667)"
    );
}

/// Runs `choose=validation` with losses from `score` (per plan, given its routed layers) and
/// checks the chosen cut and the routed layers of every evaluated candidate.
fn check_validation(
    experts: &[TestExpert],
    params: &[(&str, &str)],
    score: fn(&[usize]) -> f64,
    chosen: &[usize],
    tried: &[Vec<usize>],
) -> TestServices {
    let layers = |plan: &Plan| -> Vec<usize> {
        (0..)
            .map_while(|l| {
                plan.modules
                    .get(&format!("model.layers.{l}"))
                    .map(|p| (l, p))
            })
            .filter(|(_, p)| matches!(p, ModulePlan::Routed { .. }))
            .map(|(l, _)| l)
            .collect()
    };
    let services = TestServices::new()
        .echo_optimize(experts)
        .with_evaluate(move |fitted, _| {
            let loss = score(&layers(&fitted.plan));
            Ok(vec![loss - 0.1, loss + 0.1])
        });
    let mut all = vec![("choose", "validation")];
    all.extend_from_slice(params);
    let fitted = fit(experts, &all, &services).unwrap();
    assert_eq!(layers(&fitted.plan), chosen);
    let evaluated: Vec<Vec<usize>> = services
        .calls()
        .iter()
        .filter_map(|c| match c {
            ServiceCall::Evaluate(f, split) => {
                assert_eq!(*split, Split::Valid);
                Some(layers(&f.plan))
            }
            _ => None,
        })
        .collect();
    assert_eq!(evaluated, tried);
    services
}

#[test]
fn validation_keeps_the_best_cut_and_the_cheaper_of_equals() {
    let tried: Vec<Vec<usize>> = vec![vec![], vec![2], vec![2, 3], vec![1, 2, 3], vec![0, 1, 2, 3]];
    // Routing layer 2 is all that helps: every cut routing it ties, the smallest wins.
    let layer2 = |routed: &[usize]| if routed.contains(&2) { 0.5 } else { 1.0 };
    let services = check_validation(&crafted(), &[], layer2, &[2], &tried);
    assert!(last_progress(&services).ends_with("; valid loss 0.5000"));
    // Layers 2 and 3 help, layer 1 hurts.
    let score = |routed: &[usize]| {
        let has = |l| if routed.contains(&l) { 1.0 } else { 0.0 };
        1.0 - 0.3 * has(2) - 0.2 * has(3) + 0.1 * has(1)
    };
    check_validation(&crafted(), &[], score, &[2, 3], &tried);
    // Routing nothing is best.
    check_validation(&crafted(), &[], |r| r.len() as f64, &[], &tried);
    // A non-finite loss never wins.
    let nan = |r: &[usize]| {
        if r.is_empty() {
            f64::NAN
        } else {
            r.len() as f64
        }
    };
    check_validation(&crafted(), &[], nan, &[2], &tried);
}

#[test]
fn validation_tries_a_few_cuts_of_many_layers() {
    let modules: Vec<(String, usize, usize)> = (0..12)
        .map(|l| (format!("model.layers.{l}.q"), 3, 2))
        .collect();
    let modules: Vec<(&str, usize, usize)> = modules
        .iter()
        .map(|(m, i, o)| (m.as_str(), *i, *o))
        .collect();
    let experts: Vec<TestExpert> = (0..3)
        .map(|e| random_expert(&format!("e{e}"), &modules, 1, e))
        .collect();
    let counts = |r: &[usize]| (r.len() as f64 - 8.0).abs();
    let harness_counts = |services: &TestServices| -> Vec<usize> {
        services
            .calls()
            .iter()
            .filter_map(|c| match c {
                ServiceCall::Evaluate(f, _) => Some(
                    f.plan
                        .modules
                        .values()
                        .filter(|p| matches!(p, ModulePlan::Routed { .. }))
                        .count(),
                ),
                _ => None,
            })
            .collect()
    };
    let services = TestServices::new().with_evaluate(move |f, _| {
        let routed: Vec<usize> = (0..12)
            .filter(|l| {
                matches!(
                    f.plan.modules[&format!("model.layers.{l}")],
                    ModulePlan::Routed { .. }
                )
            })
            .collect();
        Ok(vec![counts(&routed)])
    });
    let params = [("choose", "validation"), ("candidates", "4")];
    let fitted = fit(&experts, &params, &services).unwrap();
    assert_eq!(harness_counts(&services), [0, 4, 8, 12]);
    let routed = fitted
        .plan
        .modules
        .values()
        .filter(|p| matches!(p, ModulePlan::Routed { .. }));
    assert_eq!(routed.count(), 8);
}

#[test]
fn learned_routers_are_trained_by_the_host() {
    let experts = crafted();
    let services = TestServices::new().echo_optimize(&experts);
    let params = [("router", "learned"), ("steps", "5"), ("init", "arrow")];
    let fitted = fit(&experts, &params, &services).unwrap();
    let calls = services.optimize_calls();
    assert_eq!(calls.len(), 1);
    let (template, options) = &calls[0];
    assert!(options.train_routers);
    assert!(
        !options.train_merge_weights
            && !options.train_group_weights
            && !options.train_ensemble_weights
    );
    assert_eq!(
        (options.steps, options.learning_rate, options.router_init),
        (5, 0.01, RouterInit::Arrow)
    );
    assert!(
        template.tensors.is_empty(),
        "routers start from router_init"
    );
    let want = expected(&[2, 3], MergeSpace::LowRank, Router::Learned, 3);
    assert_eq!(template.plan.modules, want);
    assert_eq!(fitted.plan.modules, want);
    let mut names: Vec<String> = Vec::new();
    for l in [2, 3] {
        for (name, _) in SHAPES {
            names.push(router_weight_name(&format!("model.layers.{l}.{name}")));
        }
    }
    names.sort();
    assert_eq!(fitted.tensors.keys().cloned().collect::<Vec<_>>(), names);
    assert_eq!(fitted.tensors[&names[0]].shape, [3, IN]);
    assert_eq!(routed_layers(&fitted.plan), [2, 3]);

    // Nothing routed, nothing to train.
    let services = TestServices::new().echo_optimize(&experts);
    fit(
        &experts,
        &[("router", "learned"), ("route_fraction", "0")],
        &services,
    )
    .unwrap();
    assert!(services.optimize_calls().is_empty());

    // With validation, every candidate that routes something is trained before it is scored.
    let tried: Vec<Vec<usize>> = vec![vec![], vec![2], vec![2, 3], vec![1, 2, 3], vec![0, 1, 2, 3]];
    let services = check_validation(
        &experts,
        &[("router", "learned")],
        |r| r.len() as f64,
        &[],
        &tried,
    );
    let calls = services.optimize_calls();
    assert_eq!(calls.len(), 4);
    assert!(calls
        .iter()
        .all(|(_, o)| o.train_routers && o.learning_rate == 0.01));
}

#[test]
fn errors_name_what_to_change() {
    let experts = crafted();
    let err = |params: &[(&str, &str)]| fit(&experts, params, &TestServices::new()).unwrap_err();
    let check = |msg: String, words: &[&str]| {
        for w in words {
            assert!(msg.contains(w), "{msg:?} lacks {w:?}");
        }
    };
    check(
        err(&[("threshold", "1"), ("route_fraction", "0.5")]),
        &["threshold", "route_fraction", "both"],
    );
    check(
        err(&[("choose", "validation"), ("threshold", "1")]),
        &["choose=validation", "threshold"],
    );
    check(
        err(&[("route_fraction", "1.5")]),
        &["route_fraction", "out of range"],
    );
    check(
        err(&[("measure", "euclid")]),
        &["measure", "one of cosine, sign"],
    );
    check(err(&[("top_k", "0")]), &["top_k", "out of range"]);
    check(
        err(&[("choose", "validation")]),
        &["evaluate failed", "with_evaluate"],
    );
    // No validation data.
    let harness = Harness::new(moerge_policy_declaration);
    let request = FitRequest::new(&experts).params(&[("choose", "validation")]);
    let msg = harness
        .fit(&request, &TestServices::new())
        .unwrap_err()
        .to_string();
    check(msg, &["choose=validation needs validation data", "--valid"]);
    // Learned routers without a trainer.
    check(err(&[("router", "learned")]), &["optimize failed"]);
    // A low-rank merge of unequal ranks; the layer is fine routed, or merged exactly.
    let mut mixed = crafted();
    let m = &mut mixed[2].modules[0];
    assert_eq!(m.module, "model.layers.0.self_attn.q");
    m.rank = 2;
    m.a.extend(vec![0.0; IN]);
    m.b = m.b.iter().flat_map(|&x| [x, 0.0]).collect();
    let msg = fit(&mixed, &[], &TestServices::new()).unwrap_err();
    check(
        msg,
        &[
            "model.layers.0.self_attn.q",
            "rank 1 in e0 and 2 in e2",
            "merge_space=exact",
        ],
    );
    fit(&mixed, &[("merge_space", "exact")], &TestServices::new()).unwrap();
    fit(&mixed, &[("threshold", "-1")], &TestServices::new()).unwrap();
    // Experts of different shapes.
    let mut bad = crafted();
    bad[1].modules[1] = random_expert("x", &[("model.layers.0.mlp.fc1", IN, 3)], 1, 1)
        .modules
        .remove(0);
    check(
        fit(&bad, &[], &TestServices::new()).unwrap_err(),
        &["model.layers.0.mlp.fc1", "expert e1", "3x6"],
    );
    // Cancellation.
    check(
        fit(&experts, &[], &TestServices::new().cancelled()).unwrap_err(),
        &["cancelled"],
    );
}
