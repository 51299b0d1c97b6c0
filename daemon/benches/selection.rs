//! Greedy selection and library clustering costs. Run:
//! `cargo bench -p moerge-daemon --bench selection`.
//!
//! 1. Greedy selection over a given expert × task matrix (25 tasks) for N = 32 and 256
//!    experts: a full selection, and the update after one expert is added (its row appended,
//!    the selection re-run: cheap enough that nothing smarter is needed), next to one plain
//!    pass over the matrix (per-task minima) in the same run.
//! 2. Clustering 256 random experts with Phi-2's layer shapes (hidden 2560, intermediate
//!    10240, 2 layers, r = 4, six targets): the update sketch of one expert (computed once per
//!    content, when the expert is indexed) next to decoding its factors; then the sketches'
//!    Gram, similarity and k-means for all 256; and the exact update Gram for 32 experts,
//!    extrapolated to 256 (why large libraries use the sketches).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use moerge_daemon::clustering::sketch_gram;
use moerge_daemon::selection::{select, LossMatrix};
use moerge_daemon::service::sketch::{decode_sketch, parameter_sketch};
use moerge_library::update_gram;
use moerge_library::{write_adapter, Adapter, NewAdapter, NewModule};
use moerge_sdk::cluster::{cluster, similarity_from_gram};

fn lcg(seed: &mut u64) -> f64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (*seed >> 11) as f64 / (1u64 << 53) as f64
}

fn median<T>(runs: usize, mut f: impl FnMut() -> T) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn matrix(n: usize, tasks: usize, seed: u64) -> LossMatrix {
    let mut s = seed;
    LossMatrix {
        tasks: (0..tasks).map(|t| format!("t{t:02}")).collect(),
        rows: (0..n)
            .map(|e| {
                (
                    format!("e{e:04}"),
                    (0..tasks).map(|_| 0.2 + 2.0 * lcg(&mut s)).collect(),
                )
            })
            .collect(),
    }
}

fn per_task_minima(m: &LossMatrix) -> Vec<f64> {
    let mut best = vec![f64::INFINITY; m.tasks.len()];
    for row in m.rows.values() {
        for (b, l) in best.iter_mut().zip(row) {
            *b = b.min(*l);
        }
    }
    best
}

fn selection_bench() {
    println!("greedy selection, 25 tasks (median of 21 runs)");
    for n in [32, 256] {
        let full = matrix(n, 25, n as u64);
        let baseline = median(21, || per_task_minima(&full));
        let whole = median(21, || select(&full, 0.01).unwrap());
        let mut before = matrix(n - 1, 25, n as u64);
        let extra = full.rows.iter().next_back().unwrap();
        let update = median(21, || {
            before.rows.insert(extra.0.clone(), extra.1.clone());
            let s = select(&before, 0.01).unwrap();
            before.rows.remove(extra.0);
            s
        });
        println!(
            "  N = {n:>3}: full selection {:>9.3} ms, after adding one expert {:>9.3} ms \
             ({:.0}× / {:.0}× one pass over the matrix, {:.4} ms)",
            whole.as_secs_f64() * 1e3,
            update.as_secs_f64() * 1e3,
            whole.as_secs_f64() / baseline.as_secs_f64(),
            update.as_secs_f64() / baseline.as_secs_f64(),
            baseline.as_secs_f64() * 1e3,
        );
    }
}

