//! Arrow prototypes: for each expert and module, the top right singular vector of `B A`, the
//! input direction the expert amplifies most (Ostapenko et al. 2024). Computed from the small
//! `r × r` problem, never forming the `out × in` product: `(BA)ᵀ(BA) = Aᵀ G A` with
//! `G = BᵀB`, whose top eigenvector is `Aᵀ y` for the top eigenvector `y` of `G H`,
//! `H = A Aᵀ`; with `H = L Lᵀ` that is `y = L⁻ᵀ z`, `z` the top eigenvector of the symmetric
//! `Lᵀ G L`. The sign is fixed so the largest-magnitude component is positive.

use moerge_library::{Adapter, LoraModule};

use crate::linalg;

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
    let l = linalg::cholesky(&h, r);
    // S = Lᵀ G L.
    let gl = matmul(&g, &l, r);
    let mut s = vec![0f64; r * r];
    for i in 0..r {
        for j in 0..r {
            s[i * r + j] = (0..r).map(|k| l[k * r + i] * gl[k * r + j]).sum();
        }
    }
    let (_, vectors) = linalg::symmetric_eigen(&s, r);
    let z: Vec<f64> = (0..r).map(|k| vectors[k * r]).collect();
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
