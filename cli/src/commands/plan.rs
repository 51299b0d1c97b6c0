//! `moerge plan ...` and `moerge export`: write plans from a library folder; export a static
//! merge as a PEFT adapter; read a plan with its experts for the model commands.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use moerge_library::{read_tensor_file, Adapter, TensorMap};
use moerge_sdk::plan::{
    Ensemble, EnsembleLevel, ExpertRef, Granularity, Member, MergeSpace, Mix, ModulePlan, Plan,
    Router, PLAN_VERSION,
};

use crate::args::{ExportArgs, LevelArg, PlanArrowArgs, PlanEnsembleArgs, PlanMergeArgs, SpaceArg};

/// Loads the expert `name` from `library`, naming both when it cannot.
fn load_expert(library: &Path, name: &str) -> Result<Adapter> {
    let dir = library.join(name);
    if !dir.is_dir() {
        bail!(
            "unknown expert {name:?}: no folder {} in the library",
            dir.display()
        );
    }
    Adapter::load(&dir).with_context(|| format!("expert {name:?}"))
}

/// A plan with everything it needs to run: its experts and its tensor file's content.
pub struct PlanInputs {
    pub plan: Plan,
    pub experts: Vec<Adapter>,
    pub tensors: TensorMap,
}

/// Reads and validates a plan file, its tensor file (next to it) if it names one, and loads
/// its experts from `library` (hashes checked when the plan is applied).
pub fn read_with_experts(library: &Path, plan_path: &Path) -> Result<PlanInputs> {
    let text = std::fs::read_to_string(plan_path)
        .with_context(|| format!("--plan {}", plan_path.display()))?;
    let plan = Plan::from_json(&text).with_context(|| format!("--plan {}", plan_path.display()))?;
    let tensors = match &plan.tensors {
        None => TensorMap::new(),
        Some(hash) => {
            let dir = plan_path.parent().unwrap_or(Path::new("."));
            read_tensor_file(dir, hash)
                .with_context(|| format!("--plan {}", plan_path.display()))?
        }
    };
    let experts = plan
        .experts
        .iter()
        .map(|e| load_expert(library, &e.name))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("--library {}", library.display()))?;
    Ok(PlanInputs {
        plan,
        experts,
        tensors,
    })
}

/// Name and hash of each expert, loaded from `library`.
fn expert_refs(library: &Path, names: &[String]) -> Result<Vec<ExpertRef>> {
    names
        .iter()
        .map(|name| {
            let adapter = load_expert(library, name)?;
            Ok(ExpertRef {
                name: name.clone(),
                hash: adapter.hash().to_string(),
            })
        })
        .collect()
}

/// The `--weights` given (one per expert), or 1/N each.
fn weights_or_uniform(weights: Option<&[f64]>, n: usize) -> Result<Vec<f64>> {
    match weights {
        None => Ok(vec![1.0 / n as f64; n]),
        Some(w) if w.len() == n => Ok(w.to_vec()),
        Some(w) => bail!("--weights: {} weights for {n} experts", w.len()),
    }
}

