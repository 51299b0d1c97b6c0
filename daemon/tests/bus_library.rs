//! Over a real bus: changing the library (AddExpert, RemoveExpert), its signals, models
//! going stale, and jobs through the policy-runner and selector hooks.

mod bus_support;

use std::sync::Arc;

use futures_util::StreamExt;
use moerge_bus::{ErrorKind, Job1Proxy, JobState, Model1Proxy};
use moerge_daemon::serving::{
    FitOutcome, FitRequest, HookError, JobReporter, PolicyDescription, PolicyRunner, SelectOutcome,
    SelectRequest, Selector,
};

use bus_support::*;

fn library_listing(setup: &Setup) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(&setup.library)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_changes_through_the_bus_and_models_go_stale() {
    let setup = Setup::start().await;
    let (conn, daemon) = setup.client().await;
    let mut changes = daemon.receive_library_changed().await.unwrap();

    // A malformed adapter is refused, naming the file; the library folder is untouched.
    let before = library_listing(&setup);
    let broken = setup.tmp.path().join("incoming/broken");
    copy_adapter(&tiny_expert("first"), &broken);
    let weights = broken.join("adapter_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() / 2]).unwrap();
    assert_error(
        daemon.add_expert(broken.to_str().unwrap()).await,
        ErrorKind::InvalidArgument,
        &["path", "adapter_model.safetensors"],
    );
    assert_error(
        daemon.add_expert("incoming/broken").await,
        ErrorKind::InvalidArgument,
        &["path", "absolute"],
    );
    assert_error(
        daemon
            .add_expert(setup.library.join("upper").to_str().unwrap())
            .await,
        ErrorKind::InvalidArgument,
        &["already has an expert named \"upper\""],
    );
    assert_eq!(library_listing(&setup), before);

    // A good one is copied in, indexed, and announced.
    let source = setup.tmp.path().join("incoming/first");
    copy_adapter(&tiny_expert("first"), &source);
    let added = daemon.add_expert(source.to_str().unwrap()).await.unwrap();
    assert_eq!(
        (added.name.as_str(), added.state.as_str()),
        ("first", "ready")
    );
    assert_eq!(
        library_listing(&setup),
        ["first", "reverse", "rot13", "upper"]
    );
    let signal = changes.next().await.unwrap();
    let args = signal.args().unwrap();
    assert_eq!(args.added(), &["first".to_string()]);
    assert!(args.removed().is_empty() && args.changed().is_empty());
    assert_eq!(*args.generation(), added.library_generation);

    // A model over "first" and "upper" goes stale when "upper" changes on disk; one that
    // does not use "upper" stays fresh.
    let experts = daemon.list_experts().await.unwrap();
    let model_path = daemon
        .fuse_plan(&merge_plan(&experts, &["first", "upper"]))
        .await
        .unwrap();
    let model = Model1Proxy::builder(&conn)
        .path(model_path)
        .build()
        .await
        .unwrap();
    let other_path = daemon
        .fuse_plan(&merge_plan(&experts, &["reverse"]))
        .await
        .unwrap();
    let other = Model1Proxy::builder(&conn)
        .path(other_path)
        .build()
        .await
        .unwrap();
    let score_before = model.score("upper ab>", "AB\n").await.unwrap();
    let mut stale_changes = model.receive_stale_changed().await;
    let config = setup.library.join("upper/adapter_config.json");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("\"lora_alpha\": 8.0", "\"lora_alpha\": 4.0");
    std::fs::write(&config, text).unwrap();
    // The stream starts with the current value (false), then the change signal's.
    while !stale_changes.next().await.unwrap().get().await.unwrap() {}
    assert!(model.stale().await.unwrap());
    assert!(!other.stale().await.unwrap());
    // The stale model still serves the generation it leased.
    assert_eq!(
        model.score("upper ab>", "AB\n").await.unwrap(),
        score_before
    );
    let signal = changes.next().await.unwrap();
    assert_eq!(signal.args().unwrap().changed(), &["upper".to_string()]);

    // Removal.
    daemon.remove_expert("first").await.unwrap();
    assert_error(
        daemon.get_expert("first").await,
        ErrorKind::NoSuchExpert,
        &["first"],
    );
    assert_error(
        daemon.remove_expert("first").await,
        ErrorKind::NoSuchExpert,
        &["first"],
    );
    assert_eq!(library_listing(&setup), ["reverse", "rot13", "upper"]);
}

/// A policy that makes a uniform merge of the requested experts, reporting progress; with
/// `"wait": true` in its parameters it runs until cancelled.
struct UniformPolicy;

impl PolicyRunner for UniformPolicy {
    fn policies(&self) -> Vec<PolicyDescription> {
        vec![PolicyDescription {
            name: "uniform-merge".into(),
            version: "0.0.1".into(),
            description: "test double".into(),
        }]
    }

    fn fit(&self, request: FitRequest, reporter: &JobReporter) -> Result<FitOutcome, HookError> {
        if request.policy != "uniform-merge" {
            return Err(HookError::InvalidArgument {
                argument: "policy".into(),
                message: format!("no policy named {:?}", request.policy),
            });
        }
        if request.params_json.contains("wait") {
            while !reporter.is_cancelled() {
                reporter.progress(0.25, "waiting to be cancelled");
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            return Err(HookError::Cancelled);
        }
        reporter.progress(0.5, "merging");
        let experts: Vec<serde_json::Value> = request
            .experts
            .iter()
            .map(|n| {
                let hash = request
                    .lease
                    .expert(n)
                    .and_then(|e| e.hash)
                    .unwrap()
                    .to_string();
                serde_json::json!({"name": n, "hash": hash})
            })
            .collect();
        let w = 1.0 / experts.len() as f64;
        let plan = serde_json::json!({
            "moerge_plan": 1,
            "experts": experts,
            "default": {"static": {"weights": vec![w; request.experts.len()], "space": "lowrank"}},
        });
        Ok(FitOutcome {
            plan_json: plan.to_string(),
            tensors: None,
            valid_loss: None,
        })
    }
}

struct FirstTwo;

impl Selector for FirstTwo {
    fn select(&self, request: SelectRequest, _: &JobReporter) -> Result<SelectOutcome, HookError> {
        let selected: Vec<String> = request.lease.experts().keys().take(2).cloned().collect();
        Ok(SelectOutcome {
            result_json: serde_json::json!({"selected": selected}).to_string(),
            selected,
        })
    }
}

async fn finished(job: &Job1Proxy<'_>) -> JobState {
    let mut states = job.receive_state_changed().await;
    loop {
        let state = JobState::parse(&job.state().await.unwrap()).unwrap();
        if state.is_final() {
            return state;
        }
        states.next().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_through_the_hooks_and_report_on_the_bus() {
    let data = tiny_library().join("data/valid.jsonl");
    let data = data.to_str().unwrap();

    // Without hooks: clear refusals.
    let bare = Setup::start().await;
    let (_c, daemon) = bare.client().await;
    assert!(daemon.list_policies().await.unwrap().is_empty());
    assert_error(
        daemon.fuse("uniform-merge", "{}", &["upper"]).await,
        ErrorKind::NotSupported,
        &["Fuse", "FusePlan"],
    );
    assert_error(
        daemon
            .fit("uniform-merge", "{}", &["upper"], data, "")
            .await,
        ErrorKind::NotSupported,
        &["Fit"],
    );
    assert_error(
        daemon.select("{}", data).await,
        ErrorKind::NotSupported,
        &["Select"],
    );
    drop(bare);

    let setup = Setup::start_with(|c| {
        c.policies = Some(Arc::new(UniformPolicy));
        c.selector = Some(Arc::new(FirstTwo));
    })
    .await;
    let (conn, daemon) = setup.client().await;
    assert_eq!(daemon.policies().await.unwrap(), ["uniform-merge"]);

    let path = daemon
        .fuse("uniform-merge", "{}", &["upper", "rot13"])
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
    assert_error(
        daemon.fuse("nope", "{}", &["upper"]).await,
        ErrorKind::InvalidArgument,
        &["policy", "nope"],
    );

    assert_error(
        daemon
            .fit("uniform-merge", "{}", &["upper"], "rel.jsonl", "")
            .await,
        ErrorKind::InvalidArgument,
        &["data", "absolute"],
    );
    let job_path = daemon
        .fit("uniform-merge", "{}", &["upper", "reverse"], data, "")
        .await
        .unwrap();
    let job = Job1Proxy::builder(&conn)
        .path(job_path)
        .build()
        .await
        .unwrap();
    assert_eq!(job.kind().await.unwrap(), "fit");
    assert_eq!(finished(&job).await, JobState::Succeeded);
    assert_eq!(job.progress().await.unwrap(), 1.0);
    let result: serde_json::Value = serde_json::from_str(&job.result().await.unwrap()).unwrap();
    let plan = result["plan"].to_string();
    daemon
        .fuse_plan(&plan)
        .await
        .expect("the fitted plan fuses");
    job.release().await.unwrap();

    let waiting = daemon
        .fit("uniform-merge", "{\"wait\": true}", &["upper"], data, "")
        .await
        .unwrap();
    let waiting = Job1Proxy::builder(&conn)
        .path(waiting)
        .build()
        .await
        .unwrap();
    eventually("the job to run", || async {
        waiting.state().await.unwrap() == "running"
    })
    .await;
    waiting.cancel().await.unwrap();
    assert_eq!(finished(&waiting).await, JobState::Cancelled);

    let mut selections = daemon.receive_selection_changed().await.unwrap();
    let select = daemon.select("{}", data).await.unwrap();
    let select = Job1Proxy::builder(&conn)
        .path(select)
        .build()
        .await
        .unwrap();
    assert_eq!(finished(&select).await, JobState::Succeeded);
    let signal = selections.next().await.unwrap();
    assert_eq!(
        signal.args().unwrap().experts(),
        &["reverse".to_string(), "rot13".to_string()]
    );
}
