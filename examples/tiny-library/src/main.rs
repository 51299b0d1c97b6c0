//! `cargo run --release -p tiny-library [-- --out DIR]`: writes the embedded tiny library
//! (data, base model, experts, manifest) from fixed seeds. The committed copy lives next to
//! this crate; the default output is that folder.

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use moerge_engine::trainer::{self, Example};
use moerge_engine::{BaseModel, Precision};
use moerge_library::ExpertMetadata;
use tiny_library::{tasks, ExpertKind, Record};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> Result<()> {
    moerge_engine::prefer_data_parallelism();
    let out = match std::env::args().skip_while(|a| a != "--out").nth(1) {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf(),
    };
    let started = Instant::now();
    let splits = write_data(&out)?;
    let base_dir = out.join("base");
    train_base(&base_dir)?;
    let base = BaseModel::load_dir(&base_dir, Precision::F32)?;
    let experts = train_experts(&base, &out.join("experts"), &splits["train"])?;
    write_manifest(&out, &base, &experts, &splits["valid"], started)?;
    println!("done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn write_data(out: &Path) -> Result<BTreeMap<&'static str, Vec<Record>>> {
    let dir = out.join("data");
    std::fs::create_dir_all(&dir)?;
    let mut splits = BTreeMap::new();
    for (name, records) in tiny_library::splits() {
        std::fs::write(
            dir.join(format!("{name}.jsonl")),
            tiny_library::to_jsonl(&records),
        )?;
        splits.insert(name, records);
    }
    println!(
        "data: {} tasks in {} families",
        tasks::all().len(),
        tasks::families().len()
    );
    Ok(splits)
}

fn train_base(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    moerge_engine::write_random_base(dir, &tiny_library::base_config(), tiny_library::SEED)?;
    moerge_engine::write_byte_level_tokenizer(dir)?;
    let (model, weights) = BaseModel::load_trainable(dir)?;
    let data = tiny_library::examples(&tiny_library::pretraining_records(200));
    let opts = tiny_library::base_training();
    let started = Instant::now();
    let summary = trainer::train(&model, weights.vars(), &data, &opts, |s| {
        if s.step % 100 == 0 {
            println!("base: step {}/{} loss {:.3}", s.step, s.steps, s.loss);
        }
        ControlFlow::Continue(())
    })?;
    weights.save(dir)?;
    println!(
        "base: loss {:.3} -> {:.3} in {:.0} s",
        summary.first_loss,
        summary.final_loss,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One expert to train: its folder name, kind, family and tasks.
struct ExpertPlan {
    name: String,
    kind: ExpertKind,
    family: Option<&'static str>,
    tasks: Vec<&'static str>,
}

fn expert_plans() -> Vec<ExpertPlan> {
    let all = tasks::all();
    let mut plans: Vec<ExpertPlan> = all
        .iter()
        .map(|t| ExpertPlan {
            name: t.name.into(),
            kind: ExpertKind::Private,
            family: Some(t.family),
            tasks: vec![t.name],
        })
        .collect();
    for family in tasks::families() {
        plans.push(ExpertPlan {
            name: format!("cluster-{family}"),
            kind: ExpertKind::Cluster,
            family: Some(family),
            tasks: all
                .iter()
                .filter(|t| t.family == family)
                .map(|t| t.name)
                .collect(),
        });
    }
    plans.push(ExpertPlan {
        name: "shared".into(),
        kind: ExpertKind::Shared,
        family: None,
        tasks: all.iter().map(|t| t.name).collect(),
    });
    plans
}

fn train_experts(base: &BaseModel, dir: &Path, train: &[Record]) -> Result<Vec<ExpertPlan>> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)?;
    }
    std::fs::create_dir_all(dir)?;
    let plans = expert_plans();
    for (index, plan) in plans.iter().enumerate() {
        let records: Vec<Record> = train
            .iter()
            .filter(|r| r.task.as_deref().is_some_and(|t| plan.tasks.contains(&t)))
            .cloned()
            .collect();
        let started = Instant::now();
        let (summary, _) = tiny_library::train_expert(
            base,
            plan.kind,
            index as u64,
            &records,
            &dir.join(&plan.name),
        )?;
        ExpertMetadata {
            tasks: plan.tasks.iter().map(|t| t.to_string()).collect(),
            kind: Some(format!("{:?}", plan.kind).to_lowercase()),
            family: plan.family.map(str::to_string),
        }
        .write(&dir.join(&plan.name))?;
        println!(
            "expert {:<18} loss {:.3} -> {:.3} in {:.1} s",
            plan.name,
            summary.first_loss,
            summary.final_loss,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(plans)
}

fn write_manifest(
    out: &Path,
    base: &BaseModel,
    experts: &[ExpertPlan],
    valid: &[Record],
    started: Instant,
) -> Result<()> {
    let task_names: Vec<&str> = tasks::all().iter().map(|t| t.name).collect();
    let by_task: Vec<Vec<Example>> = task_names
        .iter()
        .map(|t| {
            tiny_library::examples(
                &valid
                    .iter()
                    .filter(|r| r.task.as_deref() == Some(*t))
                    .cloned()
                    .collect::<Vec<_>>(),
            )
        })
        .collect();
    let row = |model: &BaseModel| -> Result<Vec<f32>> {
        by_task
            .iter()
            .map(|data| {
                let losses = trainer::example_losses(model, data, 64)?;
                Ok(losses.iter().sum::<f32>() / losses.len() as f32)
            })
            .collect()
    };
    let mut matrix = serde_json::Map::new();
    matrix.insert("base".into(), serde_json::to_value(row(base)?)?);
    let mut hashes = serde_json::Map::new();
    for plan in experts {
        let adapter = moerge_library::Adapter::load(&out.join("experts").join(&plan.name))
            .with_context(|| format!("reloading expert {}", plan.name))?;
        hashes.insert(plan.name.clone(), adapter.hash().to_string().into());
        matrix.insert(
            plan.name.clone(),
            serde_json::to_value(row(&base.with_adapter(&adapter)?)?)?,
        );
    }
    let experts_json: Vec<serde_json::Value> = experts
        .iter()
        .map(|p| serde_json::json!({"name": p.name, "kind": p.kind, "family": p.family, "tasks": p.tasks}))
        .collect();
    let families: Vec<serde_json::Value> = tasks::families()
        .iter()
        .map(|f| serde_json::json!({"family": f, "tasks": tasks::all().iter().filter(|t| t.family == *f).map(|t| t.name).collect::<Vec<_>>()}))
        .collect();
    let twins: serde_json::Map<String, serde_json::Value> = tasks::all()
        .iter()
        .filter_map(|t| t.twin_of.map(|of| (t.name.to_string(), of.into())))
        .collect();
    let (private_spec, private_opts) = tiny_library::expert_recipe(ExpertKind::Private, 0);
    let manifest = serde_json::json!({
        "generator": "cargo run --release -p tiny-library",
        "seed": tiny_library::SEED,
        "split_sizes": tiny_library::SPLIT_SIZES.iter().map(|(s, n)| serde_json::json!({"split": s, "per_task": n})).collect::<Vec<_>>(),
        "base": {"config": tiny_library::base_config(), "training": format!("{:?}", tiny_library::base_training())},
        "lora": {"rank": private_spec.rank, "alpha": private_spec.alpha, "targets": private_spec.targets, "private_training": format!("{private_opts:?}")},
        "families": families,
        "twins": twins,
        "experts": experts_json,
        "hashes": hashes,
        "validation_loss": {"tasks": task_names, "rows": matrix},
        "generation_seconds": started.elapsed().as_secs_f64().round(),
    });
    std::fs::write(
        out.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)? + "\n",
    )?;
    Ok(())
}
