//! Real scale (issue 18): a random Phi-2-shaped base (2.7B parameters, bf16, 10 shards) with
//! random rank-4 experts, and optionally a 3B Llama with grouped-query attention, served the
//! way a user would. Per case: load time (base + experts + fuse), prefill tok/s of a
//! 127-token prompt, greedy decode tok/s, peak RSS; and, measured in the same run, the time
//! to stream the weights' bytes from memory once, which bounds batch-1 decode.
//!
//! Run: `cargo bench -p moerge-engine --bench scale [-- CASE...]`, where a case is `one`,
//! `merge16`, `arrow16`, `arrow64` or `ensemble4`, optionally with the model (`phi:one`);
//! any part of a name selects (no argument: all). Each case runs in a fresh process (this
//! binary again, `--scale-case phi:one`), so its peak RSS is its own.
//!
//! The checkpoints are written once (the Phi one takes a minute or two and 7 GB of disk with
//! 64 experts) and reused: `DIR/<model>-l<layers>/{base,experts/expert-NNN}`, the layout of
//! `../shared/bench/make_phi2_scale.py`, so `peft_scale_bench.py` runs on the same files (the
//! benchmark prints how). Settings, from the environment:
//! - `MOERGE_SCALE_CACHE` — DIR (default `target/scale-cache` in the workspace);
//! - `MOERGE_SCALE_MODELS` — `phi`, `llama` or `phi,llama` (default `phi`);
//! - `MOERGE_SCALE_EXPERTS` — experts written per model (default 64; `arrow64` needs 64);
//! - `MOERGE_SCALE_PRECISION` — `bf16` (default) or `f32`: how the engine loads the bf16
//!   checkpoint;
//! - `MOERGE_SCALE_DECODE` — greedy decode steps (default 16);
//! - `MOERGE_SCALE_LAYERS` — fewer layers for a quick check of the flow, e.g. `2` (other
//!   folders, so the full-size ones stay).
//!
//! A benchmark, not a test: it asserts nothing about the figures.

#[path = "scale/cases.rs"]
mod cases;
#[path = "scale/checkpoint.rs"]
mod checkpoint;
#[path = "../tests/common/mod.rs"]
mod common;
#[path = "scale/writer.rs"]
mod writer;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use cases::{Case, Measured, CASES};
use checkpoint::{Res, Shape, LLAMA_3B, PHI2};
use moerge_engine::Precision;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The argument that makes this binary run one case.
const CASE_ARG: &str = "--scale-case";

/// PEFT's figures on the developers' machine kind, from `../shared/bench/README.md`.
const PEFT_REFERENCE: &str = "\
PEFT reference (../shared/bench/README.md, 2026-12-04; 2-core AMD EPYC, Phi-2 shapes, 2 threads):
  bf16 one adapter          load  1.0 s  prefill 41 tok/s  decode 3.78 tok/s  peak RSS  6.1 GB
  bf16 low-rank merge of 16 load 10.6 s  prefill 46 tok/s  decode 3.72 tok/s  peak RSS  6.7 GB
  bf16 Arrow top-4 of 16    load 12.9 s  prefill 11 tok/s  decode 2.50 tok/s  peak RSS  6.8 GB
  bf16 4-way prob. ensemble load  1.9 s  prefill 12 tok/s  decode 0.75 tok/s  peak RSS  6.4 GB
  f32  one adapter          load 19.5 s  prefill 16 tok/s  decode 1.28 tok/s  peak RSS 17.0 GB";

struct Settings {
    cache: PathBuf,
    models: Vec<Shape>,
    experts: usize,
    precision: Precision,
    decode: usize,
}

