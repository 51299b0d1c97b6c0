//! The fitting paths' gradients against finite differences of the *serving* path (the plan
//! with perturbed values, fused as a user would run it), on the PEFT fixtures.

use std::path::PathBuf;

use moerge_sdk::plan::{
    Ensemble, EnsembleLevel, ExpertRef, Granularity, Group, Member, MergeSpace, Mix, Router,
    PLAN_VERSION,
};

use super::*;
use crate::models::Precision;
use crate::run::examples::batch_loss;

fn fixtures() -> PathBuf {
    match std::env::var_os("MOERGE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    }
}

pub(crate) fn setup() -> (BaseModel, Vec<Adapter>, Vec<Example>) {
    let dir = fixtures().join("dev-phi");
    let base = BaseModel::load_dir(&dir, Precision::F32).unwrap();
    let experts = ["swapcase", "rot13", "twice"]
        .iter()
        .map(|n| Adapter::load(&dir.join("adapters").join(n)).unwrap())
        .collect();
    let data = (0..4u32)
        .map(|i| Example {
            task: None,
            prompt: vec![10 + i * 7, 40 + i, 99 - i * 3],
            completion: vec![120 + i * 5, 7 + i],
        })
        .collect();
    (base, experts, data)
}

/// An ensemble of one member per expert (each that expert alone), with these weights.
pub(crate) fn one_hot_ensemble(experts: &[Adapter], weights: &[f64], level: EnsembleLevel) -> Plan {
    let mut plan = plan_of(experts, ModulePlan::None);
    plan.ensemble = Some(Ensemble {
        level,
        members: (0..weights.len())
            .map(|i| Member {
                weight: weights[i],
                default: ModulePlan::one_hot(i, experts.len(), MergeSpace::Exact),
                modules: Default::default(),
            })
            .collect(),
    });
    plan
}

pub(crate) fn plan_of(experts: &[Adapter], default: ModulePlan) -> Plan {
    Plan {
        version: PLAN_VERSION,
        experts: experts
            .iter()
            .map(|e| ExpertRef {
                name: e.name().into(),
                hash: e.hash().to_string(),
            })
            .collect(),
        default,
        modules: Default::default(),
        ensemble: None,
        tensors: None,
    }
}

fn serving_loss(
    base: &BaseModel,
    experts: &[Adapter],
    plan: &Plan,
    tensors: &TensorMap,
    data: &[Example],
) -> f64 {
    let model = base.fuse_with(plan, experts, tensors).unwrap();
    let refs: Vec<&Example> = data.iter().collect();
    f64::from(
        batch_loss(&model, &refs)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap(),
    )
}

/// Autograd gradient of the fitting model's loss for `var`.
fn autograd(model: &BaseModel, var: &Var, data: &[Example]) -> Vec<f64> {
    let refs: Vec<&Example> = data.iter().collect();
    let loss = batch_loss(model, &refs).unwrap();
    let grads = loss.backward().unwrap();
    grads
        .get(var.as_tensor())
        .expect("the variable gets a gradient")
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f64::from)
        .collect()
}

fn close(got: f64, want: f64, what: &str) {
    assert!(
        (got - want).abs() <= 2e-3 + 3e-2 * want.abs(),
        "{what}: autograd {got} vs finite difference {want}"
    );
}

const EPS: f64 = 1e-2;

fn merge_opts() -> PlanFitOptions {
    PlanFitOptions {
        merge_weights: true,
        ..Default::default()
    }
}

#[test]
fn merge_weight_gradients_equal_finite_differences_of_the_served_merge() {
    let (base, experts, data) = setup();
    for space in [MergeSpace::Exact, MergeSpace::LowRank, MergeSpace::Folded] {
        let static_plan = |w: Vec<f64>| ModulePlan::Static {
            weights: w,
            space,
            svd_rank: None,
        };
        // A global default and a per-layer override: two tied weight vectors.
        let mut template = plan_of(&experts, static_plan(vec![0.5, 0.3, 0.2]));
        template
            .modules
            .insert("model.layers.1".into(), static_plan(vec![0.1, 0.6, 0.4]));
        let (model, vars, tensors) =
            prepare(&base, &experts, &template, &TensorMap::new(), &merge_opts()).unwrap();
        assert_eq!(vars.merges.len(), 2);
        for (entry, var) in &vars.merges {
            let grads = autograd(&model, var, &data);
            for (i, g) in grads.iter().enumerate() {
                let loss_at = |delta: f64| {
                    let mut p = template.clone();
                    if let ModulePlan::Static { weights, .. } = entry_mut(&mut p, entry) {
                        weights[i] += delta;
                    }
                    serving_loss(&base, &experts, &p, &tensors, &data)
                };
                let fd = (loss_at(EPS) - loss_at(-EPS)) / (2.0 * EPS);
                close(*g, fd, &format!("{space:?} entry {entry:?} weight {i}"));
            }
        }
    }
}

fn learned(top_k: usize, granularity: Granularity, groups: Vec<Group>) -> ModulePlan {
    learned_mixing(top_k, granularity, groups, Mix::Outputs)
}

