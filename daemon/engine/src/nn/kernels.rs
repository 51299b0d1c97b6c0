//! Fused CPU kernels for the two element-wise hot spots of a small transformer, where candle's
//! generic ops spend most of a forward pass: tanh-GELU (glibc's `tanhf` is slow) and the
//! scaled, causally masked softmax of attention (three passes and a mask tensor otherwise).
//!
//! Both compute the same function as the composed ops, in f32, split over rayon's threads,
//! and both define a backward pass so the trainer can differentiate through them.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Elements per parallel work item: large enough to amortise scheduling.
const CHUNK: usize = 8192;

/// `sqrt(2 / pi)`, the constant of the tanh approximation of GELU.
const SQRT_2_OVER_PI: f32 = 0.797_884_6;

/// transformers' `gelu_new` / `gelu_pytorch_tanh`:
/// `0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`, computed as the identical
/// `x · sigmoid(2 sqrt(2/pi) (x + 0.044715 x^3))`, which needs one `exp` instead of a `tanh`.
pub(crate) fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    let y = x.to_dtype(DType::F32)?.contiguous()?.apply_op1(GeluTanh)?;
    y.to_dtype(dtype)
}

struct GeluTanh;

#[inline(always)]
fn gelu_one(x: f32) -> f32 {
    let u = 2.0 * SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x);
    x / (1.0 + fast_exp(-u))
}

/// `e^x` in f32 to about 1e-7 relative error (Cephes' `expf` polynomial after reducing by
/// powers of two). Unlike a call into libm it inlines, so the loops above vectorise;
/// glibc's scalar `expf` was an eighth of a forward pass.
#[inline(always)]
fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 split in two so `x - k ln 2` stays exact for the k that occur.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5 · 2^23 rounds to the nearest integer without a call.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let k = (x * LOG2E + ROUND) - ROUND;
    let r = x - k * LN2_HI - k * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = p * r * r + r + 1.0;
    // 2^k built from its exponent bits; k is within [-126, 127] after the clamp.
    er * f32::from_bits(((k as i32 + 127) as u32) << 23)
}

impl CustomOp1 for GeluTanh {
    fn name(&self) -> &'static str {
        "moerge-gelu-tanh"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_contiguous(storage, layout, self.name())?;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(CHUNK)
            .zip(src.par_chunks(CHUNK))
            .for_each(|(o, i)| simd::gelu(o, i));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // d/dx [x s(u)] = s(u) + x s(u) (1 - s(u)) u',  u = 2c (x + 0.044715 x^3).
        let c = f64::from(2.0 * SQRT_2_OVER_PI);
        let x2 = arg.sqr()?;
        let u = ((arg * (x2.clone() * 0.044_715)?.affine(1.0, 1.0)?)? * c)?;
        let du = ((x2 * (3.0 * 0.044_715))?.affine(1.0, 1.0)? * c)?;
        let s = candle_nn::ops::sigmoid(&u)?;
        let one_minus_s = s.affine(-1.0, 1.0)?;
        let d = (&s + ((arg * &s)? * one_minus_s)?.mul(&du)?)?;
        Ok(Some(grad.mul(&d)?))
    }
}

/// Softmax over the last dim of `scale · scores`, where `scores` is `[b, h, t, s]` and query
/// `i` may only see keys `0 ..= offset + i` (causal, with `offset = s - t` cached keys);
/// masked entries come out exactly 0. Returns f32.
pub(crate) fn causal_softmax(scores: &Tensor, scale: f64) -> Result<Tensor> {
    let (_, _, t, s) = scores.dims4()?;
    if s < t || scale <= 0.0 {
        candle_core::bail!("causal_softmax: needs keys >= queries and scale > 0, got {t} queries, {s} keys, scale {scale}");
    }
    scores
        .to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(CausalSoftmax {
            scale: scale as f32,
            t,
            s,
        })
}

