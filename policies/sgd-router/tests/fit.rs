//! `sgd-router` through the SDK's testing harness (the host's ABI path).

use moerge_policy_sgd_router::moerge_policy_declaration;
use moerge_sdk::optimize::RouterInit;
use moerge_sdk::plan::{router_weight_name, Mix, ModulePlan, Router};
use moerge_sdk::testing::{random_expert, FitRequest, Harness, TestExpert, TestServices};

const MODULES: [(&str, usize, usize); 2] = [
    ("model.layers.0.mlp.fc1", 6, 4),
    ("model.layers.1.mlp.fc1", 5, 4),
];

fn experts(n: usize) -> Vec<TestExpert> {
    (0..n)
        .map(|i| random_expert(&format!("e{i}"), &MODULES, 2, i as u64))
        .collect()
}

fn check(params: &[(&str, &str)], top_k: usize, init: RouterInit, mix: Mix) {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(5);
    let services = TestServices::new().echo_optimize(&experts);
    let fitted = harness
        .fit(&FitRequest::new(&experts).params(params), &services)
        .unwrap();
    let calls = services.optimize_calls();
    assert_eq!(calls.len(), 1);
    let (template, options) = &calls[0];
    assert!(options.train_routers && !options.train_merge_weights && !options.train_group_weights);
    assert_eq!(options.router_init, init);
    assert!(
        template.tensors.is_empty(),
        "routers start from router_init"
    );
    match &template.plan.default {
        ModulePlan::Routed {
            router,
            top_k: k,
            groups,
            mix: m,
            ..
        } => {
            assert_eq!((*router, *k, *m), (Router::Learned, top_k, mix));
            assert!(groups.is_empty());
        }
        other => panic!("{other:?}"),
    }
    // The trainer's routers come back with the plan: one [experts, in] matrix per module.
    for (module, inputs, _) in MODULES {
        assert_eq!(
            fitted.tensors[&router_weight_name(module)].shape,
            [5, inputs]
        );
    }
}

#[test]
fn dense_by_default_and_top_k_clipped() {
    check(&[], 5, RouterInit::Zero, Mix::Outputs);
    check(
        &[("init", "arrow"), ("top_k", "2")],
        2,
        RouterInit::Arrow,
        Mix::Outputs,
    );
    check(&[("top_k", "9")], 5, RouterInit::Zero, Mix::Outputs);
    check(
        &[("mix", "factors"), ("top_k", "1")],
        1,
        RouterInit::Zero,
        Mix::Factors,
    );
}

#[test]
fn a_trainer_that_returns_no_router_is_caught() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(2);
    let services = TestServices::new().with_optimize(|t, _| Ok(t.clone()));
    let err = harness
        .fit(&FitRequest::new(&experts), &services)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid result") && err.contains("router.weight"),
        "{err}"
    );
}
