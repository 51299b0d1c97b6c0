//! Plan tensor files: the large tensors of a plan (learned router matrices, the factors of
//! fixed modules) in one f32 safetensors file named by its own content hash,
//! `<hash>.safetensors`, kept next to the plan that names the hash. Content addressing
//! makes the file immutable: a plan can never silently run on changed tensors.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::safetensors_header::{self, Dtype, HeaderError};

/// One f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct F32Tensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A plan's tensors by name.
pub type TensorMap = BTreeMap<String, F32Tensor>;

/// Why a tensor file cannot be written or read; every message names the file.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TensorFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: the plan's tensor file is missing; copy it next to the plan (it is named by the plan's \"tensors\" hash)")]
    Missing { path: PathBuf },
    #[error("{path}: content hash is {found}, not the {expected} the plan names; the file was changed or replaced")]
    HashMismatch {
        path: PathBuf,
        expected: String,
        found: String,
    },
    #[error("{path}: {source}")]
    Header { path: PathBuf, source: HeaderError },
    #[error("{path}: tensor {tensor} is {dtype}; plan tensors must be F32")]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: &'static str,
    },
    #[error("tensor {tensor}: {values} values do not fill shape {shape:?}")]
    Shape {
        tensor: String,
        shape: Vec<usize>,
        values: usize,
    },
    #[error("tensor {tensor}: value {value} at index {index} is not finite")]
    NotFinite {
        tensor: String,
        index: usize,
        value: f32,
    },
}

/// The content hash of a tensor file's bytes: lowercase hex of blake3.
pub fn tensor_file_hash(bytes: &[u8]) -> String {
    blake3::hash(bytes).to_hex().to_string()
}

/// The path of the tensor file with `hash` in `dir`.
pub fn tensor_file_path(dir: &Path, hash: &str) -> PathBuf {
    dir.join(format!("{hash}.safetensors"))
}

/// The bytes of the tensor file holding `tensors` (deterministic: the same tensors always give
/// the same bytes, hence the same hash). Refuses wrong sizes and non-finite values.
pub fn tensor_file_bytes(tensors: &TensorMap) -> Result<Vec<u8>, TensorFileError> {
    let mut raw: Vec<(&String, &F32Tensor, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let expected: usize = t.shape.iter().product();
        if expected != t.data.len() {
            return Err(TensorFileError::Shape {
                tensor: name.clone(),
                shape: t.shape.clone(),
                values: t.data.len(),
            });
        }
        if let Some(index) = t.data.iter().position(|v| !v.is_finite()) {
            return Err(TensorFileError::NotFinite {
                tensor: name.clone(),
                index,
                value: t.data[index],
            });
        }
        raw.push((
            name,
            t,
            t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ));
    }
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = raw
        .iter()
        .map(|(name, t, bytes)| {
            let view = safetensors::tensor::TensorView::new(
                safetensors::Dtype::F32,
                t.shape.clone(),
                bytes,
            )
            .expect("sizes checked above");
            ((*name).clone(), view)
        })
        .collect();
    safetensors::serialize(views, None).map_err(|e| TensorFileError::Io {
        path: PathBuf::new(),
        source: std::io::Error::other(e.to_string()),
    })
}

/// Writes `tensors` to `dir/<hash>.safetensors` (atomically: a temporary file renamed into
/// place) and returns the hash. Writing the same tensors twice is a no-op.
pub fn write_tensor_file(dir: &Path, tensors: &TensorMap) -> Result<String, TensorFileError> {
    write_tensor_file_bytes(dir, &tensor_file_bytes(tensors)?)
}

/// Writes a tensor file's bytes (from [`tensor_file_bytes`]) to `dir/<hash>.safetensors`,
/// atomically, and returns the hash.
pub fn write_tensor_file_bytes(dir: &Path, bytes: &[u8]) -> Result<String, TensorFileError> {
    let hash = tensor_file_hash(bytes);
    let path = tensor_file_path(dir, &hash);
    if path.exists() {
        return Ok(hash);
    }
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| TensorFileError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let staging = dir.join(format!(".{hash}.partial-{}", std::process::id()));
    let mut file = std::fs::File::create(&staging).map_err(io(&staging))?;
    file.write_all(bytes).map_err(io(&staging))?;
    file.sync_all().map_err(io(&staging))?;
    std::fs::rename(&staging, &path).map_err(io(&path))?;
    Ok(hash)
}

