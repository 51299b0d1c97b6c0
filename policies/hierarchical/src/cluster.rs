//! Model-based clustering of experts (MBC, Ostapenko et al. 2024), from the factor views:
//! flatten each expert's LoRA parameters, zero the smallest entries, reduce with a truncated
//! SVD, L2-normalise, take the cosine-similarity matrix and run k-means on its rows.
//!
//! The SVD goes through the `N × N` Gram matrix of the flattened vectors (accumulated one
//! module at a time), so nothing larger than one module's factors for all experts is ever
//! held, and no dense `B A` is formed.

use moerge_sdk::linalg::symmetric_eigen;
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
    // Gram = U Σ² Uᵀ; the rows of U_k Σ_k are the vectors' coordinates on the top k directions.
    let (values, vectors) = symmetric_eigen(&gram, n);
    let dims = dims.min(n);
    let mut z = vec![0.0f64; n * dims];
    for i in 0..n {
        for c in 0..dims {
            z[i * dims + c] = vectors[i * n + c] * values[c].max(0.0).sqrt();
        }
        let norm = z[i * dims..(i + 1) * dims]
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            .sqrt();
        if norm > 0.0 {
            z[i * dims..(i + 1) * dims]
                .iter_mut()
                .for_each(|x| *x /= norm);
        }
    }
    let mut sim = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            sim[i * n + j] = (0..dims).map(|c| z[i * dims + c] * z[j * dims + c]).sum();
        }
    }
    sim
}

/// A small seeded generator (splitmix64).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// k-means on the rows of `points` (`n × d`): k-means++ seeding from `seed`, Lloyd
/// iterations, the best of `restarts` runs by inertia. Returns a label per row.
pub fn kmeans(points: &[f64], d: usize, k: usize, seed: u64, restarts: usize) -> Vec<usize> {
    let n = points.len() / d;
    let row = |i: usize| &points[i * d..(i + 1) * d];
    let mut rng = Rng(seed);
    let mut best: Option<(f64, Vec<usize>)> = None;
    for _ in 0..restarts.max(1) {
        // k-means++: each next centre drawn with probability proportional to squared distance.
        let mut centres: Vec<f64> = row((rng.next() * n as f64) as usize % n).to_vec();
        while centres.len() / d < k {
            let near: Vec<f64> = (0..n)
                .map(|i| {
                    (0..centres.len() / d)
                        .map(|c| dist2(row(i), &centres[c * d..(c + 1) * d]))
                        .fold(f64::INFINITY, f64::min)
                })
                .collect();
            let total: f64 = near.iter().sum();
            let mut pick = rng.next() * total;
            let mut chosen = n - 1;
            for (i, w) in near.iter().enumerate() {
                if pick < *w {
                    chosen = i;
                    break;
                }
                pick -= w;
            }
            centres.extend_from_slice(row(chosen));
        }
        let mut labels = vec![usize::MAX; n];
        for _iter in 0..100 {
            let next: Vec<usize> = (0..n)
                .map(|i| {
                    (0..k)
                        .min_by(|&a, &b| {
                            dist2(row(i), &centres[a * d..(a + 1) * d])
                                .total_cmp(&dist2(row(i), &centres[b * d..(b + 1) * d]))
                        })
                        .unwrap()
                })
                .collect();
            if next == labels {
                break;
            }
            labels = next;
            for c in 0..k {
                let members: Vec<usize> = (0..n).filter(|&i| labels[i] == c).collect();
                if members.is_empty() {
                    continue; // keeps its old centre
                }
                for t in 0..d {
                    centres[c * d + t] =
                        members.iter().map(|&i| row(i)[t]).sum::<f64>() / members.len() as f64;
                }
            }
        }
        let inertia: f64 = (0..n)
            .map(|i| dist2(row(i), &centres[labels[i] * d..(labels[i] + 1) * d]))
            .sum();
        if best.as_ref().is_none_or(|(b, _)| inertia < *b) {
            best = Some((inertia, labels));
        }
    }
    best.map(|(_, l)| l).unwrap_or_default()
}

/// The mean silhouette of `labels` over the rows of `points` (Euclidean distances).
pub fn silhouette(points: &[f64], d: usize, labels: &[usize]) -> f64 {
    let n = labels.len();
    let row = |i: usize| &points[i * d..(i + 1) * d];
    let k = labels.iter().max().map_or(0, |m| m + 1);
    let mut total = 0.0;
    for i in 0..n {
        let mean_to = |c: usize| {
            let others: Vec<usize> = (0..n).filter(|&j| j != i && labels[j] == c).collect();
            (!others.is_empty()).then(|| {
                others
                    .iter()
                    .map(|&j| dist2(row(i), row(j)).sqrt())
                    .sum::<f64>()
                    / others.len() as f64
            })
        };
        let Some(a) = mean_to(labels[i]) else {
            continue;
        }; // a singleton scores 0
        let b = (0..k)
            .filter(|&c| c != labels[i])
            .filter_map(mean_to)
            .fold(f64::INFINITY, f64::min);
        if b.is_finite() && a.max(b) > 0.0 {
            total += (b - a) / a.max(b);
        }
    }
    total / n as f64
}

/// Clusters `n` experts from their similarity matrix: `k` if given, else the `k` in
/// `2..=min(10, n-1)` with the best silhouette (`n ≤ 2`: one cluster per expert).
/// Labels are renumbered in order of first appearance.
pub fn cluster(similarity: &[f64], n: usize, k: Option<usize>, seed: u64) -> Vec<usize> {
    let labels = match k {
        Some(k) => kmeans(similarity, n, k.clamp(1, n), seed, 10),
        None if n <= 2 => (0..n).collect(),
        None => {
            let candidates = (2..=10.min(n - 1)).map(|k| kmeans(similarity, n, k, seed, 10));
            let scored = candidates.map(|l| (silhouette(similarity, n, &l), l));
            scored
                .fold(None::<(f64, Vec<usize>)>, |best, (s, l)| match best {
                    Some((b, _)) if b >= s => best,
                    _ => Some((s, l)),
                })
                .map(|(_, l)| l)
                .unwrap_or_default()
        }
    };
    let mut order: Vec<usize> = Vec::new();
    for &l in &labels {
        if !order.contains(&l) {
            order.push(l);
        }
    }
    labels
        .iter()
        .map(|l| order.iter().position(|o| o == l).unwrap())
        .collect()
}
