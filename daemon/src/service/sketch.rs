//! The update sketch: derived data computed for every ready expert and cached in the index
//! by content hash. Clustering groups experts by the cosine similarity of their updates
//! `ΔW = s B A` (summed over modules); the sketch keeps those inner products in
//! expectation, so clustering hundreds of experts reads no adapter file and never forms a
//! dense `B A`.
//!
//! Per module, a small matrix stands for the update: `ΔW` itself when it has at most
//! [`EXACT_ENTRIES`] entries, else `s (P B)(A Qᵀ)` with `P` `[K, out]` and `Q` `[K, in]`
//! random ±1/√K matrices (so `E[PᵀP] = I` and inner products are kept in expectation).
//! Each entry of that matrix is then added, with sign `s(m, i)`, to bucket `h(m, i)` of a
//! [`SKETCH_DIM`]-long vector (a count sketch). `P`, `Q`, `h` and `s` come from a fixed
//! mixing function of the module name and the position, so the sketch depends on content
//! only.

use moerge_library::Adapter;

/// The derived-data kind under which sketches are stored.
pub const SKETCH_KIND: &str = "sketch/v2";
pub const SKETCH_DIM: usize = 1024;
/// Rows of the random projections.
pub const PROJECTION: usize = 32;
/// A module whose update has at most this many entries is sketched from `ΔW` itself.
pub const EXACT_ENTRIES: usize = PROJECTION * PROJECTION * 4;

/// The sketch of an adapter's update, as little-endian f32 bytes.
pub fn parameter_sketch(adapter: &Adapter) -> Vec<u8> {
    let mut sketch = vec![0f64; SKETCH_DIM];
    for module in adapter.modules().values() {
        let a = adapter.tensor_f32(&module.a);
        let b = adapter.tensor_f32(&module.b);
        let (r, din, dout) = (module.rank, module.in_features, module.out_features);
        let (small, how) = if din * dout <= EXACT_ENTRIES {
            (product(&b, &a, dout, r, din, module.scale), "exact")
        } else {
            let seed = tensor_seed(&module.module, "P");
            let pb = project_rows(&b, dout, r, seed, false); // [K, r]
            let seed = tensor_seed(&module.module, "Q");
            let aq = project_rows(&a, din, r, seed, true); // [r, K] as A Qᵀ
            (
                product(&pb, &aq, PROJECTION, r, PROJECTION, module.scale),
                "projected",
            )
        };
        let seed = tensor_seed(&module.module, how);
        for (i, x) in small.into_iter().enumerate() {
            let h = splitmix64(seed ^ i as u64);
            let bucket = (h % SKETCH_DIM as u64) as usize;
            let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
            sketch[bucket] += sign * x;
        }
    }
    sketch
        .iter()
        .flat_map(|v| (*v as f32).to_le_bytes())
        .collect()
}

/// `scale · X Y` for row-major `X` `[m, r]` (f32 or f64 values) and `Y` `[r, n]`.
fn product<T: Copy + Into<f64>>(
    x: &[T],
    y: &[T],
    m: usize,
    r: usize,
    n: usize,
    scale: f64,
) -> Vec<f64> {
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for p in 0..r {
            let xip = x[i * r + p].into() * scale;
            for j in 0..n {
                out[i * n + j] += xip * y[p * n + j].into();
            }
        }
    }
    out
}

/// With `R` the random ±1/√K matrix `[K, d]` of `seed`: for `transposed == false`, `R X`
/// for `X` `[d, r]` (a `B`), giving `[K, r]`; for `transposed == true`, `X Rᵀ` for `X`
/// `[r, d]` (an `A`), giving `[r, K]`.
fn project_rows(x: &[f32], d: usize, r: usize, seed: u64, transposed: bool) -> Vec<f64> {
    let unit = 1.0 / (PROJECTION as f64).sqrt();
    let mut out = vec![0.0; PROJECTION * r];
    for k in 0..PROJECTION {
        for c in 0..d {
            let sign = if splitmix64(seed ^ ((k * d + c) as u64)) >> 63 == 0 {
                unit
            } else {
                -unit
            };
            for p in 0..r {
                if transposed {
                    out[p * PROJECTION + k] += sign * f64::from(x[p * d + c]);
                } else {
                    out[k * r + p] += sign * f64::from(x[c * r + p]);
                }
            }
        }
    }
    out
}

/// Reads a stored sketch back; `None` if the bytes are not one.
pub fn decode_sketch(bytes: &[u8]) -> Option<Vec<f32>> {
    (bytes.len() == SKETCH_DIM * 4).then(|| {
        bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    })
}

fn tensor_seed(module: &str, factor: &str) -> u64 {
    let h = blake3::hash(format!("{module}\0{factor}").as_bytes());
    u64::from_le_bytes(h.as_bytes()[..8].try_into().expect("8 bytes"))
}

/// Sebastiano Vigna's splitmix64 finaliser: cheap, and every input bit reaches every output bit.
fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
