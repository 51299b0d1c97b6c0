//! Clustering the library (model-based clustering, the recipe of the `hierarchical` policy):
//! the experts' flattened LoRA factors → their Gram matrix → cosine similarity on the top
//! singular directions → seeded k-means with the number of clusters chosen by silhouette
//! (`moerge_sdk::cluster`). The result is stored in the index as the `mbc` clustering.
//!
//! Experts are compared by their updates `ΔW = s B A` (summed over modules), which unlike the
//! raw factors do not depend on how a trainer happened to split `ΔW` into `B` and `A`: on
//! the tiny library this recovers the task families, where flattened factors do not. The
//! Gram matrix comes from the factors (`<ΔW₁, ΔW₂> = s₁s₂ tr((B₁ᵀB₂)(A₂A₁ᵀ))`, never a dense
//! `B A`) when the library is small enough to read whole, else from the update sketches the
//! service caches for every expert (inner products kept in expectation), so clustering 256
//! Phi-2-sized experts reads no adapter file.

use moerge_library::{update_gram, Adapter, ContentHash};
use moerge_sdk::cluster::{cluster, similarity_from_gram};

use crate::index::{ClusterRecord, Index, IndexError};
use crate::service::sketch::{decode_sketch, SKETCH_KIND};
use crate::service::Lease;

/// The name the daemon's clustering is stored under.
pub const CLUSTERING: &str = "mbc";

/// How to cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterOptions {
    /// Number of clusters; `None`: the best silhouette among 2..=10.
    pub k: Option<usize>,
    /// Singular directions kept before the cosine.
    pub dims: usize,
    pub seed: u64,
    /// Largest `experts² × parameters per expert` computed exactly from the factors; above
    /// it, the sketches are used.
    pub exact_budget: f64,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        ClusterOptions {
            k: None,
            dims: 16,
            seed: 0,
            exact_budget: 4e10,
        }
    }
}

/// Where the Gram matrix came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GramSource {
    Factors,
    Sketches,
}

/// A clustering of the ready experts of one library generation.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Clustering {
    pub generation: u64,
    /// The experts, by name, in the order of `labels` and the similarity rows.
    pub experts: Vec<String>,
    pub labels: Vec<usize>,
    /// `experts.len()²`, row-major.
    pub similarity: Vec<f64>,
    pub source: GramSource,
}

impl Clustering {
    /// The experts of each cluster, in label order.
    pub fn clusters(&self) -> Vec<Vec<String>> {
        let k = self.labels.iter().max().map_or(0, |m| m + 1);
        (0..k)
            .map(|c| {
                self.experts
                    .iter()
                    .zip(&self.labels)
                    .filter(|(_, l)| **l == c)
                    .map(|(e, _)| e.clone())
                    .collect()
            })
            .collect()
    }
}

/// Why the library could not be clustered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    #[error("no ready experts to cluster")]
    Empty,
    #[error("expert {expert:?}: {message}")]
    Expert { expert: String, message: String },
    #[error("index: {0}")]
    Index(#[from] IndexError),
}

/// The Gram matrix of the sketches (`n × n`, row-major).
pub fn sketch_gram(sketches: &[Vec<f32>]) -> Vec<f64> {
    let n = sketches.len();
    let mut gram = vec![0.0f64; n * n];
    for i in 0..n {
        for j in i..n {
            let dot: f64 = sketches[i]
                .iter()
                .zip(&sketches[j])
                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                .sum();
            gram[i * n + j] = dot;
            gram[j * n + i] = dot;
        }
    }
    gram
}

/// Clusters the ready experts of `lease` and stores the result as [`CLUSTERING`].
pub fn cluster_library(
    index: &Index,
    lease: &Lease,
    options: &ClusterOptions,
) -> Result<Clustering, ClusterError> {
    let ready: Vec<(String, ContentHash)> = lease
        .experts()
        .iter()
        .filter(|(_, r)| r.is_ready())
        .filter_map(|(name, r)| r.hash.map(|h| (name.clone(), h)))
        .collect();
    if ready.is_empty() {
        return Err(ClusterError::Empty);
    }
    let n = ready.len();
    let expert_error = |name: &str, message: String| ClusterError::Expert {
        expert: name.to_owned(),
        message,
    };
    // The exact Gram costs about n² · r · parameters; count at most one parameter per two
    // bytes of adapter folder (bf16; f32 takes four) and a rank of at most 64.
    let parameters = 64.0
        * lease
            .experts()
            .values()
            .filter(|r| r.is_ready())
            .map(|r| r.size_bytes / 2)
            .max()
            .unwrap_or(0) as f64;
    let (gram, source) = if (n * n) as f64 * parameters <= options.exact_budget {
        let pins = ready
            .iter()
            .map(|(name, _)| {
                lease
                    .open(name)
                    .map_err(|e| expert_error(name, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let adapters = pins
            .iter()
            .zip(&ready)
            .map(|(pin, (name, _))| {
                Adapter::load(pin.dir()).map_err(|e| expert_error(name, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let refs: Vec<&Adapter> = adapters.iter().collect();
        (update_gram(&refs), GramSource::Factors)
    } else {
        let sketches = ready
            .iter()
            .map(|(name, hash)| {
                index
                    .derived(hash, SKETCH_KIND)?
                    .and_then(|bytes| decode_sketch(&bytes))
                    .ok_or_else(|| {
                        expert_error(name, "no parameter sketch in the index yet".into())
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        (sketch_gram(&sketches), GramSource::Sketches)
    };
    let similarity = similarity_from_gram(&gram, n, options.dims);
    let labels = cluster(&similarity, n, options.k, options.seed);
    let result = Clustering {
        generation: lease.generation(),
        experts: ready.iter().map(|(name, _)| name.clone()).collect(),
        labels,
        similarity,
        source,
    };
    let clusters = result
        .clusters()
        .iter()
        .map(|members| {
            members
                .iter()
                .map(|m| ready.iter().find(|(name, _)| name == m).expect("ready").1)
                .collect()
        })
        .collect();
    index.put_clusters(&ClusterRecord {
        name: CLUSTERING.to_owned(),
        clusters,
        stale: false,
    })?;
    Ok(result)
}
