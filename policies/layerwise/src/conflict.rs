//! Per-layer parameter conflict among experts (after Mediator, 2025), computed from the LoRA
//! factors. A *layer* is every module whose path shares the prefix up to and including its
//! first all-digit segment (`model.layers.3.mlp.fc1` → `model.layers.3`, as `learned-merge`'s
//! per-layer prefixes); a module without such a segment is a group of its own, keyed by its
//! path. The key is the plan override key of the group.
//!
//! Two measures, both 0 for identical experts:
//!
//! - **Cosine dispersion** ([`cosine_dispersion`]): `1 - mean_{e<f} cos(ΔW_e, ΔW_f)`, where
//!   `ΔW_e` is expert `e`'s delta over the whole layer (its modules' deltas side by side) and
//!   the inner products `<ΔW_e, ΔW_f> = s_e s_f tr((B_eᵀ B_f)(A_f A_eᵀ))` are summed over the
//!   layer's modules from the factors alone ([`delta_inner`]), never forming a dense delta.
//!   Pairs where either expert's layer delta is zero (it does not adapt the layer) are left
//!   out; with no pair left the dispersion is 0. Range `[0, 2]`: 1 for orthogonal experts, 2
//!   for opposite ones.
//! - **Sign disagreement** ([`sign_disagreement`]): over every entry `k` of the layer's
//!   modules' deltas where at least one expert is nonzero, `d_k = 1 - |Σ_e sign(ΔW_e[k])| /
//!   n_k` with `n_k` the number of experts nonzero at `k` (twice the fraction of those experts
//!   in the sign minority), averaged with equal weight over those entries. Range `[0, 1]`: 0
//!   when every entry's nonzero signs agree, 1 when every entry splits evenly (two opposite
//!   experts). It needs entries: each module's dense delta is formed with
//!   [`moerge_sdk::linalg::dense_delta`] one expert at a time (`out · in · rank` work each).

use moerge_sdk::linalg::dense_delta;
use moerge_sdk::policy::{ExpertView, ModuleFactors};

/// Which measure scores a layer's conflict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// [`sign_disagreement`].
    Sign,
    /// [`cosine_dispersion`].
    Cosine,
}

impl Measure {
    /// The measure's name in messages.
    pub fn describe(self) -> &'static str {
        match self {
            Measure::Sign => "sign disagreement",
            Measure::Cosine => "cosine dispersion",
        }
    }
}

/// A group of modules scored and planned together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// The plan override key: `model.layers.3`, or the module's path outside layers.
    pub key: String,
    /// The layer's index (its first all-digit segment); `None` for a module outside layers.
    pub index: Option<usize>,
    /// The module paths any expert adapts in this layer, sorted.
    pub modules: Vec<String>,
}

/// A layer and its conflict score under one [`Measure`].
#[derive(Debug, Clone, PartialEq)]
pub struct LayerConflict {
    pub layer: Layer,
    /// The conflict: higher means the experts disagree more on this layer.
    pub score: f64,
}

/// Why conflicts cannot be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConflictError {
    /// Two experts adapt one module with different shapes (they were not trained on the same
    /// base model).
    #[error(
        "module {module}: expert {expert} has shape {out}x{inputs} (out x in), but expert \
         {first} has {first_out}x{first_inputs}"
    )]
    Shape {
        module: String,
        expert: String,
        out: usize,
        inputs: usize,
        first: String,
        first_out: usize,
        first_inputs: usize,
    },
}

/// The layer key and index of `module`: the path up to and including its first all-digit
/// segment and that segment's value, or the whole path and `None`.
pub fn layer_key(module: &str) -> (String, Option<usize>) {
    let mut end = 0;
    for segment in module.split('.') {
        end += segment.len();
        let digits = !segment.is_empty() && segment.bytes().all(|b| b.is_ascii_digit());
        if let (true, Ok(index)) = (digits, segment.parse::<usize>()) {
            return (module[..end].to_owned(), Some(index));
        }
        end += 1;
    }
    (module.to_owned(), None)
}

