//! A strict parser for safetensors headers, independent of the `safetensors` crate.
//!
//! The format: an 8-byte little-endian header length `n`, `n` bytes of UTF-8 JSON mapping
//! tensor names to `{dtype, shape, data_offsets}` (plus an optional `__metadata__` map of
//! strings), then the data area. Offsets are relative to the data area.
//!
//! Everything a hostile or damaged file can lie about is checked here, before any tensor
//! byte is touched: the length prefix, the JSON (duplicate keys included, which
//! `serde_json` would otherwise silently collapse), each tensor's offsets against its dtype
//! and shape, and that the tensors tile the data area exactly, with no overlap, hole or
//! trailing bytes (the same rule the reference implementation enforces).

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};

use crate::ordered_json::OrderedMap;

/// A header larger than this is refused before it is read: real headers are a few
/// hundred bytes per tensor, so 100 MB means a damaged or hostile file.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// Element types a safetensors file may declare.
///
/// All are parsed so a refusal can name them; only [`Dtype::F32`], [`Dtype::F16`] and
/// [`Dtype::BF16`] are accepted for LoRA factors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[non_exhaustive]
pub enum Dtype {
    #[serde(rename = "BOOL")]
    Bool,
    U8,
    I8,
    #[serde(rename = "F8_E5M2")]
    F8E5M2,
    #[serde(rename = "F8_E4M3")]
    F8E4M3,
    #[serde(rename = "F8_E8M0")]
    F8E8M0,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    /// Parses the dtype string exactly as safetensors writes it.
    pub fn parse(s: &str) -> Option<Dtype> {
        Some(match s {
            "BOOL" => Dtype::Bool,
            "U8" => Dtype::U8,
            "I8" => Dtype::I8,
            "F8_E5M2" => Dtype::F8E5M2,
            "F8_E4M3" => Dtype::F8E4M3,
            "F8_E8M0" => Dtype::F8E8M0,
            "I16" => Dtype::I16,
            "U16" => Dtype::U16,
            "F16" => Dtype::F16,
            "BF16" => Dtype::BF16,
            "I32" => Dtype::I32,
            "U32" => Dtype::U32,
            "F32" => Dtype::F32,
            "F64" => Dtype::F64,
            "I64" => Dtype::I64,
            "U64" => Dtype::U64,
            _ => return None,
        })
    }

    /// The name safetensors uses for this dtype.
    pub fn as_str(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Bytes per element.
    pub fn size_bytes(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 => 1,
            Dtype::F8E5M2 | Dtype::F8E4M3 | Dtype::F8E8M0 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// Whether moerge accepts this dtype for a LoRA factor.
    pub fn is_lora_float(self) -> bool {
        matches!(self, Dtype::F32 | Dtype::F16 | Dtype::BF16)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is wrong with a safetensors file's framing or header. The caller adds the path.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    #[error("file is truncated: it is {len} bytes, shorter than the 8-byte header length prefix")]
    TooShort { len: u64 },
    #[error("header length {claimed} is absurdly large (limit {MAX_HEADER_BYTES} bytes); the file is damaged or not safetensors")]
    TooLarge { claimed: u64 },
    #[error("file is truncated: the header claims {claimed} bytes but only {available} follow the length prefix")]
    HeaderTruncated { claimed: u64, available: u64 },
    #[error("header is not valid UTF-8 (first bad byte at header offset {offset})")]
    NotUtf8 { offset: usize },
    #[error("header is not valid JSON: {message}")]
    NotJson { message: String },
    #[error("header key {key:?}: {problem}")]
    BadEntry { key: String, problem: String },
    #[error("tensor {tensor}: data_offsets [{start}, {end}] end before they start")]
    OffsetsReversed {
        tensor: String,
        start: u64,
        end: u64,
    },
    #[error("tensor {tensor}: data_offsets [{start}, {end}] extend beyond the data area of {available} bytes; the file is truncated or its offsets are wrong")]
    DataTruncated {
        tensor: String,
        start: u64,
        end: u64,
        available: u64,
    },
    #[error("tensor {tensor}: data_offsets span {actual} bytes but dtype {dtype} with shape {shape:?} needs {expected}")]
    SizeMismatch {
        tensor: String,
        dtype: Dtype,
        shape: Vec<usize>,
        /// Saturates at `u64::MAX` when dtype size × shape overflows.
        expected: u64,
        actual: u64,
    },
    #[error("tensors {first} and {second} overlap in the data area (bytes {overlap_start}..{overlap_end})")]
    Overlap {
        first: String,
        second: String,
        overlap_start: u64,
        overlap_end: u64,
    },
    #[error(
        "data area bytes {start}..{end} belong to no tensor (safetensors data must be contiguous)"
    )]
    Gap { start: u64, end: u64 },
}

/// One tensor as the header declares it; `start..end` is relative to the data area.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub start: u64,
    pub end: u64,
}

/// A parsed and validated header.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Header {
    /// In the order the header lists them.
    pub tensors: Vec<TensorEntry>,
    /// `__metadata__`, kept only to report it.
    pub metadata: Vec<(String, String)>,
    /// Absolute file offset of the data area: `8 + n`.
    pub data_start: u64,
}

/// Reads the length prefix and checks it against the file length. Returns `n`.
pub(crate) fn header_len(prefix: &[u8], file_len: u64) -> Result<u64, HeaderError> {
    if file_len < 8 || prefix.len() < 8 {
        return Err(HeaderError::TooShort {
            len: file_len.min(prefix.len() as u64),
        });
    }
    let claimed = u64::from_le_bytes(prefix[..8].try_into().expect("8 bytes"));
    if claimed > MAX_HEADER_BYTES {
        return Err(HeaderError::TooLarge { claimed });
    }
    if claimed > file_len - 8 {
        return Err(HeaderError::HeaderTruncated {
            claimed,
            available: file_len - 8,
        });
    }
    Ok(claimed)
}

