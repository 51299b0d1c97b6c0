//! ties-merge through moerge-sdk's testing harness (the daemon's ABI path), against a plain-loop
//! TIES written independently here, and the SVD reconstruction on its own.

use moerge_sdk::linalg::low_rank;
use moerge_sdk::plan::{fixed_a_name, fixed_b_name, ModulePlan};
use moerge_sdk::policy::Fitted;
use moerge_sdk::testing::{random_expert, FitRequest, Harness, Rng, TestExpert, TestServices};
use ties_merge::moerge_policy_declaration;

const Q: &str = "model.layers.0.self_attn.q_proj";
const FC: &str = "model.layers.0.mlp.fc1";

fn experts() -> Vec<TestExpert> {
    let mut e = vec![
        random_expert("a", &[(Q, 5, 5), (FC, 5, 7)], 2, 1),
        random_expert("b", &[(Q, 5, 5), (FC, 5, 7)], 3, 2),
        random_expert("c", &[(Q, 5, 5)], 1, 3),
    ];
    e[1].modules[0].scale = 0.5;
    e
}

/// TIES by the book, one entry at a time.
fn reference(experts: &[TestExpert], module: &str, weights: &[f64], density: f64) -> Vec<f64> {
    let shape = experts
        .iter()
        .flat_map(|e| &e.modules)
        .find(|m| m.module == module)
        .unwrap();
    let (out, inputs) = (shape.out_features, shape.in_features);
    let mut trimmed = Vec::new();
    for e in experts {
        let mut d = vec![0.0f64; out * inputs];
        if let Some(m) = e.modules.iter().find(|m| m.module == module) {
            for i in 0..out {
                for j in 0..inputs {
                    for t in 0..m.rank {
                        d[i * inputs + j] += m.scale
                            * f64::from(m.b[i * m.rank + t])
                            * f64::from(m.a[t * inputs + j]);
                    }
                }
            }
        }
        let keep = (d.len() as f64 * density) as usize;
        let mut mags: Vec<f64> = d.iter().map(|x| x.abs()).collect();
        mags.sort_by(|x, y| y.total_cmp(x));
        let cut = if keep == 0 {
            f64::INFINITY
        } else {
            mags[keep - 1]
        };
        trimmed.push(
            d.iter()
                .map(|&x| if x.abs() >= cut { x } else { 0.0 })
                .collect::<Vec<_>>(),
        );
    }
    let mut merged = vec![0.0; out * inputs];
    for k in 0..merged.len() {
        let total: f64 = trimmed.iter().map(|t| t[k]).sum();
        let elected = if total >= 0.0 { 1.0 } else { -1.0 };
        let (mut sum, mut count) = (0.0, 0);
        for (t, w) in trimmed.iter().zip(weights) {
            if t[k] != 0.0 && t[k].signum() == elected {
                sum += w * t[k];
                count += 1;
            }
        }
        merged[k] = if count > 0 { sum / count as f64 } else { 0.0 };
    }
    merged
}

/// `B A` of a fixed module from the fit's tensors.
fn product(fitted: &Fitted, module: &str) -> Vec<f64> {
    let a = &fitted.tensors[&fixed_a_name(module)];
    let b = &fitted.tensors[&fixed_b_name(module)];
    let (r, inputs, out) = (a.shape[0], a.shape[1], b.shape[0]);
    (0..out * inputs)
        .map(|k| {
            (0..r)
                .map(|t| {
                    f64::from(b.data[k / inputs * r + t])
                        * f64::from(a.data[t * inputs + k % inputs])
                })
                .sum()
        })
        .collect()
}

fn fit(params: &[(&str, &str)]) -> Result<Fitted, String> {
    let harness = Harness::new(moerge_policy_declaration);
    let experts = experts();
    let request = FitRequest::new(&experts).params(params);
    harness
        .fit(&request, &TestServices::new())
        .map_err(|e| e.to_string())
}

