//! The rows of the paper's table (baselines, and fusions through the real policy plugins)
//! and how one row is computed: build or fit its model, score the split's records, time it.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::ProgressBar;
use moerge_engine::services::{EngineServices, ServicesInput};
use moerge_engine::trainer::{self, Example};
use moerge_engine::{BaseModel, FusedModel, TextTokenizer};
use moerge_library::{parse_tensor_file, TensorMap};
use moerge_policy_host::{records_from_library, ExpertInput, FitRequest, PolicyRegistry};
use serde::{Deserialize, Serialize};

use super::library::Library;
use crate::args::ReportArgs;
use crate::commands::train::{mean_and_standard_error, tokenize};

/// Records scored per forward pass.
const BATCH: usize = 64;

/// How a row's model is made.
#[derive(Debug, Clone, PartialEq)]
pub enum Recipe {
    /// The base model alone.
    Base,
    /// The expert trained on every task.
    Shared,
    /// Each task scored with its own expert (known only in hindsight).
    Oracle,
    /// Each task scored with its family's expert.
    OracleCluster,
    /// A policy plugin fitted on the fused experts with these parameters.
    Policy {
        name: &'static str,
        params: Vec<(String, String)>,
        /// Whether the fit trains (gets validation data, and its time is reported).
        learned: bool,
    },
}

/// One row to compute.
#[derive(Debug, Clone)]
pub struct RowSpec {
    /// The name `--policies` selects it by.
    pub key: &'static str,
    pub label: String,
    pub recipe: Recipe,
}

