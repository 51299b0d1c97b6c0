//! Policy parameters: the schema a policy declares ([`ParamSpec`]) and the checked values it
//! receives ([`Params`]). Parsing `key=value` strings, applying defaults and type-checking
//! live here so the host, the testing harness and the plugin side of the ABI agree exactly.
//!
//! ```
//! use moerge_sdk::params::{ParamSpec, Params};
//! let specs = vec![
//!     ParamSpec::choice("space", &["lowrank", "exact"], "lowrank", "where to merge"),
//!     ParamSpec::int("steps", 100, "optimiser steps").min(1.0),
//!     ParamSpec::optional_int("svd_rank", "truncate the merged delta"),
//! ];
//! let params = Params::parse(&specs, &[("steps".into(), "20".into())]).unwrap();
//! assert_eq!(params.str("space").unwrap(), "lowrank");
//! assert_eq!(params.int("steps").unwrap(), 20);
//! assert_eq!(params.opt_int("svd_rank").unwrap(), None);
//! let err = Params::parse(&specs, &[("space".into(), "folded".into())]).unwrap_err();
//! assert!(err.to_string().contains("one of lowrank, exact"));
//! ```

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The type of a parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum ParamKind {
    Int,
    Float,
    Bool,
    String,
    /// One of a fixed list of words.
    Enum {
        choices: Vec<String>,
    },
}

impl fmt::Display for ParamKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamKind::Int => f.write_str("an integer"),
            ParamKind::Float => f.write_str("a number"),
            ParamKind::Bool => f.write_str("true or false"),
            ParamKind::String => f.write_str("a string"),
            ParamKind::Enum { choices } => write!(f, "one of {}", choices.join(", ")),
        }
    }
}

/// A checked parameter value. Enum values are [`ParamValue::String`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(v) => write!(f, "{v}"),
            ParamValue::Int(v) => write!(f, "{v}"),
            ParamValue::Float(v) => write!(f, "{v}"),
            ParamValue::String(v) => f.write_str(v),
        }
    }
}

/// One declared parameter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParamSpec {
    pub name: String,
    pub kind: ParamKind,
    /// `None`: optional, absent unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default: Option<ParamValue>,
    /// Inclusive bounds for numbers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// One sentence for `moerge policies show`.
    pub doc: String,
}

impl ParamSpec {
    fn new(name: &str, kind: ParamKind, default: Option<ParamValue>, doc: &str) -> ParamSpec {
        ParamSpec {
            name: name.to_owned(),
            kind,
            default,
            min: None,
            max: None,
            doc: doc.to_owned(),
        }
    }

    pub fn int(name: &str, default: i64, doc: &str) -> ParamSpec {
        Self::new(name, ParamKind::Int, Some(ParamValue::Int(default)), doc)
    }

    pub fn optional_int(name: &str, doc: &str) -> ParamSpec {
        Self::new(name, ParamKind::Int, None, doc)
    }

    pub fn float(name: &str, default: f64, doc: &str) -> ParamSpec {
        Self::new(
            name,
            ParamKind::Float,
            Some(ParamValue::Float(default)),
            doc,
        )
    }

    pub fn optional_float(name: &str, doc: &str) -> ParamSpec {
        Self::new(name, ParamKind::Float, None, doc)
    }

    pub fn bool(name: &str, default: bool, doc: &str) -> ParamSpec {
        Self::new(name, ParamKind::Bool, Some(ParamValue::Bool(default)), doc)
    }

    pub fn string(name: &str, default: &str, doc: &str) -> ParamSpec {
        let default = Some(ParamValue::String(default.to_owned()));
        Self::new(name, ParamKind::String, default, doc)
    }

    /// An enum parameter; `default` must be one of `choices`.
    pub fn choice(name: &str, choices: &[&str], default: &str, doc: &str) -> ParamSpec {
        let kind = ParamKind::Enum {
            choices: choices.iter().map(|c| (*c).to_owned()).collect(),
        };
        Self::new(
            name,
            kind,
            Some(ParamValue::String(default.to_owned())),
            doc,
        )
    }

    /// Sets an inclusive lower bound (numbers only).
    pub fn min(mut self, min: f64) -> ParamSpec {
        self.min = Some(min);
        self
    }

    /// Sets an inclusive upper bound (numbers only).
    pub fn max(mut self, max: f64) -> ParamSpec {
        self.max = Some(max);
        self
    }

    /// Parses the text a user typed after `name=`.
    pub fn parse_text(&self, text: &str) -> Result<ParamValue, ParamError> {
        let value = match &self.kind {
            ParamKind::Int => text.trim().parse().ok().map(ParamValue::Int),
            ParamKind::Float => text.trim().parse().ok().map(ParamValue::Float),
            ParamKind::Bool => match text.trim() {
                "true" | "yes" | "1" => Some(ParamValue::Bool(true)),
                "false" | "no" | "0" => Some(ParamValue::Bool(false)),
                _ => None,
            },
            ParamKind::String | ParamKind::Enum { .. } => Some(ParamValue::String(text.into())),
        };
        let value = value.ok_or_else(|| self.type_error(text))?;
        self.check(value)
    }

