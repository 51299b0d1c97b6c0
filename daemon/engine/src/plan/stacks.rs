//! The experts' factors of one module laid side by side, so a routed or fitted module is a few
//! matmuls whatever the number of experts: the column stacks of output mixing, and the
//! per-unit factor stacks of factor mixing with [`mix_factors`]. Serving (`routing`) and
//! fitting (the `fit` layer) build theirs here.

use candle_core::{Device, Tensor};
use moerge_library::{Adapter, LoraModule};

use super::plan_error;
use crate::error::Result;

/// One unit's members in a module: `(weight, adapter, module)` each.
pub(crate) type UnitParts<'a> = Vec<(f64, &'a Adapter, &'a LoraModule)>;

/// Every unit's factors as columns: `x · a_stack` gives all the units' `A x` at once, and
/// `· b_stack` maps them back through their weighted, scaled `B`s.
#[derive(Debug, Clone)]
pub(crate) struct ColumnStacks {
    /// `[in, Σr]`: the members' `Aᵀ` side by side.
    pub a_stack: Tensor,
    /// `[Σr, out]`: the members' `(w s B)ᵀ` stacked.
    pub b_stack: Tensor,
    /// `[U, Σr]`: 1 where a column belongs to the unit (a unit without the module has none).
    pub cols: Tensor,
}

impl ColumnStacks {
    /// The stacks of `units` (each its weighted members) of a module `[in → out]`.
    pub(crate) fn new(
        units: &[UnitParts<'_>],
        inp: usize,
        out: usize,
        device: &Device,
    ) -> Result<Self> {
        let total: usize = units.iter().flatten().map(|(_, _, m)| m.rank).sum();
        let mut a_stack = vec![0f32; inp * total];
        let mut b_stack = vec![0f32; total * out];
        let mut cols = vec![0f32; units.len() * total];
        let mut offset = 0;
        for (row, parts) in units.iter().enumerate() {
            for (w, e, m) in parts {
                let a = e.tensor_f32(&m.a); // r × in
                let b = e.tensor_f32(&m.b); // out × r
                let c = (w * m.scale) as f32;
                for k in 0..m.rank {
                    for j in 0..inp {
                        a_stack[j * total + offset + k] = a[k * inp + j];
                    }
                    for o in 0..out {
                        b_stack[(offset + k) * out + o] = c * b[o * m.rank + k];
                    }
                    cols[row * total + offset + k] = 1.0;
                }
                offset += m.rank;
            }
        }
        Ok(ColumnStacks {
            a_stack: Tensor::from_vec(a_stack, (inp, total), device)?,
            b_stack: Tensor::from_vec(b_stack, (total, out), device)?,
            cols: Tensor::from_vec(cols, (units.len(), total), device)?,
        })
    }
}

/// Every unit's `√s A` and `√s B` (equal ranks `r`), for [`mix_factors`].
#[derive(Debug, Clone)]
pub(crate) struct FactorStacks {
    /// `[in, U·r]`: unit `u`'s `√s_u A_uᵀ` in columns `u·r..(u+1)·r`.
    pub a_cat: Tensor,
    /// `[U·r, out]`: unit `u`'s `√s_u B_uᵀ` in rows `u·r..(u+1)·r`.
    pub b_cat: Tensor,
    pub rank: usize,
}

/// The factor-mixed update for inputs `x2` `[n, in]` and routing weights `coeffs` `[n, U]`:
/// per row, `h = Σ_u c_u (√s_u A_u x)` `[r]`, then `Σ_u c_u (√s_u B_u h)`, the latter as one
/// matmul of the outer products `c ⊗ h` `[n, U·r]` with the stacked `Bᵀ`s, so it costs what
/// output mixing costs. Differentiable in `coeffs` and in the stacks (fitting shares it).
pub(crate) fn mix_factors(x2: &Tensor, coeffs: &Tensor, f: &FactorStacks) -> Result<Tensor> {
    let (n, units) = coeffs.dims2()?;
    let c = coeffs.unsqueeze(2)?; // [n, U, 1]
    let xa = x2.matmul(&f.a_cat)?.reshape((n, units, f.rank))?;
    let h = xa.broadcast_mul(&c)?.sum(1)?; // [n, r]
    let outer = c
        .broadcast_mul(&h.unsqueeze(1)?)?
        .reshape((n, units * f.rank))?;
    Ok(outer.matmul(&f.b_cat)?)
}

impl FactorStacks {
    /// The stacks of units given as `(√s A [r, in], √s B [out, r])` per unit, f32 row-major;
    /// a unit without the module is `None` (zeros).
    pub(crate) fn new(
        units: &[Option<(Vec<f32>, Vec<f32>)>],
        rank: usize,
        inp: usize,
        out: usize,
        device: &Device,
    ) -> Result<Self> {
        let u = units.len();
        let mut a_cat = vec![0f32; inp * u * rank];
        let mut b_cat = vec![0f32; u * rank * out];
        for (i, unit) in units.iter().enumerate() {
            let Some((a, b)) = unit else { continue };
            for k in 0..rank {
                for j in 0..inp {
                    a_cat[j * u * rank + i * rank + k] = a[k * inp + j];
                }
                for o in 0..out {
                    b_cat[(i * rank + k) * out + o] = b[o * rank + k];
                }
            }
        }
        Ok(FactorStacks {
            a_cat: Tensor::from_vec(a_cat, (inp, u * rank), device)?,
            b_cat: Tensor::from_vec(b_cat, (u * rank, out), device)?,
            rank,
        })
    }

