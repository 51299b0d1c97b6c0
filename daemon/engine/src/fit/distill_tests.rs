//! Distillation against plain loops over the *served* models' logits: the KL loss, its
//! gradients in the fixed factors, a fit that imitates a single expert, and the host service.

use std::ops::ControlFlow;

use moerge_sdk::plan::{EnsembleLevel, MergeSpace, ModulePlan};
use rand::{Rng, SeedableRng};

use super::*;
use crate::fit::plan_fit::tests::{one_hot_ensemble, plan_of, setup};
use crate::fit::plan_fit::{fit_plan, PlanFitOptions};

/// A student with a fixed rank-`r` update on every module the experts adapt: `A` uniform in
/// ±1/√in (PEFT's), `B` zero or, with `b_scale > 0`, uniform in ±`b_scale`.
pub(crate) fn student(
    experts: &[Adapter],
    rank: usize,
    b_scale: f32,
    seed: u64,
) -> (Plan, TensorMap) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut tensors = TensorMap::new();
    for (module, m) in experts[0].modules() {
        let bound = 1.0 / (m.in_features as f32).sqrt();
        let a = (0..rank * m.in_features)
            .map(|_| rng.random_range(-bound..bound))
            .collect();
        let b = (0..m.out_features * rank)
            .map(|_| {
                if b_scale > 0.0 {
                    rng.random_range(-b_scale..b_scale)
                } else {
                    0.0
                }
            })
            .collect();
        tensors.insert(
            plan::fixed_a_name(module),
            F32Tensor {
                shape: vec![rank, m.in_features],
                data: a,
            },
        );
        tensors.insert(
            plan::fixed_b_name(module),
            F32Tensor {
                shape: vec![m.out_features, rank],
                data: b,
            },
        );
    }
    (plan_of(experts, ModulePlan::Fixed), tensors)
}

fn row_vectors(logits: &Tensor) -> Vec<Vec<f64>> {
    logits
        .to_vec2::<f32>()
        .unwrap()
        .into_iter()
        .map(|r| r.into_iter().map(f64::from).collect())
        .collect()
}

fn softmax(z: &[f64]) -> Vec<f64> {
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let e: Vec<f64> = z.iter().map(|v| (v - max).exp()).collect();
    let total: f64 = e.iter().sum();
    e.into_iter().map(|v| v / total).collect()
}

/// The teacher's next-token distributions `[t][V]` of one sequence, from its members' served
/// logits: a probability ensemble mixes the members' softmaxes, a logit ensemble the logits.
fn teacher_probs(
    base: &BaseModel,
    experts: &[Adapter],
    teacher: &Plan,
    tensors: &TensorMap,
    ids: &[u32],
) -> Vec<Vec<f64>> {
    let level = teacher.ensemble.as_ref().map(|e| e.level);
    let members: Vec<(f64, Vec<Vec<f64>>)> = teacher
        .passes()
        .into_iter()
        .map(|(w, pass)| {
            let model = base.with_plan(&pass, experts, tensors).unwrap();
            (
                w,
                row_vectors(&crate::run::inference::logits(&model, ids).unwrap()),
            )
        })
        .collect();
    (0..ids.len())
        .map(|p| {
            let v = members[0].1[p].len();
            match level {
                Some(EnsembleLevel::Logit) => softmax(
                    &(0..v)
                        .map(|k| members.iter().map(|(w, z)| w * z[p][k]).sum())
                        .collect::<Vec<f64>>(),
                ),
                _ => {
                    let mut mix = vec![0.0; v];
                    for (w, z) in &members {
                        for (m, q) in mix.iter_mut().zip(softmax(&z[p])) {
                            *m += w * q;
                        }
                    }
                    mix
                }
            }
        })
        .collect()
}

/// Mean `KL(teacher ‖ student)` per completion token of `data`, `student` served.
fn plain_kl(
    base: &BaseModel,
    experts: &[Adapter],
    teacher: &Teacher,
    student: &impl LanguageModel,
    data: &[Example],
) -> f64 {
    let (mut total, mut tokens) = (0.0, 0usize);
    for e in data {
        let ids: Vec<u32> = e.prompt.iter().chain(&e.completion).copied().collect();
        let p = teacher_probs(base, experts, &teacher.plan, &teacher.tensors, &ids);
        let q = row_vectors(&crate::run::inference::logits(student, &ids).unwrap());
        for pos in e.prompt.len() - 1..ids.len() - 1 {
            let q = softmax(&q[pos]);
            for (pk, qk) in p[pos].iter().zip(&q) {
                if *pk > 0.0 {
                    total += pk * (pk.ln() - qk.ln());
                }
            }
            tokens += 1;
        }
    }
    total / tokens as f64
}

fn distil_opts(teacher: Teacher) -> PlanFitOptions {
    PlanFitOptions {
        fixed: true,
        teacher: Some(teacher),
        ..Default::default()
    }
}