    /// Checks an already typed value (from JSON): kind, choices and bounds. An integer is
    /// accepted where a number is expected.
    pub fn check(&self, value: ParamValue) -> Result<ParamValue, ParamError> {
        let value = match (&self.kind, value) {
            (ParamKind::Int, v @ ParamValue::Int(_)) => v,
            (ParamKind::Float, ParamValue::Int(i)) => ParamValue::Float(i as f64),
            (ParamKind::Float, ParamValue::Float(x)) if x.is_finite() => ParamValue::Float(x),
            (ParamKind::Bool, v @ ParamValue::Bool(_)) => v,
            (ParamKind::String, v @ ParamValue::String(_)) => v,
            (ParamKind::Enum { choices }, ParamValue::String(s)) if choices.contains(&s) => {
                ParamValue::String(s)
            }
            (_, other) => return Err(self.type_error(&other.to_string())),
        };
        let number = match value {
            ParamValue::Int(i) => Some(i as f64),
            ParamValue::Float(x) => Some(x),
            _ => None,
        };
        if let Some(x) = number {
            let low = self.min.is_some_and(|m| x < m);
            let high = self.max.is_some_and(|m| x > m);
            if low || high {
                let bound = |b: Option<f64>| b.map_or("any".to_owned(), |b| b.to_string());
                return Err(ParamError::OutOfRange {
                    name: self.name.clone(),
                    value: x,
                    min: bound(self.min),
                    max: bound(self.max),
                });
            }
        }
        Ok(value)
    }

    fn type_error(&self, given: &str) -> ParamError {
        ParamError::Type {
            name: self.name.clone(),
            given: given.to_owned(),
            expected: self.kind.to_string(),
        }
    }
}

/// Why parameters are refused; every message names the parameter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ParamError {
    #[error("unknown parameter {name:?}; this policy takes: {known}")]
    Unknown { name: String, known: String },
    #[error("parameter {name} is given twice")]
    Duplicate { name: String },
    #[error("parameter {name}: {given:?} is not valid; expected {expected}")]
    Type {
        name: String,
        given: String,
        expected: String,
    },
    #[error("parameter {name}: {value} is out of range [{min}, {max}]")]
    OutOfRange {
        name: String,
        value: f64,
        min: String,
        max: String,
    },
    #[error("parameter {name} has no value: the policy declares no such parameter, or it has no default and was not given")]
    Missing { name: String },
    #[error("parameters are not a JSON object of values: {0}")]
    Json(String),
}

/// Parameter values after defaults were applied and types checked against the schema.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Params(BTreeMap<String, ParamValue>);

impl Params {
    /// Parses `key=value` pairs against `specs`: unknown or repeated keys, ill-typed values,
    /// out-of-range numbers and bad choices are errors naming the parameter.
    pub fn parse(specs: &[ParamSpec], given: &[(String, String)]) -> Result<Params, ParamError> {
        let mut values = BTreeMap::new();
        for (name, text) in given {
            let spec = find(specs, name)?;
            if values
                .insert(name.clone(), spec.parse_text(text)?)
                .is_some()
            {
                return Err(ParamError::Duplicate { name: name.clone() });
            }
        }
        Self::resolve(specs, values)
    }

    /// Checks typed values (from JSON) against `specs` and fills in defaults.
    pub fn resolve(
        specs: &[ParamSpec],
        given: BTreeMap<String, ParamValue>,
    ) -> Result<Params, ParamError> {
        let mut out = BTreeMap::new();
        for (name, value) in given {
            let value = find(specs, &name)?.check(value)?;
            out.insert(name, value);
        }
        for spec in specs {
            if let (false, Some(d)) = (out.contains_key(&spec.name), &spec.default) {
                out.insert(spec.name.clone(), d.clone());
            }
        }
        Ok(Params(out))
    }

