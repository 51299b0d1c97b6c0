//! Small dense linear algebra in f64 for the r × r problems of LoRA factors (Arrow
//! prototypes, SVD truncation of merges): thin QR, symmetric eigendecomposition.
//! Sizes are a few dozen, so plain loops are clear and fast enough.

/// Eigenvalues (descending) and unit eigenvectors (as columns of an `n × n` row-major
/// matrix) of the symmetric `s`, by cyclic Jacobi rotations.
pub(crate) fn symmetric_eigen(s: &[f64], n: usize) -> (Vec<f64>, Vec<f64>) {
    let mut s = s.to_vec();
    let mut v: Vec<f64> = (0..n * n)
        .map(|i| if i % (n + 1) == 0 { 1.0 } else { 0.0 })
        .collect();
    let scale: f64 = s.iter().map(|x| x * x).sum::<f64>().max(1e-300);
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| s[i * n + j].powi(2))
            .sum();
        if off <= 1e-30 * scale {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = s[p * n + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (s[q * n + q] - s[p * n + p]) / (2.0 * apq);
                let t = if theta == 0.0 {
                    1.0
                } else {
                    theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt())
                };
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
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| s[j * n + j].total_cmp(&s[i * n + i]));
    let values = order.iter().map(|&i| s[i * n + i]).collect();
    let mut vectors = vec![0f64; n * n];
    for (col, &i) in order.iter().enumerate() {
        for k in 0..n {
            vectors[k * n + col] = v[k * n + i];
        }
    }
    (values, vectors)
}

/// Thin QR of `m` (`rows × cols`, rows ≥ cols): `Q` (`rows × cols`, orthonormal columns) and
/// upper-triangular `R` (`cols × cols`), by Gram–Schmidt with re-orthogonalisation.
pub(crate) fn thin_qr(m: &[f64], rows: usize, cols: usize) -> (Vec<f64>, Vec<f64>) {
    let mut q = m.to_vec();
    let mut r = vec![0f64; cols * cols];
    for j in 0..cols {
        // Two passes keep Q orthogonal to working precision.
        for _ in 0..2 {
            for i in 0..j {
                let dot: f64 = (0..rows).map(|k| q[k * cols + i] * q[k * cols + j]).sum();
                r[i * cols + j] += dot;
                for k in 0..rows {
                    q[k * cols + j] -= dot * q[k * cols + i];
                }
            }
        }
        let norm = (0..rows)
            .map(|k| q[k * cols + j].powi(2))
            .sum::<f64>()
            .sqrt();
        r[j * cols + j] = norm;
        for k in 0..rows {
            q[k * cols + j] = if norm > 1e-300 {
                q[k * cols + j] / norm
            } else {
                0.0
            };
        }
    }
    (q, r)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matmul(a: &[f64], b: &[f64], n: usize, k: usize, m: usize) -> Vec<f64> {
        (0..n * m)
            .map(|idx| {
                (0..k)
                    .map(|t| a[(idx / m) * k + t] * b[t * m + idx % m])
                    .sum()
            })
            .collect()
    }

    #[test]
    fn qr_reconstructs_and_is_orthonormal() {
        let (rows, cols) = (7, 4);
        let m: Vec<f64> = (0..rows * cols)
            .map(|i| ((i * 37 % 11) as f64 - 5.0) / 3.0)
            .collect();
        let (q, r) = thin_qr(&m, rows, cols);
        let back = matmul(&q, &r, rows, cols, cols);
        assert!(back.iter().zip(&m).all(|(a, b)| (a - b).abs() < 1e-12));
        for i in 0..cols {
            for j in 0..cols {
                let dot: f64 = (0..rows).map(|k| q[k * cols + i] * q[k * cols + j]).sum();
                assert!((dot - f64::from(u8::from(i == j))).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn eigen_decomposes_a_symmetric_matrix() {
        let n = 5;
        let a: Vec<f64> = (0..n * n).map(|i| ((i * 13 % 7) as f64) - 3.0).collect();
        let s: Vec<f64> = (0..n * n).map(|i| a[i] + a[(i % n) * n + i / n]).collect();
        let (values, vectors) = symmetric_eigen(&s, n);
        assert!(values.windows(2).all(|w| w[0] >= w[1]));
        for c in 0..n {
            let v: Vec<f64> = (0..n).map(|k| vectors[k * n + c]).collect();
            let sv = matmul(&s, &v, n, n, 1);
            assert!(sv
                .iter()
                .zip(&v)
                .all(|(x, y)| (x - values[c] * y).abs() < 1e-9));
        }
    }
}