struct CausalSoftmax {
    scale: f32,
    t: usize,
    s: usize,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "moerge-causal-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_contiguous(storage, layout, self.name())?;
        let (t, s, scale) = (self.t, self.s, self.scale);
        let offset = s - t;
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(s)
            .zip(src.par_chunks(s))
            .enumerate()
            .for_each(|(row, (o, i))| {
                let visible = offset + row % t + 1;
                simd::softmax_row(&mut o[..visible], &i[..visible], scale);
            });
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // y = softmax(scale x + mask): dx = scale · y ⊙ (g - Σ g ⊙ y); masked y are 0.
        let dot = (grad * res)?.sum_keepdim(D::Minus1)?;
        let d = (res * grad.broadcast_sub(&dot)?)?;
        Ok(Some((d * f64::from(self.scale))?))
    }
}

/// Rotary position embedding fused with the split into heads: `x` `[b, t, heads · d]` (a
/// projection's output) becomes `[b, heads, t, d]` with the first `2 · half` channels of every
/// head rotated as transformers' `rotate_half` does, for positions `offset .. offset + t`.
/// One pass, where the composed version copies for the transpose, copies the rotated slice,
/// rotates and concatenates. `cos` / `sin` are `[positions, half]`, row-major.
pub(crate) fn rope_heads(
    x: &Tensor,
    heads: usize,
    head_dim: usize,
    tables: (&Arc<[f32]>, &Arc<[f32]>, usize),
    offset: usize,
) -> Result<Tensor> {
    let (cos, sin, half) = tables;
    let (_, t, width) = x.dims3()?;
    if width != heads * head_dim || 2 * half > head_dim || (offset + t) * half > cos.len() {
        candle_core::bail!(
            "rope_heads: {width} channels for {heads} heads of {head_dim}, rotating {} of them at positions {offset}..{}",
            2 * half,
            offset + t
        );
    }
    let dtype = x.dtype();
    let op = RopeHeads {
        cos: Arc::clone(cos),
        sin: Arc::clone(sin),
        half,
        heads,
        head_dim,
        offset,
    };
    x.to_dtype(DType::F32)?
        .contiguous()?
        .apply_op1(op)?
        .to_dtype(dtype)
}

struct RopeHeads {
    cos: Arc<[f32]>,
    sin: Arc<[f32]>,
    half: usize,
    heads: usize,
    head_dim: usize,
    offset: usize,
}

impl CustomOp1 for RopeHeads {
    fn name(&self) -> &'static str {
        "moerge-rope-heads"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_contiguous(storage, layout, self.name())?;
        let (b, t, width) = layout.shape().dims3()?;
        let (h, d, half) = (self.heads, self.head_dim, self.half);
        let mut out = vec![0f32; src.len()];
        // One output block per (batch, head): t rows of d channels.
        out.par_chunks_mut(t * d)
            .enumerate()
            .for_each(|(bh, block)| {
                let (bi, hi) = (bh / h, bh % h);
                for (ti, row) in block.chunks_exact_mut(d).enumerate() {
                    let from = (bi * t + ti) * width + hi * d;
                    let x = &src[from..from + d];
                    let pos = (self.offset + ti) * half;
                    let (c, s) = (&self.cos[pos..pos + half], &self.sin[pos..pos + half]);
                    for i in 0..half {
                        let (x1, x2) = (x[i], x[i + half]);
                        row[i] = x1 * c[i] - x2 * s[i];
                        row[i + half] = x2 * c[i] + x1 * s[i];
                    }
                    row[2 * half..].copy_from_slice(&x[2 * half..]);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, h, t, d))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // The rotation is orthogonal: its gradient rotates back by the same angle, then the
        // heads are merged again.
        let (b, h, t, d) = grad.dims4()?;
        let half = self.half;
        let rows = self.offset * half..(self.offset + t) * half;
        let c = Tensor::from_slice(&self.cos[rows.clone()], (1, 1, t, half), grad.device())?;
        let s = Tensor::from_slice(&self.sin[rows], (1, 1, t, half), grad.device())?;
        let g1 = grad.narrow(3, 0, half)?;
        let g2 = grad.narrow(3, half, half)?;
        let r1 = (g1.broadcast_mul(&c)? + g2.broadcast_mul(&s)?)?;
        let r2 = (g2.broadcast_mul(&c)? - g1.broadcast_mul(&s)?)?;
        let mut parts = vec![r1, r2];
        if 2 * half < d {
            parts.push(grad.narrow(3, 2 * half, d - 2 * half)?);
        }
        let g = Tensor::cat(&parts, 3)?
            .transpose(1, 2)?
            .reshape((b, t, h * d))?;
        Ok(Some(g))
    }
}

