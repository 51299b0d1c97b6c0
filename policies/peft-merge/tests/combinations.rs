//! Every combination type through the harness (the daemon's ABI path) against PEFT's
//! definitions re-derived in loops (`common::Reference`).

mod common;

use common::*;
use moerge_sdk::plan::ModulePlan;
use moerge_sdk::testing::ServiceCall;
use moerge_sdk::testing::{random_expert, FitRequest, Harness, TestServices};

const LOW_RANK: [&str; 4] = ["ties", "dare_linear", "dare_ties", "magnitude_prune"];

/// `(density, weights, majority_sign_method, seed)` settings each type is checked under.
const SETTINGS: [(&str, &str, &str, &str); 4] = [
    ("0.2", "", "total", "0"),
    ("0.5", "0.5,-1.5,2", "frequency", "7"),
    ("0.7", "1,1,1", "total", "3"),
    ("1", "0.3,0.3,0.4", "frequency", "0"),
];

/// The weights a fit with `weights=text` uses: by default 1 each for the TIES-style merges
/// (their disjoint mean averages already), 1/N each for the sums.
fn weights_of(text: &str, n: usize, function: &str) -> Vec<f64> {
    if text.is_empty() && function.contains("ties") {
        vec![1.0; n]
    } else if text.is_empty() {
        vec![1.0 / n as f64; n]
    } else {
        text.split(',').map(|w| w.parse().unwrap()).collect()
    }
}

#[test]
fn low_rank_types_merge_the_factors_like_peft() {
    let experts = equal_rank_experts();
    for function in LOW_RANK {
        for (density, weights, sign, seed) in SETTINGS {
            let params = [
                ("combination_type", function),
                ("density", density),
                ("weights", weights),
                ("majority_sign_method", sign),
                ("seed", seed),
            ];
            let fitted = fit(&experts, &params).unwrap();
            let reference = Reference {
                function,
                density: density.parse().unwrap(),
                sign_method: sign,
            };
            let w = weights_of(weights, 3, function);
            for module in [Q, FC] {
                let (want_a, want_b) =
                    reference.low_rank(&experts, module, &w, seed.parse().unwrap());
                let (a, b, rank) = factors(&fitted, module);
                let what = format!("{function} {module} {params:?}");
                assert_eq!(rank, 3, "{what}");
                assert!(want_a.iter().any(|x| *x != 0.0), "{what}: trivial case");
                assert_close(&a, &want_a, &format!("{what} A"));
                assert_close(&b, &want_b, &format!("{what} B"));
            }
        }
    }
}

#[test]
fn svd_types_at_full_rank_equal_the_merged_delta() {
    let experts = mixed_rank_experts();
    for function in LOW_RANK {
        let combination = format!("{function}_svd");
        for (density, weights, sign, seed) in SETTINGS {
            let params = [
                ("combination_type", combination.as_str()),
                ("density", density),
                ("weights", weights),
                ("majority_sign_method", sign),
                ("seed", seed),
                ("svd_rank", "5"),
            ];
            let fitted = fit(&experts, &params).unwrap();
            let reference = Reference {
                function,
                density: density.parse().unwrap(),
                sign_method: sign,
            };
            let w = weights_of(weights, 3, function);
            for module in [Q, FC] {
                let want = reference.exact(&experts, module, &w, seed.parse().unwrap());
                assert!(want.iter().any(|x| *x != 0.0));
                let what = format!("{combination} {module} {params:?}");
                assert_close(&product(&fitted, module), &want, &what);
            }
        }
    }
}

/// The largest singular value of the `n x m` matrix `x`, by power iteration on `xᵀx`.
fn largest_singular_value(x: &[f64], n: usize, m: usize) -> f64 {
    let mut v = vec![1.0; m];
    let mut sigma = 0.0;
    for _ in 0..2000 {
        let xv = matmul(x, &v, n, m, 1);
        let mut w = vec![0.0; m];
        for j in 0..m {
            for i in 0..n {
                w[j] += x[i * m + j] * xv[i];
            }
        }
        let norm = w.iter().map(|t| t * t).sum::<f64>().sqrt();
        if norm == 0.0 {
            return 0.0;
        }
        sigma = norm.sqrt();
        v = w.iter().map(|t| t / norm).collect();
    }
    sigma
}

#[test]
fn svd_types_keep_the_top_singular_directions_at_the_largest_expert_rank() {
    let experts = mixed_rank_experts();
    for function in LOW_RANK {
        let combination = format!("{function}_svd");
        let params = [
            ("combination_type", combination.as_str()),
            ("density", "0.6"),
        ];
        let fitted = fit(&experts, &params).unwrap();
        let reference = Reference {
            function,
            density: 0.6,
            sign_method: "total",
        };
        for (module, out) in [(Q, 5), (FC, 7)] {
            let merged = reference.exact(&experts, module, &weights_of("", 3, function), 0);
            let (a, b, rank) = factors(&fitted, module);
            // PEFT's default rank: the largest expert rank (2, 3, 1).
            assert_eq!(rank, 3, "{combination} {module}");
            // PEFT's split: A = Vhᵣ has orthonormal rows, B = Uᵣ Σᵣ orthogonal columns.
            let mut b_norms = vec![0.0; rank];
            for s in 0..rank {
                for t in 0..rank {
                    let aa: f64 = (0..5).map(|j| a[s * 5 + j] * a[t * 5 + j]).sum();
                    let bb: f64 = (0..out).map(|i| b[i * rank + s] * b[i * rank + t]).sum();
                    assert!(
                        (aa - f64::from(u8::from(s == t))).abs() < 1e-5,
                        "A rows {s},{t}"
                    );
                    if s == t {
                        b_norms[s] = bb.sqrt();
                    } else {
                        assert!(bb.abs() < 1e-4, "B columns {s},{t}: {bb}");
                    }
                }
            }
            // Eckart–Young: the residual holds no direction stronger than the weakest kept one.
            let p = product(&fitted, module);
            let residual: Vec<f64> = merged.iter().zip(&p).map(|(m, p)| m - p).collect();
            let weakest = b_norms.iter().cloned().fold(f64::INFINITY, f64::min);
            let strongest_left = largest_singular_value(&residual, out, 5);
            assert!(
                strongest_left <= weakest + 1e-4,
                "{combination} {module}: residual {strongest_left} > kept {weakest}"
            );
            assert!(
                strongest_left > 1e-3,
                "{combination} {module}: no truncation tested"
            );
        }
    }
}

