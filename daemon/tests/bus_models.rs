//! Over a real bus: listing experts, fusing plans (and refusing bad ones, naming the field),
//! and every Model1 call checked against the engine's own computation of the same plan.

mod bus_support;

use moerge_bus::{ErrorKind, GenerateOptions, Model1Proxy};
use moerge_engine::{inference, BaseModel, Precision, TextTokenizer};
use moerge_library::Adapter;
use moerge_sdk::plan::Plan;

use bus_support::*;

/// The engine's own model for `plan_json`, built from the library folder.
fn engine_model(setup: &Setup, plan_json: &str) -> (moerge_engine::FusedModel, TextTokenizer) {
    let plan = Plan::from_json(plan_json).unwrap();
    let base = BaseModel::load_dir(&tiny_base(), Precision::F32).unwrap();
    let adapters: Vec<Adapter> = plan
        .experts
        .iter()
        .map(|e| Adapter::load(&setup.library.join(&e.name)).unwrap())
        .collect();
    let tok = TextTokenizer::from_dir(&tiny_base()).unwrap();
    (base.fuse(&plan, &adapters).unwrap(), tok)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fused_models_answer_as_the_engine_does() {
    let setup = Setup::start().await;
    let (conn, daemon) = setup.client().await;

    let experts = daemon.list_experts().await.unwrap();
    let mut names: Vec<&str> = experts.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["reverse", "rot13", "upper"]);
    assert!(
        experts
            .iter()
            .all(|e| e.state == "ready" && e.hash.len() == 64),
        "{experts:?}"
    );
    assert_eq!(daemon.expert_count().await.unwrap(), 3);
    assert_eq!(daemon.base_model().await.unwrap(), "base");
    assert_error(
        daemon.get_expert("nope").await,
        ErrorKind::NoSuchExpert,
        &["nope"],
    );

    // A merge: scores and generations equal the engine's on the same plan.
    let plan = merge_plan(&experts, &["upper", "reverse"]);
    let path = daemon.fuse_plan(&plan).await.unwrap();
    assert!(path.as_str().starts_with("/org/moerge/Model/"), "{path}");
    let model = Model1Proxy::builder(&conn)
        .path(path.clone())
        .build()
        .await
        .unwrap();
    let (fused, tok) = engine_model(&setup, &plan);

    let (prompt, completion) = ("upper kiwi>", "KIWI\n");
    let got = model.score(prompt, completion).await.unwrap();
    let want = inference::score(
        &fused,
        &tok.encode(prompt).unwrap(),
        &tok.encode(completion).unwrap(),
    )
    .unwrap();
    assert_eq!(got.token_ids, want.completion_ids);
    assert_eq!(got.tokens.concat(), completion);
    let want_nll: Vec<f64> = want.token_nll.iter().map(|&x| f64::from(x)).collect();
    assert_eq!(
        got.token_nll, want_nll,
        "the daemon's score is the engine's, exactly"
    );
    assert!((got.total_nll - want_nll.iter().sum::<f64>()).abs() < 1e-9);
    assert!((got.mean_nll - f64::from(want.mean_nll())).abs() < 1e-6);

    let text = model
        .generate(prompt, GenerateOptions::greedy(12).to_dict())
        .await
        .unwrap();
    let opts = inference::GenerateOptions {
        max_tokens: 12,
        stop_ids: fused.eos_token_ids(),
        ..Default::default()
    };
    let ids = inference::generate(&fused, &tok.encode(prompt).unwrap(), &opts, |_| {
        std::ops::ControlFlow::Continue(())
    })
    .unwrap();
    assert_eq!(text, tok.decode(&ids).unwrap());

    // A stop string cuts the text before it.
    if let Some(first) = text.chars().nth(1) {
        let opts = GenerateOptions {
            max_tokens: Some(12),
            stop: vec![first.to_string()],
            ..Default::default()
        };
        let cut = model.generate(prompt, opts.to_dict()).await.unwrap();
        assert_eq!(cut, text[..text[1..].find(first).unwrap() + 1]);
    }
    assert_error(
        model
            .generate(
                prompt,
                [("temprature".to_string(), zbus::OwnedVariant::from(0u32))].into(),
            )
            .await,
        ErrorKind::InvalidArgument,
        &["options.temprature", "unknown option"],
    );

    let top = model.top_tokens(prompt, 3).await.unwrap();
    let want_top = inference::top_tokens(&fused, &tok.encode(prompt).unwrap(), 3).unwrap();
    let got_top: Vec<(u32, f64)> = top.iter().map(|t| (t.id, t.probability)).collect();
    let want_top: Vec<(u32, f64)> = want_top.iter().map(|&(i, p)| (i, f64::from(p))).collect();
    assert_eq!(got_top, want_top);

    // A merge routes nothing; its properties say what it is.
    assert!(model.explain(prompt).await.unwrap().records.is_empty());
    assert_eq!(
        Plan::from_json(&model.plan().await.unwrap()).unwrap(),
        Plan::from_json(&plan).unwrap()
    );
    assert_eq!(
        model.generation().await.unwrap(),
        daemon.generation().await.unwrap()
    );
    assert!(!model.stale().await.unwrap());

    // A merge exports as one PEFT adapter; the export loads and has the hash returned.
    let out = setup.tmp.path().join("exported");
    let hash = model.export_peft(out.to_str().unwrap()).await.unwrap();
    assert_eq!(Adapter::load(&out).unwrap().hash().to_string(), hash);
    assert_error(
        model.export_peft("relative/dir").await,
        ErrorKind::InvalidArgument,
        &["dir", "absolute"],
    );

    // Arrow: per token, the weights over the top-k experts sum to 1.
    let arrow = arrow_plan(&experts, &["upper", "reverse", "rot13"], 2);
    let routed_path = daemon.fuse_plan(&arrow).await.unwrap();
    let routed = Model1Proxy::builder(&conn)
        .path(routed_path)
        .build()
        .await
        .unwrap();
    let explanation = routed.explain(prompt).await.unwrap();
    assert_eq!(explanation.tokens.concat(), prompt);
    // 3 layers × 6 adapted modules each.
    assert_eq!(
        explanation.records.len(),
        18,
        "{:?}",
        explanation
            .records
            .iter()
            .map(|r| &r.module)
            .collect::<Vec<_>>()
    );
    for record in &explanation.records {
        assert_eq!(record.units.len(), 3, "{}", record.module);
        assert_eq!(
            record.weights.len(),
            explanation.tokens.len(),
            "{}",
            record.module
        );
        for row in &record.weights {
            let sum: f64 = row.iter().sum();
            let nonzero = row.iter().filter(|w| **w > 0.0).count();
            assert!(
                (sum - 1.0).abs() < 1e-5 && nonzero <= 2,
                "{}: {row:?}",
                record.module
            );
        }
    }
    assert_error(
        routed
            .export_peft(setup.tmp.path().join("x").to_str().unwrap())
            .await,
        ErrorKind::NotSupported,
        &["ExportPeft", "routed"],
    );

    // Listing, then releasing: the object is gone from the bus.
    assert_eq!(daemon.list_models().await.unwrap().len(), 2);
    model.release().await.unwrap();
    assert_error(
        model.score(prompt, completion).await,
        ErrorKind::ZBus,
        &["UnknownObject", path.as_str()],
    );
    assert_eq!(daemon.list_models().await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_plans_are_refused_naming_the_field_and_the_daemon_keeps_serving() {
    let setup = Setup::start().await;
    let (conn, daemon) = setup.client().await;
    let experts = daemon.list_experts().await.unwrap();
    let good = merge_plan(&experts, &["upper", "rot13"]);
    let value: serde_json::Value = serde_json::from_str(&good).unwrap();

    let check = |edit: &dyn Fn(&mut serde_json::Value), kind: ErrorKind, fragments: &[&str]| {
        let mut plan = value.clone();
        edit(&mut plan);
        let daemon = daemon.clone();
        let plan = plan.to_string();
        let fragments: Vec<String> = fragments.iter().map(|s| s.to_string()).collect();
        async move {
            let f: Vec<&str> = fragments.iter().map(String::as_str).collect();
            assert_error(daemon.fuse_plan(&plan).await, kind, &f);
        }
    };
    check(
        &|p| p["experts"][1]["hash"] = "ab".into(),
        ErrorKind::InvalidArgument,
        &["plan_json: experts[1].hash"],
    )
    .await;
    check(
        &|p| p["experts"][1]["hash"] = "0".repeat(64).into(),
        ErrorKind::InvalidArgument,
        &["plan_json: experts[1].hash", "re-create the plan"],
    )
    .await;
    check(
        &|p| p["experts"][0]["name"] = "ghost".into(),
        ErrorKind::NoSuchExpert,
        &["plan_json: experts[0].name", "ghost"],
    )
    .await;
    check(
        &|p| p["moerge_plan"] = 7.into(),
        ErrorKind::InvalidArgument,
        &["plan_json", "version 7"],
    )
    .await;
    check(
        &|p| p["default"]["static"]["weights"] = serde_json::json!([1.0]),
        ErrorKind::InvalidArgument,
        &["plan_json: default"],
    )
    .await;
    check(
        &|p| p["surprise"] = 1.into(),
        ErrorKind::InvalidArgument,
        &["plan_json", "surprise"],
    )
    .await;
    assert_error(
        daemon.fuse_plan("not json").await,
        ErrorKind::InvalidArgument,
        &["plan_json"],
    );

    // Nothing was created, and a good plan still works afterwards.
    assert!(daemon.list_models().await.unwrap().is_empty());
    let path = daemon.fuse_plan(&good).await.unwrap();
    let model = Model1Proxy::builder(&conn)
        .path(path)
        .build()
        .await
        .unwrap();
    assert_error(
        model.score("", "X").await,
        ErrorKind::InvalidArgument,
        &["prompt"],
    );
    assert_error(
        model.top_tokens("upper a>", 0).await,
        ErrorKind::InvalidArgument,
        &["k"],
    );
    let score = model.score("upper a>", "A\n").await.unwrap();
    assert_eq!(score.token_nll.len(), 2);
}
