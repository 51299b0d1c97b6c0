//! Rights and limits with real clients of another uid: a Python client (and busctl) run as
//! uid 65534 through `setpriv` against the daemon on an open private bus and on its
//! peer-to-peer socket. Needs root (as in CI).

mod bus_support;
mod open_bus;

use std::sync::Arc;

use moerge_bus::{Daemon1Proxy, ErrorKind, GenerateOptions, Model1Proxy};
use moerge_daemon::serving::{
    Caller, ClientLimits, FitOutcome, FitRequest, HookError, JobReporter, PolicyDescription,
    PolicyRunner, SelectOutcome, SelectRequest, Selector, ServingConfig,
};
use serde_json::{json, Value};

use bus_support::*;
use open_bus::*;

const ACCESS_DENIED: &str = "org.moerge.Error.AccessDenied";

/// A selection that finishes at once.
struct InstantSelection;

impl Selector for InstantSelection {
    fn select(&self, _: SelectRequest, _: &JobReporter) -> Result<SelectOutcome, HookError> {
        Ok(SelectOutcome {
            selected: vec!["upper".into()],
            result_json: "{}".into(),
        })
    }
}

/// A policy that merges "upper" alone; "gated" waits for the test to open the gate first.
struct UpperPolicy {
    entered: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    gate: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

impl UpperPolicy {
    fn new() -> (
        UpperPolicy,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (entered, in_fit) = std::sync::mpsc::channel();
        let (open, gate) = std::sync::mpsc::channel();
        let policy = UpperPolicy {
            entered: std::sync::Mutex::new(entered),
            gate: std::sync::Mutex::new(gate),
        };
        (policy, in_fit, open)
    }
}

impl PolicyRunner for UpperPolicy {
    fn policies(&self) -> Vec<PolicyDescription> {
        Vec::new()
    }