#[test]
fn dare_linear_at_density_one_is_task_arithmetic() {
    let experts = equal_rank_experts();
    let w = [0.5, -1.0, 2.0];
    let params = [
        ("combination_type", "dare_linear"),
        ("density", "1"),
        ("weights", "0.5,-1,2"),
    ];
    let fitted = fit(&experts, &params).unwrap();
    let params_svd = [
        ("combination_type", "dare_linear_svd"),
        ("density", "1"),
        ("weights", "0.5,-1,2"),
        ("svd_rank", "5"),
    ];
    let fitted_svd = fit(&experts, &params_svd).unwrap();
    for module in [Q, FC] {
        // Low-rank: Σ sign(w s) sqrt|w s| Aᵢ and Σ sqrt|w s| Bᵢ.
        let (mut want_a, mut want_b) = (vec![0.0; 15], vec![0.0; 0]);
        // Exact: Σ wᵢ sᵢ Bᵢ Aᵢ.
        let mut want_delta = Vec::new();
        for (e, w) in w.iter().enumerate() {
            let (s, a, b, r, i, o) = module_of(&experts, e, module);
            let root = (w * s).abs().sqrt();
            let signed = if w * s >= 0.0 { root } else { -root };
            want_b.resize(o * r, 0.0);
            want_delta.resize(o * i, 0.0);
            for k in 0..a.len() {
                want_a[k] += signed * a[k];
            }
            for k in 0..b.len() {
                want_b[k] += root * b[k];
            }
            let ba = matmul(&b, &a, o, r, i);
            for k in 0..ba.len() {
                want_delta[k] += w * s * ba[k];
            }
        }
        let (a, b, _) = factors(&fitted, module);
        assert_close(&a, &want_a, &format!("{module} A"));
        assert_close(&b, &want_b, &format!("{module} B"));
        assert_close(&product(&fitted_svd, module), &want_delta, module);
    }
}

/// `scale · B A` of the first module of `expert`.
fn own_delta(expert: &moerge_sdk::testing::TestExpert, module: &str) -> Vec<f64> {
    let (s, a, b, r, i, o) = module_of(std::slice::from_ref(expert), 0, module);
    matmul(&b, &a, o, r, i).iter().map(|x| s * x).collect()
}

#[test]
fn one_expert_reproduces_its_own_delta() {
    let mut expert = random_expert("solo", &[(Q, 5, 5), (FC, 5, 7)], 2, 9);
    expert.modules[1].scale = 2.0;
    let experts = [expert];
    // Density 1, and PEFT's single-adapter rule (linear, whatever the type) at density 0.2.
    for density in ["1", "0.2"] {
        for combination in ["ties_svd", "dare_ties", "magnitude_prune_svd"] {
            let params = [("combination_type", combination), ("density", density)];
            let fitted = fit(&experts, &params).unwrap();
            for module in [Q, FC] {
                let what = format!("{combination} density {density} {module}");
                assert_eq!(factors(&fitted, module).2, 2, "{what}");
                assert_close(
                    &product(&fitted, module),
                    &own_delta(&experts[0], module),
                    &what,
                );
            }
        }
    }
}

#[test]
fn an_expert_lacking_a_module_counts_as_zeros_there() {
    // b lacks q_proj: ties_svd at density 1 with weights 1, 1 leaves a's delta (its scale
    // applied once), at a's rank.
    let mut a = random_expert("a", &[(Q, 5, 5), (FC, 5, 7)], 2, 4);
    a.modules[0].scale = 0.5;
    let b = random_expert("b", &[(FC, 5, 7)], 2, 5);
    let experts = [a, b];
    let params = [
        ("combination_type", "ties_svd"),
        ("density", "1"),
        ("weights", "1,1"),
    ];
    let fitted = fit(&experts, &params).unwrap();
    let want = own_delta(&experts[0], Q);
    assert_close(&product(&fitted, Q), &want, "q_proj");
}

#[test]
fn every_module_is_fixed_with_progress_per_module() {
    let experts = equal_rank_experts();
    let harness = Harness::new(moerge_policy_peft_merge::moerge_policy_declaration);
    let services = TestServices::new();
    let fitted = harness.fit(&FitRequest::new(&experts), &services).unwrap();
    assert!(fitted.plan.default.is_none());
    assert_eq!(fitted.plan.modules.len(), 2);
    assert!(fitted
        .plan
        .modules
        .values()
        .all(|m| *m == ModulePlan::Fixed));
    assert_eq!(fitted.tensors.len(), 4);
    let progress: Vec<(f64, String)> = services
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            ServiceCall::Progress(f, m) => Some((f, m)),
            _ => None,
        })
        .collect();
    // Sorted module paths: mlp.fc1 before self_attn.q_proj.
    assert_eq!(progress, [(0.5, FC.to_owned()), (1.0, Q.to_owned())]);
    let cancelled = harness.fit(&FitRequest::new(&experts), &TestServices::new().cancelled());
    assert!(cancelled.unwrap_err().to_string().contains("cancelled"));
}
