//! `learned-merge` through the SDK's testing harness (the host's ABI path).

use moerge_policy_learned_merge::{layer_prefixes, moerge_policy_declaration};
use moerge_sdk::plan::{MergeSpace, ModulePlan};
use moerge_sdk::testing::{random_expert, FitRequest, Harness, TestExpert, TestServices};

const MODULES: [(&str, usize, usize); 4] = [
    ("model.layers.0.mlp.fc1", 6, 4),
    ("model.layers.0.self_attn.q_proj", 6, 6),
    ("model.layers.1.mlp.fc1", 6, 4),
    ("lm_head", 6, 9),
];

fn experts(n: usize) -> Vec<TestExpert> {
    (0..n)
        .map(|i| random_expert(&format!("e{i}"), &MODULES, 2, i as u64))
        .collect()
}

fn uniform(n: usize, space: MergeSpace) -> ModulePlan {
    ModulePlan::Static {
        weights: vec![1.0 / n as f64; n],
        space,
        svd_rank: None,
    }
}

#[test]
fn layer_prefixes_end_at_the_first_numeric_segment() {
    let check = |paths: &[&str], want: &[&str]| assert_eq!(layer_prefixes(paths), want);
    check(
        &["model.layers.3.mlp.fc1", "model.layers.3.q"],
        &["model.layers.3"],
    );
    check(
        &["transformer.h.10.attn", "transformer.h.2.attn"],
        &["transformer.h.10", "transformer.h.2"],
    );
    check(&["lm_head", "model.embed"], &[]);
    check(&["a.1b.2.x"], &["a.1b.2"]);
}

#[test]
fn global_and_per_layer_templates_go_to_the_trainer() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(3);
    for (granularity, overrides) in [("global", 0), ("per_layer", 2)] {
        let services = TestServices::new().echo_optimize(&experts);
        let params = [
            ("granularity", granularity),
            ("steps", "12"),
            ("space", "exact"),
        ];
        let fitted = harness
            .fit(&FitRequest::new(&experts).params(&params), &services)
            .unwrap();
        let calls = services.optimize_calls();
        assert_eq!(calls.len(), 1, "{granularity}");
        let (template, options) = &calls[0];
        assert!(options.train_merge_weights && !options.train_routers);
        assert!(!options.train_ensemble_weights && !options.train_group_weights);
        assert_eq!(options.steps, 12);
        assert_eq!(template.plan.default, uniform(3, MergeSpace::Exact));
        assert_eq!(template.plan.modules.len(), overrides, "{granularity}");
        for (prefix, plan) in &template.plan.modules {
            assert!(
                prefix == "model.layers.0" || prefix == "model.layers.1",
                "{prefix}"
            );
            assert_eq!(plan, &uniform(3, MergeSpace::Exact));
        }
        assert_eq!(&fitted, template, "the trainer's result is returned");
    }
}