/// The loop bodies, compiled twice: for the baseline target and, where the CPU has them, with
/// AVX2 and FMA (twice the vector width), chosen at run time.
mod simd {
    use super::{fast_exp, fold_lanes, gelu_one};

    #[inline(always)]
    fn gelu_body(o: &mut [f32], i: &[f32]) {
        o.iter_mut().zip(i).for_each(|(o, &x)| *o = gelu_one(x));
    }

    #[inline(always)]
    fn softmax_body(o: &mut [f32], i: &[f32], scale: f32) {
        // Separate simple passes so each one vectorises (a running sum in the exp loop
        // would serialise it).
        let max = fold_lanes(i, f32::NEG_INFINITY, f32::max);
        for (o, &x) in o.iter_mut().zip(i) {
            *o = fast_exp((x - max) * scale);
        }
        let inv = 1.0 / fold_lanes(o, 0.0, |a, b| a + b);
        o.iter_mut().for_each(|o| *o *= inv);
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn gelu_avx2(o: &mut [f32], i: &[f32]) {
        gelu_body(o, i)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn softmax_avx2(o: &mut [f32], i: &[f32], scale: f32) {
        softmax_body(o, i, scale)
    }

    fn has_avx2() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// `o[j] = gelu(i[j])`.
    pub(super) fn gelu(o: &mut [f32], i: &[f32]) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU was just checked to support the enabled features.
            return unsafe { gelu_avx2(o, i) };
        }
        gelu_body(o, i)
    }

    /// `o = softmax(scale · i)` over one row.
    pub(super) fn softmax_row(o: &mut [f32], i: &[f32], scale: f32) {
        #[cfg(target_arch = "x86_64")]
        if has_avx2() {
            // SAFETY: the CPU was just checked to support the enabled features.
            return unsafe { softmax_avx2(o, i, scale) };
        }
        softmax_body(o, i, scale)
    }
}

/// Folds `v` with `f` in eight independent lanes, then across lanes: the same result up to
/// float reassociation, and vectorisable, unlike one sequential accumulator.
#[inline(always)]
fn fold_lanes(v: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 8];
    let chunks = v.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = f(*a, x);
        }
    }
    rest.iter()
        .fold(acc.into_iter().fold(init, &f), |a, &x| f(a, x))
}

