//! Small dense linear algebra in f64 for the r × r problems of LoRA factors (Arrow
//! prototypes, SVD truncation of merges): thin QR, symmetric eigendecomposition.
//! Sizes are a few dozen, so plain loops are clear and fast enough.

/// The SDK's Jacobi eigen-decomposition (plugins and the engine share one implementation):
/// eigenvalues descending, unit eigenvectors as the columns of a row-major `n × n` matrix.
pub(crate) use moerge_sdk::linalg::symmetric_eigen;

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

/// The SVD of a product `B A` (`a_t` = `Aᵀ` `[in, R]`, `b` `[out, R]`) without forming it:
/// thin QRs `Aᵀ = Q_a R_a`, `B = Q_b R_b`, so `B A = Q_b M Q_aᵀ` with the `R × R` core
/// `M = R_b R_aᵀ`, whose right singular vectors come from `MᵀM = V Σ² Vᵀ`.
pub(crate) struct ProductSvd {
    pub qa: Vec<f64>,
    pub qb: Vec<f64>,
    pub m: Vec<f64>,
    /// Eigenvalues of `MᵀM` (σ², descending) and its unit eigenvectors as columns.
    pub values: Vec<f64>,
    pub v: Vec<f64>,
}

pub(crate) fn product_svd(a_t: &[f64], b: &[f64], r: usize, inp: usize, out: usize) -> ProductSvd {
    let (qa, ra) = thin_qr(a_t, inp, r);
    let (qb, rb) = thin_qr(b, out, r);
    let m: Vec<f64> = (0..r * r)
        .map(|idx| {
            (0..r)
                .map(|t| rb[(idx / r) * r + t] * ra[(idx % r) * r + t])
                .sum()
        })
        .collect();
    let mtm: Vec<f64> = (0..r * r)
        .map(|idx| {
            (0..r)
                .map(|t| m[t * r + idx / r] * m[t * r + idx % r])
                .sum()
        })
        .collect();
    let (values, v) = symmetric_eigen(&mtm, r);
    ProductSvd {
        qa,
        qb,
        m,
        values,
        v,
    }
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
