//! Greedy selection on the real tiny library: the eval matrix rows equal the generator's
//! own matrix (`manifest.json`, computed when the experts were trained), rows are cached by
//! content so adding one expert evaluates one row, and the stored selection is the greedy
//! curve over the matrix.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moerge_daemon::selection::{self, EngineRows, EvalData, RowEvaluator};
use moerge_daemon::service::{Service, ServiceConfig};
use moerge_engine::{BaseModel, Precision, TextTokenizer};
use moerge_library::records::read_jsonl;

fn tiny() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-library")
}

fn copy_expert(name: &str, library: &Path) {
    let staging = library.parent().unwrap().join("staging").join(name);
    std::fs::create_dir_all(&staging).unwrap();
    for file in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(
            tiny().join("experts").join(name).join(file),
            staging.join(file),
        )
        .unwrap();
    }
    std::fs::rename(&staging, library.join(name)).unwrap();
}

/// Counts the rows it computes, delegating to the engine.
struct Counting<'a> {
    inner: EngineRows,
    calls: &'a RefCell<Vec<PathBuf>>,
}

impl RowEvaluator for Counting<'_> {
    fn evaluate(&self, dir: &Path, data: &EvalData) -> Result<BTreeMap<String, f64>, String> {
        self.calls.borrow_mut().push(dir.to_path_buf());
        self.inner.evaluate(dir, data)
    }
}

/// Waits until the service's current generation has these ready experts.
fn wait_ready(service: &Service, names: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60); // a hang guard only
    loop {
        let lease = service.lease();
        let ready: Vec<&str> = lease
            .experts()
            .iter()
            .filter(|(_, r)| r.is_ready())
            .map(|(n, _)| n.as_str())
            .collect();
        let mut want = names.to_vec();
        want.sort();
        if ready == want {
            return;
        }
        assert!(Instant::now() < deadline, "ready: {ready:?}, want {want:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn adding_an_expert_evaluates_one_row_and_rows_match_the_generator() {
    let tmp = tempfile::tempdir().unwrap();
    let library = tmp.path().join("library");
    std::fs::create_dir_all(&library).unwrap();
    for name in ["reverse", "upper", "cluster-strings"] {
        copy_expert(name, &library);
    }
    let mut config = ServiceConfig::new(
        library.clone(),
        tiny().join("base"),
        tmp.path().join("state"),
    );
    config.debounce = Duration::from_millis(50);
    let service = Service::start(config).unwrap();
    wait_ready(&service, &["cluster-strings", "reverse", "upper"]);

    let tasks = ["reverse", "upper", "rot13"];
    let records: Vec<_> = read_jsonl(&tiny().join("data/valid.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| tasks.contains(&r.task.as_deref().unwrap()))
        .collect();
    let data = EvalData::new("valid", records).unwrap();
    let base = Arc::new(BaseModel::load_dir(&tiny().join("base"), Precision::F32).unwrap());
    let tok = TextTokenizer::from_dir(&tiny().join("base")).unwrap();
    let calls = RefCell::new(Vec::new());
    let evaluator = Counting {
        inner: EngineRows::new(base, &tok, &data).unwrap(),
        calls: &calls,
    };
    let run = |evaluator: &Counting<'_>| {
        selection::run(
            service.index(),
            &service.lease(),
            &data,
            evaluator,
            selection::DEFAULT_TOLERANCE,
            &mut |_, _, _| {},
            &|| false,
        )
        .unwrap()
    };

    let first = run(&evaluator);
    assert_eq!(calls.borrow().len(), 3);
    assert_eq!(first.evaluated, ["cluster-strings", "reverse", "upper"]);

    // The rows are the generator's matrix (computed per task when the library was made).
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tiny().join("manifest.json")).unwrap()).unwrap();
    let all_tasks: Vec<&str> = manifest["validation_loss"]["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    let matrix = selection::refresh(
        service.index(),
        &service.lease(),
        &data,
        &evaluator,
        &mut |_, _, _| {},
        &|| false,
    )
    .unwrap()
    .matrix;
    assert_eq!(calls.borrow().len(), 3, "a second refresh computes nothing");
    assert_eq!(matrix.tasks, ["reverse", "rot13", "upper"]);
    for (expert, row) in &matrix.rows {
        for (task, got) in matrix.tasks.iter().zip(row) {
            let t = all_tasks.iter().position(|x| x == task).unwrap();
            let want = manifest["validation_loss"]["rows"][expert][t]
                .as_f64()
                .unwrap();
            assert!(
                (got - want).abs() < 1e-4,
                "{expert} on {task}: {got} vs {want}"
            );
        }
    }

    // One expert more: one row more.
    copy_expert("rot13", &library);
    wait_ready(&service, &["cluster-strings", "reverse", "rot13", "upper"]);
    let second = run(&evaluator);
    assert_eq!(calls.borrow().len(), 4);
    assert_eq!(second.evaluated, ["rot13"]);
    // Each private expert is the best on its own task, so the full value is reached only
    // when all three are in; the cluster expert may start the curve but adds nothing after.
    let s = &second.selection;
    assert_eq!(s.order.len(), 4);
    let mut active = s.active_set().to_vec();
    active.sort();
    assert!(
        ["reverse", "rot13", "upper"]
            .iter()
            .all(|e| active.contains(&e.to_string())),
        "{s:?}"
    );
    assert!(s.curve.windows(2).all(|w| w[1] <= w[0]), "{s:?}");

    // A rename keeps the row: nothing is evaluated.
    std::fs::rename(library.join("upper"), library.join("upper2")).unwrap();
    wait_ready(&service, &["cluster-strings", "reverse", "rot13", "upper2"]);
    let third = run(&evaluator);
    assert!(third.evaluated.is_empty(), "{:?}", third.evaluated);
    assert_eq!(calls.borrow().len(), 4);

    // The stored selection is the last run's, by content hash.
    let stored = service
        .index()
        .selections()
        .unwrap()
        .into_iter()
        .find(|r| r.name == selection::ACTIVE_SELECTION)
        .unwrap();
    assert_eq!(stored.curve.len(), third.selection.curve.len());
    for (a, b) in stored.curve.iter().zip(&third.selection.curve) {
        assert!((a - b).abs() <= 1e-12 * b.abs(), "{a} vs {b}");
    }
    assert_eq!(stored.active, third.selection.active);
    let lease = service.lease();
    let want: Vec<_> = third
        .selection
        .order
        .iter()
        .map(|n| lease.expert(n).unwrap().hash.unwrap())
        .collect();
    assert_eq!(stored.order, want);
}