impl Settings {
    fn from_env() -> Res<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let number = |name: &str, default: usize| -> Res<usize> {
            var(name).map_or(Ok(default), |v| {
                v.parse()
                    .map_err(|_| format!("{name}={v}: not a number").into())
            })
        };
        let cache = var("MOERGE_SCALE_CACHE")
            .map_or_else(|| workspace().join("target/scale-cache"), PathBuf::from);
        let layers = var("MOERGE_SCALE_LAYERS")
            .map(|v| v.parse::<usize>())
            .transpose()
            .map_err(|_| "MOERGE_SCALE_LAYERS: not a number")?;
        let models = var("MOERGE_SCALE_MODELS")
            .unwrap_or_else(|| "phi".into())
            .split(',')
            .map(|name| {
                let shape = match name.trim() {
                    "phi" => PHI2,
                    "llama" => LLAMA_3B,
                    other => return Err(format!("MOERGE_SCALE_MODELS: unknown model {other:?}")),
                };
                Ok(Shape {
                    layers: layers.unwrap_or(shape.layers),
                    ..shape
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let precision = match var("MOERGE_SCALE_PRECISION").as_deref() {
            None | Some("bf16") => Precision::Bf16,
            Some("f32") => Precision::F32,
            Some(other) => {
                return Err(format!("MOERGE_SCALE_PRECISION={other}: bf16 or f32").into())
            }
        };
        Ok(Self {
            cache,
            models,
            experts: number("MOERGE_SCALE_EXPERTS", 64)?,
            precision,
            decode: number("MOERGE_SCALE_DECODE", 16)?,
        })
    }

    fn dir(&self, shape: &Shape) -> PathBuf {
        self.cache
            .join(format!("{}-l{}", shape.name(), shape.layers))
    }

    fn precision_name(&self) -> &'static str {
        match self.precision {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    fn bytes_per_value(&self) -> usize {
        match self.precision {
            Precision::F32 => 4,
            Precision::Bf16 => 2,
        }
    }
}

/// The workspace root (`daemon/engine/../..`).
fn workspace() -> PathBuf {
    let engine = Path::new(env!("CARGO_MANIFEST_DIR"));
    engine.ancestors().nth(2).unwrap_or(engine).to_owned()
}

/// Memory read bandwidth in GB/s, one thread and all cores: the median of three sums of a
/// `bytes`-sized buffer as u64 words, after a first pass that writes every page.
fn read_bandwidth(bytes: u64) -> (f64, f64, usize) {
    let words = vec![1u64; (bytes / 8) as usize];
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sum = |w: &[u64]| w.iter().fold(0u64, |a, &b| a.wrapping_add(b));
    let gb_per_s = |f: &dyn Fn() -> u64| {
        let mut times: Vec<f64> = (0..3)
            .map(|_| {
                let start = Instant::now();
                std::hint::black_box(f());
                start.elapsed().as_secs_f64()
            })
            .collect();
        times.sort_by(f64::total_cmp);
        bytes as f64 / times[1] / 1e9
    };
    let one = gb_per_s(&|| sum(&words));
    let all = gb_per_s(&|| {
        std::thread::scope(|s| {
            let handles: Vec<_> = words
                .chunks(words.len().div_ceil(threads))
                .map(|c| s.spawn(move || sum(c)))
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        })
    });
    (one, all, threads)
}

/// Runs one case in a fresh process of this binary and reads its result line.
fn run_in_child(key: &str) -> Res<Measured> {
    let output = Command::new(std::env::current_exe()?)
        .args([CASE_ARG, key])
        .stderr(Stdio::inherit())
        .output()?;
    if !output.status.success() {
        return Err(format!("{key}: the case's process failed ({})", output.status).into());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("RESULT "))
        .ok_or_else(|| format!("{key}: no result line"))?;
    Ok(serde_json::from_str(line)?)
}

/// The child's side: one case, its result as one JSON line on stdout.
fn child(settings: &Settings, key: &str) -> Res<()> {
    let (model, case) = key.split_once(':').ok_or("case key is model:case")?;
    let shape = settings
        .models
        .iter()
        .find(|s| s.name() == model)
        .ok_or_else(|| format!("model {model} not in MOERGE_SCALE_MODELS"))?;
    let case = CASES
        .iter()
        .find(|c| c.name == case)
        .ok_or_else(|| format!("no case {case}"))?;
    let m = cases::run(
        &settings.dir(shape),
        case,
        settings.precision,
        settings.decode,
    )?;
    println!("RESULT {}", serde_json::to_string(&m)?);
    Ok(())
}

fn bench_model(settings: &Settings, shape: &Shape, cases: &[&Case]) -> Res<()> {
    let dir = settings.dir(shape);
    let start = Instant::now();
    checkpoint::ensure_base(&dir, shape)?;
    checkpoint::ensure_experts(&dir, shape, settings.experts)?;
    let (file_bytes, _) = shape.weight_bytes(2);
    let (_, streamed) = shape.weight_bytes(settings.bytes_per_value());
    println!(
        "\n{} ({} layers, hidden {}, {}/{} heads, vocab {}): {:.2} GB of bf16 weights, {} experts, in {} (ready in {:.0} s)",
        shape.name(),
        shape.layers,
        shape.hidden,
        shape.heads,
        shape.kv_heads,
        shape.vocab,
        file_bytes as f64 / 1e9,
        settings.experts,
        dir.display(),
        start.elapsed().as_secs_f64()
    );

    let (one, all, threads) = read_bandwidth(streamed);
    let limit = all * 1e9 / streamed as f64;
    println!(
        "streaming read of the {:.2} GB a {} decode step reads (all weights but the embedding table): {one:.1} GB/s on 1 thread, {all:.1} GB/s on {threads}: decode limit {limit:.2} tok/s",
        streamed as f64 / 1e9,
        settings.precision_name(),
    );

    for case in cases {
        if case.experts > settings.experts {
            println!(
                "  {} {:<22} skipped: needs {} experts (MOERGE_SCALE_EXPERTS={})",
                settings.precision_name(),
                case.label,
                case.experts,
                settings.experts
            );
            continue;
        }
        let key = format!("{}:{}", shape.name(), case.name);
        match run_in_child(&key) {
            Ok(m) => println!(
                "  {} {:<22} load {:>5.1} s (base {:.1} + experts {:.1} + fuse {:.1})  prefill {:>6.1} tok/s  decode {:>5.2} tok/s = {:.2} of the limit  RSS {:.1} GB loaded, {:.1} GB peak",
                settings.precision_name(),
                case.label,
                m.base_s + m.experts_s + m.fuse_s,
                m.base_s,
                m.experts_s,
                m.fuse_s,
                m.prefill_tok_s,
                m.decode_tok_s,
                m.decode_tok_s / limit,
                m.loaded_rss_gb,
                m.peak_rss_gb,
            ),
            Err(e) => println!("  {:<22} failed: {e}", case.label),
        }
    }

    let script = workspace().join("../shared/bench/peft_scale_bench.py");
    let script = script.canonicalize().unwrap_or(script);
    println!(
        "PEFT on the same files (its environment: ../shared/bench/README.md), one case per run:"
    );
    for case in cases.iter().filter(|c| c.experts <= settings.experts) {
        println!(
            "  THREADS={threads} python3 {} {} {} --dtype {} --decode {}",
            script.display(),
            dir.display(),
            case.peft_args,
            settings.precision_name(),
            settings.decode
        );
    }
    Ok(())
}

fn main() -> Res<()> {
    moerge_engine::prefer_data_parallelism();
    let settings = Settings::from_env()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(i) = args.iter().position(|a| a == CASE_ARG) {
        let key = args.get(i + 1).ok_or("--scale-case needs model:case")?;
        return child(&settings, key);
    }
    let filter: Vec<&String> = args.iter().filter(|a| !a.starts_with('-')).collect();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split_once(':')
                    .map(|(_, v)| v.trim().to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    println!(
        "scale benchmark: {} weights, prompt {} tokens, {} greedy decode steps; {cpu}, {} cores",
        settings.precision_name(),
        cases::PROMPT,
        settings.decode,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
    );
    for shape in &settings.models {
        let selected: Vec<&Case> = CASES
            .iter()
            .filter(|c| {
                let key = format!("{}:{}", shape.name(), c.name);
                filter.is_empty() || filter.iter().any(|f| key.contains(f.as_str()))
            })
            .collect();
        if !selected.is_empty() {
            bench_model(&settings, shape, &selected)?;
        }
    }
    println!("\n{PEFT_REFERENCE}");
    Ok(())
}
