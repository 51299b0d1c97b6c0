//! `lp-ensemble` through the SDK's testing harness (the host's ABI path), with an `evaluate`
//! that answers per-record losses from a table keyed by the expert a one-hot plan selects.

use moerge_policy_lp_ensemble::moerge_policy_declaration;
use moerge_sdk::plan::{EnsembleLevel, MergeSpace, ModulePlan};
use moerge_sdk::policy::{Fitted, Record, ServiceError, Split};
use moerge_sdk::testing::{
    random_expert, FitRequest, Harness, ServiceCall, TestExpert, TestServices,
};

fn experts(n: usize) -> Vec<TestExpert> {
    let modules = [("model.layers.0.mlp.fc1", 6, 4)];
    (0..n)
        .map(|i| random_expert(&format!("e{i}"), &modules, 2, i as u64))
        .collect()
}

fn record(task: Option<&str>) -> Record {
    Record {
        task: task.map(str::to_owned),
        prompt: "p".into(),
        completion: "c".into(),
    }
}

/// Validation records: tasks a, b, a, b (two records per task).
fn valid() -> Vec<Record> {
    ["a", "b", "a", "b"].map(|t| record(Some(t))).to_vec()
}

/// Per-record losses of each expert on [`valid`]'s records, in record order. Task means:
/// e0 (1, 3), e1 (3, 1.2), e2 (2.5, 2.5), e3 (4, 4).
fn table() -> Vec<Vec<f64>> {
    vec![
        vec![0.5, 2.0, 1.5, 4.0],
        vec![3.5, 1.0, 2.5, 1.4],
        vec![2.0, 3.0, 3.0, 2.0],
        vec![4.0, 4.0, 4.0, 4.0],
    ]
}

/// The expert a one-hot single-pass plan selects.
fn selected(fitted: &Fitted) -> usize {
    assert!(fitted.plan.ensemble.is_none());
    let ModulePlan::Static { weights, .. } = &fitted.plan.default else {
        panic!("not a static plan: {:?}", fitted.plan.default)
    };
    let hot: Vec<usize> = (0..weights.len()).filter(|&i| weights[i] != 0.0).collect();
    assert_eq!(hot.len(), 1, "{weights:?}");
    assert_eq!(weights[hot[0]], 1.0);
    hot[0]
}

fn services(table: Vec<Vec<f64>>) -> TestServices {
    TestServices::new().with_evaluate(move |fitted, split| {
        assert_eq!(split, Split::Valid);
        Ok(table[selected(fitted)].clone())
    })
}

fn one_hot(i: usize, n: usize, space: MergeSpace) -> ModulePlan {
    let mut weights = vec![0.0; n];
    weights[i] = 1.0;
    ModulePlan::Static {
        weights,
        space,
        svd_rank: None,
    }
}

fn evaluated(services: &TestServices) -> Vec<(Fitted, Split)> {
    let calls = services.calls();
    let it = calls.into_iter().filter_map(|c| match c {
        ServiceCall::Evaluate(f, s) => Some((f, s)),
        _ => None,
    });
    it.collect()
}

fn last_progress(services: &TestServices) -> String {
    let calls = services.calls();
    let it = calls.iter().rev().filter_map(|c| match c {
        ServiceCall::Progress(_, m) => Some(m.clone()),
        _ => None,
    });
    it.take(1).collect()
}

/// Members as (expert, weight), checking each is a one-hot plan of `space`.
fn members(fitted: &Fitted, space: MergeSpace) -> Vec<(usize, f64)> {
    assert!(fitted.plan.default.is_none());
    let n = fitted.plan.experts.len();
    let ensemble = fitted.plan.ensemble.as_ref().expect("an ensemble plan");
    let out = ensemble.members.iter().map(|m| {
        let ModulePlan::Static { weights, .. } = &m.default else {
            panic!("{:?}", m.default)
        };
        let i = weights.iter().position(|&w| w == 1.0).unwrap();
        assert_eq!(m.default, one_hot(i, n, space));
        assert!(m.modules.is_empty());
        (i, m.weight)
    });
    out.collect()
}

#[test]
fn minimax_mixes_the_two_specialists_and_drops_the_rest() {
    let harness = Harness::new(moerge_policy_declaration);
    let (experts, valid) = (experts(4), valid());
    let services = services(table());
    let request = FitRequest::new(&experts).data(&[], &valid);
    let fitted = harness.fit(&request, &services).unwrap();

    // Plain-loop reference: the task means of e0 and e1, and the weight equalising their
    // mixed losses on the two tasks (which beats e2's 2.5).
    let t = table();
    let mean = |e: usize, task: usize| (t[e][task] + t[e][task + 2]) / 2.0;
    let (a, b, c, d) = (mean(0, 0), mean(0, 1), mean(1, 0), mean(1, 1));
    let w0 = (d - c) / (a - b - c + d);
    assert!(w0 * a + (1.0 - w0) * c < 2.5);

    let got = members(&fitted, MergeSpace::LowRank);
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!((got[0].0, got[1].0), (0, 1));
    assert!((got[0].1 - w0).abs() < 1e-7, "{got:?} vs {w0}");
    assert!((got[0].1 + got[1].1 - 1.0).abs() < 1e-12);
    let ensemble = fitted.plan.ensemble.as_ref().unwrap();
    assert_eq!(ensemble.level, EnsembleLevel::Probability);

    // One evaluation per expert, in order, each of that expert alone on the validation split.
    let calls = evaluated(&services);
    assert_eq!(calls.len(), 4);
    for (i, (f, split)) in calls.iter().enumerate() {
        assert_eq!(*split, Split::Valid);
        assert_eq!(f.plan.default, one_hot(i, 4, MergeSpace::LowRank));
        assert!(f.plan.modules.is_empty() && f.tensors.is_empty());
    }
    let message = last_progress(&services);
    assert!(message.starts_with("2 of 4 experts kept"), "{message}");
}