/// Counts its rows; `Send`, for the refresher thread.
struct Shared {
    inner: EngineRows,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

impl RowEvaluator for Shared {
    fn evaluate(&self, dir: &Path, data: &EvalData) -> Result<BTreeMap<String, f64>, String> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.evaluate(dir, data)
    }
}

#[test]
fn the_refresher_reselects_and_reclusters_after_each_library_change() {
    let tmp = tempfile::tempdir().unwrap();
    let library = tmp.path().join("library");
    std::fs::create_dir_all(&library).unwrap();
    for name in ["reverse", "upper"] {
        copy_expert(name, &library);
    }
    let mut config = ServiceConfig::new(
        library.clone(),
        tiny().join("base"),
        tmp.path().join("state"),
    );
    config.debounce = Duration::from_millis(50);
    let service = Arc::new(Service::start(config).unwrap());
    wait_ready(&service, &["reverse", "upper"]);

    let records: Vec<_> = read_jsonl(&tiny().join("data/valid.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| ["reverse", "upper", "rot13"].contains(&r.task.as_deref().unwrap()))
        .collect();
    let data = EvalData::new("valid", records).unwrap();
    let base = Arc::new(BaseModel::load_dir(&tiny().join("base"), Precision::F32).unwrap());
    let tok = TextTokenizer::from_dir(&tiny().join("base")).unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let evaluator = Shared {
        inner: EngineRows::new(base, &tok, &data).unwrap(),
        calls: calls.clone(),
    };
    let auto = selection::AutoRefresh::start(
        service.clone(),
        data,
        Box::new(evaluator),
        selection::DEFAULT_TOLERANCE,
        Default::default(),
    )
    .unwrap();
    let mut rx = auto.subscribe();
    type Latest = tokio::sync::watch::Receiver<Option<Arc<selection::Refresh>>>;
    let next = |rx: &mut Latest, after: u64| -> Arc<selection::Refresh> {
        let deadline = Instant::now() + Duration::from_secs(120); // a hang guard only
        loop {
            let seen: Option<Arc<selection::Refresh>> = rx.borrow_and_update().clone();
            if let Some(r) = seen.filter(|r| r.generation > after) {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "no refresh after generation {after}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let first = next(&mut rx, 0);
    let report = first.selection.as_ref().unwrap();
    assert_eq!(report.evaluated, ["reverse", "upper"]);
    assert_eq!(
        first.clustering.as_ref().unwrap().experts,
        ["reverse", "upper"]
    );

    copy_expert("rot13", &library);
    let second = next(&mut rx, first.generation);
    let second = if second.selection.as_ref().unwrap().selection.order.len() < 3 {
        next(&mut rx, second.generation) // the copy was seen in two steps
    } else {
        second
    };
    let report = second.selection.as_ref().unwrap();
    assert_eq!(report.evaluated, ["rot13"]);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 3);
    let mut active = second.active_set().unwrap().to_vec();
    active.sort();
    assert_eq!(
        active,
        ["reverse", "rot13", "upper"],
        "each is its task's best"
    );
    assert_eq!(second.clustering.as_ref().unwrap().experts.len(), 3);
}
