//! The optional sidecar `moerge.json` beside an adapter's two PEFT files: which task(s) the
//! expert was trained on, and what kind of expert it is. It is not part of the content hash.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::AdapterError;

/// File name of the sidecar inside an adapter folder.
pub const METADATA_FILE: &str = "moerge.json";

/// What an expert was trained for.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct ExpertMetadata {
    /// Task names of the training data (one for a private expert, several for a cluster or
    /// shared expert).
    #[serde(default)]
    pub tasks: Vec<String>,
    /// Free-form kind, e.g. "private", "cluster", "shared".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// The task family or cluster it belongs to, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
}

impl ExpertMetadata {
    /// Reads `moerge.json` from an adapter folder: `Ok(None)` when there is none.
    pub fn read(dir: &Path) -> Result<Option<ExpertMetadata>, AdapterError> {
        let path = dir.join(METADATA_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(AdapterError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AdapterError::ConfigNotJson {
                path,
                message: e.to_string(),
            })
    }

    /// Writes `moerge.json` into an adapter folder.
    pub fn write(&self, dir: &Path) -> Result<(), AdapterError> {
        let path = dir.join(METADATA_FILE);
        let json = serde_json::to_vec_pretty(self).expect("metadata serialises");
        std::fs::write(&path, json).map_err(|source| AdapterError::Io { path, source })
    }
}
