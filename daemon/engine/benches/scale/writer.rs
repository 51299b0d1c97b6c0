//! Random tensors written straight to a safetensors file, chunk by chunk: a seeded
//! generator per chunk, chunks generated on all cores, bytes written as they come.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde_json::json;

use super::checkpoint::Res;

/// Elements generated per chunk; each chunk has its own random stream, so the values do not
/// depend on how many threads generate them.
const CHUNK: usize = 1 << 20;

#[derive(Clone, Copy)]
pub enum Init {
    Normal(f32),
    /// Uniform in `[-bound, bound)`.
    Uniform(f32),
    Zeros,
    Ones,
}

#[derive(Clone, Copy)]
pub enum Dtype {
    Bf16,
    F32,
}

impl Dtype {
    pub fn size(self) -> usize {
        match self {
            Dtype::Bf16 => 2,
            Dtype::F32 => 4,
        }
    }
}

pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
}

impl TensorSpec {
    pub fn new(name: String, shape: &[usize], init: Init) -> Self {
        Self {
            name,
            shape: shape.to_vec(),
            init,
        }
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// One safetensors file, header first, then each tensor generated chunk by chunk (chunks
/// on all cores) and written as it comes. Written under another name, then renamed.
pub fn write_safetensors(path: &Path, tensors: &[&TensorSpec], dtype: Dtype, seed: u64) -> Res<()> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0;
    let dtype_name = match dtype {
        Dtype::Bf16 => "BF16",
        Dtype::F32 => "F32",
    };
    for t in tensors {
        let end = offset + t.numel() * dtype.size();
        let entry = json!({"dtype": dtype_name, "shape": t.shape, "data_offsets": [offset, end]});
        header.insert(t.name.clone(), entry);
        offset = end;
    }
    let mut header = serde_json::to_vec(&header)?;
    header.resize(header.len().next_multiple_of(8), b' ');
    let partial = path.with_extension("partial");
    let mut out = BufWriter::with_capacity(1 << 22, File::create(&partial)?);
    out.write_all(&(header.len() as u64).to_le_bytes())?;
    out.write_all(&header)?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for t in tensors {
        let n = t.numel();
        let tensor_seed = mix(seed, name_hash(&t.name));
        let encode_chunk = |c: usize| {
            let start = c * CHUNK;
            let values = t
                .init
                .values(mix(tensor_seed, c as u64), CHUNK.min(n - start));
            encode(&values, dtype)
        };
        let chunks = n.div_ceil(CHUNK);
        if chunks == 1 {
            out.write_all(&encode_chunk(0))?;
            continue;
        }
        for first in (0..chunks).step_by(threads) {
            let encoded: Vec<Vec<u8>> = std::thread::scope(|s| {
                let handles: Vec<_> = (first..chunks.min(first + threads))
                    .map(|c| s.spawn(move || encode_chunk(c)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            for bytes in encoded {
                out.write_all(&bytes)?;
            }
        }
    }
    out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&partial, path)?;
    Ok(())
}

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        // Round to nearest even, as torch and make_phi2_scale.py do.
        Dtype::Bf16 => values
            .iter()
            .flat_map(|v| {
                let b = v.to_bits();
                let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
                (rounded as u16).to_le_bytes()
            })
            .collect(),
    }
}

impl Init {
    fn values(self, seed: u64, n: usize) -> Vec<f32> {
        let mut rng = SplitMix(seed);
        match self {
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
            Init::Uniform(bound) => (0..n).map(|_| (rng.unit() * 2.0 - 1.0) * bound).collect(),
            Init::Normal(std) => {
                let mut v = Vec::with_capacity(n + 1);
                while v.len() < n {
                    let (a, b) = rng.gaussian_pair();
                    v.extend([a * std, b * std]);
                }
                v.truncate(n);
                v
            }
        }
    }
}

/// SplitMix64: tiny, seeded, and good enough for random weights.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Two independent standard normals (Box–Muller) from one 64-bit draw.
    fn gaussian_pair(&mut self) -> (f32, f32) {
        let x = self.next();
        let scale = 1.0 / (1u64 << 24) as f32;
        let u1 = ((x >> 40) + 1) as f32 * scale; // (0, 1]: ln never sees 0
        let u2 = (x & 0xff_ffff) as f32 * scale;
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }
}

pub fn mix(a: u64, b: u64) -> u64 {
    SplitMix(a ^ b.wrapping_mul(0x9e37_79b9_7f4a_7c15)).next()
}

/// FNV-1a: a stable seed per tensor name.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}