    fn fit(&self, request: FitRequest, _: &JobReporter) -> Result<FitOutcome, HookError> {
        if request.policy == "gated" {
            self.entered.lock().unwrap().send(()).unwrap();
            self.gate.lock().unwrap().recv().unwrap();
        }
        let upper = request.lease.expert("upper").unwrap().hash.unwrap();
        let plan = json!({
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

fn with_hooks(c: &mut ServingConfig) {
    c.selector = Some(Arc::new(InstantSelection));
    c.policies = Some(Arc::new(UpperPolicy::new().0));
}

/// Runs blocking client code while the daemon keeps serving on this runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn root() -> Caller {
    Caller {
        client: "in-process".into(),
        uid: Some(0),
    }
}

/// The whole rights check, against the daemon wherever `setup` serves it: uid 65534 may
/// fuse and use models but not change the library, fit, select, export, or touch others'
/// objects; the same calls from root (the daemon's user here) succeed.
async fn check_rights(setup: &OpenSetup) {
    let conn = setup.connect().await;
    let daemon = Daemon1Proxy::builder(&conn).build().await.unwrap();
    let experts = daemon.list_experts().await.unwrap();
    let plan = merge_plan(&experts, &["upper", "rot13"]);
    let roots_model = daemon.fuse_plan(&plan).await.unwrap();
    let roots_job = daemon
        .select(
            "{}",
            tiny_library().join("data/valid.jsonl").to_str().unwrap(),
        )
        .await
        .unwrap();
    let data = tiny_library().join("data/valid.jsonl");
    let data = data.to_str().unwrap();
    let incoming = setup.tmp.path().join("incoming/first");
    copy_adapter(&tiny_expert("first"), &incoming);
    let incoming = incoming.to_str().unwrap();
    let export = setup.tmp.path().join("export");

    let mut nobody = setup.python(true);
    let replies = blocking(|| {
        let mut r = serde_json::Map::new();
        let mut put = |k: &str, v: Value| r.insert(k.into(), v);
        // Any peer may fuse and use models.
        put("list", nobody.daemon("ListExperts", "", json!([])));
        put(
            "fuse",
            nobody.send(json!({
                "path": moerge_bus::DAEMON_PATH, "iface": "org.moerge.Daemon1",
                "method": "FusePlan", "sig": "s", "args": [plan], "save": "model",
            })),
        );
        put(
            "score",
            nobody.model("$model", "Score", "ss", json!(["upper kiwi>", "KIWI\n"])),
        );
        put(
            "generate",
            nobody.model(
                "$model",
                "Generate",
                "sa{sv}",
                json!(["upper kiwi>", {"max_tokens": 4}]),
            ),
        );
        put(
            "top",
            nobody.model("$model", "TopTokens", "su", json!(["upper kiwi>", 3])),
        );
        put(
            "explain",
            nobody.model("$model", "Explain", "s", json!(["upper kiwi>"])),
        );
        put(
            "score_roots",
            nobody.model(
                roots_model.as_str(),
                "Score",
                "ss",
                json!(["upper a>", "A"]),
            ),
        );
        // Nothing privileged.
        put("add", nobody.daemon("AddExpert", "s", json!([incoming])));
        put(
            "remove",
            nobody.daemon("RemoveExpert", "s", json!(["upper"])),
        );
        put(
            "fit",
            nobody.daemon("Fit", "ssasss", json!(["merge", "{}", [], data, "mine"])),
        );
        put(
            "save_plan",
            nobody.daemon("SavePlan", "ss", json!(["mine", data])),
        );
        put(
            "remove_plan",
            nobody.daemon("RemovePlan", "s", json!(["mine"])),
        );
        put("select", nobody.daemon("Select", "ss", json!(["{}", data])));
        put(
            "export",
            nobody.model(
                "$model",
                "ExportPeft",
                "s",
                json!([export.to_str().unwrap()]),
            ),
        );
        // Not others' objects.
        put(
            "release_roots",
            nobody.model(roots_model.as_str(), "Release", "", json!([])),
        );
        put(
            "cancel_roots_job",
            nobody.send(
                json!({"path": roots_job.as_str(), "iface": "org.moerge.Job1",
                               "method": "Cancel", "sig": "", "args": []}),
            ),
        );
        put(
            "release_roots_job",
            nobody.send(
                json!({"path": roots_job.as_str(), "iface": "org.moerge.Job1",
                               "method": "Release", "sig": "", "args": []}),
            ),
        );
        // Its own model, yes.
        put("release", nobody.model("$model", "Release", "", json!([])));
        r
    });
    let get = |k: &str| &replies[k];

    // What it may do worked, with the daemon's numbers.
    assert_eq!(ok_of(get("list")).as_array().unwrap().len(), 3);
    let path = ok_of(get("fuse")).as_str().unwrap().to_string();
    let theirs = setup
        .serving
        .models()
        .into_iter()
        .find(|m| moerge_bus::model_path(m.id) == path);
    assert!(theirs.is_none(), "released at the end");
    let reference = setup
        .serving
        .score(
            &root(),
            &setup
                .serving
                .fuse_plan(&root(), &plan)
                .await
                .expect("in-process fuse"),
            "upper kiwi>",
            "KIWI\n",
        )
        .await
        .unwrap();
    // ScoreResult (as, au, ad, d, d): the third field is the per-token NLL.
    let nll: Vec<f64> = ok_of(get("score"))[2]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect();
    assert_eq!(nll.len(), reference.nll.len());
    for (got, want) in nll.iter().zip(&reference.nll) {
        assert!(
            (got - f64::from(*want)).abs() < 1e-5,
            "{nll:?} vs {reference:?}"
        );
    }
    assert!(ok_of(get("generate")).is_string());
    assert_eq!(ok_of(get("top")).as_array().unwrap().len(), 3);
    assert!(ok_of(get("explain")).is_array());
    // On a bus every peer sees every model; on the private socket each peer has its own
    // connection, and its objects live there only: others' objects do not exist for it.
    let p2p = matches!(setup.reach, Reach::Socket(_));
    if p2p {
        assert_py_error(
            get("score_roots"),
            "org.freedesktop.DBus.Error.UnknownObject",
            &[],
        );
    } else {
        assert!(ok_of(get("score_roots")).is_array());
    }

    for (k, method) in [
        ("add", "AddExpert"),
        ("remove", "RemoveExpert"),
        ("fit", "Fit"),
        ("select", "Select"),
        ("export", "ExportPeft"),
        ("save_plan", "SavePlan"),
        ("remove_plan", "RemovePlan"),
    ] {
        assert_py_error(get(k), ACCESS_DENIED, &[method, "uid 65534", "uid 0"]);
    }
    for k in ["release_roots", "cancel_roots_job", "release_roots_job"] {
        if p2p {
            assert_py_error(get(k), "org.freedesktop.DBus.Error.UnknownObject", &[]);
        } else {
            assert_py_error(get(k), ACCESS_DENIED, &["another client"]);
        }
    }
    ok_of(get("release"));
    assert!(!export.exists(), "a refused export wrote nothing");
    assert_eq!(daemon.list_experts().await.unwrap().len(), 3);
    assert!(setup.library.join("upper").is_dir());

    // busctl as uid 65534 is refused the same way (busctl speaks to buses only).
    if matches!(setup.reach, Reach::Bus(_)) {
        let (ok, _, stderr) = blocking(|| {
            busctl_as_nobody(
                &setup.address(),
                &[
                    "call",
                    moerge_bus::WELL_KNOWN_NAME,
                    moerge_bus::DAEMON_PATH,
                    "org.moerge.Daemon1",
                    "RemoveExpert",
                    "s",
                    "upper",
                ],
            )
        });
        assert!(
            !ok && stderr.contains("RemoveExpert: only the daemon's user"),
            "{stderr}"
        );
    }

    // Root's objects are intact, and root may do all of it.
    let model = Model1Proxy::builder(&conn)
        .path(roots_model.clone())
        .build()
        .await
        .unwrap();
    model.score("upper a>", "A").await.unwrap();
    let added = daemon.add_expert(incoming).await.unwrap();
    assert_eq!(added.name, "first");
    daemon.remove_expert("first").await.unwrap();
    daemon.fit("merge", "{}", &[], data, "").await.unwrap();
    model.export_peft(export.to_str().unwrap()).await.unwrap();
    assert!(export.join("adapter_model.safetensors").is_file());
    model.release().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_uid_may_use_models_but_not_change_anything_over_the_bus() {
    require_root();
    let setup = OpenSetup::on_bus(with_hooks).await;
    check_rights(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peer_credentials_decide_the_same_on_the_private_socket() {
    require_root();
    let setup = OpenSetup::on_socket(with_hooks).await;
    check_rights(&setup).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_concurrent_call_limit_holds_per_client_over_the_bus() {
    let (policy, in_fit, open) = UpperPolicy::new();
    let setup = Setup::start_with(|c| {
        c.compute_threads = 3;
        c.limits = ClientLimits {
            concurrent_calls: 2,
            ..ClientLimits::default()
        };
        c.policies = Some(Arc::new(policy));
    })
    .await;
    let (conn, daemon) = setup.client().await;
    let experts = daemon.list_experts().await.unwrap();
    let path = daemon
        .fuse_plan(&merge_plan(&experts, &["upper"]))
        .await
        .unwrap();
    let model = Model1Proxy::builder(&conn)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let want = model.score("upper a>", "A\n").await.unwrap();

    // Two slow calls on one connection take this client's two slots...
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let daemon = daemon.clone();
            tokio::spawn(async move { daemon.fuse("gated", "{}", &[]).await })
        })
        .collect();
    for _ in 0..2 {
        let in_fit = &in_fit;
        blocking(|| {
            in_fit
                .recv_timeout(PATIENCE)
                .expect("both slow calls start")
        });
    }
    // ...so a third is refused at once, naming the limit...
    assert_error(
        model.score("upper a>", "A\n").await,
        ErrorKind::LimitExceeded,
        &["concurrent_calls", "(2)"],
    );
    assert_error(
        model
            .generate("upper a>", GenerateOptions::greedy(2).to_dict())
            .await,
        ErrorKind::LimitExceeded,
        &["concurrent_calls"],
    );
    // ...while another client is not affected.
    let (other_conn, _) = setup.client().await;
    let borrowed = Model1Proxy::builder(&other_conn)
        .path(path)
        .build()
        .await
        .unwrap();
    assert_eq!(borrowed.score("upper a>", "A\n").await.unwrap(), want);

    // Once the slow calls end, the slots are free again.
    open.send(()).unwrap();
    open.send(()).unwrap();
    for call in slow {
        call.await.unwrap().unwrap();
    }
    assert_eq!(model.score("upper a>", "A\n").await.unwrap(), want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_limits_are_per_client_for_models_and_jobs() {
    require_root();
    let setup = OpenSetup::on_socket(|c| {
        with_hooks(c);
        c.limits = ClientLimits {
            models: 1,
            jobs: 1,
            ..ClientLimits::default()
        };
    })
    .await;
    let conn = setup.connect().await;
    let daemon = Daemon1Proxy::builder(&conn).build().await.unwrap();
    let experts = daemon.list_experts().await.unwrap();
    let plan = merge_plan(&experts, &["upper"]);
    let data = tiny_library().join("data/valid.jsonl");
    let data = data.to_str().unwrap();

    // Jobs: one per client; a finished job counts until released.
    let job = daemon.select("{}", data).await.unwrap();
    assert_error(
        daemon.select("{}", data).await,
        ErrorKind::LimitExceeded,
        &["jobs", "(1)"],
    );
    let other_conn = setup.connect().await;
    let other = Daemon1Proxy::builder(&other_conn).build().await.unwrap();
    other.select("{}", data).await.unwrap();
    moerge_bus::Job1Proxy::builder(&conn)
        .path(job)
        .build()
        .await
        .unwrap()
        .release()
        .await
        .unwrap();
    daemon.select("{}", data).await.unwrap();

    // Models: one per client, for a peer of another uid too.
    daemon.fuse_plan(&plan).await.unwrap();
    let mut nobody = setup.python(true);
    let (first, second) = blocking(|| {
        (
            nobody.daemon("FusePlan", "s", json!([plan])),
            nobody.daemon("FusePlan", "s", json!([plan])),
        )
    });
    ok_of(&first);
    assert_py_error(
        &second,
        "org.moerge.Error.LimitExceeded",
        &["models", "(1)"],
    );
    assert_eq!(setup.serving.models().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_client_loses_its_models_and_jobs_on_the_bus_and_the_socket() {
    require_root();
    for setup in [
        OpenSetup::on_bus(with_hooks).await,
        OpenSetup::on_socket(with_hooks).await,
    ] {
        let conn = setup.connect().await;
        let daemon = Daemon1Proxy::builder(&conn).build().await.unwrap();
        let experts = daemon.list_experts().await.unwrap();
        let plan = merge_plan(&experts, &["reverse"]);
        let kept = daemon.fuse_plan(&plan).await.unwrap();
        let data = tiny_library().join("data/valid.jsonl");

        let mut nobody = setup.python(true);
        let mut root_py = setup.python(false);
        let (model, job) = blocking(|| {
            let model = nobody.daemon("FusePlan", "s", json!([plan]));
            root_py.daemon("FusePlan", "s", json!([plan]));
            let job = root_py.daemon("Select", "ss", json!(["{}", data.to_str().unwrap()]));
            (model, job)
        });
        let model = ok_of(&model).as_str().unwrap().to_string();
        let job = ok_of(&job).as_str().unwrap().to_string();
        let job_id: u64 = job.rsplit('/').next().unwrap().parse().unwrap();
        assert_eq!(setup.serving.models().len(), 3);
        setup.serving.job(job_id).unwrap();

        // SIGKILL: no goodbye; the bus (or the socket closing) tells the daemon.
        nobody.kill();
        root_py.kill();
        eventually("the killed clients' objects to be released", || async {
            let models = setup.serving.models();
            models.len() == 1 && setup.serving.job(job_id).is_err()
        })
        .await;
        assert_eq!(
            moerge_bus::model_path(setup.serving.models()[0].id),
            kept.as_str()
        );
        assert_ne!(model, kept.as_str());
        // The object is gone from the bus too, and the survivor still scores.
        let gone = Model1Proxy::builder(&conn)
            .path(model)
            .build()
            .await
            .unwrap();
        assert_eq!(
            gone.score("reverse ab>", "ba\n").await.unwrap_err().kind(),
            ErrorKind::ZBus
        );
        Model1Proxy::builder(&conn)
            .path(kept)
            .build()
            .await
            .unwrap()
            .score("reverse ab>", "ba\n")
            .await
            .unwrap();
    }
}