/// Writes `plan` to `out`, or to stdout.
fn emit(plan: &Plan, out: Option<&Path>) -> Result<ExitCode> {
    plan.validate()?;
    match out {
        Some(path) => {
            std::fs::write(path, plan.to_json())
                .with_context(|| format!("--out {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{}", plan.to_json()),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn arrow(args: &PlanArrowArgs) -> Result<ExitCode> {
    let names = match &args.experts {
        Some(names) => names.clone(),
        None => {
            let mut names: Vec<String> = std::fs::read_dir(&args.library)
                .with_context(|| format!("--library {}", args.library.display()))?
                .filter_map(|e| e.ok())
                .filter(|e| e.path().join("adapter_config.json").is_file())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect();
            names.sort();
            names
        }
    };
    if names.is_empty() {
        bail!("--library {}: no adapter folders", args.library.display());
    }
    let plan = Plan {
        version: PLAN_VERSION,
        experts: expert_refs(&args.library, &names)?,
        default: ModulePlan::Routed {
            router: Router::Arrow,
            top_k: args.top_k,
            temperature: args.temperature,
            granularity: Granularity::Token,
            groups: Vec::new(),
            mix: Default::default(),
        },
        modules: Default::default(),
        ensemble: None,
        tensors: None,
    };
    emit(&plan, args.out.as_deref())
}

pub fn ensemble(args: &PlanEnsembleArgs) -> Result<ExitCode> {
    let n = args.pick.experts.len();
    let weights = weights_or_uniform(args.pick.weights.as_deref(), n)?;
    let level = match args.level {
        LevelArg::Prob => EnsembleLevel::Probability,
        LevelArg::Logit => EnsembleLevel::Logit,
    };
    // Member i is expert i alone (a one-hot exact merge is the adapter itself).
    let members = (0..n)
        .map(|i| Member {
            weight: weights[i],
            default: ModulePlan::Static {
                weights: (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect(),
                space: MergeSpace::Exact,
                svd_rank: None,
            },
            modules: Default::default(),
        })
        .collect();
    let plan = Plan {
        version: PLAN_VERSION,
        experts: expert_refs(&args.pick.library, &args.pick.experts)?,
        default: ModulePlan::None,
        modules: Default::default(),
        ensemble: Some(Ensemble { level, members }),
        tensors: None,
    };
    emit(&plan, args.out.as_deref())
}

pub fn merge(args: &PlanMergeArgs) -> Result<ExitCode> {
    let n = args.pick.experts.len();
    let weights = weights_or_uniform(args.pick.weights.as_deref(), n)?;
    let experts = expert_refs(&args.pick.library, &args.pick.experts)?;
    let space = match args.space {
        SpaceArg::Lowrank => MergeSpace::LowRank,
        SpaceArg::Exact => MergeSpace::Exact,
        SpaceArg::Folded => MergeSpace::Folded,
    };
    let plan = Plan {
        version: PLAN_VERSION,
        experts,
        default: ModulePlan::Static {
            weights,
            space,
            svd_rank: args.svd_rank,
        },
        modules: Default::default(),
        ensemble: None,
        tensors: None,
    };
    emit(&plan, args.out.as_deref())
}

pub fn export(args: &ExportArgs) -> Result<ExitCode> {
    let (Some(library), Some(plan)) = (&args.library, &args.plan) else {
        crate::exit::invalid!("exporting offline needs --library and --plan");
    };
    let inputs = read_with_experts(library, plan)?;
    if let Some(config) = arrow_export(&inputs, library)? {
        if args.out.exists() {
            bail!(
                "--out {}: already exists; choose a new folder",
                args.out.display()
            );
        }
        std::fs::create_dir_all(&args.out)
            .with_context(|| format!("--out {}", args.out.display()))?;
        let path = args.out.join("arrow_config.json");
        std::fs::write(&path, serde_json::to_string_pretty(&config)? + "\n")
            .with_context(|| format!("--out {}", path.display()))?;
        println!(
            "wrote {} (Arrow over {} adapters)",
            path.display(),
            inputs.experts.len()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let hash = moerge_engine::merge::export_peft(
        &inputs.plan,
        &inputs.experts,
        &inputs.tensors,
        &args.out,
    )
    .with_context(|| format!("--out {}", args.out.display()))?;
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "out": args.out.display().to_string(), "hash": hash.to_string() })
        );
    } else {
        println!("wrote {} ({})", args.out.display(), hash.short());
    }
    Ok(ExitCode::SUCCESS)
}

/// For a plan that routes every module with Arrow per token over single experts (what
/// PEFT's `create_arrow_model` does), the adapter list and `ArrowConfig` values PEFT needs;
/// `None` for other plans.
fn arrow_export(inputs: &PlanInputs, library: &Path) -> Result<Option<serde_json::Value>> {
    let plan = &inputs.plan;
    let ModulePlan::Routed {
        router: Router::Arrow,
        top_k,
        temperature,
        granularity,
        groups,
        mix: Mix::Outputs,
    } = &plan.default
    else {
        return Ok(None);
    };
    if plan.ensemble.is_some() || !plan.modules.is_empty() {
        bail!("--plan: PEFT's Arrow routes every adapted module the same way; this plan has per-module overrides, which PEFT cannot express");
    }
    if *granularity != Granularity::Token || !groups.is_empty() {
        bail!("--plan: PEFT's Arrow routes single experts per token; this plan uses sequence routing or groups, which PEFT cannot express");
    }
    let base = inputs.experts[0]
        .config()
        .base_model_name_or_path
        .clone()
        .unwrap_or_default();
    let adapters: Vec<serde_json::Value> = plan
        .experts
        .iter()
        .map(|e| {
            let path = std::path::absolute(library.join(&e.name))
                .unwrap_or_else(|_| library.join(&e.name));
            serde_json::json!({"name": e.name, "hash": e.hash, "path": path})
        })
        .collect();
    Ok(Some(serde_json::json!({
        "format": "moerge arrow export 1",
        "base_model_name_or_path": base,
        "adapters": adapters,
        "arrow_config": {
            "top_k": top_k,
            "router_temperature": temperature,
            "use_gks": false,
            "rng_seed": 0,
        },
        "note": "Load each adapter path into a PeftModel under its name, then create_arrow_model(..., arrow_config=ArrowConfig(**arrow_config)). PEFT computes prototypes by power iteration; moerge uses the exact top singular vector, so routing can differ where an adapter's top two singular values are close.",
    })))
}
