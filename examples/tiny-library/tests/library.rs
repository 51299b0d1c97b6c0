//! The committed tiny library is what its generator makes, and it shows the trade-offs the
//! paper needs: private experts win on their own task, hurt elsewhere, and cluster experts
//! sit between private experts and the shared expert.

use std::path::{Path, PathBuf};

use moerge_engine::trainer;
use moerge_engine::{BaseModel, Precision};
use moerge_library::Adapter;
use tiny_library::{tasks, ExpertKind};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn manifest() -> serde_json::Value {
    serde_json::from_slice(
        &std::fs::read(root().join("manifest.json")).expect("manifest.json is committed"),
    )
    .unwrap()
}

/// `rows[expert][task]` from the manifest, tasks in manifest order.
fn matrix(m: &serde_json::Value) -> (Vec<String>, std::collections::BTreeMap<String, Vec<f64>>) {
    let tasks: Vec<String> = serde_json::from_value(m["validation_loss"]["tasks"].clone()).unwrap();
    let rows = serde_json::from_value(m["validation_loss"]["rows"].clone()).unwrap();
    (tasks, rows)
}

#[test]
fn data_splits_are_what_the_generator_writes() {
    for (name, records) in tiny_library::splits() {
        let committed =
            std::fs::read_to_string(root().join("data").join(format!("{name}.jsonl"))).unwrap();
        assert!(
            committed == tiny_library::to_jsonl(&records),
            "data/{name}.jsonl differs from the generator's"
        );
    }
    let train = tiny_library::read_jsonl(&root().join("data/train.jsonl")).unwrap();
    assert_eq!(
        train.len(),
        tasks::all().len() * tiny_library::SPLIT_SIZES[0].1
    );
    assert!(tasks::all().len() >= 24 && tasks::families().len() >= 5);
}

#[test]
fn one_expert_retrains_to_the_committed_hash() {
    moerge_engine::prefer_data_parallelism();
    let m = manifest();
    let experts = m["experts"].as_array().unwrap();
    // The first classification expert: short answers, so the cheapest to retrain.
    let index = experts
        .iter()
        .position(|e| e["family"] == "classify")
        .unwrap();
    let name = experts[index]["name"].as_str().unwrap();
    let base = BaseModel::load_dir(&root().join("base"), Precision::F32).unwrap();
    let records: Vec<_> = tiny_library::read_jsonl(&root().join("data/train.jsonl"))
        .unwrap()
        .into_iter()
        .filter(|r| r.task.as_deref() == Some(name))
        .collect();
    let tmp = tempfile::tempdir().unwrap();
    let (_, hash) = tiny_library::train_expert(
        &base,
        ExpertKind::Private,
        index as u64,
        &records,
        &tmp.path().join(name),
    )
    .unwrap();
    assert_eq!(
        hash.to_string(),
        m["hashes"][name].as_str().unwrap(),
        "expert {name}"
    );
    assert_eq!(
        Adapter::load(&root().join("experts").join(name))
            .unwrap()
            .hash(),
        hash
    );
}

#[test]
fn the_matrix_is_what_the_committed_files_compute() {
    let m = manifest();
    let (task_names, rows) = matrix(&m);
    let base = BaseModel::load_dir(&root().join("base"), Precision::F32).unwrap();
    let valid = tiny_library::read_jsonl(&root().join("data/valid.jsonl")).unwrap();
    // Spot-check: the base and two experts, each on two tasks.
    for (expert, task) in [
        ("base", "reverse"),
        ("base", "vowel"),
        ("add", "add"),
        ("add", "upper"),
        ("brackets", "brackets"),
        ("brackets", "first"),
    ] {
        let model = match expert {
            "base" => base.clone(),
            e => base
                .with_adapter(&Adapter::load(&root().join("experts").join(e)).unwrap())
                .unwrap(),
        };
        let records: Vec<_> = valid
            .iter()
            .filter(|r| r.task.as_deref() == Some(task))
            .cloned()
            .collect();
        let losses =
            trainer::example_losses(&model, &tiny_library::examples(&records), 64).unwrap();
        let mean = losses.iter().map(|&l| f64::from(l)).sum::<f64>() / losses.len() as f64;
        let column = task_names.iter().position(|t| t == task).unwrap();
        let recorded = rows[expert][column];
        assert!(
            (mean - recorded).abs() < 1e-4,
            "{expert} on {task}: {mean} vs manifest {recorded}"
        );
    }
}

