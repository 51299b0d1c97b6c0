//! `hierarchical` through the SDK's testing harness (the host's ABI path).

use moerge_policy_hierarchical::moerge_policy_declaration;
use moerge_sdk::optimize::RouterInit;
use moerge_sdk::plan::{router_weight_name, ModulePlan, Router};
use moerge_sdk::testing::{random_expert, FitRequest, Harness, Rng, TestExpert, TestServices};

const MODULES: [(&str, usize, usize); 2] = [("model.layers.0.q", 6, 4), ("model.layers.1.q", 6, 4)];

/// Two families of two near-identical experts: a0, b0, a1, b1.
fn experts() -> Vec<TestExpert> {
    let mut rng = Rng(9);
    let mut out = Vec::new();
    for copy in 0..2 {
        for family in ["a", "b"] {
            let seed = if family == "a" { 1 } else { 2 };
            let mut e = random_expert(&format!("{family}{copy}"), &MODULES, 2, seed);
            for m in &mut e.modules {
                m.a.iter_mut().for_each(|x| *x += 0.01 * rng.uniform());
            }
            out.push(e);
        }
    }
    out
}

#[test]
fn clusters_become_groups_and_the_trainer_learns_router_and_weights() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts();
    let services = TestServices::new().echo_optimize(&experts);
    let params = [
        ("k", "2"),
        ("init", "arrow"),
        ("steps", "5"),
        ("sparsity", "0"),
    ];
    let fitted = harness
        .fit(&FitRequest::new(&experts).params(&params), &services)
        .unwrap();
    let calls = services.optimize_calls();
    assert_eq!(calls.len(), 1);
    let (template, options) = &calls[0];
    assert!(options.train_routers && options.train_group_weights);
    assert!(!options.train_merge_weights && !options.train_ensemble_weights);
    assert_eq!((options.router_init, options.steps), (RouterInit::Arrow, 5));
    let ModulePlan::Routed {
        router,
        top_k,
        groups,
        ..
    } = &template.plan.default
    else {
        panic!("{:?}", template.plan.default)
    };
    assert_eq!((*router, *top_k), (Router::Learned, 2));
    let weights: Vec<&[f64]> = groups.iter().map(|g| g.weights.as_slice()).collect();
    assert_eq!(
        weights,
        [&[0.5, 0.0, 0.5, 0.0][..], &[0.0, 0.5, 0.0, 0.5][..]]
    );
    assert_eq!(groups[0].name.as_deref(), Some("cluster-0"));
    for (module, inputs, _) in MODULES {
        assert_eq!(
            fitted.tensors[&router_weight_name(module)].shape,
            [2, inputs]
        );
    }
}

#[test]
fn parameters_are_checked() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts();
    let services = TestServices::new().echo_optimize(&experts);
    let err = |params: &[(&str, &str)]| {
        harness
            .fit(&FitRequest::new(&experts).params(params), &services)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&[("k", "5")]).contains("k is 5, but there are only 4 experts"));
    assert!(err(&[("sparsity", "1")]).contains("sparsity"));
    assert!(err(&[("init", "random")]).contains("one of zero, arrow"));
    // Default k (silhouette) finds the two families; top_k clips to the clusters.
    let fitted = harness
        .fit(
            &FitRequest::new(&experts).params(&[("top_k", "7")]),
            &services,
        )
        .unwrap();
    let ModulePlan::Routed { top_k, groups, .. } = &fitted.plan.default else {
        panic!()
    };
    assert_eq!((groups.len(), *top_k), (2, 2));
}