/// Reads `dir/<hash>.safetensors`, checking its hash, its framing and that every tensor is
/// finite f32.
pub fn read_tensor_file(dir: &Path, hash: &str) -> Result<TensorMap, TensorFileError> {
    let path = tensor_file_path(dir, hash);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(TensorFileError::Missing { path })
        }
        Err(source) => return Err(TensorFileError::Io { path, source }),
    };
    parse_tensor_file(&path, &bytes, hash)
}

/// A tensor file's content from its bytes (kept elsewhere, e.g. in the daemon's index),
/// with the same checks as [`read_tensor_file`]; `path` only names it in errors.
pub fn parse_tensor_file(
    path: &Path,
    bytes: &[u8],
    hash: &str,
) -> Result<TensorMap, TensorFileError> {
    let path = path.to_path_buf();
    let found = tensor_file_hash(bytes);
    if found != hash {
        return Err(TensorFileError::HashMismatch {
            path,
            expected: hash.to_string(),
            found,
        });
    }
    let header =
        safetensors_header::parse_file(bytes).map_err(|source| TensorFileError::Header {
            path: path.clone(),
            source,
        })?;
    let mut out = TensorMap::new();
    for entry in header.tensors {
        if entry.dtype != Dtype::F32 {
            return Err(TensorFileError::Dtype {
                path,
                tensor: entry.name,
                dtype: entry.dtype.as_str(),
            });
        }
        let start = (header.data_start + entry.start) as usize;
        let end = (header.data_start + entry.end) as usize;
        let data: Vec<f32> = bytes[start..end]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        if let Some(index) = data.iter().position(|v| !v.is_finite()) {
            return Err(TensorFileError::NotFinite {
                tensor: entry.name,
                index,
                value: data[index],
            });
        }
        out.insert(
            entry.name,
            F32Tensor {
                shape: entry.shape,
                data,
            },
        );
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> TensorMap {
        TensorMap::from([
            (
                "m.router.weight".to_string(),
                F32Tensor {
                    shape: vec![2, 3],
                    data: vec![1.0, -2.0, 3.5, 0.0, 0.25, -1.0],
                },
            ),
            (
                "m.router.bias".to_string(),
                F32Tensor {
                    shape: vec![2],
                    data: vec![0.5, -0.5],
                },
            ),
        ])
    }

    #[test]
    fn tensor_files_round_trip_and_are_content_addressed() {
        let dir = tempfile::tempdir().unwrap();
        let hash = write_tensor_file(dir.path(), &sample()).unwrap();
        assert_eq!(hash.len(), 64);
        assert_eq!(read_tensor_file(dir.path(), &hash).unwrap(), sample());
        // Same tensors, same file; the hash is of the bytes on disk.
        assert_eq!(write_tensor_file(dir.path(), &sample()).unwrap(), hash);
        let bytes = std::fs::read(tensor_file_path(dir.path(), &hash)).unwrap();
        assert_eq!(tensor_file_hash(&bytes), hash);
        // The safetensors crate reads what we wrote.
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        assert_eq!(st.tensor("m.router.weight").unwrap().shape(), &[2, 3]);
    }

    #[test]
    fn damaged_missing_or_bad_tensors_are_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let hash = write_tensor_file(dir.path(), &sample()).unwrap();
        let path = tensor_file_path(dir.path(), &hash);
        let mut bytes = std::fs::read(&path).unwrap();
        *bytes.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_tensor_file(dir.path(), &hash).unwrap_err().to_string();
        assert!(
            err.contains(&hash[..12]) && err.contains("changed"),
            "{err}"
        );
        std::fs::remove_file(&path).unwrap();
        let err = read_tensor_file(dir.path(), &hash).unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");

        let mut bad = sample();
        bad.get_mut("m.router.bias").unwrap().data[1] = f32::NAN;
        let err = write_tensor_file(dir.path(), &bad).unwrap_err().to_string();
        assert!(
            err.contains("m.router.bias") && err.contains("index 1"),
            "{err}"
        );
        let mut bad = sample();
        bad.get_mut("m.router.weight").unwrap().shape = vec![4, 3];
        let err = write_tensor_file(dir.path(), &bad).unwrap_err().to_string();
        assert!(
            err.contains("m.router.weight") && err.contains("[4, 3]"),
            "{err}"
        );
    }
}