#[test]
fn full_rank_ties_equals_the_plain_loop_reference() {
    let experts = experts();
    for (density, weights) in [("0.2", "1,1,1"), ("0.5", "0.5,2,1"), ("1", "1,1,1")] {
        let w: Vec<f64> = weights.split(',').map(|x| x.parse().unwrap()).collect();
        let fitted = fit(&[("density", density), ("weights", weights), ("rank", "100")]).unwrap();
        for module in [Q, FC] {
            let want = reference(&experts, module, &w, density.parse().unwrap());
            let got = product(&fitted, module);
            assert!(want.iter().any(|x| *x != 0.0));
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() < 1e-4,
                    "{module} density {density}: {g} vs {w}"
                );
            }
        }
    }
}

#[test]
fn the_plan_is_fixed_per_module_with_the_default_rank() {
    let fitted = fit(&[]).unwrap();
    assert!(fitted.plan.default.is_none());
    assert_eq!(fitted.plan.modules.len(), 2);
    assert!(fitted
        .plan
        .modules
        .values()
        .all(|m| *m == ModulePlan::Fixed));
    // Ranks 2 + 3 + 1 = 6, capped at min(5, 5); fc1 is adapted by two experts: 2 + 3.
    assert_eq!(fitted.tensors[&fixed_a_name(Q)].shape, [5, 5]);
    assert_eq!(fitted.tensors[&fixed_a_name(FC)].shape, [5, 5]);
    assert_eq!(fitted.tensors[&fixed_b_name(FC)].shape, [7, 5]);
    let fitted = fit(&[("rank", "2")]).unwrap();
    assert_eq!(fitted.tensors[&fixed_b_name(FC)].shape, [7, 2]);
}

#[test]
fn bad_weights_are_refused() {
    assert!(fit(&[("weights", "1,2")])
        .unwrap_err()
        .contains("2 values for 3 experts"));
    assert!(fit(&[("weights", "1,x,2")])
        .unwrap_err()
        .contains("not a comma-separated list"));
    assert!(fit(&[("density", "2")]).unwrap_err().contains("density"));
}

fn reconstruct(a: &[f64], b: &[f64], out: usize, inputs: usize, r: usize) -> Vec<f64> {
    (0..out * inputs)
        .map(|k| {
            (0..r)
                .map(|t| b[k / inputs * r + t] * a[t * inputs + k % inputs])
                .sum()
        })
        .collect()
}

#[test]
fn low_rank_reconstructs_and_truncates() {
    let mut rng = Rng(4);
    for (out, inputs) in [(6, 4), (4, 6)] {
        let m: Vec<f64> = (0..out * inputs)
            .map(|_| f64::from(rng.uniform()))
            .collect();
        let full = out.min(inputs);
        let (a, b) = low_rank(&m, out, inputs, full);
        let back = reconstruct(&a, &b, out, inputs, full);
        for (x, y) in back.iter().zip(&m) {
            assert!((x - y).abs() < 1e-9, "{out}x{inputs}: {x} vs {y}");
        }
        // A rank-2 matrix plus tiny noise: rank 2 recovers it to the noise level.
        let u: Vec<f64> = (0..out * 2).map(|_| f64::from(rng.uniform())).collect();
        let v: Vec<f64> = (0..2 * inputs).map(|_| f64::from(rng.uniform())).collect();
        let clean = reconstruct(&v, &u, out, inputs, 2);
        let noisy: Vec<f64> = clean
            .iter()
            .map(|x| x + 1e-6 * f64::from(rng.uniform()))
            .collect();
        let (a, b) = low_rank(&noisy, out, inputs, 2);
        let back = reconstruct(&a, &b, out, inputs, 2);
        for (x, y) in back.iter().zip(&clean) {
            assert!((x - y).abs() < 1e-5, "{out}x{inputs}: {x} vs {y}");
        }
    }
}
