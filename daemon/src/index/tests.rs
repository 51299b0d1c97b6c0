//! Unit tests of the index that reach under its API: raw sled values, digests, the seal.

use std::path::Path;

use moerge_library::{AdapterState, ContentHash};

use super::schema::{self, TreeId};
use super::*;

fn hash(n: u8) -> ContentHash {
    ContentHash([n; 32])
}

fn stamp() -> FolderStamp {
    let f = FileStamp {
        len: 1,
        inode: 2,
        mtime_ns: 3,
        ctime_ns: 4,
    };
    FolderStamp {
        config: f,
        weights: f,
        trusted: true,
    }
}

fn expert(name: &str, h: u8, generation: u64) -> ExpertRecord {
    ExpertRecord {
        name: name.into(),
        hash: Some(hash(h)),
        generation,
        state: AdapterState::Ready,
        size_bytes: 10,
        stamp: stamp(),
    }
}

fn add(index: &Index, records: &[ExpertRecord]) -> AppliedChange {
    let update = LibraryUpdate {
        upserts: records.to_vec(),
        visible: true,
        ..Default::default()
    };
    index.apply_library_update(&update).unwrap()
}

fn remove(index: &Index, names: &[&str]) -> AppliedChange {
    let removals = names.iter().map(|n| n.to_string()).collect();
    let update = LibraryUpdate {
        removals,
        visible: true,
        ..Default::default()
    };
    index.apply_library_update(&update).unwrap()
}

fn plan_expert(name: &str, h: u8) -> PlanExpert {
    PlanExpert {
        name: name.into(),
        hash: hash(h),
    }
}

/// Writes raw bytes under the index's feet, as a damaged disk would.
fn poke(dir: &Path, tree: TreeId, key: &[u8], value: Option<&[u8]>) {
    let index = Index::open(dir).unwrap();
    match value {
        Some(v) => index.tree(tree).insert(key, v).unwrap(),
        None => index.tree(tree).remove(key).unwrap(),
    };
    index.db.flush().unwrap();
}

fn open_err(dir: &Path) -> IndexError {
    Index::open(dir).expect_err("a damaged index must not open")
}

#[test]
fn plan_expert_keys_do_not_leak_across_names() {
    // Each case: (expert, plan, scanned expert, whether the scan must see the key).
    let check = |expert: &str, plan: &str, scanned: &str, expected: bool| {
        let key = schema::plan_expert_key(expert, plan);
        assert_eq!(
            key.starts_with(&schema::plan_expert_prefix(scanned)),
            expected,
            "{expert}/{plan} vs {scanned}"
        );
        assert_eq!(schema::split_plan_expert_key(&key).unwrap(), (expert, plan));
    };
    check("ab", "p", "ab", true);
    check("abc", "p", "ab", false);
    check("ab", "cp", "abc", false);
    check("", "p", "", true);
    assert_eq!(
        &schema::plan_expert_prefix("ab")[..2],
        &[0, 2],
        "length is big-endian u16"
    );
}

#[test]
fn records_survive_reopening_and_generations_count_changes() {
    let dir = tempfile::tempdir().unwrap();
    {
        let index = Index::open(dir.path()).unwrap();
        assert_eq!(
            add(&index, &[expert("a", 1, 1), expert("b", 2, 1)]).library_generation,
            1
        );
        assert_eq!(add(&index, &[expert("a", 3, 2)]).library_generation, 2);
        remove(&index, &["b"]);
    }
    let index = Index::open(dir.path()).unwrap();
    assert_eq!(index.experts().unwrap(), vec![expert("a", 3, 2)]);
    assert_eq!(index.library_generation().unwrap(), 3);
    assert_eq!(
        index.check().unwrap().records,
        2,
        "one expert and its hash entry"
    );
}

#[test]
fn plans_go_stale_when_an_expert_changes_and_fresh_when_it_comes_back() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open(dir.path()).unwrap();
    add(&index, &[expert("a", 1, 1), expert("b", 2, 1)]);
    let tensor = vec![7u8; 5000];
    let plan = index
        .put_plan(
            "p",
            &[plan_expert("a", 1), plan_expert("b", 2)],
            "{}",
            &[("router", &tensor)],
        )
        .unwrap();
    assert_eq!(plan.stale, None);
    assert_eq!(index.blob(&plan.tensors["router"]).unwrap(), tensor);
    index
        .put_plan("q", &[plan_expert("b", 2)], "{}", &[])
        .unwrap();

    let change = add(&index, &[expert("a", 9, 2)]);
    assert_eq!(
        change.stale_plans,
        vec!["p".to_string()],
        "q does not name a"
    );
    let stale = index.plan("p").unwrap().unwrap().stale.unwrap();
    assert!(stale.contains("expert a changed"), "{stale}");

    assert_eq!(
        add(&index, &[expert("a", 1, 3)]).refreshed_plans,
        vec!["p".to_string()]
    );
    assert_eq!(
        remove(&index, &["b"]).stale_plans,
        vec!["p".to_string(), "q".to_string()]
    );
    assert!(index
        .plan("q")
        .unwrap()
        .unwrap()
        .stale
        .unwrap()
        .contains("expert b was removed"));
    assert!(index.remove_plan("p").unwrap());
    assert!(!index.remove_plan("p").unwrap());
    index.check().unwrap();
}