    /// Every expert of `parts` as its own unit (`None` where it lacks the module), with the
    /// scale split evenly over the factors; refuses unequal ranks, naming the module and
    /// expert.
    pub(crate) fn of_experts(
        module: &str,
        parts: &[Option<(&Adapter, &LoraModule)>],
        device: &Device,
    ) -> Result<Self> {
        let Some((_, first)) = parts.iter().flatten().next() else {
            return Err(plan_error(format!("module {module}: no expert adapts it")));
        };
        let (rank, inp, out) = (first.rank, first.in_features, first.out_features);
        if let Some((e, m)) = parts.iter().flatten().find(|(_, m)| m.rank != rank) {
            return Err(plan_error(format!(
                "module {module}: mix \"factors\" needs equal ranks, but expert {} has r={} and \
                 another r={rank}; use mix \"outputs\"",
                e.name(),
                m.rank
            )));
        }
        let units: Vec<_> = parts
            .iter()
            .map(|p| {
                p.map(|(e, m)| {
                    let c = m.scale.sqrt() as f32;
                    let scaled = |t| e.tensor_f32(t).iter().map(|v| c * v).collect::<Vec<f32>>();
                    (scaled(&m.a), scaled(&m.b))
                })
            })
            .collect();
        Self::new(&units, rank, inp, out, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Factor mixing in plain loops: `h = Σ_u c_u A'_u x`, `y = Σ_u c_u B'_u h`.
    #[test]
    fn mix_factors_equals_plain_loops() {
        let (n, units, r, inp, out) = (3, 4, 2, 5, 6);
        let mut seed = 7u64;
        let mut next = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let a: Vec<Vec<f32>> = (0..units)
            .map(|_| (0..r * inp).map(|_| next()).collect())
            .collect();
        let b: Vec<Vec<f32>> = (0..units)
            .map(|_| (0..out * r).map(|_| next()).collect())
            .collect();
        let x: Vec<f32> = (0..n * inp).map(|_| next()).collect();
        let c: Vec<f32> = (0..n * units).map(|_| next().abs()).collect();
        // Unit 2 lacks the module: zeros.
        let parts: Vec<_> = (0..units)
            .map(|u| (u != 2).then(|| (a[u].clone(), b[u].clone())))
            .collect();
        let dev = Device::Cpu;
        let stacks = FactorStacks::new(&parts, r, inp, out, &dev).unwrap();
        let got = mix_factors(
            &Tensor::from_vec(x.clone(), (n, inp), &dev).unwrap(),
            &Tensor::from_vec(c.clone(), (n, units), &dev).unwrap(),
            &stacks,
        )
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
        for row in 0..n {
            let mut h = vec![0f64; r];
            for u in (0..units).filter(|&u| u != 2) {
                for (k, hk) in h.iter_mut().enumerate() {
                    let ax: f64 = (0..inp)
                        .map(|j| f64::from(a[u][k * inp + j]) * f64::from(x[row * inp + j]))
                        .sum();
                    *hk += f64::from(c[row * units + u]) * ax;
                }
            }
            for o in 0..out {
                let want: f64 = (0..units)
                    .filter(|&u| u != 2)
                    .map(|u| {
                        let bh: f64 = (0..r).map(|k| f64::from(b[u][o * r + k]) * h[k]).sum();
                        f64::from(c[row * units + u]) * bh
                    })
                    .sum();
                let g = f64::from(got[row][o]);
                assert!((g - want).abs() < 1e-5, "row {row} out {o}: {g} vs {want}");
            }
        }
    }
}
