//! Shared by the peft-merge tests: small experts, the fit through the harness, and PEFT's
//! merge definitions re-derived here in plain loops (only DARE's mask stream comes from the
//! crate's public generator, which PEFT's `torch.bernoulli` stands for).

#![allow(dead_code)]

use moerge_policy_peft_merge::mask::DropMask;
use moerge_policy_peft_merge::moerge_policy_declaration;
use moerge_sdk::plan::{fixed_a_name, fixed_b_name};
use moerge_sdk::policy::Fitted;
use moerge_sdk::testing::{random_expert, FitRequest, Harness, TestExpert, TestServices};

pub const Q: &str = "model.layers.0.self_attn.q_proj";
pub const FC: &str = "model.layers.0.mlp.fc1";

/// Three rank-3 experts on a 5x5 and a 7x5 (out x in) module, with unequal scales; `c` lacks
/// `fc1`.
pub fn equal_rank_experts() -> Vec<TestExpert> {
    let mut e = vec![
        random_expert("a", &[(Q, 5, 5), (FC, 5, 7)], 3, 1),
        random_expert("b", &[(Q, 5, 5), (FC, 5, 7)], 3, 2),
        random_expert("c", &[(Q, 5, 5)], 3, 3),
    ];
    e[1].modules[0].scale = 0.5;
    e[1].modules[1].scale = 2.0;
    e[2].modules[0].scale = 1.5;
    e
}

/// Like [`equal_rank_experts`] with ranks 2, 3 and 1.
pub fn mixed_rank_experts() -> Vec<TestExpert> {
    let mut e = vec![
        random_expert("a", &[(Q, 5, 5), (FC, 5, 7)], 2, 1),
        random_expert("b", &[(Q, 5, 5), (FC, 5, 7)], 3, 2),
        random_expert("c", &[(Q, 5, 5)], 1, 3),
    ];
    e[1].modules[0].scale = 0.5;
    e[2].modules[0].scale = 2.0;
    e
}

pub fn fit(experts: &[TestExpert], params: &[(&str, &str)]) -> Result<Fitted, String> {
    let harness = Harness::new(moerge_policy_declaration);
    let request = FitRequest::new(experts).params(params);
    harness
        .fit(&request, &TestServices::new())
        .map_err(|e| e.to_string())
}

/// The fitted `(A, B)` of `module` as f64, with their shapes' rank.
pub fn factors(fitted: &Fitted, module: &str) -> (Vec<f64>, Vec<f64>, usize) {
    let a = &fitted.tensors[&fixed_a_name(module)];
    let b = &fitted.tensors[&fixed_b_name(module)];
    assert_eq!(a.shape[0], b.shape[1]);
    let f64s = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect();
    (f64s(&a.data), f64s(&b.data), a.shape[0])
}

/// `B A` of `module` from the fit's tensors, `out x in` row-major.
pub fn product(fitted: &Fitted, module: &str) -> Vec<f64> {
    let (a, b, r) = factors(fitted, module);
    let inputs = a.len() / r.max(1);
    matmul(&b, &a, b.len() / r.max(1), r, inputs)
}

/// `x [n, k] · y [k, m]`.
pub fn matmul(x: &[f64], y: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            for t in 0..k {
                out[i * m + j] += x[i * k + t] * y[t * m + j];
            }
        }
    }
    out
}

pub fn assert_close(got: &[f64], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    for (k, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
            "{what} [{k}]: {g} vs {w}"
        );
    }
}

/// One expert's `(scale, A, B, rank, in, out)` on `module`; zeros (scale 1) where it lacks it,
/// with the shape of whichever expert has it.
pub fn module_of(
    experts: &[TestExpert],
    e: usize,
    module: &str,
) -> (f64, Vec<f64>, Vec<f64>, usize, usize, usize) {
    let any = experts
        .iter()
        .flat_map(|x| &x.modules)
        .find(|m| m.module == module)
        .unwrap();
    match experts[e].modules.iter().find(|m| m.module == module) {
        Some(m) => {
            let f64s = |x: &[f32]| x.iter().map(|&v| f64::from(v)).collect();
            let (r, i, o) = (m.rank, m.in_features, m.out_features);
            (m.scale, f64s(&m.a), f64s(&m.b), r, i, o)
        }
        None => {
            let (r, i, o) = (any.rank, any.in_features, any.out_features);
            (1.0, vec![0.0; r * i], vec![0.0; o * r], r, i, o)
        }
    }
}

/// PEFT's merge functions by the book, one entry at a time.
pub struct Reference {
    /// `ties`, `dare_linear`, `dare_ties` or `magnitude_prune` (no `_svd`).
    pub function: &'static str,
    pub density: f64,
    /// `total` or `frequency`.
    pub sign_method: &'static str,
}

