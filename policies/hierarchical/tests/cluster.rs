//! The clustering maths against plain, independent computations.

use moerge_policy_hierarchical::cluster::{cluster, cosine_similarity, kmeans, silhouette};
use moerge_sdk::testing::{random_expert, Rng, TestExpert};

const MODULES: [(&str, usize, usize); 2] = [("m.0.q", 5, 4), ("m.1.q", 3, 6)];

/// `copies` noisy copies of each of `centres` random experts, interleaved.
fn noisy_copies(centres: usize, copies: usize, noise: f32) -> (Vec<TestExpert>, Vec<usize>) {
    let bases: Vec<TestExpert> = (0..centres)
        .map(|c| random_expert(&format!("c{c}"), &MODULES, 2, 100 + c as u64))
        .collect();
    let mut rng = Rng(5);
    let mut experts = Vec::new();
    let mut truth = Vec::new();
    for copy in 0..copies {
        for (c, base) in bases.iter().enumerate() {
            let mut e = base.clone();
            e.name = format!("c{c}-{copy}");
            e.hash = moerge_sdk::testing::fake_hash(&e.name);
            for m in &mut e.modules {
                m.a.iter_mut()
                    .chain(m.b.iter_mut())
                    .for_each(|x| *x += noise * rng.uniform());
            }
            experts.push(e);
            truth.push(c);
        }
    }
    (experts, truth)
}

/// The plain way: flatten every expert (A then B per module, in module order), zero the
/// smallest `sparsity` fraction by magnitude, cosine of the whole vectors.
fn direct_cosine(experts: &[TestExpert], sparsity: f64) -> Vec<f64> {
    let vectors: Vec<Vec<f64>> = experts
        .iter()
        .map(|e| {
            let mut modules = e.modules.clone();
            modules.sort_by(|x, y| x.module.cmp(&y.module));
            let mut v: Vec<f64> = modules
                .iter()
                .flat_map(|m| m.a.iter().chain(&m.b).map(|x| f64::from(*x)))
                .collect();
            let mut sorted: Vec<f64> = v.iter().map(|x| x.abs()).collect();
            sorted.sort_by(f64::total_cmp);
            let drop = (v.len() as f64 * sparsity).floor() as usize;
            if drop > 0 {
                let threshold = sorted[drop];
                v.iter_mut()
                    .filter(|x| x.abs() < threshold)
                    .for_each(|x| *x = 0.0);
            }
            v
        })
        .collect();
    let n = vectors.len();
    let mut out = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let dot: f64 = vectors[i].iter().zip(&vectors[j]).map(|(a, b)| a * b).sum();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            out[i * n + j] = dot / (norm(&vectors[i]) * norm(&vectors[j]));
        }
    }
    out
}

#[test]
fn cosine_matrix_equals_the_direct_dense_computation() {
    let (experts, _) = noisy_copies(3, 2, 0.5);
    let views: Vec<_> = experts.iter().map(TestExpert::view).collect();
    for sparsity in [0.0, 0.3, 0.5] {
        let got = cosine_similarity(&views, sparsity, experts.len());
        let want = direct_cosine(&experts, sparsity);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 1e-9, "sparsity {sparsity}: {g} vs {w}");
        }
    }
}

#[test]
fn truncation_keeps_the_dominant_structure() {
    // With 3 underlying directions, 3 singular directions already separate the clusters.
    let (experts, truth) = noisy_copies(3, 3, 0.05);
    let views: Vec<_> = experts.iter().map(TestExpert::view).collect();
    let sim = cosine_similarity(&views, 0.0, 3);
    let n = experts.len();
    for i in 0..n {
        for j in 0..n {
            if truth[i] == truth[j] {
                assert!(sim[i * n + j] > 0.95, "({i},{j}) {}", sim[i * n + j]);
            }
        }
    }
}

/// Whether `labels` partitions like `truth`, up to renaming.
fn same_partition(labels: &[usize], truth: &[usize]) -> bool {
    (0..labels.len())
        .all(|i| (0..labels.len()).all(|j| (labels[i] == labels[j]) == (truth[i] == truth[j])))
}

#[test]
fn clusters_of_noisy_copies_are_recovered() {
    let (experts, truth) = noisy_copies(3, 4, 0.2);
    let views: Vec<_> = experts.iter().map(TestExpert::view).collect();
    let sim = cosine_similarity(&views, 0.5, 16);
    let n = experts.len();
    let labels = cluster(&sim, n, None, 0);
    assert!(same_partition(&labels, &truth), "{labels:?} vs {truth:?}");
    assert_eq!(
        labels[..3],
        [0, 1, 2],
        "labels numbered by first appearance"
    );
    // Asked for 3, the same; asked for 1, everyone together.
    assert!(same_partition(&cluster(&sim, n, Some(3), 7), &truth));
    assert_eq!(cluster(&sim, n, Some(1), 7), vec![0; n]);
}

#[test]
fn kmeans_and_silhouette_on_plain_points() {
    // Two tight pairs on a line: k-means splits them; the silhouette is close to 1.
    let points = [0.0, 0.1, 10.0, 10.1];
    let labels = kmeans(&points, 1, 2, 3, 5);
    assert_eq!(labels[0], labels[1]);
    assert_eq!(labels[2], labels[3]);
    assert_ne!(labels[0], labels[2]);
    let s = silhouette(&points, 1, &labels);
    // By hand: a = 0.1 and b ≈ 10 for every point: s = 1 - 0.1/10.05 on average.
    let by_hand = (1.0 - 0.1 / 10.05 + 1.0 - 0.1 / 9.95) / 2.0;
    assert!((s - by_hand).abs() < 1e-9, "{s} vs {by_hand}");
    assert!(silhouette(&points, 1, &[0, 1, 0, 1]) < 0.0);
}