#[test]
fn the_library_shows_the_tradeoffs() {
    let m = manifest();
    let (task_names, rows) = matrix(&m);
    let all = tasks::all();
    let task = |t: &str| all.iter().find(|x| x.name == t).unwrap();
    // A task's twin is the task with the same source, rule and tag.
    let twins = |a: &str, b: &str| {
        let (a, b) = (task(a), task(b));
        a.twin_of == Some(b.name) || b.twin_of == Some(a.name)
    };
    let base = &rows["base"];
    for (column, name) in task_names.iter().enumerate() {
        let own = rows[name][column];
        // Its own expert beats every private expert but its twin's (the matrix's diagonal).
        for other in task_names.iter().filter(|o| *o != name && !twins(o, name)) {
            assert!(
                own < rows[other][column],
                "on {name}, expert {other} ({}) beats {name}'s own ({own})",
                rows[other][column]
            );
        }
        // ... and better than the base there (clearly so on each family's mean, below).
        assert!(
            own < base[column],
            "{name}: own expert {own} vs base {}",
            base[column]
        );
        // Each private expert hurts some task of another family (why merging blindly fails).
        let hurts = task_names
            .iter()
            .enumerate()
            .any(|(j, t)| task(t).family != task(name).family && rows[name][j] > base[j]);
        assert!(
            hurts,
            "expert {name} is never worse than the base outside its family"
        );
    }
    // A twin's expert serves the task nearly as well as its own (at least half its gain over
    // the base, and better than every other task's expert): they are near-duplicates, as
    // experts of one dataset and instruction are in Lots-of-LoRAs.
    let pairs: Vec<(&str, &str)> = all
        .iter()
        .filter_map(|t| t.twin_of.map(|of| (t.name, of)))
        .collect();
    assert_eq!(pairs.len(), 2 * tasks::families().len());
    for (a, b) in pairs {
        for (expert, on) in [(a, b), (b, a)] {
            let column = task_names.iter().position(|t| t == on).unwrap();
            let (own, twin) = (rows[on][column], rows[expert][column]);
            assert!(
                twin < base[column] - 0.5 * (base[column] - own),
                "on {on}: twin {expert} {twin}, own {own}, base {}",
                base[column]
            );
            for other in task_names.iter().filter(|o| *o != on && *o != expert) {
                assert!(
                    twin < rows[other][column],
                    "on {on}: expert {other} beats the twin {expert}"
                );
            }
        }
    }
    for family in tasks::families() {
        let columns: Vec<usize> = task_names
            .iter()
            .enumerate()
            .filter(|(_, t)| task(t).family == family)
            .map(|(j, _)| j)
            .collect();
        let mean = |expert: &str| {
            columns.iter().map(|&j| rows[expert][j]).sum::<f64>() / columns.len() as f64
        };
        let private = columns
            .iter()
            .map(|&j| rows[&task_names[j]][j])
            .sum::<f64>()
            / columns.len() as f64;
        let cluster = mean(&format!("cluster-{family}"));
        let shared = mean("shared");
        assert!(
            private <= cluster && cluster <= shared,
            "{family}: private {private}, cluster {cluster}, shared {shared}"
        );
        assert!(
            private < 0.85 * mean("base"),
            "{family}: private {private} is not 15% below the base {}",
            mean("base")
        );
    }
}