/// A random adapter with Phi-2's layer shapes (2 layers).
fn phi2_adapter(dir: &std::path::Path, seed: u64) -> Adapter {
    let (h, i, r) = (2560usize, 10240usize, 4usize);
    let shapes: Vec<(String, usize, usize)> = (0..2)
        .flat_map(|l| {
            [
                ("self_attn.q_proj", h, h),
                ("self_attn.k_proj", h, h),
                ("self_attn.v_proj", h, h),
                ("self_attn.dense", h, h),
                ("mlp.fc1", h, i),
                ("mlp.fc2", i, h),
            ]
            .map(|(m, inp, out)| (format!("model.layers.{l}.{m}"), inp, out))
        })
        .collect();
    let mut s = seed;
    let values: Vec<(Vec<f32>, Vec<f32>)> = shapes
        .iter()
        .map(|(_, inp, out)| {
            let mut draw = |len: usize| -> Vec<f32> {
                (0..len).map(|_| (lcg(&mut s) - 0.5) as f32 * 0.1).collect()
            };
            (draw(r * inp), draw(out * r))
        })
        .collect();
    let adapter = NewAdapter {
        r,
        lora_alpha: 8.0,
        use_rslora: false,
        target_modules: ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]
            .map(String::from)
            .to_vec(),
        base_model_name_or_path: "microsoft/phi-2".into(),
        alpha_overrides: BTreeMap::new(),
        modules: shapes
            .iter()
            .zip(&values)
            .map(|((module, inp, out), (a, b))| NewModule {
                module: module.clone(),
                rank: r,
                in_features: *inp,
                out_features: *out,
                a,
                b,
            })
            .collect(),
    };
    write_adapter(dir, &adapter).unwrap();
    Adapter::load(dir).unwrap()
}

fn clustering_bench() {
    let tmp = tempfile::tempdir().unwrap();
    let n = 256;
    println!("\nclustering {n} random experts with Phi-2's layer shapes (2 layers, r 4)");
    let started = Instant::now();
    let mut sketches = Vec::with_capacity(n);
    let mut adapters32 = Vec::new();
    let (mut sketch_time, mut decode_time) = (Duration::ZERO, Duration::ZERO);
    for k in 0..n {
        let adapter = phi2_adapter(&tmp.path().join(format!("e{k}")), k as u64 + 1);
        let t = Instant::now();
        let bytes = parameter_sketch(&adapter);
        sketch_time += t.elapsed();
        let t = Instant::now();
        for m in adapter.modules().values() {
            std::hint::black_box(adapter.tensor_f32(&m.a));
            std::hint::black_box(adapter.tensor_f32(&m.b));
        }
        decode_time += t.elapsed();
        sketches.push(decode_sketch(&bytes).unwrap());
        if k < 32 {
            adapters32.push(adapter);
        }
    }
    println!(
        "  update sketch per expert: {:.1} ms ({:.1}× decoding its factors, {:.2} ms); \
         {} experts written and sketched in {:.1} s",
        sketch_time.as_secs_f64() * 1e3 / n as f64,
        sketch_time.as_secs_f64() / decode_time.as_secs_f64(),
        decode_time.as_secs_f64() * 1e3 / n as f64,
        n,
        started.elapsed().as_secs_f64()
    );
    let gram_time = median(5, || sketch_gram(&sketches));
    let gram = sketch_gram(&sketches);
    let cluster_time = median(3, || {
        let similarity = similarity_from_gram(&gram, n, 16);
        cluster(&similarity, n, None, 0)
    });
    println!(
        "  from the sketches, N = {n}: Gram {:.1} ms, similarity + k-means with silhouette {:.0} ms",
        gram_time.as_secs_f64() * 1e3,
        cluster_time.as_secs_f64() * 1e3
    );
    let refs: Vec<&Adapter> = adapters32.iter().collect();
    let exact = median(3, || update_gram(&refs));
    let pairs = |m: usize| (m * (m + 1) / 2) as f64;
    println!(
        "  exact update Gram from the factors, N = 32: {:.2} s; N = 256 would take about {:.0} s \
         ({:.0}× the sketches' Gram)",
        exact.as_secs_f64(),
        exact.as_secs_f64() * pairs(256) / pairs(32),
        exact.as_secs_f64() * pairs(256) / pairs(32) / gram_time.as_secs_f64()
    );
}

fn main() {
    selection_bench();
    clustering_bench();
}
