//! What the D-Bus layer costs: Score of a fixed prompt and completion on the tiny library,
//! called in-process (`Serving::score`), through a private dbus-daemon, and through the
//! peer-to-peer socket; then Score throughput with 1 and with 16 concurrent clients (separate
//! connections) on the bus. Every figure is printed next to its ratio to the in-process
//! baseline measured in the same run.
//!
//! The daemon runs on a Tokio runtime of its own (two workers, as `moerged`), the clients on
//! another, both in this process; the dbus-daemon is a separate process.
//!
//! `cargo bench -p moerge-daemon --bench bus` (add `--profile dev` for a quick run: the
//! dependencies are optimised there too).

#[path = "../tests/bus_support/mod.rs"]
mod bus_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use moerge_bus::{Daemon1Proxy, Model1Proxy};
use moerge_daemon::bus::{self, BusConfig, BusTarget};
use moerge_daemon::serving::{Caller, LoadedModel, Serving};

use bus_support::{copy_adapter, merge_plan, start_serving, tiny_expert, PrivateBus, EXPERTS};

const PROMPT: &str = "upper kiwi>";
const COMPLETION: &str = "KIWI\n";
/// Calls per timed run, and runs (the median is reported).
const CALLS: usize = 200;
const RUNS: usize = 5;
const CLIENTS: usize = 16;

fn main() {
    let tmp = tempfile::tempdir().unwrap();
    let library = tmp.path().join("library");
    for name in EXPERTS {
        copy_adapter(&tiny_expert(name), &library.join(name));
    }
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let serving = start_serving(&library, &tmp.path().join("state"), |c| {
        c.compute_threads = threads;
    });
    let daemon_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let bus = PrivateBus::start(tmp.path());
    let socket = tmp.path().join("moerged.sock");
    let (_on_bus, _on_socket) = daemon_rt.block_on(async {
        let on_bus = bus::serve(
            serving.clone(),
            BusConfig::new(BusTarget::Bus(bus.address.clone())),
        )
        .await
        .unwrap();
        let on_socket = bus::serve(
            serving.clone(),
            BusConfig::new(BusTarget::Listen(socket.clone())),
        )
        .await
        .unwrap();
        (on_bus, on_socket)
    });
    println!(
        "Score({PROMPT:?}, {COMPLETION:?}) on a merge of two tiny experts; {threads} compute threads; \
         median of {RUNS} runs of {CALLS} calls"
    );

    client_rt.block_on(async {
        let me = Caller {
            client: "bench".into(),
            uid: Some(0),
        };
        // A model held by a bus client, used by everyone.
        let holder = bus.connect().await;
        let daemon = Daemon1Proxy::new(&holder).await.unwrap();
        let experts = daemon.list_experts().await.unwrap();
        let plan = merge_plan(&experts, &["upper", "rot13"]);
        let path = daemon.fuse_plan(&plan).await.unwrap();
        let in_process = serving.fuse_plan(&me, &plan).await.unwrap();
        let want = serving
            .score(&me, &in_process, PROMPT, COMPLETION)
            .await
            .unwrap();

        let base = per_call(|| in_process_score(&serving, &me, &in_process)).await;
        report("in-process Serving::score", base, base);

        let model = Model1Proxy::builder(&holder)
            .path(path.clone())
            .build()
            .await
            .unwrap();
        let got = model.score(PROMPT, COMPLETION).await.unwrap();
        assert_eq!(got.token_ids, want.ids, "the bus scores the same tokens");
        let on_bus = per_call(|| {
            let model = model.clone();
            async move {
                model.score(PROMPT, COMPLETION).await.unwrap();
            }
        })
        .await;
        report("through the bus (dbus-daemon)", on_bus, base);

        let stream = std::os::unix::net::UnixStream::connect(&socket).unwrap();
        let peer = zbus::connection::Builder::unix_stream(stream)
            .p2p()
            .build()
            .await
            .unwrap();
        let peer_daemon = Daemon1Proxy::builder(&peer).build().await.unwrap();
        let peer_path = peer_daemon.fuse_plan(&plan).await.unwrap();
        let peer_model = Model1Proxy::builder(&peer)
            .path(peer_path)
            .build()
            .await
            .unwrap();
        let on_socket = per_call(|| {
            let model = peer_model.clone();
            async move {
                model.score(PROMPT, COMPLETION).await.unwrap();
            }
        })
        .await;
        report("through the p2p socket", on_socket, base);

        // Throughput: each client its own connection, one call at a time, CALLS calls each.
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            let conn = bus.connect().await;
            let model = Model1Proxy::builder(&conn)
                .path(path.clone())
                .build()
                .await
                .unwrap();
            clients.push((conn, model));
        }
        let in_process_16 = throughput(CLIENTS, |i| {
            // Separate callers, as separate connections are: the per-client limits apply.
            let me = Caller {
                client: format!("bench-{i}"),
                uid: Some(0),
            };
            let (serving, model) = (serving.clone(), in_process.clone());
            async move { in_process_score(&serving, &me, &model).await }
        })
        .await;
        let one = throughput(1, |i| {
            let model = clients[i].1.clone();
            async move {
                model.score(PROMPT, COMPLETION).await.unwrap();
            }
        })
        .await;
        let sixteen = throughput(CLIENTS, |i| {
            let model = clients[i].1.clone();
            async move {
                model.score(PROMPT, COMPLETION).await.unwrap();
            }
        })
        .await;
        println!(
            "throughput, in-process, {CLIENTS} concurrent callers: {in_process_16:8.0} calls/s"
        );
        println!(
            "throughput, bus, 1 client:                  {one:8.0} calls/s  ({:.2}x in-process {CLIENTS})",
            one / in_process_16
        );
        println!(
            "throughput, bus, {CLIENTS} clients:                 {sixteen:8.0} calls/s  ({:.2}x in-process {CLIENTS}, {:.2}x 1 client)",
            sixteen / in_process_16,
            sixteen / one
        );
    });
}

async fn in_process_score(serving: &Serving, me: &Caller, model: &Arc<LoadedModel>) {
    serving.score(me, model, PROMPT, COMPLETION).await.unwrap();
}

/// Median time per call of `call`, run CALLS times in sequence, over RUNS runs.
async fn per_call<F, Fut>(mut call: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for _ in 0..20 {
        call().await;
    }
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        for _ in 0..CALLS {
            call().await;
        }
        runs.push(start.elapsed() / CALLS as u32);
    }
    runs.sort();
    runs[RUNS / 2]
}

/// Calls per second with `clients` callers at once, each making CALLS calls in sequence
/// (median of RUNS runs).
async fn throughput<F, Fut>(clients: usize, make: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let mut runs = Vec::new();
    for _ in 0..RUNS {
        let start = Instant::now();
        let tasks: Vec<_> = (0..clients)
            .map(|i| {
                let calls: Vec<Fut> = (0..CALLS).map(|_| make(i)).collect();
                tokio::spawn(async move {
                    for call in calls {
                        call.await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        runs.push((clients * CALLS) as f64 / start.elapsed().as_secs_f64());
    }
    runs.sort_by(f64::total_cmp);
    runs[RUNS / 2]
}

fn report(what: &str, took: Duration, base: Duration) {
    println!(
        "per call, {what:32} {:9.1} µs  ({:.2}x in-process)",
        took.as_secs_f64() * 1e6,
        took.as_secs_f64() / base.as_secs_f64()
    );
}
