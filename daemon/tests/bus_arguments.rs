//! Bad arguments over a real bus, sent with the Rust proxies, with busctl (which can send
//! wrong D-Bus types) and with the Python client: each gets a named error whose message names
//! the argument, and after each the daemon still scores exactly as it did before.

mod bus_support;
mod open_bus;

use std::collections::HashMap;
use std::sync::Arc;

use moerge_bus::{
    Daemon1Proxy, ErrorKind, GenerateOptions, Model1Proxy, MoergeError, ScoreResult, DAEMON_PATH,
    WELL_KNOWN_NAME,
};
use moerge_daemon::serving::{HookError, JobReporter, SelectOutcome, SelectRequest, Selector};
use serde_json::json;
use zbus::{OwnedObjectPath, OwnedVariant, Variant};

use bus_support::*;
use open_bus::{assert_py_error, busctl, PyClient};

const PROMPT: &str = "upper kiwi>";
const COMPLETION: &str = "KIWI\n";
/// The tiny base's context (`max_position_embeddings`); its tokenizer has a token per byte.
const CONTEXT: usize = 64;

struct InstantSelection;

impl Selector for InstantSelection {
    fn select(&self, _: SelectRequest, _: &JobReporter) -> Result<SelectOutcome, HookError> {
        Ok(SelectOutcome {
            selected: Vec::new(),
            result_json: "{}".into(),
        })
    }
}

/// A daemon with a merge model, a client of it, and the score it gave before anything bad.
struct Bench {
    setup: Setup,
    conn: zbus::Connection,
    daemon: Daemon1Proxy<'static>,
    path: OwnedObjectPath,
    model: Model1Proxy<'static>,
    reference: ScoreResult,
}

impl Bench {
    async fn start() -> Bench {
        let setup = Setup::start_with(|c| c.selector = Some(Arc::new(InstantSelection))).await;
        let (conn, daemon) = setup.client().await;
        let experts = daemon.list_experts().await.unwrap();
        let path = daemon
            .fuse_plan(&merge_plan(&experts, &["upper", "reverse"]))
            .await
            .unwrap();
        let model = Model1Proxy::builder(&conn)
            .path(path.clone())
            .build()
            .await
            .unwrap();
        let reference = model.score(PROMPT, COMPLETION).await.unwrap();
        Bench {
            setup,
            conn,
            daemon,
            path,
            model,
            reference,
        }
    }

    /// The daemon still answers, with the same numbers as before.
    async fn still_scores(&self) {
        assert_eq!(
            self.model.score(PROMPT, COMPLETION).await.unwrap(),
            self.reference
        );
    }

    /// `busctl call` on the model object; returns (success, stdout, stderr).
    fn busctl_model(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec![
            "call",
            WELL_KNOWN_NAME,
            self.path.as_str(),
            "org.moerge.Model1",
        ];
        all.extend_from_slice(args);
        let address = self.setup.bus.address.clone();
        tokio::task::block_in_place(|| busctl(&address, &all))
    }

    /// As [`Bench::busctl_model`], on the daemon object.
    fn busctl_daemon(&self, args: &[&str]) -> (bool, String, String) {
        let mut all = vec!["call", WELL_KNOWN_NAME, DAEMON_PATH, "org.moerge.Daemon1"];
        all.extend_from_slice(args);
        let address = self.setup.bus.address.clone();
        tokio::task::block_in_place(|| busctl(&address, &all))
    }
}

/// busctl failed with a message containing every fragment.
fn assert_busctl_error(result: (bool, String, String), fragments: &[&str]) {
    let (ok, stdout, stderr) = result;
    assert!(!ok, "busctl succeeded: {stdout}");
    for f in fragments {
        assert!(stderr.contains(f), "{stderr:?} lacks {f:?}");
    }
}