/// Every row, in table order.
pub fn all(args: &ReportArgs) -> Vec<RowSpec> {
    let steps = || ("steps".to_string(), args.steps.to_string());
    let kv = |k: &str, v: &str| (k.to_string(), v.to_string());
    let policy = |key, label: &str, name, params: Vec<(String, String)>, learned| RowSpec {
        key,
        label: label.to_string(),
        recipe: Recipe::Policy {
            name,
            params,
            learned,
        },
    };
    let fixed = |key, label: &str, recipe| RowSpec {
        key,
        label: label.to_string(),
        recipe,
    };
    vec![
        fixed("base", "base model", Recipe::Base),
        fixed("shared", "shared expert", Recipe::Shared),
        fixed("oracle", "oracle (task's expert)", Recipe::Oracle),
        fixed(
            "oracle-cluster",
            "oracle cluster expert",
            Recipe::OracleCluster,
        ),
        policy(
            "uniform-merge-lowrank",
            "uniform merge (low-rank)",
            "uniform-merge",
            vec![kv("space", "lowrank")],
            false,
        ),
        policy(
            "uniform-merge-exact",
            "uniform merge (exact)",
            "uniform-merge",
            vec![kv("space", "exact")],
            false,
        ),
        policy(
            "learned-merge",
            "learned merge",
            "learned-merge",
            vec![steps()],
            true,
        ),
        policy(
            "uniform-ensemble",
            "uniform ensemble",
            "ensemble",
            vec![],
            false,
        ),
        policy(
            "learned-ensemble",
            "learned ensemble",
            "ensemble",
            vec![kv("weights", "learned"), steps()],
            true,
        ),
        policy(
            "arrow",
            &format!("Arrow (top-{})", args.arrow_top_k),
            "arrow",
            vec![kv("top_k", &args.arrow_top_k.to_string())],
            false,
        ),
        policy(
            "sgd-router",
            "SGD router",
            "sgd-router",
            vec![steps()],
            true,
        ),
        policy(
            "hierarchical",
            "hierarchical (clusters)",
            "hierarchical",
            vec![steps()],
            true,
        ),
        // Beyond the paper's main table: its other methods and their variants.
        policy(
            "learned-merge-per-layer",
            "learned merge (per layer)",
            "learned-merge",
            vec![kv("granularity", "per_layer"), steps()],
            true,
        ),
        policy(
            "uniform-ensemble-logit",
            "uniform ensemble (logits)",
            "ensemble",
            vec![kv("level", "logit")],
            false,
        ),
        policy(
            "arrow-factors",
            &format!("Arrow (top-{}, mixing factors)", args.arrow_top_k),
            "arrow",
            vec![
                kv("top_k", &args.arrow_top_k.to_string()),
                kv("mix", "factors"),
            ],
            false,
        ),
        policy(
            "sgd-router-factors",
            "SGD router (mixing factors)",
            "sgd-router",
            vec![kv("mix", "factors"), steps()],
            true,
        ),
        policy(
            "sgd-router-top1",
            "SGD router (top-1)",
            "sgd-router",
            vec![kv("top_k", "1"), steps()],
            true,
        ),
        policy(
            "sgd-router-top4",
            "SGD router (top-4)",
            "sgd-router",
            vec![kv("top_k", "4"), steps()],
            true,
        ),
        policy(
            "distilled",
            "distilled ensemble (rank 8)",
            "distill",
            vec![
                steps(),
                ("teacher_steps".to_string(), args.steps.to_string()),
            ],
            true,
        ),
        policy(
            "ties",
            "TIES (low-rank, density 0.2)",
            "peft-merge",
            vec![kv("combination_type", "ties")],
            false,
        ),
        policy(
            "ties-svd",
            "TIES (exact, SVD)",
            "peft-merge",
            vec![kv("combination_type", "ties_svd")],
            false,
        ),
        policy(
            "dare-linear",
            "DARE linear (low-rank)",
            "peft-merge",
            vec![kv("combination_type", "dare_linear")],
            false,
        ),
        policy(
            "dare-ties",
            "DARE TIES (low-rank)",
            "peft-merge",
            vec![kv("combination_type", "dare_ties")],
            false,
        ),
        policy(
            "magnitude-prune",
            "magnitude prune (low-rank)",
            "peft-merge",
            vec![kv("combination_type", "magnitude_prune")],
            false,
        ),
        policy(
            "lp-ensemble",
            "LP ensemble (minimax weights)",
            "lp-ensemble",
            vec![],
            true,
        ),
        policy(
            "layerwise",
            &format!("layer-wise merge or Arrow top-{}", args.arrow_top_k),
            "layerwise",
            vec![kv("top_k", &args.arrow_top_k.to_string())],
            false,
        ),
        policy(
            "layerwise-learned",
            "layer-wise merge or learned router",
            "layerwise",
            vec![kv("router", "learned"), steps()],
            true,
        ),
    ]
}

/// The rows of the paper's main table (`--policies paper`): baselines, merges, ensembles and
/// routers as the paper compares them.
pub const PAPER: [&str; 12] = [
    "base",
    "shared",
    "oracle",
    "oracle-cluster",
    "uniform-merge-lowrank",
    "uniform-merge-exact",
    "learned-merge",
    "uniform-ensemble",
    "learned-ensemble",
    "arrow",
    "sgd-router",
    "hierarchical",
];

/// The rows `--policies` names: `all`, or a comma-separated list of keys.
pub fn chosen(args: &ReportArgs) -> Result<Vec<RowSpec>> {
    let every = all(args);
    let wanted = args.policies.as_deref().unwrap_or("all").trim();
    if wanted == "all" {
        return Ok(every);
    }
    if wanted == "paper" {
        return Ok(every
            .into_iter()
            .filter(|r| PAPER.contains(&r.key))
            .collect());
    }
    let mut out: Vec<RowSpec> = Vec::new();
    for key in wanted.split(',').map(str::trim) {
        match every.iter().find(|r| r.key == key) {
            Some(r) if !out.iter().any(|o| o.key == key) => out.push(r.clone()),
            Some(_) => {}
            None => {
                let keys: Vec<&str> = every.iter().map(|r| r.key).collect();
                crate::exit::invalid!(
                    "--policies: no row {key:?}; use all, paper or some of {}",
                    keys.join(", ")
                )
            }
        }
    }
    Ok(out)
}

