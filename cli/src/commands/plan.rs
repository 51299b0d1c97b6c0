//! `moerge plan ...` and `moerge export`: write plans from a library folder; export a static
//! merge as a PEFT adapter; read a plan with its experts for the model commands.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use moerge_library::Adapter;
use moerge_sdk::plan::{ExpertRef, MergeSpace, ModulePlan, Plan, PLAN_VERSION};

use crate::args::{ExportArgs, PlanMergeArgs, SpaceArg};

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

/// Reads and validates a plan file, and loads its experts from `library` (hashes checked
/// when the plan is applied).
pub fn read_with_experts(library: &Path, plan_path: &Path) -> Result<(Plan, Vec<Adapter>)> {
    let text = std::fs::read_to_string(plan_path)
        .with_context(|| format!("--plan {}", plan_path.display()))?;
    let plan = Plan::from_json(&text).with_context(|| format!("--plan {}", plan_path.display()))?;
    let experts = plan
        .experts
        .iter()
        .map(|e| load_expert(library, &e.name))
        .collect::<Result<Vec<_>>>()
        .with_context(|| format!("--library {}", library.display()))?;
    Ok((plan, experts))
}

pub fn merge(args: &PlanMergeArgs) -> Result<ExitCode> {
    let n = args.experts.len();
    let weights = args
        .weights
        .clone()
        .unwrap_or_else(|| vec![1.0 / n as f64; n]);
    if weights.len() != n {
        bail!("--weights: {} weights for {n} experts", weights.len());
    }
    let experts = args
        .experts
        .iter()
        .map(|name| {
            let adapter = load_expert(&args.library, name)?;
            Ok(ExpertRef {
                name: name.clone(),
                hash: adapter.hash().to_string(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let space = match args.space {
        SpaceArg::Lowrank => MergeSpace::LowRank,
        SpaceArg::Exact => MergeSpace::Exact,
        SpaceArg::Folded => MergeSpace::Folded,
    };
    let plan = Plan {
        version: PLAN_VERSION,
        experts,
        default: ModulePlan::Static { weights, space },
        modules: Default::default(),
    };
    plan.validate()?;
    match &args.out {
        Some(path) => {
            std::fs::write(path, plan.to_json())
                .with_context(|| format!("--out {}", path.display()))?;
            eprintln!("wrote {}", path.display());
        }
        None => print!("{}", plan.to_json()),
    }
    Ok(ExitCode::SUCCESS)
}

pub fn export(args: &ExportArgs) -> Result<ExitCode> {
    let (plan, experts) = read_with_experts(&args.library, &args.plan)?;
    let hash = moerge_engine::merge::export_peft(&plan, &experts, &args.out)
        .with_context(|| format!("--out {}", args.out.display()))?;
    println!("wrote {} ({})", args.out.display(), hash.short());
    Ok(ExitCode::SUCCESS)
}