/// The D-Bus error name of a failed call that is not a moerge error.
fn standard_error_name(e: MoergeError) -> String {
    match e {
        MoergeError::ZBus(zbus::Error::MethodError(name, _, _)) => name.to_string(),
        MoergeError::ZBus(zbus::Error::FDO(e)) => zbus::DBusError::name(&*e).to_string(),
        other => panic!("expected a standard D-Bus error, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn texts_that_cannot_fit_the_context_are_refused_naming_the_argument_and_limit() {
    let b = Bench::start().await;
    let m = &b.model;

    // A 10 MB prompt is refused before it is tokenized, by every method that takes one.
    let huge = "a".repeat(10 << 20);
    let fragments = ["prompt: 10485760 bytes", "context of 64 tokens"];
    assert_error(
        m.score(&huge, "A").await,
        ErrorKind::InvalidArgument,
        &fragments,
    );
    assert_error(
        m.top_tokens(&huge, 3).await,
        ErrorKind::InvalidArgument,
        &fragments,
    );
    assert_error(
        m.explain(&huge).await,
        ErrorKind::InvalidArgument,
        &fragments,
    );
    let greedy = GenerateOptions::greedy(4).to_dict();
    assert_error(
        m.generate(&huge, greedy.clone()).await,
        ErrorKind::InvalidArgument,
        &fragments,
    );
    assert_error(
        m.score(PROMPT, &huge).await,
        ErrorKind::InvalidArgument,
        &["completion: 10485760 bytes"],
    );
    b.still_scores().await;

    // One token more than the context.
    let long = "a".repeat(CONTEXT + 1);
    for result in [
        m.score(&long, "A").await.map(|_| ()),
        m.top_tokens(&long, 3).await.map(|_| ()),
        m.explain(&long).await.map(|_| ()),
    ] {
        assert_error(
            result,
            ErrorKind::InvalidArgument,
            &["prompt: 65 tokens exceed the model's context of 64 tokens"],
        );
    }
    // Prompt and completion together.
    assert_error(
        m.score(&"a".repeat(40), &"b".repeat(30)).await,
        ErrorKind::InvalidArgument,
        &["completion:", "(40 tokens)", "(30 tokens)", "context of 64"],
    );
    // Exactly the context fits for scoring.
    let fits = m.score(&"a".repeat(40), &"b".repeat(24)).await.unwrap();
    assert_eq!(fits.token_nll.len(), 24);
    // A generation needs room for one token, and ends where the context does.
    assert_error(
        m.generate(&"a".repeat(CONTEXT), greedy).await,
        ErrorKind::InvalidArgument,
        &[
            "prompt: 64 tokens leave no room to generate",
            "context of 64",
        ],
    );
    let text = m
        .generate(
            &"a".repeat(CONTEXT - 3),
            GenerateOptions::greedy(40).to_dict(),
        )
        .await
        .unwrap();
    assert!(text.chars().count() <= 3, "{text:?}");
    // Empty texts.
    assert_error(
        m.score("", "A").await,
        ErrorKind::InvalidArgument,
        &["prompt"],
    );
    assert_error(
        m.score(PROMPT, "").await,
        ErrorKind::InvalidArgument,
        &["completion"],
    );
    assert_error(
        m.top_tokens("", 1).await,
        ErrorKind::InvalidArgument,
        &["prompt"],
    );
    b.still_scores().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_tokens_k_zero_negative_and_huge() {
    let b = Bench::start().await;
    // k = 0 (u): the daemon's own refusal.
    assert_error(
        b.model.top_tokens(PROMPT, 0).await,
        ErrorKind::InvalidArgument,
        &["k: must be at least 1"],
    );
    assert_busctl_error(
        b.busctl_model(&["TopTokens", "su", PROMPT, "0"]),
        &["k: must be at least 1"],
    );
    // A negative k can only be sent as the wrong type (i, not u): zbus refuses the body.
    assert_busctl_error(
        b.busctl_model(&["TopTokens", "si", PROMPT, "-1"]),
        &["Signature mismatch"],
    );
    b.still_scores().await;
    let mut py = PyClient::start(&b.setup.bus.address, false, false);
    let path = b.path.to_string();
    let reply = tokio::task::block_in_place(|| {
        py.model(&path, "TopTokens", "si", json!([PROMPT, {"i": -1}]))
    });
    assert_py_error(
        &reply,
        "org.freedesktop.DBus.Error.InvalidArgs",
        &["Signature mismatch"],
    );
    b.still_scores().await;
    // A k beyond the vocabulary gives the whole vocabulary, best first.
    let all = b.model.top_tokens(PROMPT, u32::MAX).await.unwrap();
    assert_eq!(all.len(), 256);
    let total: f64 = all.iter().map(|t| t.probability).sum();
    assert!((total - 1.0).abs() < 1e-4, "{total}");
    assert!(all.windows(2).all(|w| w[0].probability >= w[1].probability));
    // Token 0 decodes to NUL, which no D-Bus string may carry (the bus would drop the
    // daemon's connection for sending it): it goes out as U+FFFD.
    let nul = all.iter().find(|t| t.id == 0).unwrap();
    assert_eq!(nul.text, "\u{FFFD}");
    b.still_scores().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_generate_options_are_refused_naming_the_option() {
    let b = Bench::start().await;
    for (args, fragments) in [
        (
            vec!["1", "temprature", "d", "0.5"],
            vec!["options.temprature: unknown option"],
        ),
        (
            vec!["1", "max_tokens", "s", "ten"],
            vec!["options.max_tokens: must be an integer"],
        ),
        (
            vec!["1", "max_tokens", "i", "-3"],
            vec!["options.max_tokens"],
        ),
        (
            vec!["1", "temperature", "d", "-1"],
            vec!["options.temperature: must be 0 (greedy) or a positive number"],
        ),
        (
            vec!["1", "temperature", "s", "hot"],
            vec!["options.temperature: must be a number"],
        ),
        (
            vec!["2", "temperature", "d", "1", "top_p", "d", "0"],
            vec!["options.top_p: must be in (0, 1]"],
        ),
        (
            vec!["2", "temperature", "d", "1", "top_p", "d", "1.5"],
            vec!["options.top_p: must be in (0, 1]"],
        ),
        (vec!["1", "stop", "s", "x"], vec!["options.stop"]),
        (
            vec!["1", "max_tokens", "u", "100000"],
            vec![
                "limit max_tokens (4096)",
                "options.max_tokens asks for 100000",
            ],
        ),
    ] {
        let mut call = vec!["Generate", "sa{sv}", PROMPT];
        call.extend(args.iter().copied());
        assert_busctl_error(b.busctl_model(&call), &fragments);
        call[0] = "GenerateStream";
        assert_busctl_error(b.busctl_model(&call), &fragments);
    }
    // The kinds, through the proxy; GenerateStream refuses at once, not in its Done signal.
    let options = |pairs: Vec<(&str, Variant<'static>)>| -> HashMap<String, OwnedVariant> {
        pairs
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.try_into_owned().unwrap()))
            .collect()
    };
    for bad in [
        options(vec![("temperature", Variant::F64(-0.5))]),
        options(vec![("temperature", Variant::F64(f64::NAN))]),
        options(vec![
            ("temperature", Variant::F64(1.0)),
            ("top_p", Variant::F64(-1.0)),
        ]),
        options(vec![("colour", Variant::from("red"))]),
    ] {
        assert_error(
            b.model.generate(PROMPT, bad.clone()).await,
            ErrorKind::InvalidArgument,
            &["options."],
        );
        assert_error(
            b.model.generate_stream(PROMPT, bad).await,
            ErrorKind::InvalidArgument,
            &["options."],
        );
    }
    assert_error(
        b.model
            .generate(PROMPT, GenerateOptions::greedy(4097).to_dict())
            .await,
        ErrorKind::LimitExceeded,
        &["max_tokens"],
    );
    // A good one still works.
    let text = b
        .model
        .generate(PROMPT, GenerateOptions::greedy(4).to_dict())
        .await
        .unwrap();
    assert!(!text.is_empty());
    b.still_scores().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_plans_are_refused_naming_the_field() {
    let b = Bench::start().await;
    let experts = b.daemon.list_experts().await.unwrap();
    let upper = refs(&experts, &["upper"]);
    let plan = |v: serde_json::Value| v.to_string();
    for (json, fragments) in [
        ("{".to_string(), vec!["plan_json"]),
        ("[]".to_string(), vec!["plan_json"]),
        (String::new(), vec!["plan_json"]),
        (
            plan(json!({"moerge_plan": 99, "experts": upper,
                        "default": {"static": {"weights": [1.0], "space": "lowrank"}}})),
            vec!["plan_json", "moerge_plan"],
        ),
        (
            plan(json!({"moerge_plan": 1, "experts": upper,
                        "default": {"static": {"weights": [1.0, 2.0], "space": "lowrank"}}})),
            vec!["plan_json", "weights"],
        ),
        (
            plan(json!({"moerge_plan": 1,
                        "experts": [{"name": "upper", "hash": "0".repeat(64)}],
                        "default": {"static": {"weights": [1.0], "space": "lowrank"}}})),
            vec!["plan_json: experts[0].hash"],
        ),
    ] {
        assert_error(
            b.daemon.fuse_plan(&json).await,
            ErrorKind::InvalidArgument,
            &fragments,
        );
    }
    assert_error(
        b.daemon
            .fuse_plan(&plan(json!({"moerge_plan": 1,
                "experts": [{"name": "nobody", "hash": "0".repeat(64)}],
                "default": {"static": {"weights": [1.0], "space": "lowrank"}}})))
            .await,
        ErrorKind::NoSuchExpert,
        &["plan_json: experts[0].name", "nobody"],
    );
    // busctl sends a plan of the wrong type.
    assert_busctl_error(
        b.busctl_daemon(&["FusePlan", "u", "7"]),
        &["Signature mismatch"],
    );
    assert_eq!(b.setup.serving.models().len(), 1);
    b.still_scores().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_expert_paths_outside_the_allowed_places_are_refused() {
    let b = Bench::start().await;
    let tmp = b.setup.tmp.path();
    let library = &b.setup.library;
    let d = &b.daemon;

    let file = tmp.join("loose-file");
    std::fs::write(&file, "not an adapter").unwrap();
    let into_library = tmp.join("link-into-library");
    std::os::unix::fs::symlink(library.join("upper"), &into_library).unwrap();
    let to_library = tmp.join("link-to-library");
    std::os::unix::fs::symlink(library, &to_library).unwrap();
    let devices = tmp.join("incoming/zeros");
    copy_adapter(&tiny_expert("first"), &devices);
    std::fs::remove_file(devices.join("adapter_model.safetensors")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", devices.join("adapter_model.safetensors")).unwrap();
    let s = |p: &std::path::Path| p.to_str().unwrap().to_string();

    for (path, fragments) in [
        (
            "incoming/first".to_string(),
            vec!["path:", "not an absolute path"],
        ),
        (s(&file), vec!["path:", "is not a folder"]),
        (s(library), vec!["path:", "is the library itself"]),
        (
            s(&library.join("upper")),
            vec!["path:", "already has an expert named \"upper\""],
        ),
        (s(&to_library), vec!["path:", "is the library itself"]),
        (s(&into_library), vec!["path:", "is inside the library"]),
        (
            s(&devices),
            vec!["path:", "adapter_model.safetensors is not a regular file"],
        ),
        (
            s(&tmp.join("missing")),
            vec!["path:", "missing", "No such file"],
        ),
        ("/".to_string(), vec!["path:"]),
    ] {
        assert_error(
            d.add_expert(&path).await,
            ErrorKind::InvalidArgument,
            &fragments,
        );
    }
    assert_busctl_error(
        b.busctl_daemon(&["AddExpert", "s", "relative/path"]),
        &["path: relative/path is not an absolute path"],
    );
    assert_busctl_error(
        b.busctl_daemon(&["AddExpert", "as", "1", "/x"]),
        &["Signature mismatch"],
    );
    // Nothing reached the library, no staging folder was left.
    let names: Vec<String> = std::fs::read_dir(library)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert_eq!(d.list_experts().await.unwrap().len(), 3);

    // Links that stay regular files (a hub cache's snapshot) are fine.
    let linked = tmp.join("incoming/first");
    std::fs::create_dir_all(&linked).unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::os::unix::fs::symlink(tiny_expert("first").join(f), linked.join(f)).unwrap();
    }
    assert_eq!(d.add_expert(&s(&linked)).await.unwrap().name, "first");

    // RemoveExpert and GetExpert names.
    assert_error(
        d.remove_expert("../upper").await,
        ErrorKind::InvalidArgument,
        &["name:"],
    );
    assert_error(
        d.remove_expert("").await,
        ErrorKind::InvalidArgument,
        &["name:"],
    );
    assert_error(
        d.remove_expert("nobody").await,
        ErrorKind::NoSuchExpert,
        &["name:", "nobody"],
    );
    assert_error(
        d.get_expert("nobody").await,
        ErrorKind::NoSuchExpert,
        &["name:"],
    );
    // Data files of jobs.
    assert_error(
        d.select("{}", "data/valid.jsonl").await,
        ErrorKind::InvalidArgument,
        &["data:", "not an absolute path"],
    );
    assert_error(
        d.select("{}", library.to_str().unwrap()).await,
        ErrorKind::InvalidArgument,
        &["data:", "not a readable file"],
    );
    b.still_scores().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_targets_missing_and_released_models() {
    let b = Bench::start().await;
    let tmp = b.setup.tmp.path();
    let existing = tmp.join("existing");
    std::fs::create_dir_all(&existing).unwrap();
    assert_error(
        b.model.export_peft(existing.to_str().unwrap()).await,
        ErrorKind::InvalidArgument,
        &["dir:", "already exists"],
    );
    assert_error(
        b.model.export_peft("out/merged").await,
        ErrorKind::InvalidArgument,
        &["dir:", "not an absolute path"],
    );
    assert_eq!(std::fs::read_dir(&existing).unwrap().count(), 0);
    // A routed model cannot be one adapter.
    let experts = b.daemon.list_experts().await.unwrap();
    let routed = b
        .daemon
        .fuse_plan(&arrow_plan(&experts, &["upper", "reverse"], 1))
        .await
        .unwrap();
    let routed = Model1Proxy::builder(&b.conn)
        .path(routed)
        .build()
        .await
        .unwrap();
    assert_error(
        routed
            .export_peft(tmp.join("routed").to_str().unwrap())
            .await,
        ErrorKind::NotSupported,
        &["ExportPeft", "routed"],
    );

    // A model path that never existed, and one released.
    assert_busctl_error(
        tokio::task::block_in_place(|| {
            busctl(
                &b.setup.bus.address,
                &[
                    "call",
                    WELL_KNOWN_NAME,
                    "/org/moerge/Model/999",
                    "org.moerge.Model1",
                    "Score",
                    "ss",
                    PROMPT,
                    COMPLETION,
                ],
            )
        }),
        &["/org/moerge/Model/999"],
    );
    routed.release().await.unwrap();
    assert_eq!(
        standard_error_name(routed.score(PROMPT, COMPLETION).await.unwrap_err()),
        "org.freedesktop.DBus.Error.UnknownObject"
    );
    assert_eq!(
        standard_error_name(routed.release().await.unwrap_err()),
        "org.freedesktop.DBus.Error.UnknownObject"
    );
    assert_eq!(b.setup.serving.models().len(), 1);
    b.still_scores().await;
}
