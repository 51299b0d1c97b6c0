//! The service with a real watcher on a real folder: adapters added, modified, removed and
//! renamed while it runs; half-written and malformed adapters; a burst of 200.

mod support;

use std::collections::BTreeMap;

use moerge_daemon::service::ExpertChange;
use moerge_library::AdapterState;
use support::*;

#[test]
fn add_modify_rename_remove_while_watching() {
    let h = Harness::new();
    copy_adapter(&fixture_adapter("rot13"), &h.dir("rot13"));
    let service = h.start();
    let mut rx = service.subscribe();

    copy_adapter(&fixture_adapter("twice"), &h.dir("twice"));
    let twice = hash_of(&fixture_adapter("twice"));
    wait_change(
        &mut rx,
        "twice",
        |c| matches!(c, ExpertChange::Added { hash: Some(h), state: AdapterState::Ready, .. } if *h == twice),
    );
    assert_eq!(service.lease().expert("twice").unwrap().generation, 1);

    edit_config(&h.dir("twice"), |c| c["lora_alpha"] = 7.into());
    let edited = hash_of(&h.dir("twice"));
    assert_ne!(edited, twice);
    let events = wait_change(
        &mut rx,
        "twice",
        |c| matches!(c, ExpertChange::Updated { new_hash: Some(h), .. } if *h == edited),
    );
    assert!(
        matches!(changes(&events)[..], [ExpertChange::Updated { old_hash: Some(old), .. }] if *old == twice)
    );
    assert_eq!(service.lease().expert("twice").unwrap().generation, 2);

    let sketches_before = service.index().blob_files().unwrap();
    std::fs::rename(h.dir("twice"), h.dir("double")).unwrap();
    let events = wait_for(&mut rx, |seen| {
        let c = changes(seen);
        c.iter().any(|c| c.name() == "double") && !service.lease().experts().contains_key("twice")
    });
    // The watcher sees both ends of the rename together, so it is reported as one.
    let expected = ExpertChange::Renamed {
        from: "twice".into(),
        to: "double".into(),
        hash: edited,
    };
    assert_eq!(changes(&events), vec![&expected]);
    assert_eq!(
        service.index().blob_files().unwrap(),
        sketches_before,
        "the renamed folder reused its sketch"
    );
    assert_eq!(
        service.lease().expert("double").unwrap().generation,
        1,
        "a new name starts at 1"
    );

    std::fs::remove_dir_all(h.dir("double")).unwrap();
    wait_change(&mut rx, "double", |c| {
        matches!(c, ExpertChange::Removed { .. })
    });
    assert_eq!(index_view(service.index()), folder_truth(&h.library));
    assert_eq!(
        service.lease().experts().keys().collect::<Vec<_>>(),
        ["rot13"]
    );
}

#[test]
fn a_half_written_adapter_is_never_indexed() {
    let h = Harness::new();
    let mut config = h.config();
    // Long enough that the half-written folder cannot be declared rejected during the test.
    config.settle = std::time::Duration::from_secs(600);
    let service = moerge_daemon::service::Service::start(config).unwrap();
    let mut rx = service.subscribe();

    let src = fixture_adapter("swapcase");
    let weights = std::fs::read(src.join("adapter_model.safetensors")).unwrap();
    let half = h.dir("half");
    std::fs::create_dir(&half).unwrap();
    std::fs::copy(
        src.join("adapter_config.json"),
        half.join("adapter_config.json"),
    )
    .unwrap();
    std::fs::write(
        half.join("adapter_model.safetensors"),
        &weights[..weights.len() / 2],
    )
    .unwrap();
    // Events are handled in order, so once the marker shows up the half folder has been seen.
    copy_adapter(&fixture_adapter("minus"), &h.dir("marker"));
    let events = wait_change(&mut rx, "marker", |_| true);
    assert!(
        changes(&events).iter().all(|c| c.name() != "half"),
        "{events:#?}"
    );
    assert!(service.lease().expert("half").is_none());
    assert!(service.index().expert("half").unwrap().is_none());

    std::fs::write(half.join("adapter_model.safetensors"), &weights).unwrap();
    let events = wait_change(&mut rx, "half", |_| true);
    let expected = ExpertChange::Added {
        name: "half".into(),
        hash: Some(hash_of(&src)),
        state: AdapterState::Ready,
    };
    assert_eq!(
        changes(&events)
            .iter()
            .filter(|c| c.name() == "half")
            .collect::<Vec<_>>(),
        vec![&&expected]
    );
}

