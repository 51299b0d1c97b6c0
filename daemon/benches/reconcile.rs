//! Reconcile and watch latency: the time to reconcile 1,000 small adapters cold (empty
//! index) and warm (stamps and hashes cached), and from an adapter landing in the folder to
//! its change event. Each figure is printed with a baseline measured in the same run:
//! reading and hashing the same files, and the watcher's own debounce time.
//!
//! `cargo bench -p moerge-daemon --bench reconcile`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use moerge_daemon::service::{ExpertChange, Service, ServiceConfig};
use moerge_library::{Adapter, AdapterState};

const ADAPTERS: usize = 1000;
const RUNS: usize = 5;
const LANDINGS: usize = 20;

fn main() {
    let base = fixtures().join("dev-phi");
    let tmp = tempfile::tempdir().unwrap();
    let library = tmp.path().join("library");
    for i in 0..ADAPTERS {
        write_small_adapter(&library.join(format!("expert-{i:04}")), i as u64);
    }
    let sample = Adapter::load(&library.join("expert-0000")).unwrap();
    let base_info = moerge_library::BaseModelInfo::from_dir(&base).unwrap();
    sample
        .check_compatible(&base_info)
        .expect("bench adapters fit the base");
    println!(
        "{ADAPTERS} adapters of {} bytes each ({} modules, rank 2)",
        sample.size_bytes(),
        sample.modules().len()
    );
    // File stamps younger than the racy window are never trusted; let these age, as a real
    // library's would have.
    std::thread::sleep(Duration::from_millis(2100));

    let baseline = median((0..RUNS).map(|_| time(|| read_and_hash(&library))));
    // What a cold start must at least do besides: write one sketch-sized file per expert.
    let files = median(
        (0..RUNS)
            .map(|run| time(|| write_files(&tmp.path().join(format!("files-{run}")), ADAPTERS))),
    );
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for run in 0..RUNS {
        let state = tmp.path().join(format!("state-{run}"));
        let config = ServiceConfig::new(library.clone(), base.clone(), state);
        let service = Service::start(config.clone()).unwrap();
        let report = &service.startup().reconcile;
        assert_eq!((report.loaded, report.unchanged), (ADAPTERS, 0));
        cold.push(report.elapsed);
        service.shutdown();
        let service = Service::start(config).unwrap();
        let report = &service.startup().reconcile;
        assert_eq!((report.loaded, report.unchanged), (0, ADAPTERS));
        warm.push(report.elapsed);
        service.shutdown();
    }
    let (cold, warm) = (median(cold), median(warm));
    println!(
        "baseline: read + blake3 all files      {:>9.1} ms",
        ms(baseline)
    );
    println!(
        "baseline: write {ADAPTERS} 4 KiB files      {:>9.1} ms",
        ms(files)
    );
    println!(
        "reconcile cold (empty index)           {:>9.1} ms  {:>6.2}x baseline  {:>5.2}x both baselines",
        ms(cold),
        ratio(cold, baseline),
        ratio(cold, baseline + files)
    );
    println!(
        "reconcile warm (stamps cached)         {:>9.1} ms  {:>6.2}x baseline",
        ms(warm),
        ratio(warm, baseline)
    );

    landing_latency(&library, &base, tmp.path());
}

/// Moves complete adapters into the watched folder (the atomic way: written under a hidden
/// name, then renamed) and times each until its change event.
fn landing_latency(library: &Path, base: &Path, tmp: &Path) {
    let config = ServiceConfig::new(
        library.to_owned(),
        base.to_owned(),
        tmp.join("state-latency"),
    );
    let debounce = config.debounce;
    let service = Service::start(config).unwrap();
    let mut events = service.subscribe();
    let mut latencies = Vec::new();
    let mut loads = Vec::new();
    for i in 0..LANDINGS {
        let name = format!("landed-{i:02}");
        let staging = library.join(format!(".{name}"));
        write_small_adapter(&staging, 1_000_000 + i as u64);
        loads.push(time(|| drop(Adapter::load(&staging).unwrap())));
        let landed = Instant::now();
        std::fs::rename(&staging, library.join(&name)).unwrap();
        loop {
            let event = events.blocking_recv().unwrap();
            let ours = event.changes.iter().any(|c| {
                matches!(c, ExpertChange::Added { name: n, state: AdapterState::Ready, .. } if *n == name)
            });
            if ours {
                latencies.push(landed.elapsed());
                break;
            }
        }
    }
    service.shutdown();
    latencies.sort();
    let p50 = latencies[LANDINGS / 2];
    let p90 = latencies[LANDINGS * 9 / 10];
    let load = median(loads);
    // notify-debouncer-full checks for quiet paths every quarter of the debounce time.
    let tick = debounce / 4;
    println!(
        "baseline: debounce {:.0} ms + debouncer tick {:.0} ms + one load {:.2} ms",
        ms(debounce),
        ms(tick),
        ms(load)
    );
    println!(
        "landing → event  p50 {:>7.1} ms  p90 {:>7.1} ms  {:>5.2}x baseline (p50)",
        ms(p50),
        ms(p90),
        ratio(p50, debounce + tick + load)
    );
}

fn write_files(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    for i in 0..n {
        let tmp = dir.join("tmp").join(i.to_string());
        std::fs::write(&tmp, [i as u8; 4096]).unwrap();
        std::fs::rename(&tmp, dir.join(i.to_string())).unwrap();
    }
}

fn read_and_hash(library: &Path) {
    for entry in std::fs::read_dir(library).unwrap() {
        let dir = entry.unwrap().path();
        let mut h = blake3::Hasher::new();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            h.update(&std::fs::read(dir.join(file)).unwrap());
        }
        std::hint::black_box(h.finalize());
    }
}

/// A valid PEFT adapter for dev-phi: `q_proj` of its 3 layers, rank 2, values from `seed`.
fn write_small_adapter(dir: &Path, seed: u64) {
    const HIDDEN: usize = 96;
    const RANK: usize = 2;
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "peft_type": "LORA", "r": RANK, "lora_alpha": 4, "target_modules": ["q_proj"],
        "base_model_name_or_path": "dev-phi", "task_type": "CAUSAL_LM",
    });
    std::fs::write(dir.join("adapter_config.json"), config.to_string()).unwrap();
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % 2001) as f32 / 1000.0 - 1.0
    };
    let mut header = serde_json::Map::new();
    let mut data: Vec<u8> = Vec::new();
    for layer in 0..3 {
        for (factor, shape) in [("lora_A", [RANK, HIDDEN]), ("lora_B", [HIDDEN, RANK])] {
            let start = data.len();
            for _ in 0..shape[0] * shape[1] {
                data.extend(next().to_le_bytes());
            }
            let key =
                format!("base_model.model.model.layers.{layer}.self_attn.q_proj.{factor}.weight");
            let entry = serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [start, data.len()]});
            header.insert(key, entry);
        }
    }
    let mut header = serde_json::Value::Object(header).to_string().into_bytes();
    header.resize(header.len().next_multiple_of(8), b' ');
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend(header);
    file.extend(data);
    std::fs::write(dir.join("adapter_model.safetensors"), file).unwrap();
}

fn fixtures() -> PathBuf {
    match std::env::var_os("MOERGE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures"),
    }
}

fn time(f: impl FnOnce()) -> Duration {
    let start = Instant::now();
    f();
    start.elapsed()
}

fn median(values: impl IntoIterator<Item = Duration>) -> Duration {
    let mut v: Vec<_> = values.into_iter().collect();
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}
