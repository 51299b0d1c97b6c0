//! Figures of `moerge eval --policies all --plot DIR` and `moerge plot`.
//!
//! [`draw`] turns a [`Figures`] value into SVG and PNG files. Every figure is drawn by one
//! piece of code that runs on both backends (see [`render::Figure`]); text is rendered
//! with the DejaVu Sans font embedded in the binary, so no system font is needed.
//!
//! Files: `tradeoff.rs` (loss vs cost scatter), `greedy.rs` (greedy expert selection
//! curve), `heatmap.rs` (routing weights and expert similarity), `interpolation.rs` (the
//! mode-connectivity curve of `moerge interpolate`), `render.rs` (fonts, the SVG + PNG
//! helper, ticks and text helpers).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

mod greedy;
mod heatmap;
mod interpolation;
mod raster;
mod render;
#[cfg(test)]
mod tests;
mod tradeoff;

/// One row of the paper's table: a policy's test loss and its inference cost.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CostPoint {
    /// Policy name, written next to its marker.
    pub label: String,
    /// Mean test loss in nats per token (the y axis).
    pub mean_loss: f64,
    /// Standard error of `mean_loss`, drawn as a ±1 s.e. bar.
    pub standard_error: f64,
    /// Forward passes per generated token (not drawn; kept for the table).
    pub passes_per_token: f64,
    /// Time per token relative to a model with one adapter (the x axis; must be > 0).
    pub time_vs_one_expert: f64,
}

/// Greedy expert selection: curve[i] = mean over tasks of the best loss among the first i+1 experts of `order`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GreedyCurve {
    /// Experts in the order the greedy search added them.
    pub order: Vec<String>,
    /// `curve[i]`: mean validation loss over tasks using the first `i + 1` experts.
    pub curve: Vec<f64>,
    /// Loss with all experts.
    pub full: f64,
    /// Loss of the per-task oracle, when known.
    pub oracle: Option<f64>,
    /// Loss of the base model without adapters, when known.
    pub base: Option<f64>,
    /// Size of the chosen active set (1 ≤ active ≤ curve.len()).
    pub active: usize,
    /// Relative tolerance used to choose `active` (0.01 = within 1 %).
    pub tolerance: f64,
}

/// Routing weights of a routed model on one prompt: per layer, tokens × experts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoutingMap {
    /// Figure title (e.g. the prompt or the model).
    pub title: String,
    /// The prompt's tokens, as text (control characters and spaces are shown visibly).
    pub tokens: Vec<String>,
    /// Expert names.
    pub experts: Vec<String>,
    /// One entry per layer.
    pub layers: Vec<LayerWeights>,
}

/// Routing weights of one layer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerWeights {
    /// Layer name, used as the panel title.
    pub layer: String,
    /// `weights[token][expert]`, each in [0, 1].
    pub weights: Vec<Vec<f64>>, /* [token][expert] */
}

/// Cosine similarity of the experts' updates and the cluster each expert was put in.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimilarityMatrix {
    /// Expert names.
    pub experts: Vec<String>,
    /// Square matrix, `similarity[i][j]` in [-1, 1].
    pub similarity: Vec<Vec<f64>>,
    /// Cluster id of each expert (any `usize`; clusters are drawn in increasing id).
    pub clusters: Vec<usize>,
}

/// The loss along the merge (1-t)·A + t·B of two experts (`moerge interpolate --plot`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InterpolationCurve {
    pub a: String,
    pub b: String,
    /// `lowrank` or `exact`.
    pub space: String,
    /// Increasing, in `[0, 1]`.
    pub t: Vec<f64>,
    /// Mean loss over the records of both tasks at each `t`.
    pub loss: Vec<f64>,
    /// Per task (at most two are drawn): its mean loss at each `t`.
    pub tasks: Vec<(String, Vec<f64>)>,
    /// Mean over the records of the better of A's and B's loss.
    pub oracle: f64,
    pub base: Option<f64>,
}

/// Draws `curve` into `dir` (created if missing) as `interpolation.svg` and `.png`.
pub fn draw_interpolation(curve: &InterpolationCurve, dir: &Path) -> Result<Vec<PathBuf>> {
    render::register_fonts()?;
    let figure = interpolation::Interpolation::new(curve)
        .context("invalid data for the `interpolation` figure")?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the plot directory {}", dir.display()))?;
    render::write_both(&figure, dir)
}

/// Everything `moerge eval --policies all --plot DIR` and `moerge plot` draw.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Figures {
    /// Loss-vs-cost points; an empty list means "no tradeoff figure".
    pub tradeoff: Vec<CostPoint>,
    /// Greedy expert selection curve.
    pub greedy: Option<GreedyCurve>,
    /// Routing weights on one prompt.
    pub routing: Option<RoutingMap>,
    /// Similarity of the experts' updates.
    pub similarity: Option<SimilarityMatrix>,
}

/// Draws every figure present into `dir` (created if missing) as NAME.svg and NAME.png, with
/// NAME one of `tradeoff`, `greedy`, `routing`, `similarity`; returns the files written.
///
/// All figures are checked before any file is written, so invalid data (NaN, mismatched
/// lengths, an empty curve, ...) fails with an error naming the figure and leaves `dir`
/// untouched. A `Figures` with nothing in it writes nothing and returns an empty list.
pub fn draw(figures: &Figures, dir: &Path) -> Result<Vec<PathBuf>> {
    render::register_fonts()?;

    let tradeoff = (!figures.tradeoff.is_empty())
        .then(|| tradeoff::Tradeoff::new(&figures.tradeoff))
        .transpose()
        .context("invalid data for the `tradeoff` figure")?;
    let greedy = figures
        .greedy
        .as_ref()
        .map(greedy::Greedy::new)
        .transpose()
        .context("invalid data for the `greedy` figure")?;
    let routing = figures
        .routing
        .as_ref()
        .map(heatmap::Routing::new)
        .transpose()
        .context("invalid data for the `routing` figure")?;
    let similarity = figures
        .similarity
        .as_ref()
        .map(heatmap::Similarity::new)
        .transpose()
        .context("invalid data for the `similarity` figure")?;

    if tradeoff.is_none() && greedy.is_none() && routing.is_none() && similarity.is_none() {
        return Ok(Vec::new());
    }
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create the plot directory {}", dir.display()))?;

    let mut written = Vec::new();
    if let Some(figure) = &tradeoff {
        written.extend(render::write_both(figure, dir)?);
    }
    if let Some(figure) = &greedy {
        written.extend(render::write_both(figure, dir)?);
    }
    if let Some(figure) = &routing {
        written.extend(render::write_both(figure, dir)?);
    }
    if let Some(figure) = &similarity {
        written.extend(render::write_both(figure, dir)?);
    }
    Ok(written)
}
