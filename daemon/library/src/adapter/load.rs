//! Loading an adapter folder: files, config, header, LoRA pairs, then one pass over the data
//! that both hashes it and checks every value is finite.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::Path;

use memmap2::Mmap;

use super::keys::{classify, Factor, Key};
use super::{Adapter, LoraModule, TensorRef};
use crate::config::AdapterConfig;
use crate::error::AdapterError;
use crate::hash::{AdapterHasher, ContentHash};
use crate::safetensors_header::{self as st, Dtype, Header, HeaderError, TensorEntry};

pub(crate) const CONFIG_FILE: &str = "adapter_config.json";
pub(crate) const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PICKLE_FILE: &str = "adapter_model.bin";

/// Hash and scan in slices of this size, so the finite-value check reads bytes the hasher
/// has just pulled into cache.
const CHUNK: usize = 64 * 1024;

pub(super) fn load(dir: &Path) -> Result<Adapter, AdapterError> {
    let (config_path, weights_path) = locate(dir)?;
    let config_bytes = std::fs::read(&config_path).map_err(|source| AdapterError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config = AdapterConfig::parse(&config_path, &config_bytes)?;
    config.check_supported(&config_path)?;

    let io = |source| AdapterError::Io {
        path: weights_path.clone(),
        source,
    };
    let file = File::open(&weights_path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let bad_file = |source: HeaderError| AdapterError::Safetensors {
        path: weights_path.clone(),
        source,
    };
    // Mapping an empty file fails on some platforms; refuse it with the format's own words.
    if len < 8 {
        return Err(bad_file(HeaderError::TooShort { len }));
    }
    // SAFETY: the map is only ever read, and the file is opened read-only. Another process
    // truncating or rewriting the file while it is mapped is a known mmap hazard (a read past
    // the new end raises SIGBUS; a rewrite changes bytes already validated); moerge treats
    // adapter files as immutable once loaded and the library watcher reloads on change.
    let map = unsafe { Mmap::map(&file) }.map_err(io)?;
    let header = st::parse_file(&map).map_err(bad_file)?;
    let modules = collect_modules(&weights_path, &config, &header)?;
    let hash = hash_and_scan(&weights_path, &config_bytes, &map, &header)?;

    let name = crate::folder_name(dir);
    Ok(Adapter {
        dir: dir.to_owned(),
        name,
        hash,
        config,
        modules,
        size_bytes: (config_bytes.len() + map.len()) as u64,
        map,
    })
}

/// The two files' paths, refusing a folder that lacks one of them.
pub(super) fn locate(dir: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf), AdapterError> {
    let meta = std::fs::metadata(dir).map_err(|source| AdapterError::Io {
        path: dir.to_owned(),
        source,
    })?;
    if !meta.is_dir() {
        let source = std::io::Error::other("not a directory; an adapter is a folder");
        return Err(AdapterError::Io {
            path: dir.to_owned(),
            source,
        });
    }
    let config_path = dir.join(CONFIG_FILE);
    let weights_path = dir.join(WEIGHTS_FILE);
    if !config_path.is_file() {
        return Err(AdapterError::MissingConfig {
            dir: dir.to_owned(),
        });
    }
    if !weights_path.is_file() {
        if dir.join(PICKLE_FILE).exists() {
            return Err(AdapterError::PickleOnly {
                dir: dir.to_owned(),
            });
        }
        return Err(AdapterError::MissingWeights {
            dir: dir.to_owned(),
        });
    }
    Ok((config_path, weights_path))
}

fn tensor_ref(header: &Header, t: &TensorEntry) -> TensorRef {
    // Offsets were checked against the mapped length, so these fit in usize.
    let base = header.data_start as usize;
    TensorRef {
        name: t.name.clone(),
        dtype: t.dtype,
        shape: t.shape.clone(),
        range: base + t.start as usize..base + t.end as usize,
    }
}

/// Groups the tensors into LoRA pairs and checks each against the config.
fn collect_modules(
    path: &Path,
    config: &AdapterConfig,
    header: &Header,
) -> Result<BTreeMap<String, LoraModule>, AdapterError> {
    let path_buf = || path.to_owned();
    let mut pairs: BTreeMap<&str, [Option<&TensorEntry>; 2]> = BTreeMap::new();
    let mut first_named: Option<(&TensorEntry, Option<&str>)> = None;
    for t in &header.tensors {
        let (module, factor, adapter_name) = match classify(&t.name) {
            Key::Factor {
                module,
                factor,
                adapter_name,
            } => (module, factor, adapter_name),
            Key::Unsupported { what } => {
                return Err(AdapterError::UnsupportedTensor {
                    path: path_buf(),
                    tensor: t.name.clone(),
                    what: what.to_owned(),
                })
            }
        };
        match first_named {
            None => first_named = Some((t, adapter_name)),
            Some((first, name)) if name != adapter_name => {
                return Err(AdapterError::MixedAdapterNames {
                    path: path_buf(),
                    first: first.name.clone(),
                    second: t.name.clone(),
                })
            }
            Some(_) => {}
        }
        if !t.dtype.is_lora_float() {
            return Err(AdapterError::UnsupportedDtype {
                path: path_buf(),
                tensor: t.name.clone(),
                dtype: t.dtype,
            });
        }
        let slot = &mut pairs.entry(module).or_default()[factor as usize];
        // A second tensor for the same slot would need the same module, factor and adapter
        // name, hence the same key; the header parser has already refused duplicate keys.
        debug_assert!(slot.is_none(), "duplicate factor {}", t.name);
        *slot = Some(t);
    }
    if pairs.is_empty() {
        return Err(AdapterError::NoLoraTensors { path: path_buf() });
    }

    let mut modules = BTreeMap::new();
    for (module, [a, b]) in pairs {
        let incomplete = |present: &TensorEntry, missing: Factor| AdapterError::IncompletePair {
            path: path_buf(),
            module: module.to_owned(),
            present: present.name.clone(),
            missing: missing.segment(),
        };
        let (a, b) = match (a, b) {
            (Some(a), Some(b)) => (a, b),
            (Some(a), None) => return Err(incomplete(a, Factor::B)),
            (None, Some(b)) => return Err(incomplete(b, Factor::A)),
            (None, None) => unreachable!("a module enters the map with one of its factors"),
        };
        for (t, factor, expected) in [(a, "A", "[r, in_features]"), (b, "B", "[out_features, r]")] {
            if t.shape.len() != 2 || t.shape.contains(&0) {
                return Err(AdapterError::FactorNotMatrix {
                    path: path_buf(),
                    tensor: t.name.clone(),
                    factor,
                    shape: t.shape.clone(),
                    expected,
                });
            }
        }
        let rank = a.shape[0];
        if b.shape[1] != rank {
            return Err(AdapterError::RankMismatch {
                path: path_buf(),
                a: a.name.clone(),
                a_shape: [a.shape[0], a.shape[1]],
                b: b.name.clone(),
                b_shape: [b.shape[0], b.shape[1]],
            });
        }
        if !config.targets(module) {
            return Err(AdapterError::NotTargeted {
                path: path_buf(),
                module: module.to_owned(),
                tensor: a.name.clone(),
            });
        }
        let (expected, source_key) = config.rank_for(module);
        if rank != expected {
            return Err(AdapterError::RankDisagreesWithConfig {
                path: path_buf(),
                module: module.to_owned(),
                tensor: a.name.clone(),
                rank,
                expected,
                source_key,
            });
        }
        let alpha = config.alpha_for(module);
        modules.insert(
            module.to_owned(),
            LoraModule {
                module: module.to_owned(),
                rank,
                alpha,
                scale: config.scale(rank, alpha),
                in_features: a.shape[1],
                out_features: b.shape[0],
                a: tensor_ref(header, a),
                b: tensor_ref(header, b),
            },
        );
    }
    Ok(modules)
}

/// The single pass over the file: hash everything in file order and, slice by slice, check
/// the same bytes for NaN and infinity while they are in cache.
fn hash_and_scan(
    path: &Path,
    config: &[u8],
    map: &[u8],
    header: &Header,
) -> Result<ContentHash, AdapterError> {
    let mut hasher = AdapterHasher::new(config, map.len() as u64);
    let data_start = header.data_start as usize;
    hasher.update(&map[..data_start]);
    let mut order: Vec<&TensorEntry> = header.tensors.iter().collect();
    order.sort_by_key(|t| t.start);
    // The header parser proved the tensors tile the data area, so walking them in offset
    // order feeds the hasher every byte of the file exactly once.
    for t in order {
        let bytes = &map[data_start + t.start as usize..data_start + t.end as usize];
        let elem = t.dtype.size_bytes();
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            hasher.update(chunk);
            if let Some((j, value)) = first_non_finite(chunk, t.dtype) {
                return Err(AdapterError::NonFinite {
                    path: path.to_owned(),
                    tensor: t.name.clone(),
                    index: i * (CHUNK / elem) + j,
                    value,
                });
            }
        }
    }
    Ok(hasher.finish())
}

/// The index and value of the first NaN or infinity, if any.
pub(super) fn first_non_finite(bytes: &[u8], dtype: Dtype) -> Option<(usize, f32)> {
    // An all-ones exponent means NaN or infinity in all three formats.
    match dtype {
        Dtype::F32 => scan(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            0x7f80_0000,
            f32::from_bits,
        ),
        Dtype::F16 => scan(super::u16s(bytes), 0x7c00, |h| {
            half::f16::from_bits(h).to_f32()
        }),
        Dtype::BF16 => scan(super::u16s(bytes), 0x7f80, |h| {
            half::bf16::from_bits(h).to_f32()
        }),
        _ => None,
    }
}

fn scan<T, I>(words: I, exponent: T, to_f32: impl Fn(T) -> f32) -> Option<(usize, f32)>
where
    T: Copy + PartialEq + std::ops::BitAnd<Output = T>,
    I: Iterator<Item = T> + Clone,
{
    let bad = |w: T| (w & exponent) == exponent;
    // The branch-free `fold` vectorises; locating the culprit only runs when there is one.
    if !words.clone().fold(false, |any, w| any | bad(w)) {
        return None;
    }
    words
        .enumerate()
        .find(|&(_, w)| bad(w))
        .map(|(i, w)| (i, to_f32(w)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_first_non_finite_in_each_dtype() {
        let f32s: Vec<u8> = [1.0f32, f32::INFINITY, f32::NAN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(
            first_non_finite(&f32s, Dtype::F32).map(|(i, v)| (i, v.is_infinite())),
            Some((1, true))
        );
        let f16s: Vec<u8> = [0.5f32, -2.0, f32::NAN]
            .iter()
            .flat_map(|&v| half::f16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(
            first_non_finite(&f16s, Dtype::F16).map(|(i, v)| (i, v.is_nan())),
            Some((2, true))
        );
        let bf16s: Vec<u8> = [f32::NEG_INFINITY, 3.0]
            .iter()
            .flat_map(|&v| half::bf16::from_f32(v).to_le_bytes())
            .collect();
        assert_eq!(
            first_non_finite(&bf16s, Dtype::BF16),
            Some((0, f32::NEG_INFINITY))
        );
        // Largest finite values have an exponent one short of all ones.
        let big: Vec<u8> = [f32::MAX, f32::MIN]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(&big, Dtype::F32), None);
        let big16: Vec<u8> = half::f16::MAX
            .to_le_bytes()
            .into_iter()
            .chain(half::bf16::MAX.to_le_bytes())
            .collect();
        assert_eq!(first_non_finite(&big16[..2], Dtype::F16), None);
        assert_eq!(first_non_finite(&big16[2..], Dtype::BF16), None);
    }
}
