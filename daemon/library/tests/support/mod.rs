//! Test support: where the PEFT fixtures are, and a safetensors reader and writer of the
//! tests' own, so the tests never trust the code under test to build their inputs.
#![allow(dead_code)] // Each test binary uses a different part of this module.

use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

/// `$MOERGE_FIXTURES`, else `<workspace root>/../shared/fixtures`.
pub fn fixtures() -> PathBuf {
    let dir = match std::env::var_os("MOERGE_FIXTURES") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"),
    };
    assert!(
        dir.join("dev-phi").is_dir(),
        "PEFT fixtures not found at {} (set MOERGE_FIXTURES)",
        dir.display()
    );
    dir
}

pub fn base_dir(model: &str) -> PathBuf {
    fixtures().join(model)
}

pub fn adapter_dir(model: &str, task: &str) -> PathBuf {
    fixtures().join(model).join("adapters").join(task)
}

pub fn adapter_names(model: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures().join(model).join("adapters"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Copies an adapter folder into `dest` as writable files (the fixtures are read-only).
pub fn copy_adapter(src: &Path, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        std::fs::write(
            dest.join(entry.file_name()),
            std::fs::read(entry.path()).unwrap(),
        )
        .unwrap();
    }
}

pub fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

pub fn write_json(path: &Path, value: &Value) {
    std::fs::write(path, serde_json::to_vec_pretty(value).unwrap()).unwrap();
}

/// One tensor: name, dtype string, shape, raw little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

impl Tensor {
    pub fn f32(name: &str, shape: &[usize], values: &[f32]) -> Tensor {
        assert_eq!(shape.iter().product::<usize>(), values.len());
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Tensor {
            name: name.into(),
            dtype: "F32".into(),
            shape: shape.to_vec(),
            data,
        }
    }

    /// The values, for F32 tensors.
    pub fn values(&self) -> Vec<f32> {
        assert_eq!(self.dtype, "F32");
        self.data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }
}

/// The header JSON (as a map) and the data area of a safetensors file.
pub fn read_raw(path: &Path) -> (Map<String, Value>, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Map<String, Value> = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

/// Writes a header map and a data area as they are, lies included.
pub fn write_raw(path: &Path, header: &Map<String, Value>, data: &[u8]) {
    let json = serde_json::to_vec(header).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    std::fs::write(path, out).unwrap();
}

/// All tensors of a safetensors file, in offset order.
pub fn read_tensors(path: &Path) -> Vec<Tensor> {
    let (header, data) = read_raw(path);
    let mut tensors: Vec<(u64, Tensor)> = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(name, v)| {
            let off: Vec<u64> = serde_json::from_value(v["data_offsets"].clone()).unwrap();
            let tensor = Tensor {
                name: name.clone(),
                dtype: v["dtype"].as_str().unwrap().to_owned(),
                shape: serde_json::from_value(v["shape"].clone()).unwrap(),
                data: data[off[0] as usize..off[1] as usize].to_vec(),
            };
            (off[0], tensor)
        })
        .collect();
    tensors.sort_by_key(|(start, _)| *start);
    tensors.into_iter().map(|(_, t)| t).collect()
}

/// Writes a well-formed safetensors file: tensors packed in the given order.
pub fn write_tensors(path: &Path, tensors: &[Tensor]) {
    let mut header = Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut data = Vec::new();
    for t in tensors {
        let start = data.len();
        data.extend_from_slice(&t.data);
        header.insert(
            t.name.clone(),
            json!({"dtype": t.dtype, "shape": t.shape, "data_offsets": [start, data.len()]}),
        );
    }
    write_raw(path, &header, &data);
}

/// Deterministic small values, different for each seed.
pub fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n)
        .map(|i| {
            (((i as u32).wrapping_mul(2654435761).wrapping_add(seed * 97)) % 2001) as f32 / 1000.0
                - 1.0
        })
        .collect()
}