#[test]
fn library_changes_mark_clusterings_and_selections_stale() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open(dir.path()).unwrap();
    let clusters = ClusterRecord {
        name: "mbc".into(),
        clusters: vec![vec![hash(1)]],
        stale: false,
    };
    let selection = SelectionRecord {
        name: "greedy".into(),
        dataset: DatasetId([5; 32]),
        order: vec![hash(1)],
        curve: vec![0.5],
        active: 1,
        stale: false,
    };
    index.put_clusters(&clusters).unwrap();
    index.put_selection(&selection).unwrap();
    add(&index, &[expert("a", 1, 1)]);
    assert!(index.clusters().unwrap()[0].stale);
    assert!(index.selections().unwrap()[0].stale);
}

#[test]
fn derived_data_outlives_a_rename_and_is_collected_when_its_content_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open(dir.path()).unwrap();
    let big = vec![1u8; INLINE_LIMIT + 1];
    let update = LibraryUpdate {
        upserts: vec![expert("a", 1, 1)],
        derived: vec![
            (
                hash(1),
                "sketch/v1".into(),
                index.stage_derived(&big).unwrap(),
            ),
            (hash(1), "tiny".into(), index.stage_derived(&[2]).unwrap()),
        ],
        visible: true,
        ..Default::default()
    };
    index.apply_library_update(&update).unwrap();
    let row = EvalRow {
        dataset: DatasetId([3; 32]),
        expert: hash(1),
        losses: [("t".to_string(), 0.5)].into(),
    };
    index.put_eval_row(&row).unwrap();
    assert!(matches!(
        index.derived_entry(&hash(1), "sketch/v1").unwrap(),
        Some(DerivedValue::Blob(_))
    ));
    assert_eq!(
        index.derived_entry(&hash(1), "tiny").unwrap(),
        Some(DerivedValue::Inline(vec![2]))
    );

    // A rename: same content under another name. Nothing is collected.
    let renamed = LibraryUpdate {
        upserts: vec![expert("b", 1, 1)],
        removals: vec!["a".into()],
        visible: true,
        ..Default::default()
    };
    index.apply_library_update(&renamed).unwrap();
    assert_eq!(index.collect_garbage().unwrap(), GcReport::default());
    assert_eq!(index.derived(&hash(1), "sketch/v1").unwrap(), Some(big));
    assert_eq!(index.eval_rows(&DatasetId([3; 32])).unwrap(), vec![row]);

    remove(&index, &["b"]);
    let report = index.collect_garbage().unwrap();
    assert_eq!(
        report,
        GcReport {
            derived_removed: 2,
            eval_rows_removed: 1,
            blobs_removed: 1
        }
    );
    assert!(index.blob_files().unwrap().is_empty());
    index.check().unwrap();
}

#[test]
fn a_value_with_a_bad_checksum_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    add(&Index::open(dir.path()).unwrap(), &[expert("a", 1, 1)]);
    let framed = Index::open(dir.path())
        .unwrap()
        .raw_get(TreeId::Experts, b"a")
        .unwrap()
        .unwrap();
    let mut damaged = framed.clone();
    *damaged.last_mut().unwrap() ^= 1;
    poke(dir.path(), TreeId::Experts, b"a", Some(&damaged));
    match open_err(dir.path()) {
        IndexError::Corrupt(c) => assert_eq!((c.tree, c.key.as_str()), ("experts", "\"a\""), "{c}"),
        other => panic!("expected Corrupt, got {other}"),
    }
}

#[test]
fn a_vanished_record_is_caught_by_the_digest() {
    let dir = tempfile::tempdir().unwrap();
    add(
        &Index::open(dir.path()).unwrap(),
        &[expert("a", 1, 1), expert("b", 2, 1)],
    );
    poke(dir.path(), TreeId::Experts, b"b", None);
    let err = open_err(dir.path());
    assert!(
        err.to_string().contains("do not match the recorded digest"),
        "{err}"
    );
    assert!(err.is_damage());
}

#[test]
fn an_open_waits_for_the_lock_a_just_dropped_handle_still_holds() {
    // sled lets go of its file lock a moment after the drop (its threads hold it); here
    // the moment is stretched by dropping the first index from another thread later.
    let dir = tempfile::tempdir().unwrap();
    let first = Index::open(dir.path()).unwrap();
    add(&first, &[expert("a", 1, 1)]);
    let (opened, release) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        opened.send(()).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(first);
    });
    release.recv().unwrap();
    let second = Index::open(dir.path()).expect("the open waits for the lock");
    assert_eq!(second.experts().unwrap().len(), 1);
    holder.join().unwrap();
}