#[test]
fn two_hundred_adapters_dropped_at_once_are_each_indexed_once() {
    let h = Harness::new();
    let service = h.start();
    let mut rx = service.subscribe();
    let names: Vec<String> = (0..200).map(|i| format!("expert-{i:03}")).collect();
    // Made outside, then dropped in: 200 renames in a row.
    let staging = h.tmp.path().join("staging");
    for (i, name) in names.iter().enumerate() {
        let task = TASKS[i % TASKS.len()];
        variant(&fixture_adapter(task), &staging.join(name), 100 + i as u32);
    }
    for name in &names {
        std::fs::rename(staging.join(name), h.dir(name)).unwrap();
    }
    let events = wait_for(&mut rx, |seen| changes(seen).len() >= names.len());
    // Anything indexed twice would show up before this marker's event.
    copy_adapter(&fixture_adapter("rot13"), &h.dir("zz-marker"));
    let more = wait_change(&mut rx, "zz-marker", |_| true);

    let mut added: BTreeMap<&str, usize> = BTreeMap::new();
    for change in changes(&events).into_iter().chain(changes(&more)) {
        match change {
            ExpertChange::Added {
                name,
                state: AdapterState::Ready,
                ..
            } => *added.entry(name).or_default() += 1,
            other => panic!("unexpected change {other:?}"),
        }
    }
    assert_eq!(added.len(), 201);
    assert!(added.values().all(|n| *n == 1), "{added:?}");
    let lease = service.lease();
    assert!(lease
        .experts()
        .values()
        .all(|e| e.generation == 1 && e.is_ready()));
    assert_eq!(index_view(service.index()), folder_truth(&h.library));
}

#[test]
fn malformed_adapters_are_rejected_with_their_reason_and_stop_nothing() {
    let h = Harness::new();
    let service = h.start();
    let mut rx = service.subscribe();
    copy_adapter(&fixture_adapter("length"), &h.dir("good"));
    h.drop_in("ia3", |dir| {
        copy_adapter(&fixture_adapter("rot13"), dir);
        edit_config(dir, |c| c["peft_type"] = "IA3".into());
    });
    h.drop_in("nan", |dir| {
        copy_adapter(&fixture_adapter("minus"), dir);
        poison_first_value(&dir.join("adapter_model.safetensors"));
    });
    let llama = fixtures().join("dev-llama/adapters");
    let llama_adapter = std::fs::read_dir(&llama)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    copy_adapter(&llama_adapter, &h.dir("llama"));
    copy_adapter(&fixture_adapter("twice"), &h.dir("good2"));

    let names = ["good", "good2", "ia3", "llama", "nan"];
    let events = wait_for(&mut rx, |seen| {
        let seen: Vec<_> = changes(seen).iter().map(|c| c.name().to_owned()).collect();
        names.iter().all(|n| seen.iter().any(|s| s == n))
    });
    let state = |name: &str| match changes(&events).into_iter().find(|c| c.name() == name) {
        Some(ExpertChange::Added { state, .. }) => state.clone(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(state("good"), AdapterState::Ready);
    assert_eq!(state("good2"), AdapterState::Ready);
    let reason = |s: AdapterState| match s {
        AdapterState::Rejected { reason } | AdapterState::Incompatible { reason } => reason,
        AdapterState::Ready => panic!("expected a reason"),
    };
    let ia3 = reason(state("ia3"));
    assert!(
        ia3.contains("adapter_config.json") && ia3.contains("IA3"),
        "{ia3}"
    );
    let nan = reason(state("nan"));
    assert!(
        nan.contains("adapter_model.safetensors")
            && nan.contains("lora_A")
            && nan.contains("non-finite"),
        "{nan}"
    );
    assert!(matches!(state("llama"), AdapterState::Incompatible { .. }));
    assert_eq!(index_view(service.index()), folder_truth(&h.library));

    // A fixed adapter becomes ready under the same name: a new generation of it.
    copy_adapter(&fixture_adapter("rot13"), &h.dir("ia3"));
    wait_change(&mut rx, "ia3", |c| {
        matches!(
            c,
            ExpertChange::Updated {
                state: AdapterState::Ready,
                ..
            }
        )
    });
    assert_eq!(service.lease().expert("ia3").unwrap().generation, 2);
}

/// Overwrites the first value of the first tensor (a `lora_A` in the fixtures) with NaN.
fn poison_first_value(path: &std::path::Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let first = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__");
    let start = first
        .map(|(_, t)| t["data_offsets"][0].as_u64().unwrap() as usize)
        .min()
        .unwrap();
    let at = 8 + header_len + start;
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(path, bytes).unwrap();
}
