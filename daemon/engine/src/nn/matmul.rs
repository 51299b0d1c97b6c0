//! The big matrix products of a base model's linear layers, `y = x Wᵀ` with `W` `[out, in]`
//! in its own precision (f32 or bf16, never widened as a whole), split over the engine's
//! compute threads by blocks of output rows, accumulating in f32.
//!
//! A few input rows (decoding) stream every weight once through fused dot products: the
//! memory-bound case, where the weights' bytes per token decide the speed. Many rows (a
//! prompt) widen one block of weight rows at a time into a small f32 buffer and hand it to
//! `gemm`'s microkernels, so the widened copy stays in cache. Each output element is summed
//! the same way whatever the thread count, so results do not depend on it. Small layers (the
//! tiny models) keep candle's matmul on the calling thread, where splitting costs more than
//! it saves.

use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Storage, Tensor};
use half::bf16;
use half::slice::HalfFloatSliceExt;

use crate::error::Result;

/// Below this many weights a layer is multiplied by candle on the calling thread.
const MIN_WEIGHTS: usize = 1 << 20;
/// Up to this many input rows, dot products (each weight row read once for all of them).
const DOT_ROWS: usize = 4;
/// Weight rows widened and multiplied at a time on the `gemm` path.
const BLOCK_ROWS: usize = 64;

/// The input rows as the kernels read them: f32, or bf16 (a bf16 model's activations,
/// multiplied by bf16 weights without widening when the CPU has AVX-512 BF16).
#[derive(Clone, Copy)]
pub(crate) enum Rows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// The weights of a layer as the kernels read them.
#[derive(Clone, Copy)]
pub(crate) enum Weights<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
}

/// Whether a layer of `(out, in)` on `device` is multiplied by these kernels (when it tracks
/// no gradients): big enough, on the CPU.
pub(crate) fn uses_kernels((out, inp): (usize, usize), device: &candle_core::Device) -> bool {
    device.is_cpu() && out * inp >= MIN_WEIGHTS
}

/// `x2 Wᵀ` `[n, out]` in `x2`'s dtype for `x2` `[n, in]` and `w` `[out, in]`, through the
/// engine's kernels; `None` when candle should do it (gradients are tracked, the layer is
/// small, the device is not the CPU, or the dtype is another).
pub(crate) fn linear(x2: &Tensor, w: &Tensor) -> Result<Option<Tensor>> {
    let (out, k) = w.dims2()?;
    if !uses_kernels((out, k), x2.device())
        || x2.track_op()
        || w.track_op()
        || !matches!(w.dtype(), DType::F32 | DType::BF16)
        || !w.is_contiguous()
    {
        return Ok(None);
    }
    let n = x2.dim(0)?;
    // A few bf16 rows against bf16 weights stay bf16 where the CPU multiplies them natively.
    let native = n <= DOT_ROWS
        && x2.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && simd::native_bf16();
    let xc = if native {
        x2.contiguous()?
    } else {
        x2.to_dtype(DType::F32)?.contiguous()?
    };
    let (x_storage, x_layout) = xc.storage_and_layout();
    let (w_storage, w_layout) = w.storage_and_layout();
    let (Storage::Cpu(xs), Storage::Cpu(ws)) = (&*x_storage, &*w_storage) else {
        return Ok(None);
    };
    let xr = x_layout.start_offset()..x_layout.start_offset() + n * k;
    let rows = match xs {
        CpuStorage::F32(v) => Rows::F32(&v[xr]),
        CpuStorage::BF16(v) => Rows::Bf16(&v[xr]),
        _ => return Ok(None),
    };
    let start = w_layout.start_offset();
    let weights = match ws {
        CpuStorage::F32(v) => Weights::F32(&v[start..start + out * k]),
        CpuStorage::BF16(v) => Weights::Bf16(&v[start..start + out * k]),
        _ => return Ok(None),
    };
    let y = matmul_t(rows, n, k, weights, out, compute_threads());
    drop((x_storage, w_storage));
    Ok(Some(
        Tensor::from_vec(y, (n, out), x2.device())?.to_dtype(x2.dtype())?,
    ))
}

/// How many threads the kernels split a product over: every core, unless the user capped
/// them with `RAYON_NUM_THREADS` (see [`super::threads::prefer_data_parallelism`]).
pub(crate) fn compute_threads() -> usize {
    static THREADS: OnceLock<usize> = OnceLock::new();
    *THREADS.get_or_init(|| {
        super::threads::user_thread_cap()
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
    })
}

