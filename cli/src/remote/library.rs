//! `moerge status`, `experts ...`, `plans ...` and `policies` over the daemon: what it holds.

use anyhow::{Context, Result};
use moerge_bus::{ExpertInfo, ModelInfo, PlanInfo, PolicyInfo};
use serde::Serialize;

use super::absolute;
use super::connect::{connect, Session};
use super::output::{bytes, json, table};
use crate::args::{Common, ConnectArgs, ExpertsCommand, PlansArgs, PlansCommand, StatusArgs};
use crate::exit::DaemonError;

#[derive(Serialize)]
struct Status {
    status: String,
    base_model: String,
    precision: String,
    resident_bytes: u64,
    generation: u64,
    expert_count: u32,
    ready_experts: usize,
    policies: Vec<String>,
    models: Vec<ModelInfo>,
}

pub async fn status(args: &StatusArgs) -> Result<()> {
    let Session { daemon, .. } = connect(&args.connect).await?;
    let experts = daemon.list_experts().await.map_err(DaemonError::from)?;
    let status = Status {
        status: daemon.status().await?,
        base_model: daemon.base_model().await?,
        precision: daemon.precision().await?,
        resident_bytes: daemon.resident_bytes().await?,
        generation: daemon.generation().await?,
        expert_count: daemon.expert_count().await?,
        ready_experts: experts.iter().filter(|e| e.state == "ready").count(),
        policies: daemon.policies().await?,
        models: daemon.list_models().await.map_err(DaemonError::from)?,
    };
    if args.json {
        return json(&status);
    }
    println!("daemon       {}", status.status);
    println!("base model   {} ({})", status.base_model, status.precision);
    println!("memory       {} resident", bytes(status.resident_bytes));
    println!("generation   {}", status.generation);
    println!(
        "experts      {} ({} ready){}",
        status.expert_count,
        status.ready_experts,
        if status.expert_count == 0 {
            " — add some with `moerge experts add DIR`"
        } else {
            ""
        }
    );
    if status.policies.is_empty() {
        println!("policies     none (this daemon runs plans only: `moerge fuse --plan FILE`)");
    } else {
        println!("policies     {}", status.policies.join(", "));
    }
    println!("live models  {}", status.models.len());
    if !status.models.is_empty() {
        println!();
        model_table(&status.models);
    }
    Ok(())
}

fn model_table(models: &[ModelInfo]) {
    let rows: Vec<Vec<String>> = models
        .iter()
        .map(|m| {
            vec![
                m.path.to_string(),
                m.kind.clone(),
                m.experts.join(","),
                m.generation.to_string(),
                if m.stale { "stale" } else { "" }.into(),
                m.owner.clone(),
            ]
        })
        .collect();
    table(
        &["model", "kind", "experts", "generation", "stale", "owner"],
        &rows,
    );
}

fn expert_rows(experts: &[ExpertInfo]) -> Vec<Vec<String>> {
    experts
        .iter()
        .map(|e| {
            vec![
                e.name.clone(),
                e.state.clone(),
                e.hash.chars().take(12).collect(),
                bytes(e.size_bytes),
                e.generation.to_string(),
                e.reason.clone(),
            ]
        })
        .collect()
}

fn print_expert(e: &ExpertInfo) {
    println!("name        {}", e.name);
    println!("state       {}", e.state);
    if !e.reason.is_empty() {
        println!("reason      {}", e.reason);
    }
    println!("hash        {}", e.hash);
    println!("size        {}", bytes(e.size_bytes));
    println!(
        "generation  {} (library generation {})",
        e.generation, e.library_generation
    );
}

pub async fn experts(command: &ExpertsCommand) -> Result<()> {
    match command {
        ExpertsCommand::List(common) => {
            let Session { daemon, .. } = connect(&common.connect).await?;
            let experts = daemon.list_experts().await.map_err(DaemonError::from)?;
            if common.json {
                return json(&experts);
            }
            if experts.is_empty() {
                println!("the library is empty; add an adapter with `moerge experts add DIR`");
                return Ok(());
            }
            table(
                &["name", "state", "hash", "size", "generation", "reason"],
                &expert_rows(&experts),
            );
        }
        ExpertsCommand::Show { name, common } => {
            let Session { daemon, .. } = connect(&common.connect).await?;
            let expert = daemon
                .get_expert(name)
                .await
                .map_err(DaemonError::from)
                .with_context(|| format!("expert {name:?}"))?;
            if common.json {
                return json(&expert);
            }
            print_expert(&expert);
        }
        ExpertsCommand::Add { path, common } => {
            let Session { daemon, .. } = connect(&common.connect).await?;
            let abs = absolute(path, "PATH")?;
            let expert = daemon
                .add_expert(&abs)
                .await
                .map_err(DaemonError::from)
                .with_context(|| format!("experts add {abs}"))?;
            if common.json {
                return json(&expert);
            }
            println!(
                "added {} ({}, {}); use it with e.g. `moerge score --policy arrow --experts {},...`",
                expert.name,
                expert.state,
                expert.hash.chars().take(12).collect::<String>(),
                expert.name
            );
        }
        ExpertsCommand::Remove { name, common } => {
            let Session { daemon, .. } = connect(&common.connect).await?;
            daemon
                .remove_expert(name)
                .await
                .map_err(DaemonError::from)
                .with_context(|| format!("experts remove {name}"))?;
            if common.json {
                return json(&serde_json::json!({"removed": name}));
            }
            println!("removed {name}");
        }
    }
    Ok(())
}

