//! `ensemble` through the SDK's testing harness (the host's ABI path).

use moerge_policy_ensemble::moerge_policy_declaration;
use moerge_sdk::plan::{EnsembleLevel, MergeSpace, ModulePlan};
use moerge_sdk::testing::{random_expert, FitRequest, Harness, TestExpert, TestServices};

fn experts(n: usize) -> Vec<TestExpert> {
    let modules = [("model.layers.0.mlp.fc1", 6, 4)];
    (0..n)
        .map(|i| random_expert(&format!("e{i}"), &modules, 2, i as u64))
        .collect()
}

#[test]
fn uniform_members_are_one_hot_exact_plans() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(3);
    let services = TestServices::new();
    let request = FitRequest::new(&experts).params(&[("level", "logit")]);
    let fitted = harness.fit(&request, &services).unwrap();
    assert!(fitted.plan.default.is_none());
    let ensemble = fitted.plan.ensemble.unwrap();
    assert_eq!(ensemble.level, EnsembleLevel::Logit);
    assert_eq!(ensemble.members.len(), 3);
    for (i, m) in ensemble.members.iter().enumerate() {
        assert!((m.weight - 1.0 / 3.0).abs() < 1e-12);
        let mut one_hot = vec![0.0; 3];
        one_hot[i] = 1.0;
        let want = ModulePlan::Static {
            weights: one_hot,
            space: MergeSpace::Exact,
            svd_rank: None,
        };
        assert_eq!(m.default, want);
    }
    assert!(services.calls().is_empty());
}

#[test]
fn learned_weights_ask_the_trainer_for_ensemble_weights_only() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(2);
    // A stand-in trainer that puts all weight on the second member.
    let services = TestServices::new().with_optimize(|template, _| {
        let mut out = template.clone();
        let members = &mut out.plan.ensemble.as_mut().unwrap().members;
        members[0].weight = 0.0;
        members[1].weight = 1.0;
        Ok(out)
    });
    let params = [
        ("weights", "learned"),
        ("steps", "30"),
        ("learning_rate", "0.1"),
    ];
    let fitted = harness
        .fit(&FitRequest::new(&experts).params(&params), &services)
        .unwrap();
    let weights: Vec<f64> = (fitted.plan.ensemble.unwrap().members.iter())
        .map(|m| m.weight)
        .collect();
    assert_eq!(weights, [0.0, 1.0]);
    let calls = services.optimize_calls();
    assert_eq!(calls.len(), 1);
    let (template, options) = &calls[0];
    assert!(options.train_ensemble_weights);
    assert!(!options.train_merge_weights && !options.train_routers && !options.train_group_weights);
    assert_eq!((options.steps, options.learning_rate), (30, 0.1));
    assert_eq!(
        template.plan.ensemble.as_ref().unwrap().level,
        EnsembleLevel::Probability
    );
}

#[test]
fn a_trainer_failure_fails_the_fit() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(2);
    let params = [("weights", "learned")];
    let err = harness
        .fit(
            &FitRequest::new(&experts).params(&params),
            &TestServices::new(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("optimize failed") && err.contains("not available"),
        "{err}"
    );
}
