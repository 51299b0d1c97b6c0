//! The plugin host on real `.so` files: the built-ins and misbehaving test plugins, which
//! cargo builds into this test binary's own folder (`target/<profile>/deps`) because this
//! crate dev-depends on them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use moerge_library::{write_adapter, Adapter, ExpertMetadata, NewAdapter, NewModule};
use moerge_policy_host::{
    load_policy, ExpertInput, FileFilter, FitError, FitRequest, LoadError, PolicyFolder,
    PolicyRegistry,
};
use moerge_sdk::plan::{fixed_a_name, fixed_b_name, ModulePlan};
use moerge_sdk::testing::TestServices;

/// The folder cargo built the plugin libraries into.
fn plugin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().to_path_buf()
}

/// The built library of crate `lib_name`, checked to exist.
fn library(lib_name: &str) -> PathBuf {
    let path = plugin_dir().join(format!("lib{lib_name}.so"));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// A copy of `lib` in `dir` with `mode`.
fn copy(lib: &Path, dir: &Path, file: &str, mode: u32) -> PathBuf {
    let to = dir.join(file);
    std::fs::copy(lib, &to).unwrap();
    std::fs::set_permissions(&to, std::fs::Permissions::from_mode(mode)).unwrap();
    to
}

/// Two small PEFT adapters on disk, loaded.
fn adapters(dir: &Path) -> Vec<(Adapter, ExpertMetadata)> {
    ["upper", "lower"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let a: Vec<f32> = (0..2 * 4).map(|k| (k + i) as f32 * 0.1).collect();
            let b: Vec<f32> = (0..3 * 2).map(|k| (k * (i + 1)) as f32 * 0.05).collect();
            let module = |m: &str| NewModule {
                module: m.into(),
                rank: 2,
                in_features: 4,
                out_features: 3,
                a: &a,
                b: &b,
            };
            let adapter = NewAdapter {
                r: 2,
                lora_alpha: 4.0,
                use_rslora: false,
                target_modules: vec!["q_proj".into()],
                base_model_name_or_path: "tiny".into(),
                alpha_overrides: Default::default(),
                modules: vec![
                    module("model.layers.0.self_attn.q_proj"),
                    module("model.layers.1.self_attn.q_proj"),
                ],
            };
            let path = dir.join(name);
            write_adapter(&path, &adapter).unwrap();
            let meta = ExpertMetadata {
                tasks: vec![format!("task-{name}")],
                ..Default::default()
            };
            (Adapter::load(&path).unwrap(), meta)
        })
        .collect()
}

fn fit(lib: &str, params: &[(&str, &str)]) -> Result<moerge_sdk::policy::Fitted, FitError> {
    let tmp = tempfile::tempdir().unwrap();
    let loaded = adapters(tmp.path());
    let experts: Vec<ExpertInput<'_>> = loaded
        .iter()
        .map(|(adapter, meta)| ExpertInput {
            adapter,
            metadata: Some(meta),
        })
        .collect();
    let params: Vec<(String, String)> = params
        .iter()
        .map(|(k, v)| ((*k).into(), (*v).into()))
        .collect();
    let policy = load_policy(&library(lib)).unwrap();
    let request = FitRequest {
        experts: &experts,
        train: &[],
        valid: &[],
        params: &params,
    };
    policy.fit(&request, &TestServices::new())
}

#[test]
fn built_ins_are_discovered_in_the_executables_folder() {
    let folder = PolicyFolder {
        path: plugin_dir(),
        filter: FileFilter::BuiltinNames,
    };
    let registry = PolicyRegistry::discover(&[folder]);
    let names = [
        "uniform-merge",
        "learned-merge",
        "ensemble",
        "arrow",
        "sgd-router",
        "hierarchical",
        "lp-ensemble",
        "layerwise",
        "peft-merge",
        "distill",
    ];
    for name in names {
        let policy = registry
            .get(name)
            .unwrap_or_else(|| panic!("{name} not found"));
        let file = format!("libmoerge_policy_{}.so", name.replace('-', "_"));
        assert_eq!(policy.path().file_name().unwrap().to_str(), Some(&*file));
    }
    let uniform = registry.get("uniform-merge").expect("uniform-merge found");
    assert_eq!(uniform.sdk_version(), env!("CARGO_PKG_VERSION"));
    assert_eq!(uniform.path(), library("moerge_policy_uniform_merge"));
    assert!(uniform.parameters().iter().any(|p| p.name == "space"));
    // Test plugins do not carry the built-in prefix, so they are not picked up here.
    assert!(registry.get("test-panic").is_none());
    assert!(registry.refusals().is_empty(), "{:?}", registry.refusals());
}

#[test]
fn a_fit_runs_on_library_adapters() {
    let tmp = tempfile::tempdir().unwrap();
    let hashes: Vec<String> = adapters(tmp.path())
        .iter()
        .map(|(a, _)| a.hash().to_string())
        .collect();
    let fitted = fit("moerge_policy_uniform_merge", &[("space", "exact")]).unwrap();
    let names: Vec<(&str, &str)> = (fitted.plan.experts.iter())
        .map(|e| (e.name.as_str(), e.hash.as_str()))
        .collect();
    assert_eq!(names, [("upper", &*hashes[0]), ("lower", &*hashes[1])]);
    assert!(
        matches!(&fitted.plan.default, ModulePlan::Static { weights, .. } if weights == &[0.5, 0.5])
    );
    let err = fit("moerge_policy_uniform_merge", &[("spaces", "exact")]).unwrap_err();
    assert!(matches!(err, FitError::Params { .. }), "{err}");
    assert!(
        err.to_string().contains("unknown parameter \"spaces\""),
        "{err}"
    );
}

