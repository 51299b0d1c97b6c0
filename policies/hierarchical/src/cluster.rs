//! Model-based clustering of experts (MBC, Ostapenko et al. 2024), from the factor views:
//! flatten each expert's LoRA parameters, zero the smallest entries, reduce with a truncated
//! SVD, L2-normalise, take the cosine-similarity matrix and run k-means on its rows.
//!
//! The SVD goes through the `N × N` Gram matrix of the flattened vectors (accumulated one
//! module at a time), so nothing larger than one module's factors for all experts is ever
//! held, and no dense `B A` is formed.

pub use moerge_sdk::cluster::{cluster, kmeans, silhouette, similarity_from_gram};
use moerge_sdk::policy::ExpertView;

/// Each expert's flattened, sparsified parameters for one module, laid out identically for
/// every expert: A padded to `[max_rank, in]`, then B padded to `[out, max_rank]` (zeros
/// where an expert has a lower rank or lacks the module).
pub fn module_segments(
    experts: &[ExpertView<'_>],
    module: &str,
    thresholds: &[f32],
) -> Vec<Vec<f32>> {
    let max_rank = experts
        .iter()
        .filter_map(|e| e.module(module))
        .map(|m| m.rank)
        .max()
        .unwrap_or(0);
    let shape = experts
        .iter()
        .find_map(|e| e.module(module))
        .map(|m| (m.in_features, m.out_features));
    let Some((inputs, outputs)) = shape else {
        return vec![Vec::new(); experts.len()];
    };
    let len = max_rank * inputs + outputs * max_rank;
    experts
        .iter()
        .zip(thresholds)
        .map(|(e, &t)| {
            let mut seg = vec![0.0; len];
            if let Some(m) = e.module(module) {
                seg[..m.a.len()].copy_from_slice(m.a);
                for row in 0..outputs {
                    let from = &m.b[row * m.rank..(row + 1) * m.rank];
                    let at = max_rank * inputs + row * max_rank;
                    seg[at..at + m.rank].copy_from_slice(from);
                }
            }
            seg.iter_mut()
                .filter(|x| x.abs() < t)
                .for_each(|x| *x = 0.0);
            seg
        })
        .collect()
}

/// Per expert, the magnitude below which its entries are zeroed so that a `sparsity`
/// fraction of all its parameters (A and B over all modules) is dropped.
pub fn sparsity_thresholds(experts: &[ExpertView<'_>], sparsity: f64) -> Vec<f32> {
    experts
        .iter()
        .map(|e| {
            let mut abs: Vec<f32> = e
                .modules
                .iter()
                .flat_map(|m| m.a.iter().chain(m.b))
                .map(|x| x.abs())
                .collect();
            let drop = ((abs.len() as f64) * sparsity).floor() as usize;
            if drop == 0 || abs.is_empty() {
                return 0.0;
            }
            let drop = drop.min(abs.len() - 1);
            let (_, nth, _) = abs.select_nth_unstable_by(drop, f32::total_cmp);
            *nth
        })
        .collect()
}

/// The cosine similarities (`N × N`, row-major) of the experts' sparsified parameter vectors
/// after projecting them on their top `dims` singular directions.
pub fn cosine_similarity(experts: &[ExpertView<'_>], sparsity: f64, dims: usize) -> Vec<f64> {
    let n = experts.len();
    let thresholds = sparsity_thresholds(experts, sparsity);
    let mut modules: Vec<&str> = experts
        .iter()
        .flat_map(|e| e.modules.iter().map(|m| m.module))
        .collect();
    modules.sort_unstable();
    modules.dedup();
    let mut gram = vec![0.0f64; n * n];
    for module in modules {
        let segs = module_segments(experts, module, &thresholds);
        for i in 0..n {
            for j in i..n {
                let dot: f64 = segs[i]
                    .iter()
                    .zip(&segs[j])
                    .map(|(x, y)| f64::from(*x) * f64::from(*y))
                    .sum();
                gram[i * n + j] += dot;
                if i != j {
                    gram[j * n + i] += dot;
                }
            }
        }
    }
    similarity_from_gram(&gram, n, dims)
}
