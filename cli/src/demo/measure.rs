//! One row of the demo's table: fuse a model in the daemon, generate a sample answer, score
//! the test records (several calls in flight), release the model.

use std::time::Instant;

use anyhow::{Context, Result};
use futures_util::StreamExt;
use moerge_bus::GenerateOptions;
use moerge_library::records::Record;
use moerge_sdk::plan::{ExpertRef, MergeSpace, ModulePlan, Plan, PLAN_VERSION};
use serde::Serialize;

use crate::exit::DaemonError;
use crate::remote::connect::Session;
use crate::remote::model::{fuse, Source};

/// Score calls in flight at once (the daemon's default per-client limit is 4).
const IN_FLIGHT: usize = 4;
/// Tokens of the sample answer.
const SAMPLE_TOKENS: u32 = 16;

/// One policy's results.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The policy (or reference) and its settings.
    pub policy: String,
    /// Mean over tasks of the mean loss (nats per completion token) on the test records.
    pub mean_loss: f64,
    /// Standard error of that mean over tasks.
    pub standard_error: f64,
    /// Per-task mean losses, in the demo's task order.
    pub task_losses: Vec<(String, f64)>,
    /// Forward passes per token: 1, or an ensemble's member count.
    pub passes_per_token: usize,
    /// Scoring time per completion token, in seconds (wall clock, calls in flight).
    pub seconds_per_token: f64,
    /// `seconds_per_token` over the one-expert (oracle) row's.
    pub time_vs_one_expert: f64,
    /// The greedy answer to the sample prompt.
    pub sample: String,
    /// For fitted policies: the stored plan, the fit's validation loss and its duration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fit: Option<FitInfo>,
}

#[derive(Debug, Clone, Serialize)]
pub struct FitInfo {
    pub plan_name: String,
    pub valid_loss: Option<f64>,
    pub seconds: f64,
}

/// What scoring some records gave.
#[derive(Default)]
pub struct Scored {
    /// (task, loss) per record.
    pub losses: Vec<(String, f64)>,
    pub tokens: usize,
    pub seconds: f64,
    pub sample: Option<String>,
    pub passes_per_token: usize,
}

impl Scored {
    pub fn add(&mut self, other: Scored) {
        self.losses.extend(other.losses);
        self.tokens += other.tokens;
        self.seconds += other.seconds;
        self.sample = self.sample.take().or(other.sample);
        self.passes_per_token = self.passes_per_token.max(other.passes_per_token);
    }
}

/// Fuses `source`, answers `sample_prompt` (when given), scores `records`, releases.
pub async fn run(
    session: &Session,
    source: &Source,
    records: &[Record],
    sample_prompt: Option<&str>,
) -> Result<Scored> {
    let model = fuse(session, source).await?;
    let result = async {
        let plan = model.proxy.plan().await?;
        let passes_per_token = Plan::from_json(&plan)
            .ok()
            .and_then(|p| p.ensemble.map(|e| e.members.len()))
            .unwrap_or(1);
        let sample = match sample_prompt {
            None => None,
            Some(prompt) => {
                let options = GenerateOptions {
                    stop: vec!["\n".into()],
                    ..GenerateOptions::greedy(SAMPLE_TOKENS)
                };
                Some(
                    model
                        .proxy
                        .generate(prompt, options.to_dict())
                        .await
                        .map_err(DaemonError::from)
                        .with_context(|| format!("{}: generating", source.describe()))?,
                )
            }
        };
        let started = Instant::now();
        let scores: Vec<Result<(String, f64, usize)>> = futures_util::stream::iter(records)
            .map(|r| async {
                let s = model
                    .proxy
                    .score(&r.prompt, &r.completion)
                    .await
                    .map_err(DaemonError::from)
                    .with_context(|| format!("{}: scoring {:?}", source.describe(), r.prompt))?;
                Ok((
                    r.task.clone().unwrap_or_default(),
                    s.mean_nll,
                    s.token_ids.len(),
                ))
            })
            .buffered(IN_FLIGHT)
            .collect()
            .await;
        let seconds = started.elapsed().as_secs_f64();
        let mut scored = Scored {
            seconds,
            sample,
            passes_per_token,
            ..Scored::default()
        };
        for s in scores {
            let (task, loss, tokens) = s?;
            scored.losses.push((task, loss));
            scored.tokens += tokens;
        }
        Ok(scored)
    }
    .await;
    model.release().await;
    result
}

/// A plan over `experts` (name, hash) whose every module is `default`.
pub fn plan_json(experts: &[(String, String)], default: ModulePlan) -> Source {
    let plan = Plan {
        version: PLAN_VERSION,
        experts: experts
            .iter()
            .map(|(name, hash)| ExpertRef {
                name: name.clone(),
                hash: hash.clone(),
            })
            .collect(),
        default,
        modules: Default::default(),
        ensemble: None,
        tensors: None,
    };
    Source::Plan {
        path: "(demo)".into(),
        json: plan.to_json(),
    }
}

/// One expert alone, as a plan.
pub fn single(expert: &(String, String)) -> Source {
    plan_json(
        std::slice::from_ref(expert),
        ModulePlan::Static {
            weights: vec![1.0],
            space: MergeSpace::LowRank,
            svd_rank: None,
        },
    )
}