#[test]
fn a_panic_in_fit_fails_that_fit_and_the_host_keeps_working() {
    let err = fit("moerge_test_plugin_panic", &[]).unwrap_err();
    assert_eq!(
        err,
        FitError::PluginFailed {
            policy: "test-panic".into(),
            message: "panicked: test-panic was asked to panic".into()
        }
    );
    // The same library, and another one, still work.
    assert!(fit("moerge_test_plugin_panic", &[("panic", "false")]).is_ok());
    assert!(fit("moerge_policy_uniform_merge", &[]).is_ok());
}

#[test]
fn an_invalid_plan_is_refused() {
    let err = fit("moerge_test_plugin_invalid_plan", &[]).unwrap_err();
    assert!(matches!(err, FitError::InvalidPlan { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("test-invalid-plan") && msg.contains("1 weights for 2 experts"),
        "{msg}"
    );
}

#[test]
fn libraries_that_are_not_plugins_of_this_abi_are_refused() {
    let path = library("moerge_test_plugin_wrong_abi");
    let err = load_policy(&path).unwrap_err();
    assert!(matches!(err, LoadError::Declaration { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.starts_with(&path.display().to_string()), "{msg}");
    assert!(msg.contains("expected ABI 1, got 2"), "{msg}");

    let err = load_policy(&library("moerge_test_plugin_no_entry")).unwrap_err();
    assert!(matches!(err, LoadError::NoEntry { .. }), "{err:?}");
    assert!(
        err.to_string().contains("moerge_policy_declaration"),
        "{err}"
    );

    let tmp = tempfile::tempdir().unwrap();
    let junk = tmp.path().join("junk.so");
    std::fs::write(&junk, "not an ELF file").unwrap();
    let err = load_policy(&junk).unwrap_err();
    assert!(matches!(err, LoadError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("junk.so"), "{err}");
}

#[test]
fn writable_files_are_refused_and_the_rest_load() {
    let tmp = tempfile::tempdir().unwrap();
    let uniform = library("moerge_policy_uniform_merge");
    let writable = copy(&uniform, tmp.path(), "a-writable.so", 0o775);
    copy(
        &library("moerge_test_plugin_panic"),
        tmp.path(),
        "b.so",
        0o755,
    );
    std::fs::write(tmp.path().join("notes.txt"), "not a candidate").unwrap();
    let registry = PolicyRegistry::discover(&[PolicyFolder::new(tmp.path())]);
    let names: Vec<&str> = registry.policies().iter().map(|p| p.name()).collect();
    assert_eq!(names, ["test-panic"]);
    assert_eq!(registry.refusals().len(), 1);
    let refusal = &registry.refusals()[0];
    assert_eq!(refusal.path(), writable);
    assert!(
        refusal
            .to_string()
            .contains("group- or world-writable (mode 0775)"),
        "{refusal}"
    );

    std::fs::set_permissions(&writable, std::fs::Permissions::from_mode(0o755)).unwrap();
    assert_eq!(load_policy(&writable).unwrap().name(), "uniform-merge");
}

#[test]
fn the_first_policy_of_a_name_wins() {
    let (first, second) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let uniform = library("moerge_policy_uniform_merge");
    let kept = copy(&uniform, first.path(), "u.so", 0o755);
    let dropped = copy(&uniform, second.path(), "u.so", 0o755);
    let folders = [
        PolicyFolder::new(first.path()),
        PolicyFolder::new(second.path()),
    ];
    let registry = PolicyRegistry::discover(&folders);
    assert_eq!(registry.policies().len(), 1);
    assert_eq!(registry.get("uniform-merge").unwrap().path(), kept);
    let msg = registry.refusals()[0].to_string();
    assert!(msg.contains(&*dropped.to_string_lossy()), "{msg}");
    assert!(
        msg.contains(&format!("already loaded from {}", kept.display())),
        "{msg}"
    );
}

#[test]
fn the_third_party_ties_merge_plugin_runs_through_the_host() {
    let tmp = tempfile::tempdir().unwrap();
    copy(
        &library("ties_merge"),
        tmp.path(),
        "libties_merge.so",
        0o644,
    );
    let registry = PolicyRegistry::discover(&[PolicyFolder::new(tmp.path())]);
    let ties = registry.get("ties-merge").expect("ties-merge loads");
    assert!(ties.parameters().iter().any(|p| p.name == "density"));
    let fitted = fit("ties_merge", &[("density", "0.5"), ("rank", "2")]).unwrap();
    for module in [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
    ] {
        assert_eq!(fitted.plan.module(module), &ModulePlan::Fixed);
        assert_eq!(fitted.tensors[&fixed_a_name(module)].shape, [2, 4]);
        assert_eq!(fitted.tensors[&fixed_b_name(module)].shape, [3, 2]);
    }
}