/// The engine's pool of compute threads for the kernels (separate from rayon's global pool,
/// which binaries keep at one thread for candle's small ops).
fn pool() -> &'static rayon::ThreadPool {
    static POOL: OnceLock<rayon::ThreadPool> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(compute_threads())
            .thread_name(|i| format!("moerge-matmul-{i}"))
            .build()
            .expect("the kernel thread pool starts")
    })
}

/// `y [n, out] = x [n, k] · Wᵀ` with the output rows of `W` split into `threads` parts.
pub(crate) fn matmul_t(
    x: Rows<'_>,
    n: usize,
    k: usize,
    w: Weights<'_>,
    out: usize,
    threads: usize,
) -> Vec<f32> {
    let parts = threads.clamp(1, out.div_ceil(BLOCK_ROWS).max(1));
    // Part boundaries on whole blocks, so the work splits the same way for any row count.
    let blocks = out.div_ceil(BLOCK_ROWS);
    let bounds: Vec<(usize, usize)> = (0..parts)
        .map(|p| {
            let first = blocks * p / parts * BLOCK_ROWS;
            let last = (blocks * (p + 1) / parts * BLOCK_ROWS).min(out);
            (first, last)
        })
        .collect();
    let mut y = vec![0f32; n * out];
    let dst = Dst(y.as_mut_ptr());
    let compute = |&(first, last): &(usize, usize)| {
        // SAFETY: parts own disjoint column ranges `first..last` of `y` ([n, out]), which
        // outlives the calls; nothing else touches `y` meanwhile.
        unsafe { rows_product(x, n, k, w, (first, last), &dst, out) }
    };
    if parts == 1 {
        compute(&bounds[0]);
    } else {
        use rayon::prelude::*;
        pool().install(|| bounds.par_iter().for_each(compute));
    }
    y
}

/// The output buffer, shared by the parts that fill disjoint columns of it.
struct Dst(*mut f32);
// SAFETY: parts write disjoint elements (see `matmul_t`).
unsafe impl Sync for Dst {}

