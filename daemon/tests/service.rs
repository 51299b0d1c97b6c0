//! The service core: leases keep their generation across changes, plans go stale, background
//! hooks run, and a restart reconciles what changed while the service was down.

mod support;

use std::sync::{Arc, Mutex};

use moerge_daemon::index::{DerivedValue, Index, PlanExpert};
use moerge_daemon::service::sketch::{decode_sketch, SKETCH_KIND};
use moerge_daemon::service::{BackgroundWork, ExpertChange, LeaseError, LibraryEvent, Service};
use support::*;

#[test]
fn a_lease_keeps_its_generation_while_files_change_in_place() {
    let h = Harness::new();
    copy_adapter(&fixture_adapter("rot13"), &h.dir("a"));
    copy_adapter(&fixture_adapter("twice"), &h.dir("b"));
    let service = h.start();
    let mut rx = service.subscribe();

    let old = service.lease();
    let adapter = old.open("a").unwrap();
    let module = adapter.modules().values().next().unwrap().clone();
    let old_values = adapter.tensor_f32(&module.b);
    let old_hash = adapter.hash();

    // Rewrite both of a's files in place, with other weights, as `cp` would.
    copy_adapter(&fixture_adapter("minus"), &h.dir("a"));
    copy_adapter(&fixture_adapter("length"), &h.dir("b"));
    let (minus, length) = (
        hash_of(&fixture_adapter("minus")),
        hash_of(&fixture_adapter("length")),
    );
    wait_for(&mut rx, |_| {
        let lease = service.lease();
        lease.expert("a").unwrap().hash == Some(minus)
            && lease.expert("b").unwrap().hash == Some(length)
    });

    let new = service.lease();
    assert!(new.generation() > old.generation());
    // Usually 2; 3 if the watcher caught the copy between its two files.
    assert!(new.expert("a").unwrap().generation >= 2);
    // The old lease still sees, and reads, exactly what it started with.
    assert_eq!(old.expert("a").unwrap().hash, Some(old_hash));
    assert_eq!(adapter.tensor_f32(&module.b), old_values);
    assert_eq!(old.open("a").unwrap().hash(), old_hash);
    // An expert first opened after its folder changed is refused, never torn.
    assert!(
        matches!(old.open("b"), Err(LeaseError::Changed { .. })),
        "{:?}",
        old.open("b")
    );
    assert_ne!(new.open("a").unwrap().tensor_f32(&module.b), old_values);

    assert_eq!(
        service.live_generations(),
        vec![old.generation(), new.generation()]
    );
    let pins = || std::fs::read_dir(h.state.join("pins")).unwrap().count();
    assert_eq!(pins(), 2, "old a and new a");
    drop(adapter);
    drop(old);
    assert_eq!(service.live_generations(), vec![new.generation()]);
    assert_eq!(
        pins(),
        1,
        "the old generation's copy went with its last lease"
    );
}

#[test]
fn a_library_change_marks_the_plans_naming_the_expert_stale() {
    let h = Harness::new();
    copy_adapter(&fixture_adapter("rot13"), &h.dir("a"));
    copy_adapter(&fixture_adapter("twice"), &h.dir("b"));
    let service = h.start();
    let mut rx = service.subscribe();
    let named = |n: &str| PlanExpert {
        name: n.into(),
        hash: hash_of(&h.dir(n)),
    };
    let index = service.index();
    index
        .put_plan(
            "uses-a",
            &[named("a"), named("b")],
            "{}",
            &[("router", &[1u8; 4096])],
        )
        .unwrap();
    index.put_plan("only-b", &[named("b")], "{}", &[]).unwrap();

    edit_config(&h.dir("a"), |c| c["lora_alpha"] = 3.into());
    let events = wait_change(&mut rx, "a", |_| true);
    assert_eq!(
        events.last().unwrap().stale_plans,
        vec!["uses-a".to_string()]
    );
    let stale = index.plan("uses-a").unwrap().unwrap().stale.unwrap();
    assert!(stale.contains("expert a changed"), "{stale}");
    assert_eq!(index.plan("only-b").unwrap().unwrap().stale, None);
}

/// The thread each call ran on, and the events it got.
type Calls = Arc<Mutex<Vec<(String, Vec<LibraryEvent>)>>>;

struct Recorder(Calls);

impl BackgroundWork for Recorder {
    fn library_changed(&mut self, events: &[LibraryEvent], _: &Index) {
        let thread = std::thread::current().name().unwrap_or("").to_owned();
        self.0.lock().unwrap().push((thread, events.to_vec()));
    }
}

