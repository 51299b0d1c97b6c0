//! Over a real bus: clients leaving, per-client limits, rights, streaming, the private
//! peer-to-peer socket, the committed introspection XML, and the Python client.

mod bus_support;

use std::path::Path;

use futures_util::StreamExt;
use moerge_bus::{Daemon1Proxy, ErrorKind, GenerateOptions, Model1Proxy, DAEMON_PATH};
use moerge_daemon::bus::{self, BusConfig, BusTarget};
use moerge_daemon::serving::{
    ClientLimits, FitOutcome, FitRequest, HookError, JobReporter, PolicyDescription, PolicyRunner,
    SelectOutcome, SelectRequest, Selector,
};

use bus_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_has_its_models_released_and_limits_hold() {
    let setup = Setup::start_with(|c| {
        c.limits = ClientLimits {
            models: 2,
            max_tokens: 16,
            ..ClientLimits::default()
        }
    })
    .await;
    let (conn, daemon) = setup.client().await;
    let experts = daemon.list_experts().await.unwrap();
    let plan = merge_plan(&experts, &["upper"]);

    // The own-uid caller may change the library (the rights rule itself is unit-tested
    // with other uids in serving::rights).
    let copy = setup.tmp.path().join("incoming/first");
    copy_adapter(&tiny_expert("first"), &copy);
    daemon.add_expert(copy.to_str().unwrap()).await.unwrap();

    // Limits: models per client, and max_tokens.
    let kept = daemon.fuse_plan(&plan).await.unwrap();
    daemon.fuse_plan(&plan).await.unwrap();
    assert_error(
        daemon.fuse_plan(&plan).await,
        ErrorKind::LimitExceeded,
        &["models", "2"],
    );
    let model = Model1Proxy::builder(&conn)
        .path(kept.clone())
        .build()
        .await
        .unwrap();
    assert_error(
        model
            .generate("upper a>", GenerateOptions::greedy(17).to_dict())
            .await,
        ErrorKind::LimitExceeded,
        &["max_tokens", "16"],
    );
    model
        .generate("upper a>", GenerateOptions::greedy(16).to_dict())
        .await
        .unwrap();

    // Another client has its own quota; it may use our model but not release it.
    let (other_conn, other) = setup.client().await;
    let theirs = other.fuse_plan(&plan).await.unwrap();
    let borrowed = Model1Proxy::builder(&other_conn)
        .path(kept.clone())
        .build()
        .await
        .unwrap();
    assert_eq!(
        borrowed
            .score("upper a>", "A\n")
            .await
            .unwrap()
            .token_nll
            .len(),
        2
    );
    assert_eq!(daemon.list_models().await.unwrap().len(), 3);

    // It leaves: its model goes, ours stay.
    drop((borrowed, other));
    other_conn.close().await.unwrap();
    eventually("the departed client's model to be released", || async {
        let models = daemon.list_models().await.unwrap();
        models.len() == 2 && models.iter().all(|m| m.path != theirs)
    })
    .await;
    model.score("upper a>", "A\n").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generate_stream_sends_the_same_text_as_tokens_then_done() {
    let setup = Setup::start().await;
    let (conn, daemon) = setup.client().await;
    let experts = daemon.list_experts().await.unwrap();
    let path = daemon
        .fuse_plan(&merge_plan(&experts, &["reverse"]))
        .await
        .unwrap();
    let model = Model1Proxy::builder(&conn)
        .path(path)
        .build()
        .await
        .unwrap();
    let options = GenerateOptions::greedy(10).to_dict();
    let whole = model
        .generate("reverse kiwi>", options.clone())
        .await
        .unwrap();

    let mut tokens = model.receive_token().await.unwrap();
    let mut done = model.receive_done().await.unwrap();
    let id = model
        .generate_stream("reverse kiwi>", options)
        .await
        .unwrap();
    let end = done.next().await.unwrap();
    let end = end.args().unwrap();
    assert_eq!((*end.request(), end.error().as_str()), (id, ""));
    assert_eq!(end.text(), &whole);
    let mut streamed = String::new();
    while streamed.len() < whole.len() {
        let t = tokens.next().await.unwrap();
        let t = t.args().unwrap();
        assert_eq!(*t.request(), id);
        streamed.push_str(t.text());
    }
    assert_eq!(streamed, whole);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_private_socket_serves_peers_and_forgets_them_when_they_close() {
    let tmp = tempfile::tempdir().unwrap();
    let library = tmp.path().join("library");
    for name in EXPERTS {
        copy_adapter(&tiny_expert(name), &library.join(name));
    }
    let serving = start_serving(&library, &tmp.path().join("state"), |_| {});
    let socket = tmp.path().join("moerged.sock");
    let _handle = bus::serve(
        serving.clone(),
        BusConfig::new(BusTarget::Listen(socket.clone())),
    )
    .await
    .unwrap();

    let peer = |socket: &Path| {
        let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
        zbus::connection::Builder::unix_stream(stream).p2p().build()
    };
    let conn = peer(&socket).await.unwrap();
    let daemon = Daemon1Proxy::builder(&conn).build().await.unwrap();
    let experts = daemon.list_experts().await.unwrap();
    assert_eq!(experts.len(), 3);
    let path = daemon
        .fuse_plan(&merge_plan(&experts, &["upper"]))
        .await
        .unwrap();
    let model = Model1Proxy::builder(&conn)
        .path(path)
        .build()
        .await
        .unwrap();
    assert_eq!(
        model
            .score("upper a>", "A\n")
            .await
            .unwrap()
            .token_nll
            .len(),
        2
    );
    assert_eq!(serving.models().len(), 1);
    // The peer's uid comes from the socket: we are the daemon's user, so this is allowed.
    let copy = tmp.path().join("incoming/first");
    copy_adapter(&tiny_expert("first"), &copy);
    daemon.add_expert(copy.to_str().unwrap()).await.unwrap();

    drop((daemon, model));
    conn.close().await.unwrap();
    eventually("the peer's model to be released", || async {
        serving.models().is_empty()
    })
    .await;
}

/// A policy that holds its compute thread until the test opens the gate, or panics; its plan
/// merges "upper" alone.
struct GatedPolicy {
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl PolicyRunner for GatedPolicy {
    fn policies(&self) -> Vec<PolicyDescription> {
        Vec::new()
    }

    fn fit(&self, request: FitRequest, _: &JobReporter) -> Result<FitOutcome, HookError> {
        match request.policy.as_str() {
            "panic" => panic!("a policy bug"),
            _ => {
                self.entered.lock().unwrap().send(()).unwrap();
                self.gate.lock().unwrap().recv().unwrap()
            }
        }
        let upper = request.lease.expert("upper").unwrap().hash.unwrap();
        let plan = serde_json::json!({
            "moerge_plan": 1,
            "experts": [{"name": "upper", "hash": upper.to_string()}],
            "default": {"static": {"weights": [1.0], "space": "lowrank"}},
        });
        Ok(FitOutcome {
            plan_json: plan.to_string(),
            tensors: None,
            valid_loss: None,
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bus_answers_while_compute_is_busy_and_a_panic_fails_one_call() {
    let (open, gate) = std::sync::mpsc::channel();
    let (entered, in_compute) = std::sync::mpsc::channel();
    let setup = Setup::start_with(|c| {
        c.compute_threads = 1;
        c.policies = Some(std::sync::Arc::new(GatedPolicy {
            entered: std::sync::Mutex::new(entered),
            gate: std::sync::Mutex::new(gate),
        }));
    })
    .await;
    let (conn, daemon) = setup.client().await;

    // A panic in compute fails that call only.
    assert_error(
        daemon.fuse("panic", "{}", &[]).await,
        ErrorKind::Internal,
        &["panicked", "a policy bug"],
    );

    // Fuse holds the only compute thread until the gate opens; meanwhile the daemon
    // answers calls that need no compute.
    let (_c2, busy) = setup.client().await;
    let fusing = tokio::spawn(async move { busy.fuse("gated", "{}", &[]).await });
    tokio::task::spawn_blocking(move || in_compute.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(daemon.expert_count().await.unwrap(), 3);
    assert_eq!(daemon.list_experts().await.unwrap().len(), 3);
    assert!(
        !fusing.is_finished(),
        "Fuse cannot finish before the gate opens"
    );
    open.send(()).unwrap();
    let path = fusing.await.unwrap().unwrap();
    let model = Model1Proxy::builder(&conn)
        .path(path)
        .build()
        .await
        .unwrap();
    assert_eq!(
        model
            .score("upper a>", "A\n")
            .await
            .unwrap()
            .token_nll
            .len(),
        2
    );
}

/// A selection that finishes at once, so a Job1 object exists to introspect.
struct Instant;

impl Selector for Instant {
    fn select(&self, _: SelectRequest, _: &JobReporter) -> Result<SelectOutcome, HookError> {
        Ok(SelectOutcome {
            selected: Vec::new(),
            result_json: "{}".into(),
        })
    }
}

/// The `<interface name="...">...</interface>` block of an introspection document.
fn interface_block(xml: &str, name: &str) -> String {
    let start = xml
        .find(&format!("<interface name=\"{name}\">"))
        .unwrap_or_else(|| panic!("no interface {name} in {xml}"));
    let end = start + xml[start..].find("</interface>").unwrap() + "</interface>".len();
    xml[start..end]
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_interfaces_match_the_committed_xml() {
    let setup = Setup::start_with(|c| c.selector = Some(std::sync::Arc::new(Instant))).await;
    let (conn, daemon) = setup.client().await;
    let experts = daemon.list_experts().await.unwrap();
    let path = daemon
        .fuse_plan(&merge_plan(&experts, &["upper"]))
        .await
        .unwrap();
    let data = tiny_library().join("data/valid.jsonl");
    let job = daemon.select("{}", data.to_str().unwrap()).await.unwrap();
    let introspect = |path: String| {
        let conn = conn.clone();
        async move {
            zbus::fdo::IntrospectableProxy::builder(&conn)
                .destination(moerge_bus::WELL_KNOWN_NAME)
                .path(path)
                .build()
                .await
                .unwrap()
                .introspect()
                .await
                .unwrap()
        }
    };
    let committed = Path::new(env!("CARGO_MANIFEST_DIR")).join("bus-api/interfaces");
    let daemon_xml = introspect(DAEMON_PATH.to_string()).await;
    let model_xml = introspect(path.to_string()).await;
    let job_xml = introspect(job.to_string()).await;
    for (name, xml) in [
        ("org.moerge.Daemon1", daemon_xml),
        ("org.moerge.Model1", model_xml),
        ("org.moerge.Job1", job_xml),
    ] {
        let live = interface_block(&xml, name);
        let file = committed.join(format!("{name}.xml"));
        if std::env::var_os("MOERGE_BLESS").is_some() {
            std::fs::write(&file, format!("{live}\n")).unwrap();
        }
        let want = std::fs::read_to_string(&file).unwrap_or_default();
        assert_eq!(
            live,
            want.trim_end(),
            "{name} changed; if on purpose, rerun with MOERGE_BLESS=1 and commit {}",
            file.display()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_client_lists_fuses_scores_and_generates() {
    let setup = Setup::start().await;
    let script =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/clients/python/moerge_client.py");
    let address = setup.bus.address.clone();
    // Blocking on a thread of its own: the daemon answers the script on this runtime.
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("/usr/bin/python3")
            .arg(&script)
            .args([
                "--experts",
                "upper,rot13",
                "--prompt",
                "upper kiwi>",
                "--completion",
                "KIWI\n",
            ])
            .env("DBUS_SESSION_BUS_ADDRESS", address)
            .output()
            .expect("/usr/bin/python3 runs (CI: apt-get install python3-dbus)")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for needle in [
        "upper",
        "rot13",
        "reverse",
        "mean NLL",
        "generated:",
        "released",
    ] {
        assert!(stdout.contains(needle), "no {needle:?} in:\n{stdout}");
    }
    // The model it made was released before it left.
    assert!(setup.serving.models().is_empty());
}
