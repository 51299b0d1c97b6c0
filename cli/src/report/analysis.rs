//! The report's analyses beside the table: greedy expert selection over the library's
//! expert × task validation losses, the similarity and clustering of the fused experts'
//! updates, and the routing weights a routed model gives one text.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use moerge_engine::routing;
use moerge_engine::trainer::{self, Example};
use moerge_engine::{BaseModel, FusedModel, TextTokenizer};
use moerge_library::update_gram;
use moerge_sdk::cluster::{cluster, similarity_from_gram};
use moerge_sdk::greedy::{self, LossMatrix};

use super::library::Library;
use crate::commands::explain::layer_of;
use crate::commands::train::tokenize;
use crate::plot::{GreedyCurve, LayerWeights, RoutingMap, SimilarityMatrix};

/// Singular directions kept before the cosine (as the daemon's clustering).
const DIMS: usize = 16;
/// The active set's tolerance: within 1% of the full library.
pub const TOLERANCE: f64 = 0.01;

/// Per task, the mean validation loss of `model` (the `tasks` order).
fn task_losses(model: &FusedModel, valid: &[Example], tasks: &[String]) -> Result<Vec<f64>> {
    let losses = trainer::example_losses(model, valid, 64)?;
    let mut sums: BTreeMap<&str, (f64, usize)> = BTreeMap::new();
    for (e, l) in valid.iter().zip(losses) {
        let s = sums
            .entry(e.task.as_deref().unwrap_or_default())
            .or_default();
        s.0 += f64::from(l);
        s.1 += 1;
    }
    tasks
        .iter()
        .map(|t| {
            let (sum, n) = sums
                .get(t.as_str())
                .with_context(|| format!("task {t:?} has no validation record"))?;
            Ok(sum / *n as f64)
        })
        .collect()
}

/// Greedy selection over every expert of the library (private, cluster and shared alike,
/// as the daemon selects), with the base model and the oracle as reference lines.
pub fn greedy_curve(
    lib: &Library,
    base: &BaseModel,
    tokenizer: &TextTokenizer,
    each: impl Fn(&str),
) -> Result<GreedyCurve> {
    let valid = tokenize(tokenizer, &lib.valid)?;
    let mut rows = BTreeMap::new();
    for e in &lib.experts {
        each(&e.name);
        let model = FusedModel::Single(base.with_adapter(&e.adapter)?);
        rows.insert(e.name.clone(), task_losses(&model, &valid, &lib.tasks)?);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let oracle: Vec<f64> = lib
        .tasks
        .iter()
        .enumerate()
        .map(|(t, task)| rows[&lib.experts[lib.private[task]].name][t])
        .collect();
    let base_losses = task_losses(&FusedModel::Single(base.clone()), &valid, &lib.tasks)?;
    let matrix = LossMatrix {
        tasks: lib.tasks.clone(),
        rows,
    };
    let selection = greedy::select(&matrix, TOLERANCE)?;
    Ok(GreedyCurve {
        order: selection.order,
        curve: selection.curve,
        full: selection.full,
        oracle: Some(mean(&oracle)),
        base: Some(mean(&base_losses)),
        active: selection.active,
        tolerance: selection.tolerance,
    })
}

/// Cosine similarity of the fused experts' updates (on their top singular directions) and
/// the model-based clustering of them, as the daemon and the `hierarchical` policy do it.
pub fn similarity(lib: &Library) -> SimilarityMatrix {
    let refs: Vec<&_> = lib.fused.iter().collect();
    let n = refs.len();
    let gram = update_gram(&refs);
    let sim = similarity_from_gram(&gram, n, DIMS);
    let clusters = cluster(&sim, n, None, 0);
    SimilarityMatrix {
        experts: lib.fused.iter().map(|a| a.name().to_string()).collect(),
        similarity: sim.chunks(n).map(<[f64]>::to_vec).collect(),
        clusters,
    }
}

/// The routing weights `model` gives each token of `text`, averaged over each layer's
/// routed modules; `None` when the model routes nothing.
pub fn routing_map(
    model: &FusedModel,
    tokenizer: &TextTokenizer,
    text: &str,
    title: &str,
) -> Result<Option<RoutingMap>> {
    let ids = tokenizer.encode(text)?;
    let tokens = ids
        .iter()
        .map(|&id| tokenizer.decode(&[id]))
        .collect::<Result<Vec<_>, _>>()?;
    let modules = routing::explain(model, &ids)?;
    let Some(first) = modules.first() else {
        return Ok(None);
    };
    let units = first.units.clone();
    let mut layers: Vec<(String, Vec<Vec<f64>>, usize)> = Vec::new();
    for m in modules.iter().filter(|m| m.units == units) {
        let layer = layer_of(&m.module);
        let at = match layers.iter().position(|(l, _, _)| *l == layer) {
            Some(i) => i,
            None => {
                layers.push((layer, vec![vec![0.0; units.len()]; tokens.len()], 0));
                layers.len() - 1
            }
        };
        let (_, sums, count) = &mut layers[at];
        for (row, weights) in sums.iter_mut().zip(&m.weights) {
            for (s, w) in row.iter_mut().zip(weights) {
                *s += f64::from(*w);
            }
        }
        *count += 1;
    }
    Ok(Some(RoutingMap {
        title: format!("{title}: routing weights per token ({text:?})"),
        tokens,
        experts: units,
        layers: layers
            .into_iter()
            .map(|(layer, sums, count)| LayerWeights {
                layer,
                weights: sums
                    .into_iter()
                    .map(|row| row.into_iter().map(|s| s / count as f64).collect())
                    .collect(),
            })
            .collect(),
    }))
}
