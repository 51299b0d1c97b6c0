//! The top-k softmax of routing as one kernel: per row, the softmax of `scale · x` over the
//! `k` largest entries (ties to the lower index), exactly 0 elsewhere. The choice is made
//! where the scores live, in one pass over each row (no sort ops, no thread pool: rows of a
//! few experts are far too small for either), and the result is differentiable in the kept
//! scores, so serving and fitting route through the same code.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

use super::kernels::f32_contiguous;

/// Weights `[.., U]` (f32) from scores `[.., U]`: per row, softmax of `scale · score` over the
/// `top_k` largest scores (ties broken by position), exactly 0 elsewhere.
pub(crate) fn top_k_softmax(scores: &Tensor, top_k: usize, scale: f64) -> Result<Tensor> {
    let units = scores.dim(D::Minus1)?;
    if top_k == 0 || top_k > units || scale <= 0.0 {
        candle_core::bail!(
            "top_k_softmax: needs 1 <= k <= {units} and scale > 0, got k {top_k}, scale {scale}"
        );
    }
    scores
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(TopKSoftmax {
            top_k,
            scale,
            units,
        })
}

struct TopKSoftmax {
    top_k: usize,
    scale: f64,
    units: usize,
}

impl CustomOp1 for TopKSoftmax {
    fn name(&self) -> &'static str {
        "moerge-top-k-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_contiguous(storage, layout, self.name())?;
        let (k, u) = (self.top_k, self.units);
        let mut out = vec![0f32; src.len()];
        let mut order: Vec<usize> = Vec::with_capacity(u);
        let mut weights = vec![0f64; k];
        for (row, coeffs) in src.chunks_exact(u).zip(out.chunks_exact_mut(u)) {
            order.clear();
            order.extend(0..u);
            if k < u {
                // The k largest first (ties to the lower index); their order does not matter.
                order.select_nth_unstable_by(k - 1, |&i, &j| {
                    row[j].total_cmp(&row[i]).then(i.cmp(&j))
                });
            }
            let kept = &order[..k];
            let max = kept
                .iter()
                .map(|&i| f64::from(row[i]))
                .fold(f64::NEG_INFINITY, f64::max);
            for (w, &i) in weights.iter_mut().zip(kept) {
                *w = ((f64::from(row[i]) - max) * self.scale).exp();
            }
            let sum: f64 = weights.iter().sum();
            for (w, &i) in weights.iter().zip(kept) {
                coeffs[i] = (w / sum) as f32;
            }
        }
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // y = softmax(scale x) over the kept entries: dx = scale · y ⊙ (g - Σ g ⊙ y); the
        // dropped entries have y = 0, so they get none.
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        let d = (res * grad.broadcast_sub(&dot)?)?;
        Ok(Some((d * self.scale)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn check(scores: Vec<f32>, e: usize, k: usize, t: f64, want: Vec<f32>) {
        let n = scores.len() / e;
        let s = Tensor::from_vec(scores, (n, e), &Device::Cpu).unwrap();
        let got = top_k_softmax(&s, k, 1.0 / t)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-6, "{got:?} vs {want:?}");
        }
    }

    #[test]
    fn top_k_softmax_cases() {
        let e1 = (1f64).exp();
        let p = (e1 / (e1 + 1.0)) as f32;
        check(vec![3.0, 1.0, 2.0], 3, 2, 1.0, vec![p, 0.0, 1.0 - p]);
        check(vec![3.0, 1.0, 2.0], 3, 1, 1.0, vec![1.0, 0.0, 0.0]);
        check(vec![1.0, 1.0, 1.0, 1.0], 4, 4, 0.5, vec![0.25; 4]);
        // Ties at the cut are broken by position.
        check(
            vec![1.0, 2.0, 2.0, 2.0],
            4,
            2,
            1.0,
            vec![0.0, 0.5, 0.5, 0.0],
        );
        // Temperature 0.5 doubles the gap: e^2 / (e^2 + 1).
        let q = ((2f64).exp() / ((2f64).exp() + 1.0)) as f32;
        check(
            vec![0.0, 5.0, 4.0, -1.0, 0.0, 0.0],
            3,
            2,
            0.5,
            vec![0.0, q, 1.0 - q, 0.0, 0.5, 0.5],
        );
    }

    /// Gradients equal the composed masked softmax's (what autograd gives the plain ops).
    #[test]
    fn gradients_equal_the_composed_masked_softmax() {
        let values = vec![0.3f32, -1.2, 2.0, 0.7, 1.1, 0.9, -0.4, 0.2];
        let v = Var::from_vec(values, (2, 4), &Device::Cpu).unwrap();
        let g = Tensor::new(
            &[[0.5f32, -1.0, 2.0, 0.25], [1.5, 0.0, -0.5, 3.0]],
            &Device::Cpu,
        )
        .unwrap();
        let (k, scale) = (2, 1.7);
        let ours = top_k_softmax(v.as_tensor(), k, scale).unwrap();
        let ours_grad = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        // Kept: row 0 {2, 0.7 -> units 2, 3}, row 1 {1.1, 0.9 -> units 0, 1}.
        let penalty = Tensor::new(
            &[[-1e9f32, -1e9, 0.0, 0.0], [0.0, 0.0, -1e9, -1e9]],
            &Device::Cpu,
        )
        .unwrap();
        let composed = candle_nn::ops::softmax(
            &((v.as_tensor() * scale).unwrap() + penalty).unwrap(),
            D::Minus1,
        )
        .unwrap();
        let diff = (&ours - &composed)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let composed_grad = (&composed * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let a = ours_grad
            .get(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = composed_grad
            .get(&v)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }
}
