//! Clustering maths shared by the `hierarchical` policy and the daemon's library clustering
//! (model-based clustering, Ostapenko et al. 2024): from the Gram matrix of the experts'
//! parameter vectors, the cosine similarities of their projections on the top singular
//! directions; then seeded k-means++ on the similarity rows, with the number of clusters
//! chosen by silhouette.

use crate::linalg::symmetric_eigen;

/// The cosine similarities (`n × n`, row-major) of `n` vectors given by their Gram matrix
/// (`n × n`, row-major), after projecting them on their top `dims` singular directions.
/// A vector of norm zero has similarity zero with everything.
pub fn similarity_from_gram(gram: &[f64], n: usize, dims: usize) -> Vec<f64> {
    // Gram = U Σ² Uᵀ; the rows of U_k Σ_k are the vectors' coordinates on the top k directions.
    let (values, vectors) = symmetric_eigen(gram, n);
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