fn learned_mixing(
    top_k: usize,
    granularity: Granularity,
    groups: Vec<Group>,
    mix: Mix,
) -> ModulePlan {
    ModulePlan::Routed {
        router: Router::Learned,
        top_k,
        temperature: 0.7,
        granularity,
        groups,
        mix,
    }
}

#[test]
fn router_gradients_equal_finite_differences_of_the_served_router() {
    let (base, experts, data) = setup();
    let module = "model.layers.0.mlp.fc1";
    for (granularity, mix) in [
        (Granularity::Token, Mix::Outputs),
        (Granularity::Sequence, Mix::Outputs),
        (Granularity::Token, Mix::Factors),
    ] {
        let mut template = plan_of(&experts, learned_mixing(3, granularity, vec![], mix));
        template.tensors = Some("0".repeat(64));
        let opts = PlanFitOptions {
            routers: true,
            router_init: RouterInit::Arrow,
            ..Default::default()
        };
        let (model, vars, tensors) =
            prepare(&base, &experts, &template, &TensorMap::new(), &opts).unwrap();
        // Arrow init wrote every module's starting matrix.
        assert_eq!(vars.routers.len(), experts[0].modules().len());
        let (w, b) = &vars.routers[module];
        let gw = autograd(&model, w, &data);
        let gb = autograd(&model, b, &data);
        let mut tensors = tensors;
        write_back(&template, &vars, &mut tensors).unwrap();
        for (name, grads, picks) in [
            (
                plan::router_weight_name(module),
                &gw,
                vec![0, 97, 2 * 96 + 5],
            ),
            (plan::router_bias_name(module), &gb, vec![0, 1, 2]),
        ] {
            for i in picks {
                let loss_at = |delta: f64| {
                    let mut t = tensors.clone();
                    t.get_mut(&name).unwrap().data[i] += delta as f32;
                    serving_loss(&base, &experts, &template, &t, &data)
                };
                let fd = (loss_at(EPS) - loss_at(-EPS)) / (2.0 * EPS);
                close(
                    grads[i],
                    fd,
                    &format!("{granularity:?} {mix:?} {name}[{i}]"),
                );
            }
        }
    }
}

#[test]
fn group_weight_gradients_equal_finite_differences_of_the_served_groups() {
    let (base, experts, data) = setup();
    let groups = vec![
        Group {
            name: None,
            weights: vec![0.6, 0.4, 0.0],
        },
        Group {
            name: None,
            weights: vec![0.0, 0.3, 0.7],
        },
    ];
    let mut template = plan_of(&experts, learned(2, Granularity::Token, groups));
    template.tensors = Some("0".repeat(64));
    let opts = PlanFitOptions {
        routers: true,
        group_weights: true,
        router_init: RouterInit::Arrow,
        ..Default::default()
    };
    let (model, vars, mut tensors) =
        prepare(&base, &experts, &template, &TensorMap::new(), &opts).unwrap();
    let var = &vars.groups[&None];
    let grads = autograd(&model, var, &data);
    write_back(&template, &vars, &mut tensors).unwrap();
    for i in [0, 1, 4, 5] {
        let loss_at = |delta: f64| {
            let mut p = template.clone();
            if let ModulePlan::Routed { groups, .. } = &mut p.default {
                groups[i / 3].weights[i % 3] += delta;
            }
            serving_loss(&base, &experts, &p, &tensors, &data)
        };
        let fd = (loss_at(EPS) - loss_at(-EPS)) / (2.0 * EPS);
        close(grads[i], fd, &format!("group weight {i}"));
    }
}

#[test]
fn fitting_lowers_the_loss_and_the_result_serves_as_fitted() {
    let (base, experts, data) = setup();
    let mut template = plan_of(&experts, learned(2, Granularity::Token, vec![]));
    template.tensors = Some("0".repeat(64));
    let opts = PlanFitOptions {
        routers: true,
        steps: 30,
        batch_size: 4,
        learning_rate: 0.05,
        ..Default::default()
    };
    let mut zero = TensorMap::new();
    let (_, vars, _) = prepare(&base, &experts, &template, &zero, &opts).unwrap();
    write_back(&template, &vars, &mut zero).unwrap();
    let before = serving_loss(&base, &experts, &template, &zero, &data);
    let fitted = fit_plan(
        &base,
        &experts,
        &template,
        &TensorMap::new(),
        &data,
        &opts,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    let after = serving_loss(&base, &experts, &fitted.plan, &fitted.tensors, &data);
    assert!(after < before - 1e-3, "loss {before} -> {after}");
    // The same seed gives the same fit.
    let again = fit_plan(
        &base,
        &experts,
        &template,
        &TensorMap::new(),
        &data,
        &opts,
        |_| ControlFlow::Continue(()),
    )
    .unwrap();
    assert_eq!(again.tensors, fitted.tensors);
    // Asking for nothing trainable is refused with a reason.
    let err = fit_plan(
        &base,
        &experts,
        &template,
        &TensorMap::new(),
        &data,
        &merge_opts(),
        |_| ControlFlow::Continue(()),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("nothing to fit"), "{err}");
}