impl Reference {
    /// `magnitude_based_pruning`: the `int(density · n)` largest magnitudes, picked one by one
    /// (first index on equal magnitudes); `prune` returns the tensor when `density ≥ 1`.
    fn magnitude(&self, t: &[f64]) -> Vec<f64> {
        if self.density >= 1.0 {
            return t.to_vec();
        }
        let k = (self.density * t.len() as f64).floor() as usize;
        let mut chosen = vec![false; t.len()];
        for _ in 0..k {
            let mut best: Option<usize> = None;
            for i in 0..t.len() {
                if !chosen[i] && best.is_none_or(|b| t[i].abs() > t[b].abs()) {
                    best = Some(i);
                }
            }
            chosen[best.unwrap()] = true;
        }
        (0..t.len())
            .map(|i| if chosen[i] { t[i] } else { 0.0 })
            .collect()
    }

    /// `random_pruning(rescale=True)`: keep with probability `density`, divide by it.
    fn random(&self, t: &[f64], mask: &mut DropMask) -> Vec<f64> {
        if self.density >= 1.0 {
            return t.to_vec();
        }
        let mut out = vec![0.0; t.len()];
        for i in 0..t.len() {
            if mask.keep(self.density) {
                out[i] = t[i] / self.density;
            }
        }
        out
    }

    /// The merge of equally shaped `tensors` with `weights`.
    pub fn merge(&self, tensors: &[Vec<f64>], weights: &[f64], mask: &mut DropMask) -> Vec<f64> {
        let pruned: Vec<Vec<f64>> = match self.function {
            "ties" | "magnitude_prune" => tensors.iter().map(|t| self.magnitude(t)).collect(),
            "dare_linear" | "dare_ties" => tensors.iter().map(|t| self.random(t, mask)).collect(),
            "linear" => tensors.to_vec(),
            other => panic!("no reference for {other}"),
        };
        let n = pruned[0].len();
        let mut merged = vec![0.0; n];
        for k in 0..n {
            if self.function.ends_with("ties") {
                let sgn = |x: f64| {
                    if x > 0.0 {
                        1.0
                    } else if x < 0.0 {
                        -1.0
                    } else {
                        0.0
                    }
                };
                let mut magnitude = 0.0;
                for t in &pruned {
                    magnitude += if self.sign_method == "total" {
                        t[k]
                    } else {
                        sgn(t[k])
                    };
                }
                let elected = if magnitude >= 0.0 { 1.0 } else { -1.0 };
                let (mut sum, mut count) = (0.0, 0.0);
                for (t, w) in pruned.iter().zip(weights) {
                    if sgn(t[k]) == elected {
                        sum += w * t[k];
                        count += 1.0;
                    }
                }
                merged[k] = sum / f64::max(count, 1.0);
            } else {
                for (t, w) in pruned.iter().zip(weights) {
                    merged[k] += w * t[k];
                }
            }
        }
        merged
    }

    /// PEFT's low-rank path for `module`: `(A, B)` merged separately with `±sqrt(w s)` and
    /// `sqrt(w s)`; the mask draws all `A`s, then all `B`s.
    pub fn low_rank(
        &self,
        experts: &[TestExpert],
        module: &str,
        weights: &[f64],
        seed: u64,
    ) -> (Vec<f64>, Vec<f64>) {
        let (mut a_s, mut b_s, mut wa, mut wb) = (vec![], vec![], vec![], vec![]);
        for (e, w) in weights.iter().enumerate() {
            let (scale, a, b, ..) = module_of(experts, e, module);
            let ws = w * scale;
            wa.push(if ws >= 0.0 {
                ws.abs().sqrt()
            } else {
                -ws.abs().sqrt()
            });
            wb.push(ws.abs().sqrt());
            a_s.push(a);
            b_s.push(b);
        }
        let mut mask = DropMask::for_module(seed, module);
        let a = self.merge(&a_s, &wa, &mut mask);
        let b = self.merge(&b_s, &wb, &mut mask);
        (a, b)
    }

    /// PEFT's SVD path for `module` before the SVD: deltas `s B A` merged with `w`.
    pub fn exact(
        &self,
        experts: &[TestExpert],
        module: &str,
        weights: &[f64],
        seed: u64,
    ) -> Vec<f64> {
        let (mut deltas, mut ws) = (vec![], vec![]);
        for (e, w) in weights.iter().enumerate() {
            let (scale, a, b, r, i, o) = module_of(experts, e, module);
            let delta: Vec<f64> = matmul(&b, &a, o, r, i).iter().map(|x| scale * x).collect();
            deltas.push(delta);
            ws.push(*w);
        }
        self.merge(&deltas, &ws, &mut DropMask::for_module(seed, module))
    }
}
