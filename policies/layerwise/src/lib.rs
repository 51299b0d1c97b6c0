//! `layerwise`: merge where the experts agree, route where they conflict, one decision per
//! layer (after Mediator, 2025). Each layer's conflict among the experts is measured from
//! their factors ([`conflict`]: cosine dispersion by default, or sign disagreement); the
//! layers at or below a threshold become a static uniform merge (`1/N` each), the layers above
//! it are routed (Arrow, or a learned router the host trains). The cut ([`cut`]) is a given
//! `threshold`, a `route_fraction` of the most conflicted layers (default half), or with
//! `choose=validation` the candidate cut with the lowest mean validation loss.
//!
//! The plan's default is `none`, with one override per layer prefix (`model.layers.3`) and one
//! per module outside layers. The last progress message lists the merged and the routed
//! layers with their scores.
//!
//! ```
//! use moerge_policy_layerwise::conflict::{layer_conflicts, Measure};
//! use moerge_sdk::testing::random_expert;
//! let modules = [("model.layers.0.q", 6, 4), ("model.layers.1.q", 6, 4)];
//! let a = random_expert("a", &modules, 2, 1);
//! let b = random_expert("b", &modules, 2, 1); // the same factors: no conflict
//! let conflicts = layer_conflicts(&[a.view(), b.view()], Measure::Cosine).unwrap();
//! assert_eq!(conflicts[1].layer.key, "model.layers.1");
//! assert!(conflicts.iter().all(|c| c.score.abs() < 1e-12));
//! ```

pub mod conflict;
pub mod cut;

use std::collections::BTreeMap;

use moerge_sdk::optimize::{OptimizeOptions, RouterInit};
use moerge_sdk::params::{ParamSpec, ParamValue, Params};
use moerge_sdk::plan::{Granularity, MergeSpace, Mix, ModulePlan, Router};
use moerge_sdk::policy::{rank_mismatch, FitContext, Fitted, Policy, PolicyError, Split};

use crate::conflict::{LayerConflict, Measure};

/// The learned routers' default learning rate, as `sgd-router`'s (0.05 hardens them onto the
/// wrong experts within a few steps).
const LEARNING_RATE: f64 = 0.01;

/// The share of the most conflicted layers routed when neither `threshold` nor
/// `route_fraction` is given.
const ROUTE_FRACTION: f64 = 0.5;

/// The `layerwise` policy: merge the low-conflict layers, route the high-conflict ones.
#[derive(Default)]
pub struct Layerwise;

impl Policy for Layerwise {
    fn name(&self) -> &str {
        "layerwise"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        let mut specs = vec![
            ParamSpec::choice(
                "measure",
                &["cosine", "sign"],
                "cosine",
                "layer conflict: 1 - mean pairwise cosine of the experts' deltas, or the \
                 disagreement of their entries' signs",
            ),
            ParamSpec::optional_float(
                "threshold",
                "route the layers whose conflict is above this; merge the others",
            ),
            ParamSpec::optional_float(
                "route_fraction",
                "without threshold: route this share of the most conflicted layers (default 0.5)",
            )
            .min(0.0)
            .max(1.0),
            ParamSpec::choice(
                "choose",
                &["conflict", "validation"],
                "conflict",
                "conflict: cut by threshold or route_fraction; validation: try cut points and \
                 keep the lowest mean validation loss",
            ),
            ParamSpec::int(
                "candidates",
                9,
                "choose=validation: at most this many cut points (all when the layers allow)",
            )
            .min(2.0),
            ParamSpec::choice(
                "merge_space",
                &["lowrank", "exact"],
                "lowrank",
                "merged layers: average the factors (equal ranks needed), or sum the deltas",
            ),
            ParamSpec::choice(
                "router",
                &["arrow", "learned"],
                "arrow",
                "routed layers: Arrow (no training), or a router the host trains",
            ),
            ParamSpec::int("top_k", 3, "experts mixed per token in routed layers").min(1.0),
            Mix::param_spec(),
            ParamSpec::choice(
                "init",
                &["zero", "arrow"],
                "zero",
                "router=learned: start from zeros, or the experts' Arrow prototypes",
            ),
        ];
        specs.extend(OptimizeOptions::param_specs());
        for spec in specs.iter_mut().filter(|s| s.name == "learning_rate") {
            spec.default = Some(ParamValue::Float(LEARNING_RATE));
        }
        specs
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let experts = ctx.experts();
        if experts.is_empty() {
            return Err(PolicyError::invalid("layerwise needs at least one expert"));
        }
        let settings = Settings::from_params(params, experts.len())?;
        let cut = CutRule::from_params(params, ctx)?;
        let measure = match params.str("measure")? {
            "sign" => Measure::Sign,
            _ => Measure::Cosine,
        };
        let layers = conflict::layers(experts).map_err(|e| PolicyError::invalid(e.to_string()))?;
        if layers.is_empty() {
            return Err(PolicyError::invalid("the experts adapt no module"));
        }
        let message = format!(
            "measuring {} over {} layers",
            measure.describe(),
            layers.len()
        );
        ctx.progress(0.0, &message);
        let mut conflicts = Vec::with_capacity(layers.len());
        for layer in layers {
            ctx.check_cancelled()?;
            let score = conflict::layer_score(experts, &layer, measure);
            conflicts.push(LayerConflict { layer, score });
        }
        let (routed, fitted, loss) = match cut {
            CutRule::Threshold(t) => {
                let routed = cut::above(&conflicts, t);
                let fitted = settings.fit(ctx, &conflicts, &routed)?;
                (routed, fitted, None)
            }
            CutRule::Fraction(f) => {
                let count = cut::fraction_count(f, conflicts.len());
                let routed = cut::most_conflicted(&conflicts, count);
                let fitted = settings.fit(ctx, &conflicts, &routed)?;
                (routed, fitted, None)
            }
            CutRule::Validation(candidates) => {
                let (routed, fitted, loss) =
                    choose_by_validation(ctx, &settings, &conflicts, candidates)?;
                (routed, fitted, Some(loss))
            }
        };
        ctx.progress(1.0, &summary(measure, &conflicts, &routed, loss));
        Ok(fitted)
    }
}

