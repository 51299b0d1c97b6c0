//! How the engine uses the cores: across batch rows (and, in the daemon, across requests)
//! rather than inside each op.
//!
//! The models served here are small: splitting a 64 x 64 matmul over threads costs more in
//! wake-ups than it saves (measured: 34 µs threaded vs 5 µs on one thread), while whole
//! batch rows are independent and big enough to keep a core busy. So binaries call
//! [`prefer_data_parallelism`] first thing, and a forward over several rows then runs its
//! rows on scoped threads, each op on the calling thread.

use candle_core::Tensor;

use crate::error::{EngineError, Result};
use crate::layers::KvCache;

/// Makes candle run each op on the calling thread (`RAYON_NUM_THREADS` and
/// `CANDLE_NUM_THREADS` = 1, unless the user set them), so the engine parallelises across
/// batch rows instead. Call it at the very start of `main`, before any thread exists: it
/// changes the process environment.
pub fn prefer_data_parallelism() {
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "1");
        }
    }
}

/// Threads to split a batch of `rows` over: only when candle itself runs single-threaded.
fn data_parallel_threads(rows: usize) -> usize {
    if rows < 2 || candle_core::utils::get_num_threads() > 1 {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows)
}

/// Runs `f` on contiguous parts of the batch in parallel (or once, on the whole batch) and
/// joins the outputs and the caches along the batch.
pub(crate) fn split_batch<F>(ids: &Tensor, cache: &mut KvCache, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &mut KvCache) -> Result<Tensor> + Sync,
{
    split_batch_over(data_parallel_threads(ids.dim(0)?), ids, cache, f)
}

/// Splits `n` items into `parts` near-equal counts.
fn shares(n: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| n / parts + usize::from(i < n % parts))
        .collect()
}

fn split_batch_over<F>(threads: usize, ids: &Tensor, cache: &mut KvCache, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &mut KvCache) -> Result<Tensor> + Sync,
{
    let sizes = shares(ids.dim(0)?, threads.max(1));
    run_parts(&sizes, ids, cache, |ids, cache, _| f(ids, cache))
}

/// For a batch made of `blocks` equal blocks of rows (an ensemble's members): runs `f` on
/// whole blocks in parallel, telling it the first block and how many it has.
pub(crate) fn split_blocks<F>(
    blocks: usize,
    ids: &Tensor,
    cache: &mut KvCache,
    f: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &mut KvCache, usize, usize) -> Result<Tensor> + Sync,
{
    let block = ids.dim(0)? / blocks.max(1);
    let counts = shares(blocks, data_parallel_threads(blocks).max(1));
    let sizes: Vec<usize> = counts.iter().map(|c| c * block).collect();
    let firsts: Vec<usize> = counts
        .iter()
        .scan(0, |start, c| {
            let first = *start;
            *start += c;
            Some(first)
        })
        .collect();
    run_parts(&sizes, ids, cache, |ids, cache, part| {
        f(ids, cache, firsts[part], counts[part])
    })
}

/// Runs `f` on consecutive parts of `sizes` rows on scoped threads (or directly when there is
/// one part), and joins outputs and caches along the batch.
fn run_parts<F>(sizes: &[usize], ids: &Tensor, cache: &mut KvCache, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &mut KvCache, usize) -> Result<Tensor> + Sync,
{
    if sizes.len() <= 1 {
        return f(ids, cache, 0);
    }
    let mut parts = cache.split_batch(sizes)?;
    let outputs: Vec<Result<Tensor>> = std::thread::scope(|scope| {
        let mut start = 0;
        let handles: Vec<_> = sizes
            .iter()
            .zip(parts.iter_mut())
            .enumerate()
            .map(|(i, (&n, part))| {
                let ids = ids.narrow(0, start, n);
                start += n;
                let f = &f;
                scope.spawn(move || f(&ids?, part, i))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(EngineError::WorkerGone("a batch thread panicked".into()))
                })
            })
            .collect()
    });
    let outputs = outputs.into_iter().collect::<Result<Vec<_>>>()?;
    *cache = KvCache::concat_batch(&parts)?;
    Ok(Tensor::cat(&outputs, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A stand-in for a model step: caches `ids` as keys and values and returns, per row,
    /// the running sum of everything it has cached, so a torn or misordered cache shows.
    fn step(ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let x = ids.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(3)?; // [b, 1, t, 1]
        let (k, _) = cache.append(0, x.clone(), x)?;
        Ok(k.sum_keepdim(2)?.flatten_all()?)
    }

    #[test]
    fn split_rows_give_the_same_outputs_and_cache() {
        let dev = Device::Cpu;
        let first = Tensor::new(&[[1u32, 2], [3, 4], [5, 6], [7, 8], [9, 10]], &dev).unwrap();
        let next = Tensor::new(&[[1u32], [2], [3], [4], [5]], &dev).unwrap();
        let run = |threads: usize| {
            let mut cache = KvCache::new();
            let a = split_batch_over(threads, &first, &mut cache, step).unwrap();
            let b = split_batch_over(threads, &next, &mut cache, step).unwrap();
            (
                a.to_vec1::<f32>().unwrap(),
                b.to_vec1::<f32>().unwrap(),
                cache.len(),
            )
        };
        let whole = run(1);
        assert_eq!(whole.0, vec![3.0, 7.0, 11.0, 15.0, 19.0]);
        assert_eq!(whole.1, vec![4.0, 9.0, 14.0, 19.0, 24.0]);
        for threads in [2, 3, 5] {
            assert_eq!(run(threads), whole, "{threads} threads");
        }
    }
}
