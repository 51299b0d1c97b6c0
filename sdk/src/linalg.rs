//! Small dense linear algebra for policies, in f64 and without dependencies: the symmetric
//! eigen-decomposition that truncated SVDs through a Gram matrix need (an `N × N` problem for
//! `N` experts, or `r × r` for one module's factors), so plugins never form large deltas; and,
//! for merges that do need entries (TIES, DARE), a module's dense delta ([`dense_delta`]) and
//! the truncated SVD that turns a merged delta back into factors ([`low_rank`]).
//!
//! ```
//! use moerge_sdk::linalg::symmetric_eigen;
//! let (values, vectors) = symmetric_eigen(&[2.0, 1.0, 1.0, 2.0], 2);
//! assert!((values[0] - 3.0).abs() < 1e-12 && (values[1] - 1.0).abs() < 1e-12);
//! // Column 0 is the eigenvector of 3: (1, 1) / sqrt(2), up to sign.
//! assert!((vectors[0].abs() - 0.5f64.sqrt()).abs() < 1e-12);
//! ```

/// Eigenvalues (descending) and eigenvectors of the symmetric `n × n` matrix `a` (row-major),
/// by cyclic Jacobi rotations. The vectors come back row-major `n × n`, column `j` the unit
/// eigenvector of value `j`. Only the symmetric part of `a` is used.
///
/// # Panics
/// If `a` does not have `n * n` values.
pub fn symmetric_eigen(a: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    assert_eq!(
        a.len(),
        n * n,
        "symmetric_eigen: {n} x {n} needs {} values",
        n * n
    );
    let mut m: Vec<f64> = (0..n * n)
        .map(|k| 0.5 * (a[k] + a[(k % n) * n + k / n]))
        .collect();
    let mut v = vec![0.0; n * n];
    for i in 0..n {
        v[i * n + i] = 1.0;
    }
    let norm: f64 = m.iter().map(|x| x * x).sum::<f64>().sqrt();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| m[i * n + j] * m[i * n + j])
            .sum::<f64>()
            .sqrt();
        if off <= 1e-15 * norm.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = m[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (m[q * n + q] - m[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // m <- Jᵀ m J, rotating rows and columns p and q.
                for k in 0..n {
                    let (mkp, mkq) = (m[k * n + p], m[k * n + q]);
                    m[k * n + p] = c * mkp - s * mkq;
                    m[k * n + q] = s * mkp + c * mkq;
                }
                for k in 0..n {
                    let (mpk, mqk) = (m[p * n + k], m[q * n + k]);
                    m[p * n + k] = c * mpk - s * mqk;
                    m[q * n + k] = s * mpk + c * mqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| m[j * n + j].total_cmp(&m[i * n + i]));
    let values = order.iter().map(|&i| m[i * n + i]).collect();
    let mut vectors = vec![0.0; n * n];
    for (col, &i) in order.iter().enumerate() {
        for k in 0..n {
            vectors[k * n + col] = v[k * n + i];
        }
    }
    (values, vectors)
}

/// `scale · B A` of one module as a dense `out × in` matrix (row-major): for the small models
/// and one-module-at-a-time merges that need entries (TIES, DARE, magnitude pruning).
pub fn dense_delta(m: &crate::policy::ModuleFactors<'_>) -> Vec<f64> {
    let (rank, inputs) = (m.rank, m.in_features);
    (0..m.out_features * inputs)
        .map(|k| {
            let (i, j) = (k / inputs, k % inputs);
            let dot: f64 = (0..rank)
                .map(|t| f64::from(m.b[i * rank + t]) * f64::from(m.a[t * inputs + j]))
                .sum();
            m.scale * dot
        })
        .collect()
}

/// The best rank-`rank` factors of the `out × in` matrix `m` (row-major): `(a, b)` with `a`
/// `[rank, in]` and `b` `[out, rank]`, `b a` the truncated SVD of `m`. Computed from the
/// eigenvectors of the smaller Gram matrix, so no division by small singular values.
pub fn low_rank(m: &[f64], out: usize, inputs: usize, rank: usize) -> (Vec<f64>, Vec<f64>) {
    let at = |i: usize, j: usize| m[i * inputs + j];
    if inputs <= out {
        // mᵀm = V Σ² Vᵀ: a = V_rᵀ, b = m V_r.
        let gram: Vec<f64> = (0..inputs * inputs)
            .map(|k| {
                (0..out)
                    .map(|t| at(t, k / inputs) * at(t, k % inputs))
                    .sum()
            })
            .collect();
        let (_, v) = symmetric_eigen(&gram, inputs);
        let a: Vec<f64> = (0..rank * inputs)
            .map(|k| v[(k % inputs) * inputs + k / inputs])
            .collect();
        let b = (0..out * rank)
            .map(|k| {
                (0..inputs)
                    .map(|j| at(k / rank, j) * a[(k % rank) * inputs + j])
                    .sum()
            })
            .collect();
        (a, b)
    } else {
        // m mᵀ = U Σ² Uᵀ: b = U_r, a = U_rᵀ m.
        let gram: Vec<f64> = (0..out * out)
            .map(|k| (0..inputs).map(|t| at(k / out, t) * at(k % out, t)).sum())
            .collect();
        let (_, u) = symmetric_eigen(&gram, out);
        let b: Vec<f64> = (0..out * rank)
            .map(|k| u[(k / rank) * out + k % rank])
            .collect();
        let a = (0..rank * inputs)
            .map(|k| {
                (0..out)
                    .map(|i| b[i * rank + k / inputs] * at(i, k % inputs))
                    .sum()
            })
            .collect();
        (a, b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reconstructs_random_symmetric_matrices() {
        let mut seed = 7u64;
        let mut next = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        for n in [1, 2, 5, 12] {
            let x: Vec<f64> = (0..n * n).map(|_| next()).collect();
            // a = x xᵀ: symmetric positive semi-definite, like a Gram matrix.
            let a: Vec<f64> = (0..n * n)
                .map(|k| {
                    (0..n)
                        .map(|t| x[(k / n) * n + t] * x[(k % n) * n + t])
                        .sum()
                })
                .collect();
            let (values, vectors) = symmetric_eigen(&a, n);
            assert!(values.windows(2).all(|w| w[0] >= w[1]), "{values:?}");
            for i in 0..n {
                for j in 0..n {
                    let rebuilt: f64 = (0..n)
                        .map(|k| vectors[i * n + k] * values[k] * vectors[j * n + k])
                        .sum();
                    assert!((rebuilt - a[i * n + j]).abs() < 1e-10, "n={n} ({i},{j})");
                    let dot: f64 = (0..n)
                        .map(|k| vectors[k * n + i] * vectors[k * n + j])
                        .sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((dot - want).abs() < 1e-10, "orthonormal n={n} ({i},{j})");
                }
            }
        }
    }
}