/// How the cut between merged and routed layers is made.
enum CutRule {
    Threshold(f64),
    Fraction(f64),
    /// The number of candidate cuts.
    Validation(usize),
}

impl CutRule {
    fn from_params(params: &Params, ctx: &FitContext<'_>) -> Result<CutRule, PolicyError> {
        let threshold = params.opt_float("threshold")?;
        let fraction = params.opt_float("route_fraction")?;
        if params.str("choose")? == "validation" {
            if threshold.is_some() || fraction.is_some() {
                return Err(PolicyError::invalid(
                    "choose=validation picks the cut itself; drop parameter threshold and \
                     route_fraction, or use choose=conflict",
                ));
            }
            if ctx.records(Split::Valid).is_empty() {
                return Err(PolicyError::invalid(
                    "choose=validation needs validation data (give --valid, or a valid.jsonl \
                     in the data folder); or cut by threshold or route_fraction instead",
                ));
            }
            return Ok(CutRule::Validation(params.int("candidates")? as usize));
        }
        match (threshold, fraction) {
            (Some(_), Some(_)) => Err(PolicyError::invalid(
                "parameters threshold and route_fraction both given; give one",
            )),
            (Some(t), None) => Ok(CutRule::Threshold(t)),
            (None, f) => Ok(CutRule::Fraction(f.unwrap_or(ROUTE_FRACTION))),
        }
    }
}

/// What the merged and the routed layers become.
struct Settings {
    experts: usize,
    space: MergeSpace,
    router: Router,
    top_k: usize,
    mix: Mix,
    /// How learned routers are trained (`router=learned` only).
    options: Option<OptimizeOptions>,
}

impl Settings {
    fn from_params(params: &Params, experts: usize) -> Result<Settings, PolicyError> {
        let learned = params.str("router")? == "learned";
        let options = if learned {
            Some(OptimizeOptions {
                train_routers: true,
                router_init: match params.str("init")? {
                    "arrow" => RouterInit::Arrow,
                    _ => RouterInit::Zero,
                },
                ..OptimizeOptions::from_params(params)?
            })
        } else {
            None
        };
        Ok(Settings {
            experts,
            space: match params.str("merge_space")? {
                "exact" => MergeSpace::Exact,
                _ => MergeSpace::LowRank,
            },
            router: if learned {
                Router::Learned
            } else {
                Router::Arrow
            },
            top_k: (params.int("top_k")? as usize).min(experts),
            mix: Mix::from_name(params.str("mix")?).unwrap_or_default(),
            options,
        })
    }

