//! Arrow prototypes: for each expert and module, the top right singular vector of `B A`, the
//! input direction the expert amplifies most (Ostapenko et al. 2024). Computed from the small
//! `r × r` problem, never forming the `out × in` product: `(BA)ᵀ(BA) = Aᵀ G A` with
//! `G = BᵀB`, whose top eigenvector is `Aᵀ y` for the top eigenvector `y` of `G H`,
//! `H = A Aᵀ`; with `H = L Lᵀ` that is `y = L⁻ᵀ z`, `z` the top eigenvector of the symmetric
//! `Lᵀ G L`. The sign is fixed so the largest-magnitude component is positive.

use moerge_library::{Adapter, LoraModule};

/// The unit prototype (length `in_features`) of one expert's module.
pub fn prototype(adapter: &Adapter, module: &LoraModule) -> Vec<f32> {
    let (r, inp, out) = (module.rank, module.in_features, module.out_features);
    let a: Vec<f64> = adapter
        .tensor_f32(&module.a)
        .into_iter()
        .map(f64::from)
        .collect(); // r × in
    let b: Vec<f64> = adapter
        .tensor_f32(&module.b)
        .into_iter()
        .map(f64::from)
        .collect(); // out × r
    let mut g = vec![0f64; r * r];
    let mut h = vec![0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            g[i * r + j] = (0..out).map(|o| b[o * r + i] * b[o * r + j]).sum();
            h[i * r + j] = (0..inp).map(|k| a[i * inp + k] * a[j * inp + k]).sum();
        }
    }
    let l = cholesky(&h, r);
    // S = Lᵀ G L.
    let gl = matmul(&g, &l, r);
    let mut s = vec![0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            s[i * r + j] = (0..r).map(|k| l[k * r + i] * gl[k * r + j]).sum();
        }
    }
    let z = top_eigenvector(&mut s, r);
    // Solve Lᵀ y = z (Lᵀ is upper triangular).
    let mut y = vec![0f64; r];
    for i in (0..r).rev() {
        let rest: f64 = (i + 1..r).map(|k| l[k * r + i] * y[k]).sum();
        y[i] = (z[i] - rest) / l[i * r + i];
    }
    let mut v: Vec<f64> = (0..inp)
        .map(|k| (0..r).map(|i| a[i * inp + k] * y[i]).sum())
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

fn matmul(x: &[f64], y: &[f64], n: usize) -> Vec<f64> {
    let mut out = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..n {
            out[i * n + j] = (0..n).map(|k| x[i * n + k] * y[k * n + j]).sum();
        }
    }
    out
}

/// Lower-triangular `L` with `L Lᵀ = m` (a tiny ridge keeps a rank-deficient `A Aᵀ` usable).
fn cholesky(m: &[f64], n: usize) -> Vec<f64> {
    let ridge = 1e-12
        * (0..n)
            .map(|i| m[i * n + i])
            .fold(0f64, f64::max)
            .max(1e-300);
    let mut l = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let dot: f64 = (0..j).map(|k| l[i * n + k] * l[j * n + k]).sum();
            if i == j {
                l[i * n + i] = (m[i * n + i] + ridge - dot).max(ridge).sqrt();
            } else {
                l[i * n + j] = (m[i * n + j] - dot) / l[j * n + j];
            }
        }
    }
    l
}

/// Eigenvector of the largest eigenvalue of the symmetric `s` (cyclic Jacobi; `s` is
/// destroyed).
fn top_eigenvector(s: &mut [f64], n: usize) -> Vec<f64> {
    let mut v: Vec<f64> = (0..n * n)
        .map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 })
        .collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| s[i * n + j].powi(2))
            .sum();
        if off < 1e-30 {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = s[p * n + q];
                if apq.abs() < 1e-300 {
                    continue;
                }
                let theta = (s[q * n + q] - s[p * n + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * c;
                for k in 0..n {
                    let (skp, skq) = (s[k * n + p], s[k * n + q]);
                    s[k * n + p] = c * skp - sn * skq;
                    s[k * n + q] = sn * skp + c * skq;
                }
                for k in 0..n {
                    let (spk, sqk) = (s[p * n + k], s[q * n + k]);
                    s[p * n + k] = c * spk - sn * sqk;
                    s[q * n + k] = sn * spk + c * sqk;
                }
                for k in 0..n {
                    let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                    v[k * n + p] = c * vkp - sn * vkq;
                    v[k * n + q] = sn * vkp + c * vkq;
                }
            }
        }
    }
    let top = (0..n)
        .max_by(|&i, &j| s[i * n + i].total_cmp(&s[j * n + j]))
        .unwrap_or(0);
    (0..n).map(|k| v[k * n + top]).collect()
}