pub(super) fn f32_contiguous<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    op: &str,
) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: expects f32 storage");
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: expects a contiguous tensor");
    };
    Ok(&data[start..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    fn input(shape: &[usize]) -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * i as f64 / 200_000.0;
            let want = x.exp();
            let got = fast_exp(x as f32) as f64;
            // Compare with e^(x as f32): the input itself is rounded to f32 first.
            let want_f32_input = (x as f32 as f64).exp();
            worst = worst.max(((got - want_f32_input) / want_f32_input).abs());
            assert!(got.is_finite() && want.is_finite());
        }
        assert!(worst < 3e-7, "relative error {worst}");
        // Out-of-range inputs saturate instead of overflowing to inf or denormals.
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
        assert!(fast_exp(1000.0).is_finite());
        assert!(fast_exp(f32::NAN).is_nan());
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let x = input(&[3, 1000]);
        // candle's own tanh-GELU is the reference (the formula transformers uses).
        let want = x.gelu().unwrap();
        assert!(max_diff(&gelu_tanh(&x).unwrap(), &want) < 1e-5);
    }

    #[test]
    fn gelu_gradient_matches_the_composed_ops() {
        let x = input(&[5, 300]);
        let ours = Var::from_tensor(&x).unwrap();
        let theirs = Var::from_tensor(&x).unwrap();
        let g1 = gelu_tanh(ours.as_tensor())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = theirs
            .as_tensor()
            .gelu()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_diff(
            g1.get(ours.as_tensor()).unwrap(),
            g2.get(theirs.as_tensor()).unwrap(),
        );
        assert!(d < 1e-4, "gradient differs by {d}");
    }

    /// The composed reference: scale, add a -inf mask, softmax.
    fn reference(x: &Tensor, scale: f64) -> Tensor {
        let (_, _, t, s) = x.dims4().unwrap();
        let offset = s - t;
        let mask: Vec<f32> = (0..t)
            .flat_map(|i| {
                (0..s).map(move |j| {
                    if j > offset + i {
                        f32::NEG_INFINITY
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let mask = Tensor::from_vec(mask, (t, s), &Device::Cpu).unwrap();
        // The composed softmax (not candle's fused kernel) so autograd can run through it.
        candle_nn::ops::softmax(
            &(x * scale).unwrap().broadcast_add(&mask).unwrap(),
            D::Minus1,
        )
        .unwrap()
    }

    #[test]
    fn causal_softmax_matches_mask_and_softmax() {
        for (t, s) in [(7, 7), (1, 9), (3, 8)] {
            let x = input(&[2, 3, t, s]);
            let got = causal_softmax(&x, 0.25).unwrap();
            assert!(max_diff(&got, &reference(&x, 0.25)) < 1e-6, "t={t} s={s}");
        }
    }

    /// The composed reference: split heads, rotate the first `2 half` channels of each.
    fn rope_reference(
        x: &Tensor,
        heads: usize,
        d: usize,
        cos: &[f32],
        sin: &[f32],
        half: usize,
        offset: usize,
    ) -> Tensor {
        let (b, t, _) = x.dims3().unwrap();
        let x = x
            .reshape((b, t, heads, d))
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        let c = Tensor::from_slice(
            &cos[offset * half..(offset + t) * half],
            (t, half),
            &Device::Cpu,
        )
        .unwrap();
        let s = Tensor::from_slice(
            &sin[offset * half..(offset + t) * half],
            (t, half),
            &Device::Cpu,
        )
        .unwrap();
        let rot = candle_nn::rotary_emb::rope_slow(
            &x.narrow(3, 0, 2 * half).unwrap().contiguous().unwrap(),
            &c,
            &s,
        )
        .unwrap();
        if 2 * half == d {
            return rot;
        }
        Tensor::cat(&[&rot, &x.narrow(3, 2 * half, d - 2 * half).unwrap()], 3).unwrap()
    }

    #[test]
    fn rope_heads_matches_transpose_and_rope() {
        let (heads, d, positions) = (3, 8, 20);
        for half in [4, 2] {
            let angles: Vec<f32> = (0..positions * half).map(|i| i as f32 * 0.37).collect();
            let cos: Arc<[f32]> = angles.iter().map(|a| a.cos()).collect();
            let sin: Arc<[f32]> = angles.iter().map(|a| a.sin()).collect();
            let x = input(&[2, 5, heads * d]);
            for offset in [0, 7] {
                let got = rope_heads(&x, heads, d, (&cos, &sin, half), offset).unwrap();
                let want = rope_reference(&x, heads, d, &cos, &sin, half, offset);
                assert!(max_diff(&got, &want) < 1e-5, "half {half} offset {offset}");

                let ours = Var::from_tensor(&x).unwrap();
                let theirs = Var::from_tensor(&x).unwrap();
                let w = input(&[2, heads, 5, d]).cos().unwrap();
                let g1 = (rope_heads(ours.as_tensor(), heads, d, (&cos, &sin, half), offset)
                    .unwrap()
                    * &w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g2 = (rope_reference(theirs.as_tensor(), heads, d, &cos, &sin, half, offset)
                    * &w)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let diff = max_diff(
                    g1.get(ours.as_tensor()).unwrap(),
                    g2.get(theirs.as_tensor()).unwrap(),
                );
                assert!(diff < 1e-5, "gradient differs by {diff}");
            }
        }
    }

    #[test]
    fn causal_softmax_gradient_matches_the_composed_ops() {
        let x = input(&[2, 2, 5, 5]);
        let w = input(&[2, 2, 5, 5]).sin().unwrap();
        let ours = Var::from_tensor(&x).unwrap();
        let theirs = Var::from_tensor(&x).unwrap();
        let g1 = (causal_softmax(ours.as_tensor(), 0.3).unwrap() * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g2 = (reference(theirs.as_tensor(), 0.3) * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let d = max_diff(
            g1.get(ours.as_tensor()).unwrap(),
            g2.get(theirs.as_tensor()).unwrap(),
        );
        assert!(d < 1e-5, "gradient differs by {d}");
    }
}