#[test]
fn a_well_framed_record_that_does_not_decode_is_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    // Valid frame, nonsense payload: only the decoder can tell.
    let framed = schema::frame(TreeId::Plans, b"p", b"{\"not\":\"a plan\"}");
    {
        let index = Index::open(dir.path()).unwrap();
        let mut batch = batch::Batch::new(&index);
        batch.put(TreeId::Plans, b"p".to_vec(), &framed[8..]);
        batch.commit().unwrap();
    }
    let err = open_err(dir.path());
    assert!(
        err.to_string()
            .contains("tree `plans`, key \"p\": bad record"),
        "{err}"
    );
}

#[test]
fn a_database_behind_its_seal_lost_records() {
    let dir = tempfile::tempdir().unwrap();
    add(&Index::open(dir.path()).unwrap(), &[expert("a", 1, 1)]);
    std::fs::write(
        dir.path().join("seal"),
        "moerge index seal v1\ncommit 999\n",
    )
    .unwrap();
    assert!(open_err(dir.path())
        .to_string()
        .contains("commit 999 was sealed"));
    std::fs::remove_dir_all(dir.path().join("db")).unwrap();
    assert!(open_err(dir.path())
        .to_string()
        .contains("database is empty but commit 999 was sealed"));
}

#[test]
fn a_newer_schema_is_moved_aside_with_the_plans_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("index");
    {
        let index = Index::open(&dir).unwrap();
        add(&index, &[expert("a", 1, 1)]);
        index
            .put_plan("learned", &[plan_expert("a", 1)], "{}", &[])
            .unwrap();
    }
    let v99 = schema::frame(
        TreeId::Meta,
        schema::meta::SCHEMA_VERSION,
        &99u32.to_be_bytes(),
    );
    poke(&dir, TreeId::Meta, schema::meta::SCHEMA_VERSION, Some(&v99));
    assert!(matches!(
        open_err(&dir),
        IndexError::WrongSchema {
            found: 99,
            supported: 1,
            ..
        }
    ));

    let (index, recovery) = Index::open_or_rebuild(&dir).unwrap();
    let recovery = recovery.expect("moved aside");
    assert_eq!(recovery.lost_plans, Some(vec!["learned".to_string()]));
    assert!(recovery.moved_to.join("db").is_dir(), "{recovery:?}");
    assert!(recovery
        .moved_to
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("index.damaged-"));
    assert!(
        index.experts().unwrap().is_empty(),
        "rebuilt empty, to be filled from the folder"
    );
    drop(index);
    assert!(
        Index::open_or_rebuild(&dir).unwrap().1.is_none(),
        "the rebuilt index opens cleanly"
    );
}

#[test]
fn a_missing_blob_is_reported_with_its_owner() {
    let dir = tempfile::tempdir().unwrap();
    let id = {
        let index = Index::open(dir.path()).unwrap();
        add(&index, &[expert("a", 1, 1)]);
        index
            .put_plan("p", &[plan_expert("a", 1)], "{}", &[("router", &[0u8; 64])])
            .unwrap()
            .tensors["router"]
    };
    std::fs::remove_file(Index::open(dir.path()).unwrap().blobs.path(&id)).unwrap();
    let err = open_err(dir.path());
    assert!(
        matches!(&err, IndexError::MissingBlob { owner, .. } if owner == "plan p"),
        "{err}"
    );
}

#[test]
fn garbage_collection_removes_orphans_and_temporary_files() {
    let dir = tempfile::tempdir().unwrap();
    let index = Index::open(dir.path()).unwrap();
    let staged = index.stage_derived(&[9u8; INLINE_LIMIT + 1]).unwrap();
    let orphan = index
        .blobs
        .put(b"written, then the process died before the commit")
        .unwrap();
    std::fs::write(dir.path().join("blobs/tmp/123-0"), b"half").unwrap();
    add(&index, &[expert("a", 1, 1)]);
    let kept = index
        .put_plan("p", &[plan_expert("a", 1)], "{}", &[("w", b"kept")])
        .unwrap()
        .tensors["w"];
    let DerivedValue::Blob(staged) = staged else {
        panic!("a value over the limit goes to a blob")
    };
    assert_eq!(index.collect_garbage().unwrap().blobs_removed, 1);
    let blobs: std::collections::BTreeSet<_> = index.blob_files().unwrap().into_iter().collect();
    assert_eq!(
        blobs,
        [kept, staged].into(),
        "a staged blob waits for its commit"
    );
    assert!(!index.blobs.exists(&orphan));
    assert_eq!(
        std::fs::read_dir(dir.path().join("blobs/tmp"))
            .unwrap()
            .count(),
        0
    );
}