#[test]
fn the_kl_loss_and_its_gradients_match_plain_loops_over_the_served_models() {
    let (base, experts, data) = setup();
    let (template, tensors) = student(&experts, 4, 0.05, 7);
    let teachers = [
        plan_of(&experts, ModulePlan::one_hot(1, 3, MergeSpace::Exact)),
        one_hot_ensemble(&experts, &[0.5, 0.3, 0.2], EnsembleLevel::Probability),
        one_hot_ensemble(&experts, &[0.6, 0.4, 0.3], EnsembleLevel::Logit),
    ];
    let served = |t: &TensorMap| base.fuse_with(&template, &experts, t).unwrap();
    for plan in teachers {
        let teacher = Teacher {
            plan,
            tensors: TensorMap::new(),
        };
        // The student as a fit trains it: served as usual, its fixed modules on variables.
        let mut model = base.with_plan(&template, &experts, &tensors).unwrap();
        let vars = fixed_vars(&template, &tensors, base.device()).unwrap();
        attach_fixed(&mut model, &vars).unwrap();
        let mut outputs = TeacherOutputs::new(&base, &experts, &teacher, data.len()).unwrap();
        // Every example once, one twice (served from the cache the second time).
        let batch = [0, 1, 2, 3, 1];
        let targets = outputs.targets(&data, &batch).unwrap();
        let examples: Vec<&Example> = batch.iter().map(|&i| &data[i]).collect();
        let loss = kl_loss(&model, &examples, &targets).unwrap();
        let got = f64::from(loss.to_scalar::<f32>().unwrap());
        let batch_data: Vec<Example> = examples.iter().map(|e| (*e).clone()).collect();
        let want = plain_kl(&base, &experts, &teacher, &served(&tensors), &batch_data);
        assert!(want > 1e-3, "a student that differs from its teacher");
        assert!(
            (got - want).abs() < 1e-5 + 1e-3 * want,
            "{:?}: KL {got} vs plain {want}",
            teacher.plan.ensemble.as_ref().map(|e| e.level)
        );

        // Gradients in one module's A and B against finite differences of the served KL.
        let module = "model.layers.1.mlp.fc1";
        let grads = loss.backward().unwrap();
        let (a, b) = &vars[module];
        for (var, name, picks) in [
            (a, plan::fixed_a_name(module), [0, 5, 97]),
            (b, plan::fixed_b_name(module), [0, 3, 130]),
        ] {
            let g = grads.get(var.as_tensor()).unwrap();
            let g = g.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for i in picks {
                let eps = 1e-2;
                let at = |d: f32| {
                    let mut t = tensors.clone();
                    t.get_mut(&name).unwrap().data[i] += d;
                    plain_kl(&base, &experts, &teacher, &served(&t), &batch_data)
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * f64::from(eps));
                let g = f64::from(g[i]);
                assert!(
                    (g - fd).abs() <= 2e-6 + 2e-2 * fd.abs(),
                    "{name}[{i}]: autograd {g} vs finite difference {fd}"
                );
            }
        }
    }
}

#[test]
fn distilling_a_single_expert_into_an_equal_rank_adapter_imitates_it_and_serves() {
    let (base, experts, data) = setup();
    let rank = experts[1].modules().values().next().unwrap().rank;
    let (template, tensors) = student(&experts, rank, 0.0, 3);
    let teacher = Teacher {
        plan: plan_of(&experts, ModulePlan::one_hot(1, 3, MergeSpace::Exact)),
        tensors: TensorMap::new(),
    };
    let before = plain_kl(
        &base,
        &experts,
        &teacher,
        &base.fuse_with(&template, &experts, &tensors).unwrap(),
        &data,
    );
    let opts = PlanFitOptions {
        steps: 60,
        batch_size: 4,
        learning_rate: 0.02,
        ..distil_opts(teacher.clone())
    };
    let fitted = fit_plan(&base, &experts, &template, &tensors, &data, &opts, |_| {
        ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(fitted.plan, template);
    // Exactly the student's factors come back, at the student's rank.
    assert_eq!(
        fitted.tensors.keys().collect::<Vec<_>>(),
        tensors.keys().collect::<Vec<_>>()
    );
    for (module, m) in experts[0].modules() {
        assert_eq!(
            fitted.tensors[&plan::fixed_a_name(module)].shape,
            [rank, m.in_features]
        );
        assert_eq!(
            fitted.tensors[&plan::fixed_b_name(module)].shape,
            [m.out_features, rank]
        );
    }
    let served = base
        .fuse_with(&fitted.plan, &experts, &fitted.tensors)
        .unwrap();
    let after = plain_kl(&base, &experts, &teacher, &served, &data);
    // Rank-8 factors can represent the teacher's rank-8 updates exactly.
    assert!(after < 0.25 * before, "KL {before} -> {after}");
}

#[test]
fn refusals_name_what_is_wrong() {
    let (base, experts, data) = setup();
    let (template, tensors) = student(&experts, 2, 0.0, 1);
    let fit = |template: &Plan, tensors: &TensorMap, opts: &PlanFitOptions| {
        fit_plan(&base, &experts, template, tensors, &data, opts, |_| {
            ControlFlow::Continue(())
        })
        .unwrap_err()
        .to_string()
    };
    // A teacher over the experts in another order.
    let mut reordered = plan_of(&experts, ModulePlan::one_hot(0, 3, MergeSpace::Exact));
    reordered.experts.swap(0, 1);
    let err = fit(
        &template,
        &tensors,
        &distil_opts(Teacher {
            plan: reordered,
            tensors: TensorMap::new(),
        }),
    );
    assert!(
        err.contains("teacher") && err.contains("experts[0]"),
        "{err}"
    );
    // Factors that do not fit their layer.
    let mut bad = tensors.clone();
    let a = plan::fixed_a_name("model.layers.0.mlp.fc1");
    bad.insert(
        a.clone(),
        F32Tensor {
            shape: vec![2, 5],
            data: vec![0.0; 10],
        },
    );
    let opts = PlanFitOptions {
        fixed: true,
        ..Default::default()
    };
    let err = fit(&template, &bad, &opts);
    assert!(err.contains("model.layers.0.mlp.fc1"), "{err}");
    // A fixed plan without factors has nothing to train.
    let err = fit(&template, &TensorMap::new(), &opts);
    assert!(err.contains("nothing to fit"), "{err}");
}
