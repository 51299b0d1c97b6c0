//! The experts' factors of one module laid side by side, so a routed or fitted module is a few
//! matmuls whatever the number of experts: the column stacks of output mixing, and the
//! per-unit factor stacks of factor mixing with [`mix_factors`]. Serving (`routing`) and
//! fitting (the `fit` layer) build theirs here.

use candle_core::{DType, Device, Tensor};
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
    /// Each unit's columns.
    pub ranges: Vec<std::ops::Range<usize>>,
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
        let mut ranges = Vec::with_capacity(units.len());
        for (row, parts) in units.iter().enumerate() {
            let start = offset;
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
            ranges.push(start..offset);
        }
        Ok(ColumnStacks {
            a_stack: Tensor::from_vec(a_stack, (inp, total), device)?,
            b_stack: Tensor::from_vec(b_stack, (total, out), device)?,
            cols: Tensor::from_vec(cols, (units.len(), total), device)?,
            ranges,
        })
    }

    /// The stacks of only the units some row of `coeffs` `[n, U]` weighs (the others are
    /// exactly 0 outside the top-k), with those units' weights: `(a, b, cols, coeffs)`. At
    /// decode a top-k of many units then reads k units' factors, not all of them.
    pub(crate) fn kept(&self, coeffs: &Tensor) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
        let rows = coeffs.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let used: Vec<u32> = (0..self.ranges.len())
            .filter(|&u| rows.iter().any(|r| r[u] != 0.0))
            .map(|u| u as u32)
            .collect();
        if used.len() == self.ranges.len() {
            return Ok((
                self.a_stack.clone(),
                self.b_stack.clone(),
                self.cols.clone(),
                coeffs.clone(),
            ));
        }
        let columns: Vec<u32> = used
            .iter()
            .flat_map(|&u| self.ranges[u as usize].clone().map(|c| c as u32))
            .collect();
        let device = coeffs.device();
        let (used, columns) = (
            Tensor::new(used.as_slice(), device)?,
            Tensor::new(columns.as_slice(), device)?,
        );
        Ok((
            self.a_stack.index_select(&columns, 1)?,
            self.b_stack.index_select(&columns, 0)?,
            self.cols
                .index_select(&used, 0)?
                .index_select(&columns, 1)?,
            coeffs.index_select(&used, 1)?,
        ))
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

    /// The update from only the weighed units' columns equals the update from all of them.
    #[test]
    fn kept_units_give_the_update_of_every_unit() {
        let dev = Device::Cpu;
        let (inp, out) = (6, 5);
        let ranges = vec![0..2, 2..5, 5..5, 5..7]; // unit 2 lacks the module
        let total = 7;
        let mut cols = vec![0f32; 4 * total];
        for (u, r) in ranges.iter().enumerate() {
            for c in r.clone() {
                cols[u * total + c] = 1.0;
            }
        }
        let values = |n: usize, seed: u32| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as u32 * 37 + seed) % 23) as f32 / 11.0 - 1.0)
                .collect()
        };
        let stacks = ColumnStacks {
            a_stack: Tensor::from_vec(values(inp * total, 3), (inp, total), &dev).unwrap(),
            b_stack: Tensor::from_vec(values(total * out, 5), (total, out), &dev).unwrap(),
            cols: Tensor::from_vec(cols, (4, total), &dev).unwrap(),
            ranges,
        };
        let x = Tensor::from_vec(values(3 * inp, 7), (3, inp), &dev).unwrap();
        let update = |a: &Tensor, b: &Tensor, cols: &Tensor, c: &Tensor| {
            let xa = x.matmul(a).unwrap();
            (xa * c.matmul(cols).unwrap()).unwrap().matmul(b).unwrap()
        };
        let full = |c: &Tensor| update(&stacks.a_stack, &stacks.b_stack, &stacks.cols, c);
        // Unit 1 weighs nothing on any row: it is left out; then every unit is weighed.
        for coeffs in [
            vec![
                0.7f32, 0.0, 0.0, 0.3, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.0, 1.0,
            ],
            vec![
                0.7f32, 0.1, 0.0, 0.2, 0.5, 0.0, 0.0, 0.5, 0.0, 0.0, 0.4, 0.6,
            ],
        ] {
            let c = Tensor::from_vec(coeffs, (3, 4), &dev).unwrap();
            let (a, b, cols, kc) = stacks.kept(&c).unwrap();
            let got = update(&a, &b, &cols, &kc);
            let diff = (got - full(&c)).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        }
        let c = Tensor::from_vec(vec![0.7f32, 0.0, 0.0, 0.3], (1, 4), &dev).unwrap();
        assert_eq!(
            stacks.kept(&c).unwrap().0.dims(),
            &[inp, 4],
            "units 0 and 3: 2 + 2 columns"
        );
    }

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