#[test]
fn background_work_runs_on_its_own_thread_after_each_change() {
    let h = Harness::new();
    let calls: Calls = Arc::default();
    let service = Service::start_with(h.config(), vec![Box::new(Recorder(calls.clone()))]).unwrap();
    let mut rx = service.subscribe();
    copy_adapter(&fixture_adapter("rot13"), &h.dir("a"));
    let published = wait_change(&mut rx, "a", |_| true);
    service.shutdown(); // joins the background thread
    let calls = calls.lock().unwrap();
    let seen: Vec<&LibraryEvent> = calls.iter().flat_map(|(_, events)| events).collect();
    assert_eq!(seen, published.iter().collect::<Vec<_>>());
    assert!(
        calls
            .iter()
            .all(|(thread, _)| thread == "moerge-background"),
        "{calls:?}"
    );
}

#[test]
fn restarts_reconcile_offline_changes_and_reuse_cached_work() {
    let h = Harness::new();
    for task in TASKS {
        copy_adapter(&fixture_adapter(task), &h.dir(task));
    }
    // Stamps of files changed in the last moments cannot be trusted; let these age.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    let cold = h.start();
    let report = cold.startup().reconcile.clone();
    assert_eq!(
        (report.loaded, report.unchanged, report.sketches_computed),
        (5, 0, 5),
        "{report:?}"
    );
    assert_eq!(cold.startup().changes.len(), 5);
    cold.shutdown();

    let warm = h.start();
    let report = warm.startup().reconcile.clone();
    assert_eq!(
        (report.loaded, report.unchanged, report.sketches_computed),
        (0, 5, 0),
        "{report:?}"
    );
    assert!(warm.startup().changes.is_empty());
    let generation = warm.startup().generation;
    warm.shutdown();

    // While it is down: one added, one modified, one removed, one renamed.
    variant(&fixture_adapter("rot13"), &h.dir("new"), 5);
    edit_config(&h.dir("length"), |c| c["lora_alpha"] = 9.into());
    std::fs::remove_dir_all(h.dir("minus")).unwrap();
    std::fs::rename(h.dir("twice"), h.dir("double")).unwrap();
    let service = h.start();
    let startup = service.startup();
    let kinds: Vec<String> = startup
        .changes
        .iter()
        .map(|c| format!("{}:{}", kind(c), c.name()))
        .collect();
    assert_eq!(
        kinds,
        [
            "renamed:double",
            "updated:length",
            "removed:minus",
            "added:new"
        ]
    );
    assert_eq!(
        startup.generation,
        generation + 1,
        "one change, one generation"
    );
    let report = &startup.reconcile;
    assert_eq!(
        report.sketches_computed, 2,
        "new and length; double kept twice's: {report:?}"
    );
    assert_eq!(
        report.gc.derived_removed, 2,
        "the sketches of minus and of the old length"
    );
    assert_eq!(index_view(service.index()), folder_truth(&h.library));
    let mut referenced = std::collections::BTreeSet::new();
    for expert in service.lease().experts().values() {
        let hash = expert.hash.unwrap();
        let sketch = service.index().derived(&hash, SKETCH_KIND).unwrap();
        assert!(decode_sketch(&sketch.unwrap()).is_some(), "{}", expert.name);
        match service.index().derived_entry(&hash, SKETCH_KIND).unwrap() {
            Some(DerivedValue::Blob(id)) => referenced.insert(id),
            other => panic!("a sketch is big enough for a blob: {other:?}"),
        };
    }
    // "new" differs from rot13 by its alpha only: its update, and so its sketch, is scaled;
    // every expert has a blob of its own.
    assert_eq!(referenced.len(), 5);
    let blobs: std::collections::BTreeSet<_> =
        service.index().blob_files().unwrap().into_iter().collect();
    assert_eq!(
        blobs, referenced,
        "every sketch has its blob, and no blob is orphaned"
    );
}

fn kind(change: &ExpertChange) -> &'static str {
    match change {
        ExpertChange::Added { .. } => "added",
        ExpertChange::Updated { .. } => "updated",
        ExpertChange::Removed { .. } => "removed",
        ExpertChange::Renamed { .. } => "renamed",
    }
}

#[test]
fn a_rescan_finds_a_change_the_watcher_could_not_see() {
    let h = Harness::new();
    copy_adapter(&fixture_adapter("rot13"), &h.dir("a"));
    // The config is also linked from outside the library: writing through that link changes
    // the file without any event in the watched folders.
    let outside = h.tmp.path().join("outside.json");
    std::fs::hard_link(h.dir("a").join("adapter_config.json"), &outside).unwrap();
    let service = h.start();
    let mut rx = service.subscribe();
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&outside).unwrap()).unwrap();
    config["lora_alpha"] = 5.into();
    std::fs::write(&outside, serde_json::to_vec(&config).unwrap()).unwrap();

    service.rescan();
    let events = wait_change(&mut rx, "a", |c| matches!(c, ExpertChange::Updated { .. }));
    assert_eq!(
        events.last().unwrap().cause,
        moerge_daemon::service::ChangeCause::Rescan
    );
    assert_eq!(
        service.lease().expert("a").unwrap().hash,
        Some(hash_of(&h.dir("a")))
    );
}
