//! The parameter sketch: derived data computed for every ready expert and cached in the
//! index by content hash. Clustering (a later issue) groups experts by the cosine
//! similarity of their flattened LoRA parameters (the model-based clustering recipe); a
//! count sketch keeps inner products in expectation, so clustering can compare hundreds of
//! experts without reading their files again.
//!
//! Each factor value `x` at position `i` of tensor `t` is added, with sign `s(t, i)`, to
//! bucket `h(t, i)` of a [`SKETCH_DIM`]-long vector; `h` and `s` come from a fixed mixing
//! function of the module name, the factor and `i`, so the sketch depends on content only.

use moerge_library::Adapter;

/// The derived-data kind under which sketches are stored.
pub const SKETCH_KIND: &str = "sketch/v1";
pub const SKETCH_DIM: usize = 1024;

/// The sketch of an adapter's LoRA factors, as little-endian f32 bytes.
pub fn parameter_sketch(adapter: &Adapter) -> Vec<u8> {
    let mut sketch = vec![0f64; SKETCH_DIM];
    for module in adapter.modules().values() {
        for (factor, tensor) in [("A", &module.a), ("B", &module.b)] {
            let seed = tensor_seed(&module.module, factor);
            for (i, x) in adapter.tensor_f32(tensor).into_iter().enumerate() {
                let h = splitmix64(seed ^ i as u64);
                let bucket = (h % SKETCH_DIM as u64) as usize;
                let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
                sketch[bucket] += sign * f64::from(x);
            }
        }
    }
    sketch
        .iter()
        .flat_map(|v| (*v as f32).to_le_bytes())
        .collect()
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