/// A computed row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowResult {
    pub key: String,
    pub label: String,
    /// Mean over tasks of the task's mean loss (nats per completion token).
    pub mean_loss: f64,
    /// Standard error of that mean over tasks.
    pub standard_error: f64,
    pub task_losses: BTreeMap<String, f64>,
    /// Forward passes of the base network per token: an ensemble's member count, else 1.
    pub passes_per_token: f64,
    /// Scoring time per completion token (wall clock, batches of 64 records).
    pub seconds_per_token: f64,
    /// `seconds_per_token` over the oracle's (one adapter per task); none without an oracle
    /// row.
    pub time_vs_one_expert: Option<f64>,
    /// For learned rows: how long the fit took and its validation loss.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fit: Option<FitSummary>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FitSummary {
    pub seconds: f64,
    pub valid_loss: Option<f64>,
}

/// What computing rows needs, shared by all of them.
pub struct Runner<'a> {
    pub lib: &'a Library,
    pub base: &'a BaseModel,
    pub tokenizer: &'a TextTokenizer,
    pub registry: &'a PolicyRegistry,
    pub bar: &'a ProgressBar,
    pub cancelled: &'a AtomicBool,
    /// `lib.scored`, tokenized.
    pub scored: Vec<Example>,
}

/// Losses and timing of scoring some records.
#[derive(Default)]
struct Scored {
    losses: Vec<(String, f64)>,
    tokens: usize,
    seconds: f64,
}

