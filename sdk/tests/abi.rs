//! The C ABI end to end, in process: a probe policy exported with `export_policy!` and driven
//! through its declaration by the testing harness (the host's own calling code).

use moerge_sdk::abi::{
    DeclarationError, DeclaredPolicy, FitCallError, PolicyDeclaration, ABI_VERSION,
};
use moerge_sdk::optimize::{distillation_template, OptimizeOptions};
use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{
    fixed_a_name, fixed_b_name, router_weight_name, MergeSpace, ModulePlan, Plan, Router,
    PLAN_VERSION,
};
use moerge_sdk::policy::{
    FitContext, Fitted, Policy, PolicyError, Record, ServiceError, Split, TensorData,
};
use moerge_sdk::testing::{
    random_expert, FitRequest, Harness, HarnessError, ServiceCall, TestExpert, TestServices,
};

#[derive(Default)]
struct Probe;

fn uniform(ctx: &FitContext<'_>) -> Fitted {
    let n = ctx.experts().len();
    Fitted::plan(Plan {
        version: PLAN_VERSION,
        experts: ctx.expert_refs(),
        default: ModulePlan::Static {
            weights: vec![1.0 / n as f64; n],
            space: MergeSpace::Exact,
            svd_rank: None,
        },
        modules: Default::default(),
        ensemble: None,
        tensors: None,
    })
}

impl Policy for Probe {
    fn name(&self) -> &str {
        "probe"
    }
    fn version(&self) -> &str {
        "1.2.3"
    }
    fn parameters(&self) -> Vec<ParamSpec> {
        let modes = [
            "echo",
            "panic",
            "fail",
            "cancel",
            "evaluate",
            "optimize",
            "bad_plan",
            "router",
            "distil",
            "bad_teacher",
            "stray_teacher",
        ];
        vec![ParamSpec::choice("mode", &modes, "echo", "what to do")]
    }
    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        match params.str("mode")? {
            "echo" => {
                // Encode what the plugin saw into the weights: factor sums and data sizes.
                let e = &ctx.experts()[0];
                let m = &e.modules[0];
                let sum: f32 = m.a.iter().chain(m.b).sum();
                ctx.progress(
                    0.5,
                    &format!("{} {} {}", e.name, e.tasks.join(","), m.module),
                );
                let mut fitted = uniform(ctx);
                let n = ctx.experts().len();
                let mut weights = vec![0.0; n];
                weights[0] = f64::from(sum);
                weights[n - 1] +=
                    (ctx.records(Split::Train).len() * 10 + ctx.records(Split::Valid).len()) as f64;
                fitted.plan.default = ModulePlan::Static {
                    weights,
                    space: MergeSpace::Exact,
                    svd_rank: None,
                };
                Ok(fitted)
            }
            "panic" => panic!("probe exploded"),
            "fail" => Err(PolicyError::invalid("needs at least 3 experts")),
            "cancel" => {
                ctx.check_cancelled()?;
                Ok(uniform(ctx))
            }
            "evaluate" => {
                let losses = ctx.evaluate(&uniform(ctx), Split::Valid)?;
                let mut fitted = uniform(ctx);
                if let ModulePlan::Static { weights, .. } = &mut fitted.plan.default {
                    weights[0] = losses.iter().sum();
                }
                Ok(fitted)
            }
            "optimize" | "router" => {
                let mut template = uniform(ctx);
                template.plan.default = ModulePlan::Routed {
                    router: Router::Learned,
                    top_k: 1,
                    temperature: 1.0,
                    granularity: Default::default(),
                    groups: vec![],
                    mix: Default::default(),
                };
                if params.str("mode")? == "router" {
                    return Ok(template); // no router weights: invalid
                }
                let options = OptimizeOptions {
                    train_routers: true,
                    steps: 7,
                    ..Default::default()
                };
                ctx.optimize(&template, &options)
            }
            "distil" | "bad_teacher" | "stray_teacher" => {
                // A rank-1 fixed student, distilled from a rank-3 fixed teacher whose factors
                // have the same names.
                let fixed = |rank: usize| {
                    let mut f = uniform(ctx);
                    f.plan.default = ModulePlan::Fixed;
                    f.tensors
                        .insert(fixed_a_name(MODULE), TensorData::zeros(&[rank, 6]));
                    f.tensors
                        .insert(fixed_b_name(MODULE), TensorData::zeros(&[4, rank]));
                    f
                };
                let student = fixed(1);
                let mut teacher = fixed(3);
                if params.str("mode")? == "bad_teacher" {
                    teacher.tensors.remove(&fixed_b_name(MODULE));
                }
                let options = OptimizeOptions {
                    train_fixed: true,
                    teacher: (params.str("mode")? != "stray_teacher")
                        .then(|| Box::new(teacher.plan.clone())),
                    ..Default::default()
                };
                ctx.optimize(&distillation_template(&student, &teacher), &options)
            }
            "bad_plan" => {
                let mut fitted = uniform(ctx);
                fitted.plan.default = ModulePlan::Static {
                    weights: vec![1.0],
                    space: MergeSpace::Exact,
                    svd_rank: None,
                };
                Ok(fitted)
            }
            other => unreachable!("{other}"),
        }
    }
}