/// Parses the header JSON (the `n` bytes after the prefix) and validates every entry
/// against a data area of `data_len` bytes.
pub(crate) fn parse_header(json: &[u8], data_len: u64) -> Result<Header, HeaderError> {
    let text = std::str::from_utf8(json).map_err(|e| HeaderError::NotUtf8 {
        offset: e.valid_up_to(),
    })?;
    let entries: OrderedMap<serde_json::Value> =
        serde_json::from_str(text).map_err(|e| HeaderError::NotJson {
            message: e.to_string(),
        })?;

    let mut tensors = Vec::with_capacity(entries.0.len());
    let mut metadata = Vec::new();
    for (key, value) in entries.0 {
        if key == "__metadata__" {
            metadata = parse_metadata(&value)?;
        } else {
            tensors.push(parse_entry(key, &value, data_len)?);
        }
    }
    check_tiling(&tensors, data_len)?;
    Ok(Header {
        tensors,
        metadata,
        data_start: 8 + json.len() as u64,
    })
}

/// Parses a whole in-memory safetensors file (prefix, header, data).
pub(crate) fn parse_file(bytes: &[u8]) -> Result<Header, HeaderError> {
    let n = header_len(bytes, bytes.len() as u64)?;
    let end = 8 + n as usize;
    parse_header(&bytes[8..end], (bytes.len() - end) as u64)
}

fn parse_metadata(value: &serde_json::Value) -> Result<Vec<(String, String)>, HeaderError> {
    let bad = |problem: &str| HeaderError::BadEntry {
        key: "__metadata__".into(),
        problem: problem.into(),
    };
    let map = value
        .as_object()
        .ok_or_else(|| bad("must be an object of strings"))?;
    map.iter()
        .map(|(k, v)| match v.as_str() {
            Some(s) => Ok((k.clone(), s.to_owned())),
            None => Err(bad(&format!("value of {k:?} is not a string"))),
        })
        .collect()
}

fn parse_entry(
    name: String,
    value: &serde_json::Value,
    data_len: u64,
) -> Result<TensorEntry, HeaderError> {
    let bad = |problem: String| HeaderError::BadEntry {
        key: name.clone(),
        problem,
    };
    let obj = value
        .as_object()
        .ok_or_else(|| bad("must be an object with dtype, shape and data_offsets".into()))?;
    if let Some(extra) = obj
        .keys()
        .find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets"))
    {
        return Err(bad(format!("unknown field {extra:?}")));
    }
    let dtype_str = obj
        .get("dtype")
        .and_then(|v| v.as_str())
        .ok_or_else(|| bad("dtype missing or not a string".into()))?;
    let dtype =
        Dtype::parse(dtype_str).ok_or_else(|| bad(format!("unknown dtype {dtype_str:?}")))?;
    let shape = obj
        .get("shape")
        .and_then(|v| v.as_array())
        .ok_or_else(|| bad("shape missing or not an array".into()))?
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad("shape must hold non-negative integers".into()))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 2)
        .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
        .ok_or_else(|| bad("data_offsets must be two non-negative integers".into()))?;
    let (start, end) = offsets;
    if end < start {
        return Err(HeaderError::OffsetsReversed {
            tensor: name,
            start,
            end,
        });
    }
    if end > data_len {
        return Err(HeaderError::DataTruncated {
            tensor: name,
            start,
            end,
            available: data_len,
        });
    }
    // u128 so a shape whose product overflows cannot wrap around to the right size.
    let expected = shape
        .iter()
        .try_fold(dtype.size_bytes() as u128, |acc, &d| {
            acc.checked_mul(d as u128)
        });
    let actual = end - start;
    if expected != Some(actual as u128) {
        return Err(HeaderError::SizeMismatch {
            tensor: name,
            dtype,
            shape,
            expected: expected.map_or(u64::MAX, |e| u64::try_from(e).unwrap_or(u64::MAX)),
            actual,
        });
    }
    Ok(TensorEntry {
        name,
        dtype,
        shape,
        start,
        end,
    })
}

/// The tensors must cover `0..data_len` exactly once.
fn check_tiling(tensors: &[TensorEntry], data_len: u64) -> Result<(), HeaderError> {
    let mut order: Vec<&TensorEntry> = tensors.iter().filter(|t| t.end > t.start).collect();
    order.sort_by_key(|t| (t.start, t.end));
    let mut covered = 0u64;
    let mut last: Option<&TensorEntry> = None;
    for t in order {
        if t.start < covered {
            let prev = last.expect("covered > 0 implies a previous tensor");
            return Err(HeaderError::Overlap {
                first: prev.name.clone(),
                second: t.name.clone(),
                overlap_start: t.start,
                overlap_end: covered.min(t.end),
            });
        }
        if t.start > covered {
            return Err(HeaderError::Gap {
                start: covered,
                end: t.start,
            });
        }
        covered = t.end;
        last = Some(t);
    }
    if covered < data_len {
        return Err(HeaderError::Gap {
            start: covered,
            end: data_len,
        });
    }
    Ok(())
}

// `Dtype` deserialises from the safetensors string, for callers that read headers with serde.
impl<'de> Deserialize<'de> for Dtype {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dtype;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a safetensors dtype such as \"F32\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dtype, E> {
                Dtype::parse(s).ok_or_else(|| E::custom(format!("unknown dtype {s:?}")))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
#[path = "safetensors_header_tests.rs"]
mod tests;