impl Runner<'_> {
    pub fn new<'a>(
        lib: &'a Library,
        base: &'a BaseModel,
        tokenizer: &'a TextTokenizer,
        registry: &'a PolicyRegistry,
        bar: &'a ProgressBar,
        cancelled: &'a AtomicBool,
    ) -> Result<Runner<'a>> {
        let scored = tokenize(tokenizer, &lib.scored)?;
        Ok(Runner {
            lib,
            base,
            tokenizer,
            registry,
            bar,
            cancelled,
            scored,
        })
    }

    /// Computes one row; also returns its model when it is one model for every task.
    pub fn run(&self, spec: &RowSpec) -> Result<(RowResult, Option<FusedModel>)> {
        self.bar.set_message(spec.label.clone());
        let lib = self.lib;
        let per_task = |pick: &dyn Fn(&str) -> Option<usize>| -> Result<Scored> {
            let mut total = Scored::default();
            for task in &lib.tasks {
                let i = pick(task)
                    .with_context(|| format!("no expert for task {task:?} in this library"))?;
                let model = FusedModel::Single(self.base.with_adapter(&lib.experts[i].adapter)?);
                let part = self.score(&model, Some(task))?;
                total.losses.extend(part.losses);
                total.tokens += part.tokens;
                total.seconds += part.seconds;
            }
            Ok(total)
        };
        let (scored, model, passes, fit) = match &spec.recipe {
            Recipe::Base => {
                let model = FusedModel::Single(self.base.clone());
                (self.score(&model, None)?, Some(model), 1, None)
            }
            Recipe::Shared => {
                let i = lib
                    .shared
                    .context("no expert of this library was trained on every task")?;
                let model = FusedModel::Single(self.base.with_adapter(&lib.experts[i].adapter)?);
                (self.score(&model, None)?, Some(model), 1, None)
            }
            Recipe::Oracle => (per_task(&|t| lib.private.get(t).copied())?, None, 1, None),
            Recipe::OracleCluster => (per_task(&|t| lib.cluster.get(t).copied())?, None, 1, None),
            Recipe::Policy {
                name,
                params,
                learned,
            } => {
                let started = Instant::now();
                let (model, passes, valid_loss) = self.fit(name, params, *learned, &spec.label)?;
                let fit = learned.then(|| FitSummary {
                    seconds: started.elapsed().as_secs_f64(),
                    valid_loss,
                });
                self.bar.set_message(format!("{}: scoring", spec.label));
                (self.score(&model, None)?, Some(model), passes, fit)
            }
        };
        let mut by_task: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for (task, loss) in scored.losses {
            by_task.entry(task).or_default().push(loss);
        }
        let task_losses: BTreeMap<String, f64> = by_task
            .into_iter()
            .map(|(t, l)| (t, l.iter().sum::<f64>() / l.len() as f64))
            .collect();
        let means: Vec<f64> = task_losses.values().copied().collect();
        let (mean_loss, standard_error) = mean_and_standard_error(&means);
        let result = RowResult {
            key: spec.key.to_string(),
            label: spec.label.clone(),
            mean_loss,
            standard_error,
            task_losses,
            passes_per_token: passes as f64,
            seconds_per_token: scored.seconds / scored.tokens.max(1) as f64,
            time_vs_one_expert: None,
            fit,
        };
        Ok((result, model))
    }

    /// Scores the records of `task` (or all), timing the forward passes only.
    fn score(&self, model: &FusedModel, task: Option<&str>) -> Result<Scored> {
        let data: Vec<Example> = self
            .scored
            .iter()
            .filter(|e| task.is_none_or(|t| e.task.as_deref() == Some(t)))
            .cloned()
            .collect();
        let started = Instant::now();
        let losses = trainer::example_losses(model, &data, BATCH)?;
        let seconds = started.elapsed().as_secs_f64();
        Ok(Scored {
            tokens: data.iter().map(|e| e.completion.len()).sum(),
            losses: data
                .iter()
                .zip(losses)
                .map(|(e, l)| (e.task.clone().unwrap_or_default(), f64::from(l)))
                .collect(),
            seconds,
        })
    }

    /// Fits `policy` on the fused experts through the plugin host (as `moerge fit` does)
    /// and fuses its plan: the model, its passes per token and the fit's validation loss.
    fn fit(
        &self,
        policy: &str,
        params: &[(String, String)],
        learned: bool,
        label: &str,
    ) -> Result<(FusedModel, usize, Option<f64>)> {
        let lib = self.lib;
        let loaded = self.registry.get(policy).with_context(|| {
            format!(
                "policy {policy:?} was not found (build the plugins with `cargo build --release`, \
                 or pass --policy-dir DIR)"
            )
        })?;
        let train = records_from_library(&lib.train);
        // Only learned rows get validation data: it is what their fit reports on.
        let valid = if learned {
            records_from_library(&lib.valid)
        } else {
            Vec::new()
        };
        let bar = self.bar;
        let input = ServicesInput {
            base: self.base,
            experts: &lib.fused,
            tokenizer: self.tokenizer,
            train: &train,
            valid: &valid,
            cancelled: self.cancelled,
        };
        let services = EngineServices::new(input, |fraction, message| {
            bar.set_message(format!(
                "{label}: {:>3.0}% {message}",
                fraction.clamp(0.0, 1.0) * 100.0
            ))
        })?;
        let inputs: Vec<ExpertInput<'_>> = lib
            .fused
            .iter()
            .zip(&lib.fused_metadata)
            .map(|(adapter, metadata)| ExpertInput {
                adapter,
                metadata: metadata.as_ref(),
            })
            .collect();
        let request = FitRequest {
            experts: &inputs,
            train: &train,
            valid: &valid,
            params,
        };
        let fitted = loaded
            .fit_plan(&request, &services)
            .with_context(|| format!("{label}: fitting {policy}"))?;
        let tensors = match (&fitted.tensor_file, &fitted.plan.tensors) {
            (Some(bytes), Some(hash)) => {
                parse_tensor_file(Path::new("(the fitted plan's tensors)"), bytes, hash)?
            }
            _ => TensorMap::new(),
        };
        let passes = fitted.plan.passes().len();
        let model = self
            .base
            .fuse_with(&fitted.plan, &lib.fused, &tensors)
            .with_context(|| format!("{label}: fusing the fitted plan"))?;
        Ok((model, passes, fitted.valid_loss))
    }
}
