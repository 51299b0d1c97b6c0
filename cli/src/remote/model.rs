//! The model a command runs over the daemon: which one to fuse (`--policy`, `--plan`,
//! `--saved`), fusing it, and releasing it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use moerge_bus::Model1Proxy;
use moerge_sdk::plan::{ModulePlan, Plan};
use zbus::OwnedObjectPath;

use super::connect::Session;
use super::params_json;
use crate::args::RemoteModelArgs;
use crate::exit::{invalid, DaemonError};

/// Which model the daemon fuses.
#[derive(Debug, Clone)]
pub enum Source {
    /// `Fuse(policy, params, experts)`.
    Policy {
        policy: String,
        params_json: String,
        experts: Vec<String>,
    },
    /// `FusePlan(text of the file)`.
    Plan { path: PathBuf, json: String },
    /// `FuseSaved(name)`.
    Saved(String),
}

impl Source {
    /// The source the flags name; exactly one of `--policy`, `--plan`, `--saved`.
    pub fn from_args(plan: Option<&Path>, remote: &RemoteModelArgs) -> Result<Source> {
        match (plan, &remote.policy, &remote.saved) {
            (Some(path), None, None) => {
                let json = std::fs::read_to_string(path)
                    .with_context(|| format!("--plan {}", path.display()))?;
                Ok(Source::Plan {
                    path: path.to_owned(),
                    json,
                })
            }
            (None, Some(policy), None) => Ok(Source::Policy {
                policy: policy.clone(),
                params_json: params_json(&remote.param)?,
                experts: remote.experts.clone().unwrap_or_default(),
            }),
            (None, None, Some(name)) => Ok(Source::Saved(name.clone())),
            (None, None, None) => invalid!(
                "which model? give --policy NAME [--param k=v] [--experts a,b], --plan FILE or \
                 --saved NAME (the daemon fuses it), or --base DIR to run offline"
            ),
            _ => invalid!("give only one of --policy, --plan and --saved"),
        }
    }

    /// The flag and value, for error messages.
    pub fn describe(&self) -> String {
        match self {
            Source::Policy { policy, .. } => format!("--policy {policy}"),
            Source::Plan { path, .. } => format!("--plan {}", path.display()),
            Source::Saved(name) => format!("--saved {name}"),
        }
    }
}

/// A model the daemon fused for this command.
pub struct RemoteModel {
    pub proxy: Model1Proxy<'static>,
    pub path: OwnedObjectPath,
    /// How long the Fuse call took, in seconds.
    pub fuse_seconds: f64,
}

/// Asks the daemon to fuse `source`.
pub async fn fuse(session: &Session, source: &Source) -> Result<RemoteModel> {
    let started = Instant::now();
    let daemon = &session.daemon;
    let path = match source {
        Source::Policy {
            policy,
            params_json,
            experts,
        } => {
            let experts: Vec<&str> = experts.iter().map(String::as_str).collect();
            daemon.fuse(policy, params_json, &experts).await
        }
        Source::Plan { json, .. } => daemon.fuse_plan(json).await,
        Source::Saved(name) => daemon.fuse_saved(name).await,
    }
    .map_err(DaemonError::from)
    .with_context(|| source.describe())?;
    let fuse_seconds = started.elapsed().as_secs_f64();
    let proxy = Model1Proxy::builder(&session.conn)
        .path(path.clone())
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    Ok(RemoteModel {
        proxy,
        path,
        fuse_seconds,
    })
}

impl RemoteModel {
    /// Frees the model in the daemon. Best effort: models die with the connection anyway.
    pub async fn release(&self) {
        if let Err(e) = self.proxy.release().await {
            tracing::warn!(model = %self.path, error = %e, "could not release the model");
        }
    }
}

/// One line about a plan: its kind and experts.
pub fn summarize_plan(plan_json: &str) -> String {
    let Ok(plan) = Plan::from_json(plan_json) else {
        return "an unreadable plan".into();
    };
    let names: Vec<&str> = plan.experts.iter().map(|e| e.name.as_str()).collect();
    let over = format!("over {} experts ({})", names.len(), names.join(", "));
    if let Some(ensemble) = &plan.ensemble {
        return format!(
            "an ensemble of {} members at {} level {over}",
            ensemble.members.len(),
            lower(&ensemble.level)
        );
    }
    let what = match &plan.default {
        ModulePlan::Static { space, .. } => format!("a static merge in {} space", lower(space)),
        ModulePlan::Routed {
            router,
            top_k,
            granularity,
            groups,
            ..
        } => {
            let groups = if groups.is_empty() {
                String::new()
            } else {
                format!(" in {} groups", groups.len())
            };
            format!(
                "{} routing, top-{top_k} per {}{groups}",
                lower(router),
                lower(granularity)
            )
        }
        other => lower(other),
    };
    let overrides = if plan.modules.is_empty() {
        String::new()
    } else {
        format!(", {} module overrides", plan.modules.len())
    };
    format!("{what}{overrides} {over}")
}

fn lower(value: &impl std::fmt::Debug) -> String {
    format!("{value:?}").to_lowercase()
}
