//! A client that is not Rust: the daemon driven with `busctl` alone (introspection,
//! ListExperts, FusePlan, Score, TopTokens, Generate, Release), its JSON output parsed and
//! its numbers checked against the daemon's own in-process computation.
//!
//! Every busctl run is a new bus client that leaves when busctl exits, and a client's models
//! are released when it leaves: a model fused by one busctl run is gone by the next. So the
//! model busctl scores with is held by a long-lived connection (an application holding a
//! model that scripts use), and busctl releases it (root may release any model).

mod bus_support;
mod open_bus;

use moerge_bus::{Model1Proxy, DAEMON_PATH, WELL_KNOWN_NAME};
use moerge_daemon::serving::Caller;
use serde_json::{json, Value};

use bus_support::*;
use open_bus::{busctl, busctl_with};

/// `busctl --json=short call <daemon or model> <method> [signature args...]`, parsed.
fn call(address: &str, path: &str, interface: &str, args: &[&str]) -> Value {
    let mut all = vec!["call", WELL_KNOWN_NAME, path, interface];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) =
        tokio::task::block_in_place(|| busctl_with(address, &["--json=short"], &all));
    assert!(ok, "busctl {all:?} failed: {stderr}");
    if stdout.trim().is_empty() {
        return Value::Null;
    }
    let reply: Value =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("busctl printed {stdout:?}: {e}"));
    reply["data"].clone()
}

fn daemon(address: &str, args: &[&str]) -> Value {
    call(address, DAEMON_PATH, "org.moerge.Daemon1", args)
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_alone_introspects_lists_fuses_scores_and_releases() {
    let setup = Setup::start().await;
    let address = setup.bus.address.clone();

    // Introspection shows the interface a script needs.
    let (ok, xml, stderr) = tokio::task::block_in_place(|| {
        busctl(&address, &["introspect", WELL_KNOWN_NAME, DAEMON_PATH])
    });
    assert!(ok, "{stderr}");
    for member in [
        "org.moerge.Daemon1",
        ".ListExperts",
        ".FusePlan",
        ".Fuse",
        ".ExpertCount",
    ] {
        assert!(xml.contains(member), "no {member} in:\n{xml}");
    }

    // ListExperts: a(ssssttt), name and hash first.
    let experts = daemon(&address, &["ListExperts"]);
    let experts = experts[0].as_array().unwrap();
    let names: Vec<&str> = experts.iter().map(|e| e[0].as_str().unwrap()).collect();
    assert_eq!(names.len(), EXPERTS.len());
    for name in EXPERTS {
        assert!(names.contains(&name), "{names:?}");
    }
    let hash = |name: &str| {
        experts.iter().find(|e| e[0] == name).unwrap()[1]
            .as_str()
            .unwrap()
            .to_string()
    };
    let plan = json!({
        "moerge_plan": 1,
        "experts": [{"name": "upper", "hash": hash("upper")}, {"name": "rot13", "hash": hash("rot13")}],
        "default": {"static": {"weights": [0.5, 0.5], "space": "lowrank"}},
    })
    .to_string();

    // FusePlan from busctl: a model path; busctl leaves, and its model goes with it.
    let path = daemon(&address, &["FusePlan", "s", &plan]);
    let path = path[0].as_str().unwrap().to_string();
    assert!(path.starts_with("/org/moerge/Model/"), "{path}");
    eventually(
        "busctl's model to be released when busctl exits",
        || async {
            daemon(&address, &["ListModels"])[0]
                .as_array()
                .unwrap()
                .is_empty()
        },
    )
    .await;

    // A model held by a long-lived client, used by busctl.
    let (holder, holder_daemon) = setup.client().await;
    let held = holder_daemon.fuse_plan(&plan).await.unwrap();
    let models = daemon(&address, &["ListModels"]);
    let listed = &models[0].as_array().unwrap()[0];
    assert_eq!(listed[0], held.as_str());
    assert_eq!(listed[4], json!(["upper", "rot13"]));

    // Score: (asauaddd); the numbers are the daemon's own, computed in-process.
    let score = call(
        &address,
        held.as_str(),
        "org.moerge.Model1",
        &["Score", "ss", "upper kiwi>", "KIWI\n"],
    );
    // busctl prints a reply struct's fields as the data array itself.
    let me = Caller {
        client: "in-process".into(),
        uid: Some(0),
    };
    let model = setup.serving.fuse_plan(&me, &plan).await.unwrap();
    let want = setup
        .serving
        .score(&me, &model, "upper kiwi>", "KIWI\n")
        .await
        .unwrap();
    let nll = floats(&score[2]);
    assert_eq!(nll.len(), want.nll.len());
    for (got, want) in nll.iter().zip(&want.nll) {
        assert!((got - f64::from(*want)).abs() < 1e-6, "{got} vs {want}");
    }
    let ids: Vec<u64> = score[1]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    assert_eq!(
        ids,
        want.ids.iter().map(|&i| u64::from(i)).collect::<Vec<_>>()
    );
    let total: f64 = nll.iter().sum();
    assert!((score[3].as_f64().unwrap() - total).abs() < 1e-9);
    assert!((score[4].as_f64().unwrap() - total / nll.len() as f64).abs() < 1e-9);

    // TopTokens: a(usd), best first, probabilities agreeing with the in-process call.
    let top = call(
        &address,
        held.as_str(),
        "org.moerge.Model1",
        &["TopTokens", "su", "upper kiwi>", "3"],
    );
    let top = top[0].as_array().unwrap();
    let want_top = setup
        .serving
        .top_tokens(&me, &model, "upper kiwi>", 3)
        .await
        .unwrap();
    assert_eq!(top.len(), 3);
    for (got, (id, _, p)) in top.iter().zip(&want_top) {
        assert_eq!(got[0].as_u64().unwrap(), u64::from(*id));
        assert!((got[2].as_f64().unwrap() - f64::from(*p)).abs() < 1e-6);
    }
    setup.serving.release_model(&me, model.id).unwrap();

    // Generate with an a{sv} of options written on the command line.
    let text = call(
        &address,
        held.as_str(),
        "org.moerge.Model1",
        &[
            "Generate",
            "sa{sv}",
            "upper kiwi>",
            "1",
            "max_tokens",
            "u",
            "5",
        ],
    );
    let holder_model = Model1Proxy::builder(&holder)
        .path(held.clone())
        .build()
        .await
        .unwrap();
    let same = holder_model
        .generate(
            "upper kiwi>",
            moerge_bus::GenerateOptions::greedy(5).to_dict(),
        )
        .await
        .unwrap();
    assert_eq!(text[0].as_str().unwrap(), same);

    // Release from busctl (root may release any model): gone for its holder too.
    assert_eq!(
        call(&address, held.as_str(), "org.moerge.Model1", &["Release"]),
        Value::Null
    );
    assert!(daemon(&address, &["ListModels"])[0]
        .as_array()
        .unwrap()
        .is_empty());
    assert!(holder_model.score("upper a>", "A").await.is_err());
}
