//! How the engine uses the cores: across batch rows (and, in the daemon, across requests)
//! rather than inside each op.
//!
//! The models served here are small: splitting a 64 x 64 matmul over threads costs more in
//! wake-ups than it saves (measured: 34 µs threaded vs 5 µs on one thread), while whole
//! batch rows are independent and big enough to keep a core busy. So binaries call
//! [`prefer_data_parallelism`] first thing, and a forward over several rows then runs its
//! rows on scoped threads, each op on the calling thread.

use candle_core::Tensor;

use super::state::{Cut, ForwardState, MemberPart};
use crate::error::{EngineError, Result};

/// Set (to 1) by [`prefer_data_parallelism`] when it, not the user, set `RAYON_NUM_THREADS`:
/// child processes inherit both, and must not take ours for a user's cap.
const OURS: &str = "MOERGE_SET_RAYON_NUM_THREADS";

/// Makes candle run each op on the calling thread (`RAYON_NUM_THREADS` and
/// `CANDLE_NUM_THREADS` = 1, unless the user set them), so the engine parallelises across
/// batch rows instead; the engine's own kernels still use every core. Call it at the very
/// start of `main`, before any thread exists: it changes the process environment.
pub fn prefer_data_parallelism() {
    // What the user asked for, read before it is overwritten below.
    user_thread_cap();
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var(OURS, "1");
    }
    for var in ["RAYON_NUM_THREADS", "CANDLE_NUM_THREADS"] {
        if std::env::var_os(var).is_none() {
            std::env::set_var(var, "1");
        }
    }
}

/// The thread count the user set with `RAYON_NUM_THREADS` (not the 1 that
/// [`prefer_data_parallelism`] sets for candle, here or in a parent process), if any: it
/// caps the kernels' threads.
pub(crate) fn user_thread_cap() -> Option<usize> {
    static CAP: std::sync::OnceLock<Option<usize>> = std::sync::OnceLock::new();
    *CAP.get_or_init(|| {
        if std::env::var_os(OURS).is_some() {
            return None;
        }
        std::env::var("RAYON_NUM_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&n| n > 0)
    })
}

/// Threads to split a batch of `rows` over: as many as the request asked for, else none when
/// the model's products already use every core (`rows_apart` false: splitting would read its
/// weights once per part) or candle runs multithreaded, else one per core.
fn data_parallel_threads(rows: usize, state: &ForwardState, rows_apart: bool) -> usize {
    if rows < 2 {
        return 1;
    }
    if let Some(n) = state.threads() {
        return n.min(rows);
    }
    if !rows_apart || candle_core::utils::get_num_threads() > 1 {
        return 1;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows)
}

/// Runs `f` on contiguous parts of the batch in parallel (or once, on the whole batch) and
/// joins the outputs and the states along the batch.
pub(crate) fn split_batch<F>(
    ids: &Tensor,
    state: &mut ForwardState,
    rows_apart: bool,
    f: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &mut ForwardState) -> Result<Tensor> + Sync,
{
    let sizes = shares(
        ids.dim(0)?,
        data_parallel_threads(ids.dim(0)?, state, rows_apart).max(1),
    );
    if sizes.len() <= 1 {
        return f(ids, state);
    }
    run_parts(&Cut::Rows(&sizes), ids, state, f)
}

/// Splits `n` items into `parts` near-equal counts.
fn shares(n: usize, parts: usize) -> Vec<usize> {
    (0..parts)
        .map(|i| n / parts + usize::from(i < n % parts))
        .collect()
}

/// For a batch made of `blocks` equal blocks of rows (a stacked ensemble's members): runs `f`
/// on whole blocks in parallel, each part's state saying which members its rows hold.
pub(crate) fn split_blocks<F>(
    blocks: usize,
    ids: &Tensor,
    state: &mut ForwardState,
    rows_apart: bool,
    f: F,
) -> Result<Tensor>
where
    F: Fn(&Tensor, &mut ForwardState) -> Result<Tensor> + Sync,
{
    let block = ids.dim(0)? / blocks.max(1);
    let counts = shares(
        blocks,
        data_parallel_threads(blocks, state, rows_apart).max(1),
    );
    if counts.len() <= 1 {
        state.set_member_part(Some(MemberPart {
            first: 0,
            count: blocks,
        }));
        let out = f(ids, state);
        state.set_member_part(None);
        return out;
    }
    let sizes: Vec<usize> = counts.iter().map(|c| c * block).collect();
    let members: Vec<MemberPart> = counts
        .iter()
        .scan(0, |start, &count| {
            let first = *start;
            *start += count;
            Some(MemberPart { first, count })
        })
        .collect();
    run_parts(&Cut::Members(&sizes, &members), ids, state, f)
}

/// Runs `f` on the parts of `cut` on scoped threads, and joins outputs and states.
fn run_parts<F>(cut: &Cut<'_>, ids: &Tensor, state: &mut ForwardState, f: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &mut ForwardState) -> Result<Tensor> + Sync,
{
    let sizes = match cut {
        Cut::Rows(sizes) | Cut::Members(sizes, _) => *sizes,
    };
    let mut parts = state.split(cut)?;
    let outputs: Vec<Result<Tensor>> = std::thread::scope(|scope| {
        let mut start = 0;
        let handles: Vec<_> = sizes
            .iter()
            .zip(parts.iter_mut())
            .map(|(&n, part)| {
                let ids = ids.narrow(0, start, n);
                start += n;
                let f = &f;
                scope.spawn(move || f(&ids?, part))
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
    state.join(parts, cut)?;
    Ok(Tensor::cat(&outputs, 0)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A stand-in for a model step: caches `ids` as keys and values and returns, per row,
    /// the running sum of everything it has cached, so a torn or misordered cache shows.
    fn step(ids: &Tensor, state: &mut ForwardState) -> Result<Tensor> {
        let x = ids.to_dtype(DType::F32)?.unsqueeze(1)?.unsqueeze(3)?; // [b, 1, t, 1]
        let (k, _) = state.append(0, x.clone(), x)?;
        Ok(k.sum_keepdim(2)?.flatten_all()?)
    }

    #[test]
    fn split_rows_give_the_same_outputs_and_cache() {
        let dev = Device::Cpu;
        let first = Tensor::new(&[[1u32, 2], [3, 4], [5, 6], [7, 8], [9, 10]], &dev).unwrap();
        let next = Tensor::new(&[[1u32], [2], [3], [4], [5]], &dev).unwrap();
        let run = |threads: usize| {
            let mut cache = ForwardState::new().with_threads(threads);
            let a = split_batch(&first, &mut cache, true, step).unwrap();
            let b = split_batch(&next, &mut cache, true, step).unwrap();
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