moerge_sdk::export_policy!(Probe);

const MODULE: &str = "model.layers.0.mlp.fc1";

fn experts() -> Vec<TestExpert> {
    let modules = [(MODULE, 6, 4)];
    vec![
        random_expert("a", &modules, 2, 1),
        random_expert("b", &modules, 2, 2),
    ]
}

fn run(mode: &str, services: &TestServices) -> Result<Fitted, HarnessError> {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts();
    let params = [("mode", mode)];
    harness.fit(&FitRequest::new(&experts).params(&params), services)
}

fn weights(f: &Fitted) -> Vec<f64> {
    match &f.plan.default {
        ModulePlan::Static { weights, .. } => weights.clone(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn declaration_is_read_through_the_table() {
    let harness = Harness::new(moerge_policy_declaration);
    let p = harness.policy();
    assert_eq!((p.name(), p.version()), ("probe", "1.2.3"));
    assert_eq!(p.sdk_version(), env!("CARGO_PKG_VERSION"));
    assert_eq!(p.parameters()[0].name, "mode");
    // The same declaration every time.
    assert_eq!(moerge_policy_declaration(), moerge_policy_declaration());
}

#[test]
fn inputs_cross_the_abi_intact() {
    let experts = experts();
    let m = &experts[0].modules[0];
    let sum: f32 = m.a.iter().chain(&m.b).sum();
    let record = |t: &str| Record {
        task: Some(t.into()),
        prompt: "p".into(),
        completion: "c".into(),
    };
    let train = [record("x"), record("y")];
    let valid = [record("x")];
    let services = TestServices::new();
    let harness = Harness::new(moerge_policy_declaration);
    let request = FitRequest::new(&experts).data(&train, &valid);
    let fitted = harness.fit(&request, &services).unwrap();
    assert_eq!(weights(&fitted), vec![f64::from(sum), 21.0]);
    assert_eq!(
        services.calls(),
        vec![ServiceCall::Progress(0.5, format!("a a {MODULE}"))]
    );
}

#[test]
fn a_panic_fails_the_fit_with_its_message_and_the_next_fit_works() {
    let err = run("panic", &TestServices::new()).unwrap_err();
    assert_eq!(
        err,
        HarnessError::Fit(FitCallError::Failed("panicked: probe exploded".into()))
    );
    assert!(run("echo", &TestServices::new()).is_ok());
}

#[test]
fn errors_and_cancellation_come_back_typed() {
    let err = run("fail", &TestServices::new()).unwrap_err().to_string();
    assert_eq!(err, "needs at least 3 experts");
    let err = run("cancel", &TestServices::new().cancelled()).unwrap_err();
    assert_eq!(err, HarnessError::Fit(FitCallError::Cancelled));
    assert!(run("cancel", &TestServices::new()).is_ok());
}

#[test]
fn services_are_served_across_the_abi() {
    let services = TestServices::new().with_evaluate(|f, split| {
        assert_eq!(split, Split::Valid);
        Ok(vec![f.plan.experts.len() as f64, 0.25])
    });
    assert_eq!(weights(&run("evaluate", &services).unwrap())[0], 2.25);
    // Without an evaluate closure the harness says how to give one.
    let err = run("evaluate", &TestServices::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("evaluate failed") && err.contains("with_evaluate"),
        "{err}"
    );
    // A panicking host service fails the fit, it does not abort.
    let services = TestServices::new().with_evaluate(|_, _| panic!("host broke"));
    let err = run("evaluate", &services).unwrap_err().to_string();
    assert!(err.contains("host panicked: host broke"), "{err}");
    let services = TestServices::new().with_evaluate(|_, _| Err(ServiceError::Cancelled));
    assert_eq!(
        run("evaluate", &services).unwrap_err(),
        HarnessError::Fit(FitCallError::Cancelled)
    );
}

#[test]
fn optimize_gets_the_template_and_options() {
    let services = TestServices::new().echo_optimize(&experts());
    let fitted = run("optimize", &services).unwrap();
    let calls = services.optimize_calls();
    assert_eq!(calls.len(), 1);
    assert!(calls[0].1.train_routers && calls[0].1.steps == 7);
    assert!(calls[0].0.tensors.is_empty());
    assert_eq!(
        fitted.tensors[&router_weight_name(MODULE)],
        TensorData::zeros(&[2, 6])
    );
}

#[test]
fn a_teachers_tensors_are_checked_with_it_and_never_come_back() {
    // The stand-in trainer returns everything it was sent, the teacher's tensors included.
    let services = TestServices::new().with_optimize(|t, _| Ok(t.clone()));
    let fitted = run("distil", &services).unwrap();
    let (template, options) = &services.optimize_calls()[0];
    assert!(options.train_fixed);
    assert_eq!(options.teacher.as_ref().unwrap().default, ModulePlan::Fixed);
    assert_eq!(
        template.tensors[&format!("teacher.{}", fixed_a_name(MODULE))].shape,
        [3, 6]
    );
    assert_eq!(template.tensors[&fixed_a_name(MODULE)].shape, [1, 6]);
    let names: Vec<&String> = fitted.tensors.keys().collect();
    assert_eq!(names, [&fixed_a_name(MODULE), &fixed_b_name(MODULE)]);
    assert_eq!(fitted.tensors[&fixed_b_name(MODULE)].shape, [4, 1]);

    let err = run("bad_teacher", &services).unwrap_err().to_string();
    assert!(
        err.contains("teacher") && err.contains(&fixed_b_name(MODULE)),
        "{err}"
    );
    let err = run("stray_teacher", &services).unwrap_err().to_string();
    assert!(err.contains("no teacher"), "{err}");
}

#[test]
fn invalid_results_are_refused() {
    let err = run("bad_plan", &TestServices::new())
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("invalid result") && err.contains("1 weights for 2 experts"),
        "{err}"
    );
    let err = run("router", &TestServices::new()).unwrap_err().to_string();
    assert!(
        err.contains(&router_weight_name(MODULE)) && err.contains("[2, 6]"),
        "{err}"
    );
    // A trainer that returns a wrongly shaped router is caught too.
    let services = TestServices::new().with_optimize(|t, _| {
        let mut t = t.clone();
        t.tensors
            .insert(router_weight_name(MODULE), TensorData::zeros(&[3, 6]));
        Ok(t)
    });
    let err = run("optimize", &services).unwrap_err().to_string();
    assert!(err.contains("[3, 6]") && err.contains("[2, 6]"), "{err}");
}

#[test]
fn declarations_of_another_abi_are_refused_before_anything_is_read() {
    // Only the first field is read: the rest of this "declaration" would be garbage.
    static OTHER: u32 = ABI_VERSION + 1;
    let decl = (&OTHER as *const u32).cast::<PolicyDeclaration>();
    // SAFETY: only the version is read when it does not match.
    let err = unsafe { DeclaredPolicy::from_raw(decl) }.unwrap_err();
    assert_eq!(
        err,
        DeclarationError::Abi {
            expected: 1,
            found: 2
        }
    );
    assert!(err.to_string().starts_with("expected ABI 1, got 2"));
    assert_eq!(
        unsafe { DeclaredPolicy::from_raw(std::ptr::null()) }.unwrap_err(),
        DeclarationError::Null
    );
}

#[test]
fn unknown_parameters_are_refused_by_name() {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts();
    let err = harness
        .fit(
            &FitRequest::new(&experts).params(&[("mode", "sideways")]),
            &TestServices::new(),
        )
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("mode") && err.contains("one of echo, panic"),
        "{err}"
    );
}