thread_local! {
    /// A block of weight rows widened to f32, kept between calls so a prompt's products do
    /// not fault in fresh pages for it every time (scratch only: no request state).
    static WIDENED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Output columns `first..last` of `x Wᵀ` into `dst` (`[n, out]` row-major).
///
/// # Safety
/// `dst` must point to `n * out` floats of which no one else touches columns `first..last`.
unsafe fn rows_product(
    x: Rows<'_>,
    n: usize,
    k: usize,
    w: Weights<'_>,
    (first, last): (usize, usize),
    dst: &Dst,
    out: usize,
) {
    let x = match x {
        Rows::F32(x) => x,
        Rows::Bf16(x) => {
            // Only a few rows against bf16 weights come as bf16 (see `linear`).
            let Weights::Bf16(w) = w else {
                unreachable!("bf16 rows go with bf16 weights")
            };
            for r in first..last {
                for i in 0..n {
                    let v = simd::dot_bf16_bf16(&x[i * k..(i + 1) * k], &w[r * k..(r + 1) * k]);
                    // SAFETY: within the caller's columns of `dst`.
                    unsafe { *dst.0.add(i * out + r) = v };
                }
            }
            return;
        }
    };
    if n <= DOT_ROWS {
        for r in first..last {
            for i in 0..n {
                let xi = &x[i * k..(i + 1) * k];
                let v = match w {
                    Weights::F32(v) => simd::dot_f32(xi, &v[r * k..(r + 1) * k]),
                    Weights::Bf16(v) => simd::dot_bf16(xi, &v[r * k..(r + 1) * k]),
                };
                // SAFETY: within the caller's columns of `dst`.
                unsafe { *dst.0.add(i * out + r) = v };
            }
        }
        return;
    }
    WIDENED.with(|widened| {
        let mut widened = widened.borrow_mut();
        let mut r = first;
        while r < last {
            let rows = BLOCK_ROWS.min(last - r);
            let block: &[f32] = match w {
                Weights::F32(v) => &v[r * k..(r + rows) * k],
                Weights::Bf16(v) => {
                    // half's slice conversion is vectorised (F16C/AVX-512 where present).
                    widened.resize(rows * k, 0.0);
                    v[r * k..(r + rows) * k].convert_to_f32_slice(&mut widened[..rows * k]);
                    &widened[..rows * k]
                }
            };
            // dst[:, r ..] = x · blockᵀ; the block is [rows, k] row-major, i.e. the rhs
            // [k, rows] with a column stride of k.
            // SAFETY: dst is [n, out] with these `rows` columns from `r` inside the caller's
            // range, lhs is [n, k], rhs is [k, rows].
            unsafe {
                gemm::gemm(
                    n,
                    rows,
                    k,
                    dst.0.add(r),
                    1,
                    out as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    block.as_ptr(),
                    k as isize,
                    1,
                    0.0f32,
                    1.0f32,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            r += rows;
        }
    });
}

/// Dot products in f32, eight lanes at a time: AVX2 + FMA when the CPU has them (chosen at
/// run time), else the portable form, which `MOERGE_PORTABLE_KERNELS=1` forces.
mod simd {
    use std::sync::OnceLock;

    use half::bf16;

    const LANES: usize = 64;

    fn use_avx2() -> bool {
        static USE: OnceLock<bool> = OnceLock::new();
        *USE.get_or_init(|| {
            let forced = std::env::var_os("MOERGE_PORTABLE_KERNELS").is_some_and(|v| v == "1");
            #[cfg(target_arch = "x86_64")]
            {
                !forced && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = forced;
                false
            }
        })
    }

    macro_rules! dot {
        ($name:ident, $w:ty, $widen:expr, $mul_add:expr, $prefetch:expr) => {
            #[inline(always)]
            fn $name(x: &[f32], w: &[$w]) -> f32 {
                let widen = $widen;
                let mul_add = $mul_add;
                let prefetch = $prefetch;
                let mut acc = [0f32; LANES];
                let (xc, xt) = x.split_at(x.len() / LANES * LANES);
                let (wc, wt) = w.split_at(xc.len());
                for (xs, ws) in xc.chunks_exact(LANES).zip(wc.chunks_exact(LANES)) {
                    prefetch(ws);
                    for j in 0..LANES {
                        acc[j] = mul_add(xs[j], widen(ws[j]), acc[j]);
                    }
                }
                let mut tail = 0f32;
                for (a, b) in xt.iter().zip(wt) {
                    tail = mul_add(*a, widen(*b), tail);
                }
                // A fixed summation order: the result does not depend on where it runs.
                let mut half = LANES / 2;
                while half > 0 {
                    for j in 0..half {
                        acc[j] += acc[j + half];
                    }
                    half /= 2;
                }
                acc[0] + tail
            }
        };
    }

    /// Leaves the weights to the hardware prefetcher.
    fn no_prefetch<T>(_: &[T]) {}

    /// Asks for the weights `AHEAD_BYTES` past this step's: the hardware prefetcher alone
    /// left the stream at about half the memory's read speed.
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    fn prefetch_ahead<T>(step: &[T]) {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        const AHEAD_BYTES: usize = 2048;
        let base = step.as_ptr().cast::<i8>().wrapping_add(AHEAD_BYTES);
        for line in (0..std::mem::size_of_val(step)).step_by(64) {
            // SAFETY: a prefetch never faults, whatever the address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(line)) };
        }
    }

    fn widen_bf16(v: bf16) -> f32 {
        f32::from_bits(u32::from(v.to_bits()) << 16)
    }

    dot!(
        dot_f32_plain,
        f32,
        |v: f32| v,
        |a: f32, b: f32, c: f32| c + a * b,
        no_prefetch::<f32>
    );
    dot!(
        dot_bf16_plain,
        bf16,
        widen_bf16,
        |a: f32, b: f32, c: f32| c + a * b,
        no_prefetch::<bf16>
    );
    #[cfg(target_arch = "x86_64")]
    dot!(
        dot_f32_fused,
        f32,
        |v: f32| v,
        |a: f32, b: f32, c: f32| a.mul_add(b, c),
        prefetch_ahead::<f32>
    );
    #[cfg(target_arch = "x86_64")]
    dot!(
        dot_bf16_fused,
        bf16,
        widen_bf16,
        |a: f32, b: f32, c: f32| a.mul_add(b, c),
        prefetch_ahead::<bf16>
    );

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn dot_f32_avx2(x: &[f32], w: &[f32]) -> f32 {
        dot_f32_fused(x, w)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn dot_bf16_avx2(x: &[f32], w: &[bf16]) -> f32 {
        dot_bf16_fused(x, w)
    }

    pub(super) fn dot_f32(x: &[f32], w: &[f32]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if use_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { dot_f32_avx2(x, w) };
        }
        dot_f32_plain(x, w)
    }

    pub(super) fn dot_bf16(x: &[f32], w: &[bf16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if use_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked at run time).
            return unsafe { dot_bf16_avx2(x, w) };
        }
        dot_bf16_plain(x, w)
    }

    /// Whether the CPU multiplies bf16 pairs natively (AVX-512 BF16), unless
    /// `MOERGE_PORTABLE_KERNELS=1`.
    pub(super) fn native_bf16() -> bool {
        static USE: OnceLock<bool> = OnceLock::new();
        *USE.get_or_init(|| {
            let forced = std::env::var_os("MOERGE_PORTABLE_KERNELS").is_some_and(|v| v == "1");
            #[cfg(target_arch = "x86_64")]
            {
                !forced
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = forced;
                false
            }
        })
    }

    /// `x · w` for bf16 `x` and `w`, accumulated in f32: `vdpbf16ps` on 32 pairs at a time
    /// where the CPU has it, else both widened.
    pub(super) fn dot_bf16_bf16(x: &[bf16], w: &[bf16]) -> f32 {
        #[cfg(target_arch = "x86_64")]
        if native_bf16() {
            // SAFETY: the CPU has AVX-512F and AVX-512 BF16 (checked at run time).
            return unsafe { dot_bf16_bf16_avx512(x, w) };
        }
        dot_bf16_bf16_plain(x, w)
    }

    /// The portable form of [`dot_bf16_bf16`].
    pub(super) fn dot_bf16_bf16_plain(x: &[bf16], w: &[bf16]) -> f32 {
        let x: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        dot_bf16_plain(&x, w)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dot_bf16_bf16_avx512(x: &[bf16], w: &[bf16]) -> f32 {
        use std::arch::x86_64::{
            __m512bh, __m512i, _mm512_add_ps, _mm512_dpbf16_ps, _mm512_loadu_si512,
            _mm512_reduce_add_ps, _mm512_setzero_ps, _mm_prefetch, _MM_HINT_T0,
        };
        const STEP: usize = 32;
        const AHEAD: usize = 1024;
        const UNROLL: usize = 4;
        let full = x.len() / (STEP * UNROLL) * (STEP * UNROLL);
        let mut acc = [_mm512_setzero_ps(); UNROLL];
        let load = |s: &[bf16], at: usize| -> __m512bh {
            // SAFETY: `at + STEP <= full <= s.len()`; unaligned loads are allowed.
            unsafe {
                std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    s.as_ptr().add(at).cast(),
                ))
            }
        };
        let mut at = 0;
        while at < full {
            // Ask for the weights a few steps ahead: the hardware prefetcher alone left the
            // stream at about half the memory's read speed.
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(at + AHEAD).cast());
            _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(at + AHEAD + 32).cast());
            for (u, a) in acc.iter_mut().enumerate() {
                let off = at + u * STEP;
                *a = _mm512_dpbf16_ps(*a, load(x, off), load(w, off));
            }
            at += STEP * UNROLL;
        }
        let sum = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let mut total = _mm512_reduce_add_ps(sum);
        for (a, b) in x[full..].iter().zip(&w[full..]) {
            total += a.to_f32() * b.to_f32();
        }
        total
    }

    #[cfg(test)]
    pub(super) fn portable(x: &[f32], w: &[bf16]) -> f32 {
        dot_bf16_plain(x, w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `x Wᵀ` in f64 plain loops.
    fn reference(x: &[f32], n: usize, k: usize, w: &[f32], out: usize) -> Vec<f64> {
        let mut y = vec![0f64; n * out];
        for i in 0..n {
            for r in 0..out {
                y[i * out + r] = (0..k)
                    .map(|j| f64::from(x[i * k + j]) * f64::from(w[r * k + j]))
                    .sum();
            }
        }
        y
    }

    fn worst(got: &[f32], want: &[f64]) -> f64 {
        got.iter()
            .zip(want)
            .map(|(g, w)| (f64::from(*g) - w).abs())
            .fold(0.0, f64::max)
    }

    /// Odd sizes (not multiples of the lanes or the block), one and many input rows, f32
    /// and bf16 weights, 1 to 5 threads: equal to plain loops, and bit-identical across
    /// thread counts.
    #[test]
    fn products_equal_plain_loops_whatever_the_threads() {
        for (n, k, out) in [(1, 37, 131), (3, 100, 70), (5, 129, 200), (17, 64, 65)] {
            let x = values(n * k, 1);
            let w = values(out * k, 2);
            let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
            let w_rounded: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let want32 = reference(&x, n, k, &w, out);
            let want16 = reference(&x, n, k, &w_rounded, out);
            let one32 = matmul_t(Rows::F32(&x), n, k, Weights::F32(&w), out, 1);
            let one16 = matmul_t(Rows::F32(&x), n, k, Weights::Bf16(&w16), out, 1);
            assert!(worst(&one32, &want32) < 1e-4, "f32 n={n} k={k} out={out}");
            assert!(worst(&one16, &want16) < 1e-4, "bf16 n={n} k={k} out={out}");
            for threads in 2..=5 {
                assert_eq!(
                    matmul_t(Rows::F32(&x), n, k, Weights::F32(&w), out, threads),
                    one32
                );
                assert_eq!(
                    matmul_t(Rows::F32(&x), n, k, Weights::Bf16(&w16), out, threads),
                    one16
                );
            }
        }
    }

    /// bf16 rows against bf16 weights (native where the CPU has AVX-512 BF16): plain loops
    /// over the same bf16 values, any thread count, sizes that do not fill the unrolled steps.
    #[test]
    fn bf16_rows_equal_plain_loops_whatever_the_threads() {
        for (n, k, out) in [(1, 300, 77), (2, 128, 129), (4, 1000, 64)] {
            let x16: Vec<bf16> = values(n * k, 7)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let w16: Vec<bf16> = values(out * k, 8)
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect();
            let x32: Vec<f32> = x16.iter().map(|v| v.to_f32()).collect();
            let w32: Vec<f32> = w16.iter().map(|v| v.to_f32()).collect();
            let want = reference(&x32, n, k, &w32, out);
            let one = matmul_t(Rows::Bf16(&x16), n, k, Weights::Bf16(&w16), out, 1);
            assert!(worst(&one, &want) < 1e-4, "n={n} k={k} out={out}");
            for threads in 2..=3 {
                assert_eq!(
                    matmul_t(Rows::Bf16(&x16), n, k, Weights::Bf16(&w16), out, threads),
                    one
                );
            }
        }
    }

    #[test]
    fn the_portable_dots_equal_plain_loops() {
        // Both forms run here whatever the CPU (the dispatching ones pick the native form
        // where there is one, which the other tests cover).
        let (x, w) = (values(1000, 3), values(1000, 4));
        let x16: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let w16: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let want: f64 = x
            .iter()
            .zip(&w16)
            .map(|(a, b)| f64::from(*a) * f64::from(b.to_f32()))
            .sum();
        assert!((f64::from(simd::portable(&x, &w16)) - want).abs() < 1e-4);
        let want: f64 = x16
            .iter()
            .zip(&w16)
            .map(|(a, b)| f64::from(a.to_f32()) * f64::from(b.to_f32()))
            .sum();
        assert!((f64::from(simd::dot_bf16_bf16_plain(&x16, &w16)) - want).abs() < 1e-4);
        assert!((f64::from(simd::dot_bf16_bf16(&x16, &w16)) - want).abs() < 1e-4);
    }

    /// Through tensors: a layer big enough for the kernels gives candle's product (bf16
    /// weights against candle's f32 product of the same rounded weights).
    #[test]
    fn a_big_layer_goes_through_the_kernels_and_equals_candle() {
        let (n, k, out) = (6, 1024, 1030);
        let dev = Device::Cpu;
        let x = Tensor::from_vec(values(n * k, 5), (n, k), &dev).unwrap();
        let w = Tensor::from_vec(values(out * k, 6), (out, k), &dev).unwrap();
        for dtype in [DType::F32, DType::BF16] {
            let w = w.to_dtype(dtype).unwrap();
            let got = linear(&x, &w).unwrap().expect("big enough for the kernels");
            let want = x
                .matmul(&w.to_dtype(DType::F32).unwrap().t().unwrap())
                .unwrap();
            let diff = (got - want).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-3, "{dtype:?}");
        }
        // A small layer is left to candle.
        let small = Tensor::zeros((8, k), DType::F32, &dev).unwrap();
        assert!(linear(&x, &small).unwrap().is_none());
    }
}
