//! `lp-ensemble`: an output ensemble whose mixture weights minimise the worst validation task's
//! loss, found without gradients by a linear program over the expert × task loss matrix.
//!
//! Each expert is evaluated alone on the validation data (one `evaluate` call per expert);
//! its per-record losses are averaged per task into `L[e][t]`. The weights solve
//! `min_w max_t Σ_e w_e L[e][t]` over the simplex (see [`weights::mixture_weights`]). For a
//! probability-level mixture `-log Σ_e w_e p_e ≤ Σ_e w_e (-log p_e)` (Jensen), so the LP
//! minimises an upper bound of every task's ensemble loss. Its optimum is a vertex with no more
//! nonzero weights than tasks, so the ensemble keeps few members and runs fewer passes per
//! token than the uniform `ensemble`. Members are one-hot low-rank merges (the expert alone at
//! its own rank), or one-hot exact merges when the experts' ranks differ.

pub mod tasks;
pub mod weights;

use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{Ensemble, EnsembleLevel, Member, MergeSpace, ModulePlan};
use moerge_sdk::policy::{
    rank_mismatch, ExpertView, FitContext, Fitted, Policy, PolicyError, Split,
};

use crate::tasks::TaskIndex;
use crate::weights::{mixture_weights, Objective, WeightsError};

/// The `lp-ensemble` policy.
#[derive(Default)]
pub struct LpEnsemble;

impl Policy for LpEnsemble {
    fn name(&self) -> &str {
        "lp-ensemble"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        vec![
            ParamSpec::choice(
                "objective",
                &["worst", "mean"],
                "worst",
                "minimise the worst validation task's loss (minimax), or the mean over tasks \
                 (which picks the single best expert)",
            ),
            ParamSpec::choice(
                "level",
                &["probability", "logit"],
                "probability",
                "mix next-token distributions, or logits",
            ),
            ParamSpec::float(
                "min_weight",
                1e-6,
                "experts whose weight is at most this are dropped (the rest renormalised)",
            )
            .min(0.0)
            .max(1.0),
        ]
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let experts = ctx.experts();
        let n = experts.len();
        if n == 0 {
            return Err(PolicyError::invalid(
                "lp-ensemble needs at least one expert",
            ));
        }
        let objective = match params.str("objective")? {
            "mean" => Objective::Mean,
            _ => Objective::Worst,
        };
        let level = match params.str("level")? {
            "logit" => EnsembleLevel::Logit,
            _ => EnsembleLevel::Probability,
        };
        let min_weight = params.float("min_weight")?;
        let valid = ctx.records(Split::Valid);
        if valid.is_empty() {
            return Err(PolicyError::invalid(
                "lp-ensemble sets its weights from each expert's validation loss per task, but \
                 no validation records were given: pass validation data (a folder with \
                 valid.jsonl, a JSONL file to hold records out of, or --valid)",
            ));
        }
        let tasks = TaskIndex::new(valid);
        let space = member_space(experts);
        let mut losses = Vec::with_capacity(n);
        for (i, expert) in experts.iter().enumerate() {
            ctx.check_cancelled()?;
            ctx.progress(
                i as f64 / (n + 1) as f64,
                &format!("evaluating expert {} alone ({} of {n})", expert.name, i + 1),
            );
            let fitted = Fitted::plan(ctx.plan(ModulePlan::one_hot(i, n, space)));
            let per_record = ctx.evaluate(&fitted, Split::Valid)?;
            let means = tasks.means(&per_record).map_err(|found| {
                PolicyError::invalid(format!(
                    "evaluating expert {} gave {found} losses for {} validation records",
                    expert.name,
                    valid.len()
                ))
            })?;
            losses.push(means);
        }
        ctx.check_cancelled()?;
        ctx.progress(n as f64 / (n + 1) as f64, "solving the linear program");
        let weights = mixture_weights(&losses, objective).map_err(|e| match e {
            WeightsError::NotFinite {
                expert,
                task,
                value,
            } => PolicyError::invalid(format!(
                "expert {}'s mean validation loss on task {:?} is {value}",
                experts[expert].name,
                tasks.names()[task]
            )),
            e => PolicyError::invalid(format!("lp-ensemble: {e}")),
        })?;
        let kept: Vec<usize> = (0..n).filter(|&i| weights[i] > min_weight).collect();
        if kept.is_empty() {
            let best = (0..n).max_by(|&a, &b| weights[a].total_cmp(&weights[b]));
            let best = best.expect("at least one expert");
            return Err(PolicyError::invalid(format!(
                "min_weight {min_weight} drops every expert; the largest weight is {} ({})",
                weights[best], experts[best].name
            )));
        }
        let total: f64 = kept.iter().map(|&i| weights[i]).sum();
        let mut mixed = vec![0.0; n];
        for &i in &kept {
            mixed[i] = weights[i] / total;
        }
        let members = kept
            .iter()
            .map(|&i| Member {
                weight: mixed[i],
                default: ModulePlan::one_hot(i, n, space),
                modules: Default::default(),
            })
            .collect();
        let worst = worst_task(&losses, &mixed);
        let best_single = (losses.iter())
            .map(|row| row.iter().copied().fold(f64::NEG_INFINITY, f64::max))
            .fold(f64::INFINITY, f64::min);
        ctx.progress(
            1.0,
            &format!(
                "{} of {n} experts kept; worst task's mixed loss {worst:.4} \
                 (best single expert's worst task {best_single:.4})",
                kept.len()
            ),
        );
        let mut plan = ctx.plan(ModulePlan::None);
        plan.ensemble = Some(Ensemble { level, members });
        Ok(Fitted::plan(plan))
    }
}

/// Low-rank merge when it can run: a one-hot low-rank merge is the expert itself
/// (`A = sqrt(s) A_e`, `B = sqrt(s) B_e`, scale 1) at its own rank, but the host refuses it
/// unless all experts adapting a module share one rank. Otherwise the exact merge, which is
/// the expert itself too, at the cost of carrying the others' zero-weighted factors.
fn member_space(experts: &[ExpertView<'_>]) -> MergeSpace {
    let modules = experts
        .iter()
        .flat_map(|e| e.modules.iter().map(|m| m.module));
    if rank_mismatch(experts, modules).is_none() {
        MergeSpace::LowRank
    } else {
        MergeSpace::Exact
    }
}

/// `max_t Σ_e w_e L[e][t]`: the LP's bound on the worst task's mixed loss.
fn worst_task(losses: &[Vec<f64>], weights: &[f64]) -> f64 {
    (0..losses[0].len())
        .map(|t| {
            losses
                .iter()
                .zip(weights)
                .map(|(l, w)| w * l[t])
                .sum::<f64>()
        })
        .fold(f64::NEG_INFINITY, f64::max)
}

moerge_sdk::export_policy!(LpEnsemble);