fn plan_rows(plans: &[PlanInfo]) -> Vec<Vec<String>> {
    plans
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.experts.join(","),
                if p.stale { "stale" } else { "" }.into(),
                p.reason.clone(),
            ]
        })
        .collect()
}

async fn list_plans(common: &Common) -> Result<()> {
    let Session { daemon, .. } = connect(&common.connect).await?;
    let plans = daemon.list_plans().await.map_err(DaemonError::from)?;
    if common.json {
        return json(&plans);
    }
    if plans.is_empty() {
        println!("no stored plans; make one with `moerge fit --policy NAME --data PATH` or `moerge plans save NAME FILE`");
        return Ok(());
    }
    table(&["name", "experts", "stale", "reason"], &plan_rows(&plans));
    Ok(())
}

pub async fn plans(args: &PlansArgs) -> Result<()> {
    match &args.command {
        None => list_plans(&args.common).await,
        Some(PlansCommand::List(common)) => list_plans(common).await,
        Some(PlansCommand::Save { name, file, common }) => {
            let Session { daemon, .. } = connect(&common.connect).await?;
            let abs = absolute(file, "FILE")?;
            let info = daemon
                .save_plan(name, &abs)
                .await
                .map_err(DaemonError::from)
                .with_context(|| format!("plans save {name} {abs}"))?;
            if common.json {
                return json(&info);
            }
            println!(
                "stored {} ({} experts); fuse it with `moerge score --saved {} ...`",
                info.name,
                info.experts.len(),
                info.name
            );
            Ok(())
        }
        Some(PlansCommand::Remove { name, common }) => {
            let Session { daemon, .. } = connect(&common.connect).await?;
            daemon
                .remove_plan(name)
                .await
                .map_err(DaemonError::from)
                .with_context(|| format!("plans remove {name}"))?;
            if common.json {
                return json(&serde_json::json!({"removed": name}));
            }
            println!("removed plan {name}");
            Ok(())
        }
    }
}

/// `moerge policies` over the daemon (`show NAME` narrows the list to one).
pub async fn policies(connect_args: &ConnectArgs, only: Option<&str>, as_json: bool) -> Result<()> {
    let Session { daemon, .. } = connect(connect_args).await?;
    let mut policies: Vec<PolicyInfo> = daemon.list_policies().await.map_err(DaemonError::from)?;
    if let Some(name) = only {
        policies.retain(|p| p.name == name);
        if policies.is_empty() {
            return Err(anyhow::Error::new(DaemonError {
                kind: moerge_bus::ErrorKind::NoSuchObject,
                message: format!("no policy named {name:?}; `moerge policies` lists them"),
            }));
        }
    }
    if as_json {
        return json(&policies);
    }
    if policies.is_empty() {
        println!("the daemon offers no policies (it has no policy host); `moerge policies --local` lists the plugins on this machine");
        return Ok(());
    }
    let rows: Vec<Vec<String>> = policies
        .iter()
        .map(|p| vec![p.name.clone(), p.version.clone(), p.description.clone()])
        .collect();
    table(&["name", "version", "description"], &rows);
    Ok(())
}

/// A JSON answer of the daemon (`GetSelection`, `GetClusters`), or a hint when empty.
fn parsed(text: &str, what: &str) -> Result<Option<serde_json::Value>> {
    if text.is_empty() {
        eprintln!(
            "the daemon has no {what} yet: start moerged with --eval-data PATH (kept current \
             after every library change) or run `moerge select --data PATH`"
        );
        return Ok(None);
    }
    Ok(Some(
        serde_json::from_str(text).with_context(|| format!("the daemon's {what}"))?,
    ))
}

pub async fn selection(args: &Common) -> Result<()> {
    let Session { daemon, .. } = connect(&args.connect).await?;
    let text = daemon.get_selection().await.map_err(DaemonError::from)?;
    let Some(value) = parsed(&text, "selection")? else {
        return Ok(());
    };
    if args.json {
        return json(&value);
    }
    let order: Vec<&str> = value["order"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let curve: Vec<f64> = value["curve"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_f64()).collect())
        .unwrap_or_default();
    let active = value["active"].as_u64().unwrap_or(0) as usize;
    let rows: Vec<Vec<String>> = order
        .iter()
        .zip(&curve)
        .enumerate()
        .map(|(i, (name, loss))| {
            vec![
                (i + 1).to_string(),
                (*name).to_string(),
                format!("{loss:.4}"),
                if i < active { "active" } else { "" }.into(),
            ]
        })
        .collect();
    table(&["#", "expert", "mean best loss", ""], &rows);
    println!(
        "\nactive set: {active} of {} experts{}",
        order.len(),
        if value["stale"].as_bool() == Some(true) {
            " (stale: the library changed since)"
        } else {
            ""
        }
    );
    Ok(())
}

pub async fn clusters(args: &Common) -> Result<()> {
    let Session { daemon, .. } = connect(&args.connect).await?;
    let text = daemon.get_clusters().await.map_err(DaemonError::from)?;
    let Some(value) = parsed(&text, "clustering")? else {
        return Ok(());
    };
    if args.json {
        return json(&value);
    }
    let clusters = value["clusters"].as_array().cloned().unwrap_or_default();
    let rows: Vec<Vec<String>> = clusters
        .iter()
        .enumerate()
        .map(|(i, members)| {
            let names: Vec<&str> = members
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            vec![i.to_string(), names.len().to_string(), names.join(", ")]
        })
        .collect();
    table(&["cluster", "experts", "members"], &rows);
    Ok(())
}