    /// The plan for one cut: default `none`, one override per layer; with learned routers and
    /// at least one routed layer, trained by the host.
    fn fit(
        &self,
        ctx: &FitContext<'_>,
        conflicts: &[LayerConflict],
        routed: &[bool],
    ) -> Result<Fitted, PolicyError> {
        let n = self.experts;
        let merged = ModulePlan::Static {
            weights: vec![1.0 / n as f64; n],
            space: self.space,
            svd_rank: None,
        };
        let route = ModulePlan::Routed {
            router: self.router,
            top_k: self.top_k,
            temperature: 1.0,
            granularity: Granularity::Token,
            groups: Vec::new(),
            mix: self.mix,
        };
        let mut modules = BTreeMap::new();
        for (c, &r) in conflicts.iter().zip(routed) {
            if !r && self.space == MergeSpace::LowRank {
                let modules = c.layer.modules.iter().map(String::as_str);
                if let Some(m) = rank_mismatch(ctx.experts(), modules) {
                    return Err(m.refusal("merge_space"));
                }
            }
            let plan = if r { route.clone() } else { merged.clone() };
            modules.insert(c.layer.key.clone(), plan);
        }
        let mut plan = ctx.plan(ModulePlan::None);
        plan.modules = modules;
        let template = Fitted::plan(plan);
        match &self.options {
            Some(options) if routed.iter().any(|&r| r) => {
                ctx.check_cancelled()?;
                let count = routed.iter().filter(|&&r| r).count();
                ctx.progress(0.5, &format!("training the routers of {count} layers"));
                ctx.optimize(&template, options)
            }
            _ => Ok(template),
        }
    }
}

/// Tries the candidate cuts (route the 0, …, L most conflicted layers, or a few evenly spaced
/// counts) and keeps the one with the lowest mean validation loss; ties keep fewer routed
/// layers. Returns the cut, its plan and its loss.
fn choose_by_validation(
    ctx: &FitContext<'_>,
    settings: &Settings,
    conflicts: &[LayerConflict],
    candidates: usize,
) -> Result<(Vec<bool>, Fitted, f64), PolicyError> {
    let counts = cut::candidate_counts(conflicts.len(), candidates);
    let mut best: Option<(Vec<bool>, Fitted, f64)> = None;
    for (i, &count) in counts.iter().enumerate() {
        ctx.check_cancelled()?;
        let routed = cut::most_conflicted(conflicts, count);
        let fitted = settings.fit(ctx, conflicts, &routed)?;
        let losses = ctx.evaluate(&fitted, Split::Valid)?;
        if losses.is_empty() {
            return Err(PolicyError::invalid(
                "evaluate returned no validation losses; choose=validation needs validation data",
            ));
        }
        let loss = losses.iter().sum::<f64>() / losses.len() as f64;
        let fraction = 0.05 + 0.9 * (i + 1) as f64 / counts.len() as f64;
        let message = format!("routing the {count} most conflicted layers: valid loss {loss:.4}");
        ctx.progress(fraction, &message);
        // A non-finite loss never beats a finite one; equal losses keep the fewer routed layers.
        let better = match &best {
            None => true,
            Some((_, _, b)) => loss.is_finite() && (!b.is_finite() || loss < *b),
        };
        if better {
            best = Some((routed, fitted, loss));
        }
    }
    let best = best.expect("candidate_counts is never empty");
    if !best.2.is_finite() {
        return Err(PolicyError::invalid(format!(
            "no candidate cut has a finite validation loss (the cheapest scored {})",
            best.2
        )));
    }
    Ok(best)
}

/// The report: which layers are merged and which routed, each with its score.
fn summary(
    measure: Measure,
    conflicts: &[LayerConflict],
    routed: &[bool],
    loss: Option<f64>,
) -> String {
    let list = |want: bool| {
        let items: Vec<String> = (conflicts.iter().zip(routed))
            .filter(|(_, &r)| r == want)
            .map(|(c, _)| format!("{} ({:.4})", c.layer.key, c.score))
            .collect();
        if items.is_empty() {
            "none".to_owned()
        } else {
            items.join(", ")
        }
    };
    let mut text = format!(
        "{}: merged {}; routed {}",
        measure.describe(),
        list(false),
        list(true)
    );
    if let Some(loss) = loss {
        text += &format!("; valid loss {loss:.4}");
    }
    text
}

moerge_sdk::export_policy!(Layerwise);
