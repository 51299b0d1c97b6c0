//! Arrow prototypes: for each routed unit and module, the top right singular vector of its
//! `ΔW = B A`, the input direction the unit amplifies most (Ostapenko et al. 2024).
//! Computed from the small `R × R` problem, never forming the `out × in` product: thin QR
//! `Aᵀ = Q_a R_a` and `B = Q_b R_b` give `B A = Q_b (R_b R_aᵀ) Q_aᵀ`, so the top right
//! singular vector is `Q_a v` for the top eigenvector `v` of `MᵀM`, `M = R_b R_aᵀ`. This also
//! works when the factors are rank-deficient (merged groups of many experts). The sign is
//! fixed so the largest-magnitude component is positive.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use moerge_library::{Adapter, ContentHash, LoraModule};

use super::stacks::UnitParts;
use crate::nn::linalg;

/// The unit prototype (length `in_features`) of one expert's module.
pub fn prototype(adapter: &Adapter, module: &LoraModule) -> Vec<f32> {
    let to64 = |v: Vec<f32>| v.into_iter().map(f64::from).collect::<Vec<f64>>();
    let a = to64(adapter.tensor_f32(&module.a)); // r × in
    let b = to64(adapter.tensor_f32(&module.b)); // out × r
    prototype_of_factors(&a, &b, module.rank, module.in_features, module.out_features)
}

/// [`prototype`], computed once per expert content and module for the life of the process:
/// prototypes depend only on the adapter's bytes, which its hash names.
pub(crate) fn cached_prototype(adapter: &Adapter, module: &LoraModule) -> Vec<f32> {
    type Cache = Mutex<HashMap<(ContentHash, String), Vec<f32>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (adapter.hash(), module.module.clone());
    if let Some(v) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return v.clone();
    }
    let v = prototype(adapter, module);
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(key, v.clone());
    v
}

/// The prototype of a unit merging several experts' updates, `Σ w s B A`: the factors
/// `[A_1; A_2; …]` and `[w_1 s_1 B_1, w_2 s_2 B_2, …]` side by side.
pub(crate) fn unit_prototype(parts: &UnitParts<'_>) -> Vec<f32> {
    let (inp, out) = (parts[0].2.in_features, parts[0].2.out_features);
    let r: usize = parts.iter().map(|(_, _, m)| m.rank).sum();
    let mut a = Vec::with_capacity(r * inp);
    let mut b = vec![0f64; out * r];
    let mut offset = 0;
    for (w, e, m) in parts {
        a.extend(e.tensor_f32(&m.a).into_iter().map(f64::from));
        // Scaled in f32, as the serving stacks hold them.
        let c = (w * m.scale) as f32;
        for (o, row) in e.tensor_f32(&m.b).chunks_exact(m.rank).enumerate() {
            for (k, v) in row.iter().enumerate() {
                b[o * r + offset + k] = f64::from(c * v);
            }
        }
        offset += m.rank;
    }
    prototype_of_factors(&a, &b, r, inp, out)
}

/// The unit top right singular vector of `B A` for `a` (`r × in`) and `b` (`out × r`).
pub(crate) fn prototype_of_factors(
    a: &[f64],
    b: &[f64],
    r: usize,
    inp: usize,
    out: usize,
) -> Vec<f32> {
    let mut a_t = vec![0f64; inp * r];
    for k in 0..r {
        for j in 0..inp {
            a_t[j * r + k] = a[k * inp + j];
        }
    }
    let svd = linalg::product_svd(&a_t, b, r, inp, out);
    let mut v: Vec<f64> = (0..inp)
        .map(|j| (0..r).map(|i| svd.qa[j * r + i] * svd.v[i * r]).sum())
        .collect();
    let norm = v
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    let largest = v
        .iter()
        .copied()
        .fold(0f64, |m, x| if x.abs() > m.abs() { x } else { m });
    let sign = if largest < 0.0 { -1.0 } else { 1.0 };
    v.iter_mut().for_each(|x| *x *= sign / norm);
    v.into_iter().map(|x| x as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The top right singular vector of the dense `B A` by power iteration on `(BA)ᵀ(BA)`.
    fn dense_top_vector(a: &[f64], b: &[f64], r: usize, inp: usize, out: usize) -> Vec<f64> {
        let mut w = vec![0f64; out * inp];
        for o in 0..out {
            for j in 0..inp {
                w[o * inp + j] = (0..r).map(|k| b[o * r + k] * a[k * inp + j]).sum();
            }
        }
        let mut v: Vec<f64> = (0..inp).map(|j| 1.0 + j as f64 * 0.01).collect();
        for _ in 0..2000 {
            let wv: Vec<f64> = (0..out)
                .map(|o| (0..inp).map(|j| w[o * inp + j] * v[j]).sum())
                .collect();
            let mut next: Vec<f64> = (0..inp)
                .map(|j| (0..out).map(|o| w[o * inp + j] * wv[o]).sum())
                .collect();
            let norm = next.iter().map(|x| x * x).sum::<f64>().sqrt();
            next.iter_mut().for_each(|x| *x /= norm);
            v = next;
        }
        v
    }

    #[test]
    fn prototypes_match_dense_power_iteration_even_when_rank_deficient() {
        // (r, in, out): ordinary, and more rank than inputs (a merged group of many experts).
        for (r, inp, out) in [(3, 7, 5), (9, 4, 6)] {
            let a: Vec<f64> = (0..r * inp)
                .map(|i| ((i * 37 % 17) as f64 - 8.0) / 5.0)
                .collect();
            let b: Vec<f64> = (0..out * r)
                .map(|i| ((i * 23 % 13) as f64 - 6.0) / 4.0)
                .collect();
            let got = prototype_of_factors(&a, &b, r, inp, out);
            let want = dense_top_vector(&a, &b, r, inp, out);
            let dot: f64 = got.iter().zip(&want).map(|(g, w)| f64::from(*g) * w).sum();
            assert!(
                (dot.abs() - 1.0).abs() < 1e-5,
                "r={r}: |<got, want>| = {dot}"
            );
            let largest = got
                .iter()
                .fold(0f32, |m, &x| if x.abs() > m.abs() { x } else { m });
            assert!(largest > 0.0, "sign convention");
        }
    }
}