    /// The values as a JSON object (what crosses the ABI).
    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).expect("parameter values serialise")
    }

    /// Reads a JSON object of values (not yet checked: see [`Params::resolve`]).
    pub fn values_from_json(text: &str) -> Result<BTreeMap<String, ParamValue>, ParamError> {
        serde_json::from_str(text).map_err(|e| ParamError::Json(e.to_string()))
    }

    /// Every value, by name.
    pub fn values(&self) -> &BTreeMap<String, ParamValue> {
        &self.0
    }

    pub fn get(&self, name: &str) -> Option<&ParamValue> {
        self.0.get(name)
    }

    /// An integer parameter that has a value (given or default).
    pub fn int(&self, name: &str) -> Result<i64, ParamError> {
        self.opt_int(name)?
            .ok_or_else(|| ParamError::Missing { name: name.into() })
    }

    pub fn opt_int(&self, name: &str) -> Result<Option<i64>, ParamError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(ParamValue::Int(i)) => Ok(Some(*i)),
            Some(other) => Err(wrong(name, other, "an integer")),
        }
    }

    pub fn float(&self, name: &str) -> Result<f64, ParamError> {
        self.opt_float(name)?
            .ok_or_else(|| ParamError::Missing { name: name.into() })
    }

    pub fn opt_float(&self, name: &str) -> Result<Option<f64>, ParamError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(ParamValue::Float(x)) => Ok(Some(*x)),
            Some(ParamValue::Int(i)) => Ok(Some(*i as f64)),
            Some(other) => Err(wrong(name, other, "a number")),
        }
    }

    pub fn bool(&self, name: &str) -> Result<bool, ParamError> {
        match self.0.get(name) {
            None => Err(ParamError::Missing { name: name.into() }),
            Some(ParamValue::Bool(b)) => Ok(*b),
            Some(other) => Err(wrong(name, other, "true or false")),
        }
    }

    /// A string or enum parameter.
    pub fn str(&self, name: &str) -> Result<&str, ParamError> {
        match self.0.get(name) {
            None => Err(ParamError::Missing { name: name.into() }),
            Some(ParamValue::String(s)) => Ok(s),
            Some(other) => Err(wrong(name, other, "a string")),
        }
    }
}

fn find<'s>(specs: &'s [ParamSpec], name: &str) -> Result<&'s ParamSpec, ParamError> {
    specs
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| ParamError::Unknown {
            name: name.to_owned(),
            known: if specs.is_empty() {
                "no parameters".to_owned()
            } else {
                let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
                names.join(", ")
            },
        })
}

fn wrong(name: &str, value: &ParamValue, expected: &str) -> ParamError {
    ParamError::Type {
        name: name.to_owned(),
        given: value.to_string(),
        expected: expected.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ParamSpec> {
        vec![
            ParamSpec::choice("space", &["lowrank", "exact", "folded"], "lowrank", "space"),
            ParamSpec::int("top_k", 4, "k").min(1.0),
            ParamSpec::float("temperature", 1.0, "t").min(0.0),
            ParamSpec::bool("learned", false, "b"),
            ParamSpec::optional_int("svd_rank", "r"),
            ParamSpec::float("sparsity", 0.5, "s").min(0.0).max(0.99),
        ]
    }

    fn check(given: &[(&str, &str)], expected: Result<&[(&str, ParamValue)], &[&str]>) {
        let given: Vec<(String, String)> = given
            .iter()
            .map(|(k, v)| ((*k).into(), (*v).into()))
            .collect();
        match (Params::parse(&specs(), &given), expected) {
            (Ok(params), Ok(want)) => {
                for (name, value) in want {
                    assert_eq!(params.get(name), Some(value), "{name}");
                }
                // What crosses the ABI resolves to the same values.
                let again = Params::values_from_json(&params.to_json()).unwrap();
                assert_eq!(Params::resolve(&specs(), again).unwrap(), params);
            }
            (Err(e), Err(words)) => {
                let msg = e.to_string();
                for w in words {
                    assert!(msg.contains(w), "{msg:?} lacks {w:?}");
                }
            }
            (got, want) => panic!("{given:?}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn parses_defaults_and_refusals() {
        use ParamValue::*;
        check(
            &[],
            Ok(&[
                ("space", String("lowrank".into())),
                ("top_k", Int(4)),
                ("temperature", Float(1.0)),
                ("learned", Bool(false)),
            ]),
        );
        check(&[("svd_rank", "8")], Ok(&[("svd_rank", Int(8))]));
        check(
            &[("temperature", "2"), ("learned", "yes"), ("space", "exact")],
            Ok(&[
                ("temperature", Float(2.0)),
                ("learned", Bool(true)),
                ("space", String("exact".into())),
            ]),
        );
        check(
            &[("space", "sideways")],
            Err(&["space", "sideways", "one of lowrank, exact, folded"]),
        );
        check(
            &[("top_k", "two")],
            Err(&["top_k", "\"two\"", "an integer"]),
        );
        check(&[("top_k", "0")], Err(&["top_k", "out of range"]));
        check(&[("sparsity", "1.5")], Err(&["sparsity", "0.99"]));
        check(&[("learned", "maybe")], Err(&["learned", "true or false"]));
        check(
            &[("topk", "2")],
            Err(&["unknown parameter \"topk\"", "top_k, temperature"]),
        );
        check(&[("top_k", "2"), ("top_k", "3")], Err(&["top_k", "twice"]));
    }

    #[test]
    fn typed_accessors_name_the_parameter() {
        let params = Params::parse(&specs(), &[]).unwrap();
        assert_eq!(params.float("top_k").unwrap(), 4.0);
        assert!(params
            .int("svd_rank")
            .unwrap_err()
            .to_string()
            .contains("svd_rank"));
        assert!(params
            .str("top_k")
            .unwrap_err()
            .to_string()
            .contains("a string"));
        let json = serde_json::to_string(&specs()).unwrap();
        assert_eq!(
            serde_json::from_str::<Vec<ParamSpec>>(&json).unwrap(),
            specs()
        );
    }
}
