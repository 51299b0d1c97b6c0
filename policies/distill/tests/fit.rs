//! `distill` through the SDK's testing harness (the host's ABI path).

use moerge_policy_distill::moerge_policy_declaration;
use moerge_sdk::optimize::OptimizeOptions;
use moerge_sdk::plan::{fixed_a_name, fixed_b_name, EnsembleLevel, MergeSpace, ModulePlan, Plan};
use moerge_sdk::policy::Fitted;
use moerge_sdk::testing::{
    random_expert, FitRequest, Harness, ServiceCall, TestExpert, TestServices,
};

const MODULES: [(&str, usize, usize); 2] = [
    ("model.layers.0.mlp.fc1", 6, 4),
    ("model.layers.0.self_attn.q_proj", 4, 5),
];

fn experts(n: usize) -> Vec<TestExpert> {
    (0..n)
        .map(|i| random_expert(&format!("e{i}"), &MODULES, 2, i as u64))
        .collect()
}

/// A stand-in trainer: an ensemble's weights become `learned`; anything else comes back as
/// it was sent.
fn trainer(learned: Vec<f64>) -> TestServices {
    TestServices::new().with_optimize(move |template, _| {
        let mut out = template.clone();
        if let Some(e) = out.plan.ensemble.as_mut() {
            for (m, w) in e.members.iter_mut().zip(&learned) {
                m.weight = *w;
            }
        }
        Ok(out)
    })
}

/// Checks `teacher` is the probability ensemble of every expert alone with `weights`.
fn check_teacher(teacher: &Plan, weights: &[f64]) {
    let ensemble = teacher.ensemble.as_ref().expect("an ensemble teacher");
    assert_eq!(ensemble.level, EnsembleLevel::Probability);
    assert_eq!(ensemble.members.len(), weights.len());
    for (i, (m, w)) in ensemble.members.iter().zip(weights).enumerate() {
        assert!((m.weight - w).abs() < 1e-12, "member {i}: {}", m.weight);
        let mut one_hot = vec![0.0; weights.len()];
        one_hot[i] = 1.0;
        let want = ModulePlan::Static {
            weights: one_hot,
            space: MergeSpace::Exact,
            svd_rank: None,
        };
        assert_eq!(m.default, want);
    }
}

/// Checks the distillation call: a fixed plan over all experts, rank-`rank` factors as PEFT
/// starts them, trained with the teacher as the loss.
fn check_student(template: &Fitted, options: &OptimizeOptions, rank: usize) {
    assert!(options.train_fixed && options.teacher.is_some());
    assert!(
        !options.train_merge_weights
            && !options.train_routers
            && !options.train_group_weights
            && !options.train_ensemble_weights
    );
    assert_eq!(template.plan.default, ModulePlan::Fixed);
    assert!(template.plan.ensemble.is_none() && template.plan.modules.is_empty());
    assert_eq!(template.tensors.len(), 2 * MODULES.len());
    for (module, inputs, outputs) in MODULES {
        let a = &template.tensors[&fixed_a_name(module)];
        let b = &template.tensors[&fixed_b_name(module)];
        assert_eq!(a.shape, [rank, inputs]);
        assert_eq!(b.shape, [outputs, rank]);
        assert_eq!(a.data.len(), rank * inputs);
        let bound = 1.0 / (inputs as f32).sqrt();
        assert!(
            a.data.iter().all(|x| x.abs() <= bound),
            "{module}: A in ±{bound}"
        );
        assert!(a.data.iter().any(|x| *x != 0.0), "{module}: A is random");
        assert!(
            b.data.iter().all(|x| *x == 0.0),
            "{module}: B starts at zero"
        );
    }
}

#[test]
fn a_learned_teacher_is_trained_first_then_distilled_into_a_fixed_adapter() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(2);
    let services = trainer(vec![0.7, 0.3]);
    let params = [
        ("rank", "3"),
        ("teacher_steps", "25"),
        ("batch_size", "4"),
        ("seed", "9"),
    ];
    let fitted = harness
        .fit(&FitRequest::new(&experts).params(&params), &services)
        .unwrap();
    let calls = services.optimize_calls();
    assert_eq!(calls.len(), 2);

    let (template, options) = &calls[0];
    check_teacher(&template.plan, &[0.5, 0.5]);
    assert!(options.train_ensemble_weights && !options.train_fixed);
    assert!(options.teacher.is_none());
    assert_eq!(
        (options.steps, options.batch_size, options.seed),
        (25, 4, 9)
    );
    assert_eq!(
        options.learning_rate,
        OptimizeOptions::default().learning_rate
    );

    let (template, options) = &calls[1];
    check_student(template, options, 3);
    check_teacher(options.teacher.as_ref().unwrap(), &[0.7, 0.3]);
    assert_eq!((options.steps, options.learning_rate), (400, 0.01));
    assert_eq!((options.batch_size, options.seed), (4, 9));
    // The stand-in trainer sent the student back as it was: that is the fit's result.
    assert_eq!(&fitted, template);

    let messages: Vec<String> = services
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            ServiceCall::Progress(_, m) => Some(m),
            _ => None,
        })
        .collect();
    assert_eq!(messages.len(), 2, "{messages:?}");
    assert!(messages[0].contains("mixture weights") && messages[1].contains("rank-3"));
}

#[test]
fn a_uniform_teacher_needs_one_optimisation_and_the_seed_fixes_the_start() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(3);
    let start = |seed: &'static str| {
        let services = TestServices::new().echo_optimize(&experts);
        let params = [
            ("teacher", "uniform-ensemble"),
            ("seed", seed),
            ("steps", "7"),
            ("learning_rate", "0.002"),
        ];
        harness
            .fit(&FitRequest::new(&experts).params(&params), &services)
            .unwrap();
        let calls = services.optimize_calls();
        assert_eq!(calls.len(), 1);
        let (template, options) = calls.into_iter().next().unwrap();
        check_student(&template, &options, 8);
        check_teacher(options.teacher.as_ref().unwrap(), &[1.0 / 3.0; 3]);
        assert_eq!((options.steps, options.learning_rate), (7, 0.002));
        assert_eq!(options.batch_size, 16);
        template.tensors
    };
    assert_eq!(start("1"), start("1"));
    assert_ne!(start("1"), start("2"));
}

#[test]
fn bad_parameters_cancellation_and_trainer_failures_are_reported() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts(2);
    let services = trainer(vec![0.5, 0.5]);
    let fit = |params: &[(&str, &str)], services: &TestServices| {
        harness
            .fit(&FitRequest::new(&experts).params(params), services)
            .unwrap_err()
            .to_string()
    };
    let err = fit(&[("rank", "0")], &services);
    assert!(err.contains("rank"), "{err}");
    let err = fit(&[("teacher", "oracle")], &services);
    assert!(err.contains("teacher") && err.contains("oracle"), "{err}");
    let err = fit(&[("teacher_steps", "0")], &services);
    assert!(err.contains("teacher_steps"), "{err}");
    assert!(services.calls().is_empty());
    // Cancelled after the teacher: the student is never trained.
    let cancelled = trainer(vec![0.5, 0.5]).cancelled();
    let err = fit(&[], &cancelled);
    assert!(err.contains("cancelled"), "{err}");
    assert_eq!(cancelled.optimize_calls().len(), 1);
    let err = fit(&[("teacher", "uniform-ensemble")], &TestServices::new());
    assert!(
        err.contains("optimize failed") && err.contains("not available"),
        "{err}"
    );
}