/// The layers of the modules any expert adapts: layers by stem and index
/// (`model.layers.2` before `model.layers.10`), then modules outside layers by path. Checks
/// that experts sharing a module agree on its shape.
pub fn layers(experts: &[ExpertView<'_>]) -> Result<Vec<Layer>, ConflictError> {
    let mut first: Vec<(&ModuleFactors<'_>, &str)> = Vec::new();
    for e in experts {
        for m in &e.modules {
            match first.iter().find(|(f, _)| f.module == m.module) {
                None => first.push((m, &e.name)),
                Some((f, name))
                    if (f.out_features, f.in_features) != (m.out_features, m.in_features) =>
                {
                    return Err(ConflictError::Shape {
                        module: m.module.to_owned(),
                        expert: e.name.clone(),
                        out: m.out_features,
                        inputs: m.in_features,
                        first: (*name).to_owned(),
                        first_out: f.out_features,
                        first_inputs: f.in_features,
                    });
                }
                Some(_) => {}
            }
        }
    }
    let mut layers: Vec<Layer> = Vec::new();
    for (m, _) in first {
        let (key, index) = layer_key(m.module);
        match layers.iter_mut().find(|l| l.key == key) {
            Some(layer) => layer.modules.push(m.module.to_owned()),
            None => layers.push(Layer {
                key,
                index,
                modules: vec![m.module.to_owned()],
            }),
        }
    }
    for layer in &mut layers {
        layer.modules.sort();
    }
    let order = |l: &Layer| {
        let stem = l
            .index
            .map(|_| l.key.rsplit_once('.').map_or("", |(s, _)| s));
        (
            l.index.is_none(),
            stem.map(str::to_owned),
            l.index,
            l.key.clone(),
        )
    };
    layers.sort_by_key(order);
    Ok(layers)
}

/// The Frobenius inner product `<s_x B_x A_x, s_y B_y A_y> = s_x s_y Σ_ij (B_xᵀ B_y)_ij
/// (A_x A_yᵀ)_ij` of two deltas of one module, from the factors (`r_x r_y (out + in)` work).
///
/// # Panics
/// If the two factors have different shapes.
pub fn delta_inner(x: &ModuleFactors<'_>, y: &ModuleFactors<'_>) -> f64 {
    assert_eq!(
        (x.out_features, x.in_features),
        (y.out_features, y.in_features),
        "delta_inner: module {} and {} differ in shape",
        x.module,
        y.module
    );
    let (rx, ry, inputs) = (x.rank, y.rank, x.in_features);
    if rx == 0 || ry == 0 || inputs == 0 {
        return 0.0;
    }
    // B_xᵀ B_y, accumulated row by row of B so both factors are read in order.
    let mut btb = vec![0.0f64; rx * ry];
    for (xb, yb) in x.b.chunks_exact(rx).zip(y.b.chunks_exact(ry)) {
        for (i, &xi) in xb.iter().enumerate() {
            let row = &mut btb[i * ry..(i + 1) * ry];
            for (acc, &yj) in row.iter_mut().zip(yb) {
                *acc += f64::from(xi) * f64::from(yj);
            }
        }
    }
    let mut total = 0.0;
    for (i, xa) in x.a.chunks_exact(inputs).enumerate() {
        for (j, ya) in y.a.chunks_exact(inputs).enumerate() {
            let aat: f64 = (xa.iter().zip(ya))
                .map(|(&p, &q)| f64::from(p) * f64::from(q))
                .sum();
            total += btb[i * ry + j] * aat;
        }
    }
    x.scale * y.scale * total
}

/// The `N × N` Gram matrix (row-major) of the experts' deltas over `layer`'s modules; an
/// expert without a module contributes zero there.
pub fn layer_gram(experts: &[ExpertView<'_>], layer: &Layer) -> Vec<f64> {
    let n = experts.len();
    let mut gram = vec![0.0; n * n];
    for module in &layer.modules {
        let factors: Vec<Option<&ModuleFactors<'_>>> =
            experts.iter().map(|e| e.module(module)).collect();
        for i in 0..n {
            let Some(x) = factors[i] else { continue };
            for j in i..n {
                let Some(y) = factors[j] else { continue };
                let dot = delta_inner(x, y);
                gram[i * n + j] += dot;
                if i != j {
                    gram[j * n + i] += dot;
                }
            }
        }
    }
    gram
}

/// `1 - mean pairwise cosine` of the experts' deltas over `layer` (see the module docs).
pub fn cosine_dispersion(experts: &[ExpertView<'_>], layer: &Layer) -> f64 {
    let n = experts.len();
    let gram = layer_gram(experts, layer);
    let (mut sum, mut pairs) = (0.0, 0usize);
    for i in 0..n {
        for j in i + 1..n {
            let norms = gram[i * n + i] * gram[j * n + j];
            if norms > 0.0 {
                sum += (gram[i * n + j] / norms.sqrt()).clamp(-1.0, 1.0);
                pairs += 1;
            }
        }
    }
    if pairs == 0 {
        0.0
    } else {
        1.0 - sum / pairs as f64
    }
}

/// The mean over the layer's entries of `1 - |Σ_e sign(ΔW_e[k])| / n_k` (see the module
/// docs); 0 when no entry is nonzero.
pub fn sign_disagreement(experts: &[ExpertView<'_>], layer: &Layer) -> f64 {
    let (mut total, mut entries) = (0.0, 0usize);
    for module in &layer.modules {
        let mut signs: Vec<i64> = Vec::new();
        let mut nonzero: Vec<u64> = Vec::new();
        for m in experts.iter().filter_map(|e| e.module(module)) {
            let delta = dense_delta(m);
            if signs.is_empty() {
                signs = vec![0; delta.len()];
                nonzero = vec![0; delta.len()];
            }
            for (k, &x) in delta.iter().enumerate() {
                if x != 0.0 {
                    signs[k] += if x > 0.0 { 1 } else { -1 };
                    nonzero[k] += 1;
                }
            }
        }
        for (&s, &n) in signs.iter().zip(&nonzero).filter(|(_, &n)| n > 0) {
            total += 1.0 - s.unsigned_abs() as f64 / n as f64;
            entries += 1;
        }
    }
    if entries == 0 {
        0.0
    } else {
        total / entries as f64
    }
}

/// Every layer of the experts (in [`layers`] order) with its conflict under `measure`.
pub fn layer_conflicts(
    experts: &[ExpertView<'_>],
    measure: Measure,
) -> Result<Vec<LayerConflict>, ConflictError> {
    Ok(layers(experts)?
        .into_iter()
        .map(|layer| {
            let score = layer_score(experts, &layer, measure);
            LayerConflict { layer, score }
        })
        .collect())
}

/// `layer`'s conflict under `measure`.
pub fn layer_score(experts: &[ExpertView<'_>], layer: &Layer, measure: Measure) -> f64 {
    match measure {
        Measure::Sign => sign_disagreement(experts, layer),
        Measure::Cosine => cosine_dispersion(experts, layer),
    }
}