#[test]
fn the_mean_objective_and_logit_level_keep_the_best_mean_expert() {
    let harness = Harness::new(moerge_policy_declaration);
    let (experts, valid) = (experts(4), valid());
    let services = services(table());
    let params = [("objective", "mean"), ("level", "logit")];
    let request = FitRequest::new(&experts).data(&[], &valid).params(&params);
    let fitted = harness.fit(&request, &services).unwrap();
    // Means over tasks: e0 2.0, e1 2.1, e2 2.5, e3 4.0.
    assert_eq!(members(&fitted, MergeSpace::LowRank), [(0, 1.0)]);
    assert_eq!(fitted.plan.ensemble.unwrap().level, EnsembleLevel::Logit);
    assert!(last_progress(&services).starts_with("1 of 4 experts kept"));
}

#[test]
fn records_without_a_task_form_one_task() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(3);
    let valid = vec![record(None), record(None), record(None)];
    // One task: the minimax is the expert with the lowest mean, e2 (mean 1.0).
    let table = vec![
        vec![1.0, 2.0, 3.0],
        vec![0.5, 0.5, 5.0],
        vec![1.0, 1.0, 1.0],
    ];
    let services = services(table);
    let request = FitRequest::new(&experts).data(&[], &valid);
    let fitted = harness.fit(&request, &services).unwrap();
    assert_eq!(members(&fitted, MergeSpace::LowRank), [(2, 1.0)]);
}

#[test]
fn unequal_ranks_use_exact_one_hot_members() {
    let harness = Harness::new(moerge_policy_declaration);
    let modules = [("model.layers.0.mlp.fc1", 6, 4)];
    let experts = vec![
        random_expert("e0", &modules, 2, 0),
        random_expert("e1", &modules, 3, 1),
    ];
    let valid = valid();
    let services = services(table()[..2].to_vec());
    let request = FitRequest::new(&experts).data(&[], &valid);
    let fitted = harness.fit(&request, &services).unwrap();
    assert_eq!(members(&fitted, MergeSpace::Exact).len(), 2);
    let (f, _) = &evaluated(&services)[1];
    assert_eq!(f.plan.default, one_hot(1, 2, MergeSpace::Exact));
}

#[test]
fn without_validation_data_the_error_says_to_give_some() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(2);
    let train = valid();
    let services = services(table());
    let request = FitRequest::new(&experts).data(&train, &[]);
    let err = harness.fit(&request, &services).unwrap_err().to_string();
    assert!(err.contains("no validation records"), "{err}");
    assert!(evaluated(&services).is_empty());
}

#[test]
fn bad_losses_name_the_expert_and_task() {
    let harness = Harness::new(moerge_policy_declaration);
    let (experts, valid) = (experts(2), valid());
    let mut t = table();
    t[1][3] = f64::INFINITY;
    let request = FitRequest::new(&experts).data(&[], &valid);
    let err = harness.fit(&request, &services(t)).unwrap_err().to_string();
    assert!(err.contains("e1") && err.contains("\"b\""), "{err}");

    let short = TestServices::new().with_evaluate(|_, _| Ok(vec![1.0]));
    let err = harness.fit(&request, &short).unwrap_err().to_string();
    assert!(
        err.contains("e0") && err.contains("1 losses for 4"),
        "{err}"
    );

    let failing =
        TestServices::new().with_evaluate(|_, _| Err(ServiceError::Failed("out of memory".into())));
    let err = harness.fit(&request, &failing).unwrap_err().to_string();
    assert!(
        err.contains("evaluate failed") && err.contains("out of memory"),
        "{err}"
    );
}

#[test]
fn min_weight_drops_small_members_or_refuses_to_drop_all() {
    let harness = Harness::new(moerge_policy_declaration);
    let (experts, valid) = (experts(4), valid());
    // e0's weight is about 0.47, e1's about 0.53.
    let params = [("min_weight", "0.5")];
    let request = FitRequest::new(&experts).data(&[], &valid).params(&params);
    let fitted = harness.fit(&request, &services(table())).unwrap();
    assert_eq!(members(&fitted, MergeSpace::LowRank), [(1, 1.0)]);

    let params = [("min_weight", "0.9")];
    let request = FitRequest::new(&experts).data(&[], &valid).params(&params);
    let err = harness
        .fit(&request, &services(table()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("min_weight") && err.contains("e1"), "{err}");
}

#[test]
fn a_cancelled_fit_evaluates_nothing() {
    let harness = Harness::new(moerge_policy_declaration);
    let (experts, valid) = (experts(2), valid());
    let services = services(table()).cancelled();
    let request = FitRequest::new(&experts).data(&[], &valid);
    let err = harness.fit(&request, &services).unwrap_err().to_string();
    assert!(err.contains("cancelled"), "{err}");
    assert!(evaluated(&services).is_empty());
}
