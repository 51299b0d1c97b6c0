//! `moerge policies` and `moerge fit`: list the policy plugins the host finds, and run one
//! offline on a library folder to write a plan (and its tensor file) next to `--out`.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use moerge_engine::services::{EngineServices, ServicesInput};
use moerge_engine::{BaseModel, Precision, TextTokenizer};
use moerge_library::source::{self, HubSettings, ModelKind};
use moerge_library::{records, write_tensor_file_bytes, Adapter, ExpertMetadata};
use moerge_policy_host::{
    records_from_library, standard_folders, ExpertInput, FitRequest, PolicyRegistry,
};
use serde::Serialize;

use crate::args::{FitArgs, PoliciesArgs, PoliciesCommand};

fn registry(extra: &[std::path::PathBuf]) -> PolicyRegistry {
    let registry = PolicyRegistry::discover(&standard_folders(extra));
    for refusal in registry.refusals() {
        eprintln!("warning: skipped {refusal}");
    }
    registry
}

#[derive(Serialize)]
struct PolicyRow<'a> {
    name: &'a str,
    version: &'a str,
    sdk_version: &'a str,
    path: String,
    parameters: &'a [moerge_sdk::params::ParamSpec],
}

pub fn list(args: &PoliciesArgs) -> Result<ExitCode> {
    let registry = registry(&args.policy_dir);
    let rows: Vec<PolicyRow<'_>> = registry
        .policies()
        .iter()
        .map(|p| PolicyRow {
            name: p.name(),
            version: p.version(),
            sdk_version: p.sdk_version(),
            path: p.path().display().to_string(),
            parameters: p.parameters(),
        })
        .collect();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(ExitCode::SUCCESS);
    }
    if rows.is_empty() {
        println!("no policy plugins found; build them with `cargo build --release` or pass --policy-dir DIR");
        return Ok(ExitCode::SUCCESS);
    }
    let wanted = args
        .command
        .as_ref()
        .map(|PoliciesCommand::Show { name }| name);
    if let Some(name) = wanted {
        if !rows.iter().any(|r| r.name == name) {
            bail!("no policy named {name:?}; `moerge policies` lists them");
        }
    }
    for r in rows.iter().filter(|r| wanted.is_none_or(|w| w == r.name)) {
        println!("{} {}  ({})", r.name, r.version, r.path);
        for p in r.parameters {
            let default = p
                .default
                .as_ref()
                .map(|d| format!(" = {}", serde_json::to_string(d).unwrap_or_default()))
                .unwrap_or_default();
            println!("    {} ({}{default}): {}", p.name, p.kind, p.doc);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Every expert folder of `library` (or those named), loaded, with its metadata.
fn load_experts(
    library: &Path,
    names: Option<&[String]>,
) -> Result<(Vec<Adapter>, Vec<Option<ExpertMetadata>>)> {
    let names: Vec<String> = match names {
        Some(n) => n.to_vec(),
        None => {
            let mut all: Vec<String> = std::fs::read_dir(library)
                .with_context(|| format!("--library {}", library.display()))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("adapter_config.json").is_file())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect();
            all.sort();
            all
        }
    };
    if names.is_empty() {
        bail!("--library {}: holds no adapter folder", library.display());
    }
    let mut adapters = Vec::with_capacity(names.len());
    let mut metadata = Vec::with_capacity(names.len());
    for name in &names {
        let dir = library.join(name);
        adapters.push(Adapter::load(&dir).with_context(|| format!("expert {name:?}"))?);
        metadata.push(ExpertMetadata::read(&dir).with_context(|| format!("expert {name:?}"))?);
    }
    Ok((adapters, metadata))
}

#[derive(Serialize)]
struct FitReport {
    policy: String,
    plan: String,
    tensors: Option<String>,
    experts: usize,
    valid_mean_loss: Option<f64>,
}

pub fn fit(args: &FitArgs) -> Result<ExitCode> {
    let (Some(base), Some(library), Some(out)) = (&args.base, &args.library, &args.out) else {
        crate::exit::invalid!("fitting offline needs --base, --library and --out");
    };
    let registry = registry(&args.policy_dir);
    let Some(policy) = registry.get(&args.policy) else {
        let known: Vec<&str> = registry.policies().iter().map(|p| p.name()).collect();
        bail!(
            "--policy {}: no such policy; found: {}",
            args.policy,
            known.join(", ")
        );
    };
    let params: Vec<(String, String)> = args
        .param
        .iter()
        .map(|kv| match kv.split_once('=') {
            Some((k, v)) => Ok((k.trim().to_string(), v.trim().to_string())),
            None => bail!("--param {kv}: expected KEY=VALUE"),
        })
        .collect::<Result<_>>()?;
    let base_dir = source::resolve(base, ModelKind::Base, &HubSettings::from_env())
        .with_context(|| format!("--base {base}"))?;
    let (adapters, metadata) = load_experts(library, args.experts.as_deref())?;
    let read =
        |p: &Option<std::path::PathBuf>, flag: &str| -> Result<Vec<moerge_sdk::policy::Record>> {
            match p {
                None => Ok(Vec::new()),
                Some(p) => Ok(records_from_library(
                    &records::read_jsonl(p).with_context(|| format!("--{flag} {}", p.display()))?,
                )),
            }
        };
    let (train, valid) = (read(&args.train, "train")?, read(&args.valid, "valid")?);
    let cancelled = crate::exit::cancel_on_ctrl_c();
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(1000)
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:30} {msg}")
            .expect("a valid template"),
    );
    let policy_name = policy.name().to_string();
    let out = out.clone();
    let bar2 = bar.clone();
    let policy_path = policy.path().to_path_buf();
    // The fit blocks in the host's services (training), so it gets a thread of its own.
    let fit_thread = std::thread::Builder::new()
        .name("moerge-fit".into())
        .spawn(move || -> Result<_> {
            let base = BaseModel::load_dir(&base_dir, Precision::F32)?;
            let tokenizer = TextTokenizer::from_dir(&base_dir)?;
            let inputs: Vec<ExpertInput<'_>> = adapters
                .iter()
                .zip(&metadata)
                .map(|(a, m)| ExpertInput {
                    adapter: a,
                    metadata: m.as_ref(),
                })
                .collect();
            let input = ServicesInput {
                base: &base,
                experts: &adapters,
                tokenizer: &tokenizer,
                train: &train,
                valid: &valid,
                cancelled: &cancelled,
            };
            let services = EngineServices::new(input, |fraction, message| {
                bar2.set_position((fraction.clamp(0.0, 1.0) * 1000.0) as u64);
                bar2.set_message(message.to_string());
            })?;
            let request = FitRequest {
                experts: &inputs,
                train: &train,
                valid: &valid,
                params: &params,
            };
            let policy = moerge_policy_host::load_policy(&policy_path)?;
            Ok(policy.fit_plan(&request, &services)?)
        })
        .context("cannot start the fit thread")?;
    let result = fit_thread
        .join()
        .map_err(|_| anyhow::anyhow!("the fit thread panicked"))?;
    bar.finish_and_clear();
    let fitted = result?;
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Some(bytes) = &fitted.tensor_file {
        write_tensor_file_bytes(dir, bytes).with_context(|| format!("--out {}", out.display()))?;
    }
    std::fs::write(&out, fitted.plan.to_json())
        .with_context(|| format!("--out {}", out.display()))?;
    let report = FitReport {
        policy: policy_name,
        plan: out.display().to_string(),
        tensors: fitted.plan.tensors_file(),
        experts: fitted.plan.experts.len(),
        valid_mean_loss: fitted.valid_loss,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("wrote {}", report.plan);
        if let Some(t) = &report.tensors {
            print!(" and {t}");
        }
        match report.valid_mean_loss {
            Some(l) => println!(" (validation loss {l:.4})"),
            None => println!(),
        }
    }
    Ok(ExitCode::SUCCESS)
}
