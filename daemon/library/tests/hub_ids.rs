//! Where a location points (an existing local path wins over a hub id), which hub ids are
//! well-formed, and the hub settings read from environment variables. No hub is involved.

mod fake_hub;
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fake_hub::{dead_endpoint, offline, settings};
use moerge_library::source::{resolve, HubSettings, ModelKind, Source, SourceError};

#[test]
fn local_path_wins_over_hub_id() {
    // A folder whose relative path is also a well-formed hub id.
    let here = std::env::current_dir().unwrap();
    let parent = tempfile::Builder::new()
        .prefix("moerge-hubtest-")
        .tempdir_in(&here)
        .unwrap();
    let folder = parent.path().join("adapter");
    std::fs::create_dir(&folder).unwrap();
    let spec = format!(
        "{}/adapter",
        parent.path().file_name().unwrap().to_str().unwrap()
    );

    let cache = tempfile::tempdir().unwrap();
    let unreachable = settings(&dead_endpoint(), cache.path());
    assert_eq!(
        Source::parse(&spec).unwrap(),
        Source::Local(PathBuf::from(&spec))
    );
    let dir = resolve(&spec, ModelKind::Adapter, &unreachable).unwrap();
    assert_eq!(dir, PathBuf::from(&spec));

    // Absolute paths, and a local file where a folder is expected.
    let abs = resolve(
        folder.to_str().unwrap(),
        ModelKind::Base,
        &offline(cache.path()),
    )
    .unwrap();
    assert_eq!(abs, folder);
    let file = support::adapter_dir("dev-phi", "swapcase").join("adapter_config.json");
    let err = resolve(file.to_str().unwrap(), ModelKind::Adapter, &unreachable).unwrap_err();
    assert!(matches!(err, SourceError::NotAFolder { .. }), "{err:?}");

    drop(parent);
    assert_eq!(
        Source::parse(&spec).unwrap(),
        Source::Hub {
            repo: spec.clone(),
            revision: "main".to_string()
        }
    );
}

#[test]
fn hub_ids_are_parsed_and_malformed_ones_rejected() {
    assert_eq!(
        Source::parse("org-1/name_2.x@v1.0").unwrap(),
        Source::Hub {
            repo: "org-1/name_2.x".into(),
            revision: "v1.0".into()
        }
    );
    assert_eq!(
        Source::parse("org/name@refs/pr/3").unwrap(),
        Source::Hub {
            repo: "org/name".into(),
            revision: "refs/pr/3".into()
        }
    );
    assert_eq!(
        Source::parse("org/name").unwrap().to_string(),
        "org/name@main"
    );

    for bad in [
        "",
        "name-without-org",
        "org/",
        "/org",
        "/definitely/not/a/folder",
        "org/name/extra",
        "org/na me",
        "org/name@",
        "org/name@a..b",
        "org/name@v1@v2",
        "org//name",
        "org/-name",
        "org/name.git",
        "org--x/name",
        "https://huggingface.co/org/name",
        "./not-here",
    ] {
        let err = Source::parse(bad).unwrap_err();
        assert!(
            matches!(err, SourceError::InvalidSpec { .. }),
            "{bad}: {err:?}"
        );
        let message = err.to_string();
        assert!(
            message.contains("not an existing folder") && message.contains("hub id"),
            "{bad}: {message}"
        );
    }
    let long = format!("org/{}", "x".repeat(100));
    assert!(Source::parse(&long).is_err());
}

#[test]
fn settings_from_variables() {
    let home = tempfile::tempdir().unwrap();
    let hf_home = home.path().join("hf");
    std::fs::create_dir_all(&hf_home).unwrap();
    std::fs::write(hf_home.join("token"), "hf_from_file\n").unwrap();

    let vars = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let from =
        |map: BTreeMap<String, String>| HubSettings::from_lookup(|name| map.get(name).cloned());
    let home_str = home.path().to_str().unwrap();

    let defaults = from(vars(&[("HOME", home_str)]));
    assert_eq!(defaults.endpoint, "https://huggingface.co");
    assert_eq!(
        defaults.cache_dir,
        home.path().join(".cache/huggingface/hub")
    );
    assert!(!defaults.offline);
    assert_eq!(defaults.token, None);

    let hf_home_str = hf_home.to_str().unwrap();
    let set = from(vars(&[
        ("HOME", home_str),
        ("HF_HOME", hf_home_str),
        ("HF_ENDPOINT", "http://mirror.example/"),
        ("HF_HUB_OFFLINE", "True"),
    ]));
    assert_eq!(set.endpoint, "http://mirror.example");
    assert_eq!(set.cache_dir, hf_home.join("hub"));
    assert!(set.offline);
    assert_eq!(set.token.as_deref(), Some("hf_from_file"));
    assert!(!format!("{set:?}").contains("hf_from_file"));

    let explicit = from(vars(&[
        ("HOME", home_str),
        ("HF_HOME", hf_home_str),
        ("HF_HUB_CACHE", "~/elsewhere"),
        ("HF_TOKEN", "hf_from_env"),
        ("HF_HUB_OFFLINE", "0"),
    ]));
    assert_eq!(explicit.cache_dir, home.path().join("elsewhere"));
    assert_eq!(explicit.token.as_deref(), Some("hf_from_env"));
    assert!(!explicit.offline);

    let xdg = from(vars(&[("HOME", home_str), ("XDG_CACHE_HOME", "/xdg")]));
    assert_eq!(xdg.cache_dir, Path::new("/xdg/huggingface/hub"));
    for on in ["1", "yes", "ON", "true"] {
        assert!(from(vars(&[("HOME", home_str), ("HF_HUB_OFFLINE", on)])).offline);
    }
}
