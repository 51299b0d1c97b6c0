//! The Gram matrix of adapters' updates `ΔW = s B A`, computed from the factors: the
//! similarity measure behind model-based clustering (the daemon's `mbc` clustering and the
//! `moerge eval` report's similarity matrix).

use std::collections::BTreeSet;

use super::Adapter;

/// One module's factors of one expert, rows contiguous: `A` `[r, in]` and `Bᵀ` `[r, out]`.
struct ModuleFactors {
    scale: f64,
    rank: usize,
    a: Vec<f64>,
    bt: Vec<f64>,
}

impl ModuleFactors {
    fn read(adapter: &Adapter, module: &str) -> Option<ModuleFactors> {
        let m = adapter.modules().get(module)?;
        let b = adapter.tensor_f32(&m.b);
        let mut bt = vec![0.0; m.rank * m.out_features];
        for o in 0..m.out_features {
            for p in 0..m.rank {
                bt[p * m.out_features + o] = f64::from(b[o * m.rank + p]);
            }
        }
        Some(ModuleFactors {
            scale: m.scale,
            rank: m.rank,
            a: adapter
                .tensor_f32(&m.a)
                .into_iter()
                .map(f64::from)
                .collect(),
            bt,
        })
    }

    fn row(values: &[f64], rank: usize, p: usize) -> &[f64] {
        let width = values.len() / rank;
        &values[p * width..(p + 1) * width]
    }

    /// `<ΔW_self, ΔW_other> = s s' Σ_pq (BᵀB')_pq (A'Aᵀ)_qp`.
    fn inner(&self, other: &ModuleFactors) -> f64 {
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
        let mut total = 0.0;
        for p in 0..self.rank {
            let (bp, ap) = (
                Self::row(&self.bt, self.rank, p),
                Self::row(&self.a, self.rank, p),
            );
            for q in 0..other.rank {
                let bq = Self::row(&other.bt, other.rank, q);
                let aq = Self::row(&other.a, other.rank, q);
                total += dot(bp, bq) * dot(aq, ap);
            }
        }
        self.scale * other.scale * total
    }
}

/// The Gram matrix (`n × n`, row-major) of the adapters' updates `s B A` summed over
/// modules, from the factors: `<s₁B₁A₁, s₂B₂A₂> = s₁s₂ tr((B₁ᵀB₂)(A₂A₁ᵀ))`, one module at a
/// time, never forming `B A`.
pub fn update_gram(adapters: &[&Adapter]) -> Vec<f64> {
    let n = adapters.len();
    let modules: BTreeSet<&String> = adapters.iter().flat_map(|a| a.modules().keys()).collect();
    let mut gram = vec![0.0f64; n * n];
    for module in modules {
        let factors: Vec<Option<ModuleFactors>> = adapters
            .iter()
            .map(|a| ModuleFactors::read(a, module))
            .collect();
        for i in 0..n {
            let Some(fi) = &factors[i] else { continue };
            for j in i..n {
                let Some(fj) = &factors[j] else { continue };
                let dot = fi.inner(fj);
                gram[i * n + j] += dot;
                if i != j {
                    gram[j * n + i] += dot;
                }
            }
        }
    }
    gram
}
