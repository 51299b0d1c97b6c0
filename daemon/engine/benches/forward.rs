//! Forward throughput (tokens/s) of the tiny Phi and Llama of the foundation issue, base only
//! and with one unmerged rank-8 adapter, at batch 1 x 64 and 8 x 128 tokens; prints the
//! adapter/base ratio measured in the same run. Run: `cargo bench -p moerge-engine --bench forward`.
//!
//! Reference on this machine kind (from the issue): PEFT on torch with 2 threads does about
//! 13.5k tok/s (1 x 64) and 98k tok/s (8 x 128) with one adapter on the tiny Phi.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::*;
use moerge_engine::{BaseModel, ForwardState, Precision};
use moerge_library::Adapter;

// The allocator the binaries use: glibc's returns big buffers to the kernel between ops,
// and page faults then cost a fifth of a forward pass.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Median tokens/s of full forward passes (logits for every position) of `base` and
/// `adapted`, run alternately for about 1.5 s so drifting machine load hits both alike.
fn tokens_per_second(
    base: &BaseModel,
    adapted: &BaseModel,
    batch: usize,
    len: usize,
) -> (f64, f64) {
    let ids: Vec<u32> = (0..batch * len).map(|i| (i * 7 % 251) as u32).collect();
    let input = Tensor::from_vec(ids, (batch, len), &Device::Cpu).unwrap();
    let run = |model: &BaseModel| {
        let start = Instant::now();
        let logits = model.forward(&input, &mut ForwardState::new()).unwrap();
        assert_eq!(logits.dims(), &[batch, len, model.vocab_size()]);
        start.elapsed()
    };
    for _ in 0..3 {
        run(base);
        run(adapted);
    }
    let (mut b, mut a): (Vec<Duration>, Vec<Duration>) = (Vec::new(), Vec::new());
    let budget = Instant::now();
    while b.len() < 10 || (budget.elapsed() < Duration::from_millis(1500) && b.len() < 2000) {
        b.push(run(base));
        a.push(run(adapted));
    }
    let median = |mut v: Vec<Duration>| {
        v.sort();
        (batch * len) as f64 / v[v.len() / 2].as_secs_f64()
    };
    (median(b), median(a))
}

fn bench(label: &str, dir: &Path, adapter: &Path) {
    let base = BaseModel::load_dir(dir, Precision::F32).unwrap();
    let adapted = base.with_adapter(&Adapter::load(adapter).unwrap()).unwrap();
    for (batch, len) in [(1, 64), (8, 128)] {
        let (b, a) = tokens_per_second(&base, &adapted, batch, len);
        println!(
            "{label:<6} {batch}x{len:<4} base {:>9.0} tok/s   adapter {:>9.0} tok/s   adapter/base {:.2}",
            b,
            a,
            a / b
        );
    }
}

fn main() {
    // As the CLI and daemon do: ops on one thread each, batch rows across cores.
    moerge_engine::prefer_data_parallelism();
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    write_phi(&phi, TINY_PHI, 1);
    let phi_modules = lora_specs(
        &phi,
        &["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
        8,
    );
    let phi_adapter = tmp.path().join("phi-adapter");
    write_adapter(
        &phi_adapter,
        lora_config(
            8,
            16.0,
            &["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
        ),
        &phi_modules,
        2,
    );

    let llama = tmp.path().join("llama");
    write_llama(&llama, TINY_LLAMA, 3);
    let llama_modules = lora_specs(
        &llama,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
        8,
    );
    let llama_adapter = tmp.path().join("llama-adapter");
    write_adapter(
        &llama_adapter,
        lora_config(
            8,
            16.0,
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        ),
        &llama_modules,
        4,
    );

    println!(
        "forward throughput, f32, {} threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    bench("phi", &phi, &phi_adapter);
    bench("llama", &llama, &llama_adapter);
    println!("PEFT on torch (2 threads), tiny phi + adapter, from the issue: 13.5k tok/s (1x64), 98k tok/s (8x128)");
}
