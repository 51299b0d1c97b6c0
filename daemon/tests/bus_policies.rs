//! The real policy plugins behind the bus: Fuse with built-ins equals FusePlan of the same
//! hand-written plan; a Fit job with progress, stored plan, FuseSaved equal to the engine on
//! the stored plan and tensors; cancel; bad requests; a panicking plugin; stored plans.

mod bus_support;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use moerge_bus::{ErrorKind, Job1Proxy, JobState, Model1Proxy};
use moerge_daemon::fitting::PluginRunner;
use moerge_engine::{inference, BaseModel, Precision, TextTokenizer};
use moerge_library::{parse_tensor_file, Adapter, TensorMap};
use moerge_policy_host::PolicyFolder;
use moerge_sdk::plan::Plan;
use zbus::Connection;

use bus_support::*;

/// The folder cargo built the plugin `.so` files into (the test binary's own).
fn plugin_dir() -> PathBuf {
    std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The built-ins and the panicking test plugin.
fn runner() -> Arc<PluginRunner> {
    let builtins = PolicyFolder {
        path: plugin_dir(),
        filter: moerge_policy_host::FileFilter::BuiltinNames,
    };
    let mut runner = PluginRunner::from_folders(&[builtins]);
    runner
        .registry_mut()
        .add_file(&plugin_dir().join("libmoerge_test_plugin_panic.so"));
    Arc::new(runner)
}

async fn setup() -> Setup {
    Setup::start_with(|c| c.policies = Some(runner())).await
}

/// Training and validation data of the three tasks, small.
fn data_dir(dir: &Path) -> PathBuf {
    let out = dir.join("data");
    std::fs::create_dir_all(&out).unwrap();
    for (split, per_task) in [("train", 24), ("valid", 8)] {
        let text =
            std::fs::read_to_string(tiny_library().join(format!("data/{split}.jsonl"))).unwrap();
        let mut kept = String::new();
        for task in EXPERTS {
            for line in text
                .lines()
                .filter(|l| l.contains(&format!("\"task\":\"{task}\"")))
                .take(per_task)
            {
                kept += line;
                kept.push('\n');
            }
        }
        std::fs::write(out.join(format!("{split}.jsonl")), kept).unwrap();
    }
    out
}

async fn model<'a>(conn: &Connection, path: zbus::OwnedObjectPath) -> Model1Proxy<'a> {
    Model1Proxy::builder(conn).path(path).build().await.unwrap()
}

async fn job<'a>(conn: &Connection, path: zbus::OwnedObjectPath) -> Job1Proxy<'a> {
    Job1Proxy::builder(conn).path(path).build().await.unwrap()
}

const PROMPT: (&str, &str) = ("upper kiwi>", "KIWI\n");

async fn nll(model: &Model1Proxy<'_>) -> Vec<f64> {
    model.score(PROMPT.0, PROMPT.1).await.unwrap().token_nll
}

/// Waits for the job to end, recording every progress value seen.
async fn finish(job: &Job1Proxy<'_>) -> (JobState, Vec<f64>) {
    let deadline = std::time::Instant::now() + PATIENCE;
    let mut seen = Vec::new();
    loop {
        seen.push(job.progress().await.unwrap());
        let state = JobState::parse(&job.state().await.unwrap()).unwrap();
        if state.is_final() {
            seen.push(job.progress().await.unwrap());
            return (state, seen);
        }
        assert!(std::time::Instant::now() < deadline, "the job did not end");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn built_in_policies_fuse_as_their_plans_do() {
    let setup = setup().await;
    let (conn, daemon) = setup.client().await;
    let names: Vec<String> = daemon
        .list_policies()
        .await
        .unwrap()
        .into_iter()
        .map(|p| p.name)
        .collect();
    for want in [
        "uniform-merge",
        "arrow",
        "sgd-router",
        "hierarchical",
        "ensemble",
        "learned-merge",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let experts = daemon.list_experts().await.unwrap();

    let by_policy = model(&conn, daemon.fuse("uniform-merge", "", &[]).await.unwrap()).await;
    let by_plan = model(
        &conn,
        daemon
            .fuse_plan(&merge_plan(&experts, &["reverse", "rot13", "upper"])) // every ready expert, by name
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(nll(&by_policy).await, nll(&by_plan).await);

    let by_policy = model(
        &conn,
        daemon
            .fuse("arrow", r#"{"top_k": 2}"#, &["reverse", "upper"])
            .await
            .unwrap(),
    )
    .await;
    let by_plan = model(
        &conn,
        daemon
            .fuse_plan(&arrow_plan(&experts, &["reverse", "upper"], 2))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(nll(&by_policy).await, nll(&by_plan).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fit_job_stores_a_plan_that_serves_as_the_engine_computes_it() {
    let setup = setup().await;
    let (conn, daemon) = setup.client().await;
    let data = data_dir(setup.tmp.path());
    let path = daemon
        .fit(
            "sgd-router",
            r#"{"steps": 8}"#,
            &[],
            data.to_str().unwrap(),
            "router",
        )
        .await
        .unwrap();
    let fit = job(&conn, path).await;
    let (state, progress) = finish(&fit).await;
    assert_eq!(
        state,
        JobState::Succeeded,
        "{}",
        fit.message().await.unwrap()
    );
    assert!(progress.windows(2).all(|w| w[1] >= w[0]), "{progress:?}");
    assert_eq!(*progress.last().unwrap(), 1.0);
    let result: serde_json::Value = serde_json::from_str(&fit.result().await.unwrap()).unwrap();
    assert_eq!(result["plan_name"], "router");
    assert!(
        result["valid_loss"].as_f64().unwrap().is_finite(),
        "{result}"
    );
    let plans = daemon.list_plans().await.unwrap();
    assert!(
        plans.iter().any(|p| p.name == "router" && !p.stale),
        "{plans:?}"
    );

    // The stored plan and tensors, served by the engine in process.
    let stored = setup
        .serving
        .service()
        .index()
        .plan("router")
        .unwrap()
        .unwrap();
    let plan = Plan::from_json(&stored.body).unwrap();
    let hash = plan.tensors.clone().expect("a learned router has tensors");
    let file = format!("{hash}.safetensors");
    let bytes = setup
        .serving
        .service()
        .index()
        .blob(&stored.tensors[&file])
        .unwrap();
    let tensors: TensorMap = parse_tensor_file(Path::new(&file), &bytes, &hash).unwrap();
    let adapters: Vec<Adapter> = plan
        .experts
        .iter()
        .map(|e| Adapter::load(&setup.library.join(&e.name)).unwrap())
        .collect();
    let base = BaseModel::load_dir(&tiny_base(), Precision::F32).unwrap();
    let tok = TextTokenizer::from_dir(&tiny_base()).unwrap();
    let fused = base.fuse_with(&plan, &adapters, &tensors).unwrap();
    let want = inference::score(
        &fused,
        &tok.encode(PROMPT.0).unwrap(),
        &tok.encode(PROMPT.1).unwrap(),
    )
    .unwrap();
    let want: Vec<f64> = want.token_nll.iter().map(|&x| f64::from(x)).collect();

    let saved = model(&conn, daemon.fuse_saved("router").await.unwrap()).await;
    assert_eq!(nll(&saved).await, want);
    // The same plan sent as JSON finds its tensors by hash.
    let again = model(&conn, daemon.fuse_plan(&stored.body).await.unwrap()).await;
    assert_eq!(nll(&again).await, want);

    // Written to files as `moerge fit` would, saved under another name, fused back.
    let dir = setup.tmp.path().join("offline");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("plan.json"), &stored.body).unwrap();
    std::fs::write(dir.join(&file), &bytes).unwrap();
    let info = daemon
        .save_plan("copy", dir.join("plan.json").to_str().unwrap())
        .await
        .unwrap();
    assert_eq!(info.name, "copy");
    daemon.remove_plan("router").await.unwrap();
    let copy = model(&conn, daemon.fuse_saved("copy").await.unwrap()).await;
    assert_eq!(nll(&copy).await, want);
    assert_error(
        daemon.fuse_saved("router").await,
        ErrorKind::NoSuchObject,
        &["router"],
    );
    assert_error(
        daemon.remove_plan("router").await,
        ErrorKind::NoSuchObject,
        &["router"],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_fit_stores_nothing_and_bad_requests_are_named() {
    let setup = setup().await;
    let (conn, daemon) = setup.client().await;
    let data = data_dir(setup.tmp.path());
    let path = daemon
        .fit(
            "sgd-router",
            r#"{"steps": 100000}"#,
            &[],
            data.to_str().unwrap(),
            "long",
        )
        .await
        .unwrap();
    let long = job(&conn, path).await;
    eventually("the fit to make progress", || {
        let long = long.clone();
        async move { long.progress().await.unwrap() > 0.0 }
    })
    .await;
    long.cancel().await.unwrap();
    assert_eq!(finish(&long).await.0, JobState::Cancelled);
    assert!(daemon
        .list_plans()
        .await
        .unwrap()
        .iter()
        .all(|p| p.name != "long"));

    assert_error(
        daemon.fuse("nope", "", &[]).await,
        ErrorKind::InvalidArgument,
        &["policy", "nope", "arrow"],
    );
    assert_error(
        daemon.fuse("arrow", "{top_k", &[]).await,
        ErrorKind::InvalidArgument,
        &["params", "JSON"],
    );
    assert_error(
        daemon.fuse("arrow", "[1]", &[]).await,
        ErrorKind::InvalidArgument,
        &["params", "object"],
    );
    assert_error(
        daemon.fuse("arrow", r#"{"top_k": 0}"#, &[]).await,
        ErrorKind::InvalidArgument,
        &["params", "top_k"],
    );
    assert_error(
        daemon.fuse("arrow", "", &["ghost"]).await,
        ErrorKind::InvalidArgument,
        &["experts[0]", "ghost"],
    );
    assert_error(
        daemon.fuse("sgd-router", "", &[]).await,
        ErrorKind::PluginFailed,
        &["training"],
    );
    assert_error(
        daemon.fuse("test-panic", "", &[]).await,
        ErrorKind::PluginFailed,
        &["test-panic"],
    );
    let bad = setup.tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"task\":\"upper\",\"prompt\":\"a>\",\"completion\":\"A\\n\"}\n{\"prompt\": 3}\n",
    )
    .unwrap();
    let failed = job(
        &conn,
        daemon
            .fit("sgd-router", "", &[], bad.to_str().unwrap(), "")
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(finish(&failed).await.0, JobState::Failed);
    let message = failed.message().await.unwrap();
    assert!(message.contains("bad.jsonl:2"), "{message}");
    assert_error(
        daemon
            .fit("sgd-router", "", &[], data.to_str().unwrap(), "a/b")
            .await,
        ErrorKind::InvalidArgument,
        &["name"],
    );

    // A plan naming a tensor file nobody stored.
    let experts = daemon.list_experts().await.unwrap();
    let mut plan: serde_json::Value =
        serde_json::from_str(&merge_plan(&experts, &["upper"])).unwrap();
    plan["tensors"] = "0".repeat(64).into();
    assert_error(
        daemon.fuse_plan(&plan.to_string()).await,
        ErrorKind::InvalidArgument,
        &["tensors", "SavePlan"],
    );

    // After all that, the daemon still serves.
    let fine = model(
        &conn,
        daemon
            .fuse_plan(&merge_plan(&experts, &["upper"]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(nll(&fine).await.len(), 5);
}
