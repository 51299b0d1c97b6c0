//! One linear layer at Phi-2's shapes, the unit of real-scale speed: decode (1 input row) and
//! prompt (127 rows), f32 and bf16 weights, through the engine's kernels and through candle's
//! matmul as binaries configure it (one thread per op), next to the time to stream the
//! weights' bytes once from memory, measured in the same run. Run:
//! `cargo bench -p moerge-engine --bench linear`.

use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use moerge_engine::{AdapterLinear, ForwardState};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Median time of `f` over about half a second (at least 5 runs).
fn median(mut f: impl FnMut()) -> Duration {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 5 || (start.elapsed() < Duration::from_millis(500) && times.len() < 200) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    times[times.len() / 2]
}

/// Seconds to read `bytes` of memory once, summing them as words on every core.
fn stream_read(bytes: usize) -> f64 {
    let words = vec![1u64; bytes / 8];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = words.len().div_ceil(threads);
    median(|| {
        let total: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(chunk)
                .map(|c| s.spawn(move || c.iter().fold(0u64, |a, &b| a.wrapping_add(b))))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        std::hint::black_box(total);
    })
    .as_secs_f64()
}

fn main() {
    moerge_engine::prefer_data_parallelism();
    let dev = Device::Cpu;
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    println!("one linear layer, Phi-2 shapes; engine kernels vs candle (1 thread per op)");
    for (name, inp, out) in [
        ("q_proj", 2560, 2560),
        ("fc1", 2560, 10240),
        ("fc2", 10240, 2560),
        ("lm_head", 2560, 51200),
    ] {
        if !filter.is_empty() && !filter.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        let w32 = Tensor::randn(0f32, 0.02, (out, inp), &dev).unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let w = w32.to_dtype(dtype).unwrap();
            let bytes = out * inp * dtype.size_in_bytes();
            let read = stream_read(bytes);
            let layer = AdapterLinear::new(name, w.clone(), None);
            for rows in [1, 127] {
                let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                let ours = median(|| {
                    std::hint::black_box(layer.forward(&x, &mut ForwardState::new()).unwrap());
                })
                .as_secs_f64();
                let candle = median(|| {
                    std::hint::black_box(x.matmul(&w.t().unwrap()).unwrap());
                })
                .as_secs_f64();
                let gflops = 2.0 * (rows * inp * out) as f64 / 1e9;
                println!(
                    "  {name:8} {:5} {rows:3} rows  engine {:8.2} ms ({:6.1} GFLOP/s, {:4.2} of the read limit)   candle {:8.2} ms   candle/engine {:5.1}x   stream-read {:6.2} ms ({:5.1} GB/s)",
                    format!("{dtype:?}"),
                    ours * 1e3,
                    gflops / ours,
                    read / ours,
                    candle * 1e3,
                    candle / ours,
                    read * 1e3,
                    bytes as f64 / read / 1e9,
                );
            }
        }
    }
}
