//! Reading Hugging Face `config.json` files: rotary settings in both the older top-level keys
//! and transformers 5's `rope_parameters` object.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::{EngineError, Result};

/// How positions are encoded by rotary embeddings.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RopeSettings {
    pub theta: f64,
    pub partial_rotary_factor: f64,
    pub scaling: RopeScaling,
}

/// The rotary scalings this engine implements.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RopeScaling {
    None,
    /// Positions divided by `factor` (transformers' "linear").
    Linear {
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// Deserialises the family's config struct, naming the file and the field on failure.
pub(crate) fn parse<T: DeserializeOwned>(json: &Value, path: &Path) -> Result<T> {
    serde_json::from_value(json.clone()).map_err(|e| EngineError::Config {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Rotary settings: `rope_parameters` (transformers 5) wins over the older top-level
/// `rope_theta`, `partial_rotary_factor` and `rope_scaling`.
pub(crate) fn rope_settings(json: &Value, path: &Path) -> Result<RopeSettings> {
    let params = json.get("rope_parameters").filter(|v| v.is_object());
    let lookup = |key: &str| -> Option<&Value> {
        params
            .and_then(|p| p.get(key))
            .filter(|v| !v.is_null())
            .or_else(|| json.get(key).filter(|v| !v.is_null()))
    };
    let number = |key: &str, default: f64| -> Result<f64> {
        match lookup(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| EngineError::Config {
                path: path.to_path_buf(),
                message: format!("key {key} must be a number, found {v}"),
            }),
        }
    };
    let theta = number("rope_theta", 10_000.0)?;
    let partial_rotary_factor = number("partial_rotary_factor", 1.0)?;
    // Older configs put the scaling in `rope_scaling`; transformers 5 folds it into
    // `rope_parameters` next to `rope_type`.
    let scaling_obj = json
        .get("rope_scaling")
        .filter(|v| v.is_object())
        .or(params);
    let scaling = match scaling_obj {
        None => RopeScaling::None,
        Some(obj) => {
            let kind = obj
                .get("rope_type")
                .or_else(|| obj.get("type"))
                .and_then(Value::as_str)
                .unwrap_or("default");
            let field = |key: &str| -> Result<f64> {
                obj.get(key)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| EngineError::Config {
                        path: path.to_path_buf(),
                        message: format!("rope_type \"{kind}\" needs a numeric \"{key}\""),
                    })
            };
            match kind {
                "default" => RopeScaling::None,
                "linear" => RopeScaling::Linear {
                    factor: field("factor")?,
                },
                "llama3" => RopeScaling::Llama3 {
                    factor: field("factor")?,
                    low_freq_factor: field("low_freq_factor")?,
                    high_freq_factor: field("high_freq_factor")?,
                    original_max_position_embeddings: field("original_max_position_embeddings")?,
                },
                other => {
                    return Err(EngineError::Config {
                        path: path.to_path_buf(),
                        message: format!(
                            "rope_type \"{other}\" is not supported (supported: default, linear, llama3)"
                        ),
                    })
                }
            }
        }
    };
    Ok(RopeSettings {
        theta,
        partial_rotary_factor,
        scaling,
    })
}

impl RopeSettings {
    /// Inverse frequencies for `rotary_dim` channels, with the scaling applied.
    pub(crate) fn inv_freq(&self, rotary_dim: usize) -> Vec<f64> {
        let base = crate::nn::default_inv_freq(rotary_dim, self.theta);
        match self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.into_iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: orig,
            } => {
                let low_wavelen = orig / low_freq_factor;
                let high_wavelen = orig / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (orig / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str, theta: f64, partial: f64, scaling: RopeScaling) {
        let v: Value = serde_json::from_str(json).unwrap();
        let got = rope_settings(&v, Path::new("config.json")).unwrap();
        assert_eq!(
            got,
            RopeSettings {
                theta,
                partial_rotary_factor: partial,
                scaling
            }
        );
    }

    #[test]
    fn rope_keys_old_and_new() {
        check("{}", 10_000.0, 1.0, RopeScaling::None);
        check(
            r#"{"rope_theta": 500.0, "partial_rotary_factor": 0.5}"#,
            500.0,
            0.5,
            RopeScaling::None,
        );
        check(
            r#"{"rope_parameters": {"rope_theta": 50000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}}"#,
            50_000.0,
            0.25,
            RopeScaling::None,
        );
        check(
            r#"{"rope_theta": 1.0, "rope_parameters": {"rope_theta": 2.0, "rope_type": "linear", "factor": 4.0}}"#,
            2.0,
            1.0,
            RopeScaling::Linear { factor: 4.0 },
        );
        check(
            r#"{"rope_scaling": {"type": "linear", "factor": 2.0}}"#,
            10_000.0,
            1.0,
            RopeScaling::Linear { factor: 2.0 },
        );
    }

    #[test]
    fn unknown_rope_type_is_named() {
        let v: Value =
            serde_json::from_str(r#"{"rope_parameters": {"rope_type": "yarn"}}"#).unwrap();
        let err = rope_settings(&v, Path::new("/m/config.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/m/config.json") && err.contains("yarn"),
            "{err}"
        );
    }
}
