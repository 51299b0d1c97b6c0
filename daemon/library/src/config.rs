//! `adapter_config.json`: the PEFT LoRA settings moerge honours, parsed strictly, and PEFT's
//! rules for which modules an adapter targets and which rank and alpha each one gets.
//!
//! Matching follows PEFT (`peft.tuners.tuners_utils.check_target_module_exists` and
//! `peft.utils.other.get_pattern_key`):
//! - `target_modules` as a list selects a module whose name equals an entry or ends with
//!   `"." + entry`; as a string it is a regex that must match the whole name; `"all-linear"`
//!   selects every linear layer (checked against the base model later).
//! - a `rank_pattern` / `alpha_pattern` key `k` applies to a module when the regex
//!   `(.*\.)?(k)$` matches the whole name; the first key in file order wins.
//!
//! `fan_in_fan_out` is accepted and has no effect: it describes the *base* layer's weight
//! layout (GPT-2's `Conv1D`), the saved factors are always `A: [r, in]`, `B: [out, r]`, and for
//! `nn.Linear` bases PEFT itself resets it to false.

use std::path::Path;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::AdapterError;
use crate::ordered_json::OrderedMap;

/// Which modules an adapter says it adapts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum TargetModules {
    /// Module names or name suffixes (after a `.`).
    Names(Vec<String>),
    /// A regular expression that must match the whole module name.
    Regex(String),
    /// PEFT's `"all-linear"` shorthand.
    #[serde(serialize_with = "all_linear")]
    AllLinear,
}

fn all_linear<S: serde::Serializer>(s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("all-linear")
}

/// A parsed `adapter_config.json`. Fields moerge does not interpret stay in [`raw`](Self::raw).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct AdapterConfig {
    pub peft_type: String,
    pub r: usize,
    pub lora_alpha: f64,
    pub use_rslora: bool,
    pub use_dora: bool,
    pub fan_in_fan_out: bool,
    pub target_modules: TargetModules,
    /// In file order, which decides the match (first wins).
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub modules_to_save: Vec<String>,
    pub base_model_name_or_path: Option<String>,
    pub task_type: Option<String>,
    /// The whole file as JSON.
    pub raw: Value,
    matchers: Matchers,
}

#[derive(Debug, Clone)]
struct Matchers {
    target: Selector,
    exclude: Option<Selector>,
    rank: Vec<Regex>,
    alpha: Vec<Regex>,
    layers_to_transform: Option<LayerFilter>,
}

/// `layers_to_transform`: the layer indices, and the patterns that find a module's index.
type LayerFilter = (Vec<u64>, Vec<Regex>);

#[derive(Debug, Clone)]
enum Selector {
    Names(Vec<String>),
    Regex(Regex),
    All,
}

impl Selector {
    fn matches(&self, module: &str) -> bool {
        match self {
            Selector::Names(names) => names.iter().any(|n| {
                module == n
                    || (module.ends_with(n.as_str())
                        && module[..module.len() - n.len()].ends_with('.'))
            }),
            Selector::Regex(re) => re.is_match(module),
            Selector::All => true,
        }
    }
}

/// The fields whose key order matters, read a second time in file order.
#[derive(Deserialize)]
struct PatternFields {
    #[serde(default)]
    rank_pattern: Option<OrderedMap<Value>>,
    #[serde(default)]
    alpha_pattern: Option<OrderedMap<Value>>,
}

impl AdapterConfig {
    /// Parses and type-checks the file; unsupported features are refused separately by
    /// [`check_supported`](Self::check_supported) so `inspect` can still report them.
    pub(crate) fn parse(path: &Path, bytes: &[u8]) -> Result<AdapterConfig, AdapterError> {
        let not_json = |e: serde_json::Error| AdapterError::ConfigNotJson {
            path: path.to_owned(),
            message: e.to_string(),
        };
        // Ordered first so a duplicated key is an error instead of "last one wins".
        let top: OrderedMap<Value> = serde_json::from_slice(bytes).map_err(not_json)?;
        let raw = Value::Object(top.0.into_iter().collect());
        let patterns: PatternFields = serde_json::from_slice(bytes).map_err(not_json)?;
        let key_err = |key: &str, problem: &str| AdapterError::ConfigKey {
            path: path.to_owned(),
            key: key.to_owned(),
            problem: problem.to_owned(),
        };
        let field = |key: &str| raw.get(key).filter(|v| !v.is_null());
        let flag = |key: &str| match field(key) {
            None => Ok(false),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| key_err(key, "must be true or false")),
        };
        let opt_str = |key: &str| match field(key) {
            None => Ok(None),
            Some(v) => v
                .as_str()
                .map(|s| Some(s.to_owned()))
                .ok_or_else(|| key_err(key, "must be a string")),
        };

        let peft_type = opt_str("peft_type")?.ok_or_else(|| key_err("peft_type", "is missing"))?;
        let r = field("r")
            .ok_or_else(|| key_err("r", "is missing"))?
            .as_u64()
            .and_then(|r| usize::try_from(r).ok())
            .filter(|&r| r > 0)
            .ok_or_else(|| key_err("r", "must be a positive integer"))?;
        let lora_alpha = field("lora_alpha")
            .ok_or_else(|| key_err("lora_alpha", "is missing"))?
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| key_err("lora_alpha", "must be a finite number"))?;

        let (target_modules, target) =
            match field("target_modules") {
                None => return Err(key_err(
                    "target_modules",
                    "is missing or null; moerge needs to know which modules the adapter targets",
                )),
                Some(v) => parse_selector(path, "target_modules", v)?,
            };
        let exclude = field("exclude_modules")
            .map(|v| parse_selector(path, "exclude_modules", v))
            .transpose()?
            .map(|(_, s)| s);

        let mut rank_pattern = Vec::new();
        let mut alpha_pattern = Vec::new();
        let mut rank_re = Vec::new();
        let mut alpha_re = Vec::new();
        for (k, v) in patterns.rank_pattern.map(|m| m.0).unwrap_or_default() {
            let rank = v
                .as_u64()
                .and_then(|r| usize::try_from(r).ok())
                .filter(|&r| r > 0);
            let rank = rank.ok_or_else(|| {
                key_err(
                    "rank_pattern",
                    &format!("entry {k:?} must be a positive integer"),
                )
            })?;
            rank_re.push(pattern_regex(path, "rank_pattern", &k)?);
            rank_pattern.push((k, rank));
        }
        for (k, v) in patterns.alpha_pattern.map(|m| m.0).unwrap_or_default() {
            let alpha = v.as_f64().filter(|a| a.is_finite());
            let alpha = alpha.ok_or_else(|| {
                key_err(
                    "alpha_pattern",
                    &format!("entry {k:?} must be a finite number"),
                )
            })?;
            alpha_re.push(pattern_regex(path, "alpha_pattern", &k)?);
            alpha_pattern.push((k, alpha));
        }

        let modules_to_save = match field("modules_to_save") {
            None => Vec::new(),
            Some(v) => v
                .as_array()
                .and_then(|a| {
                    a.iter()
                        .map(|m| m.as_str().map(str::to_owned))
                        .collect::<Option<Vec<_>>>()
                })
                .ok_or_else(|| key_err("modules_to_save", "must be a list of strings"))?,
        };
        let layers_to_transform = parse_layers(path, &raw, &target)?;

        Ok(AdapterConfig {
            peft_type,
            r,
            lora_alpha,
            use_rslora: flag("use_rslora")?,
            use_dora: flag("use_dora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            target_modules,
            rank_pattern,
            alpha_pattern,
            modules_to_save,
            base_model_name_or_path: opt_str("base_model_name_or_path")?,
            task_type: opt_str("task_type")?,
            matchers: Matchers {
                target,
                exclude,
                rank: rank_re,
                alpha: alpha_re,
                layers_to_transform,
            },
            raw,
        })
    }

    /// Refuses the PEFT features moerge cannot honour, each by name, never by dropping them.
    pub(crate) fn check_supported(&self, path: &Path) -> Result<(), AdapterError> {
        let path = path.to_owned();
        if self.peft_type != "LORA" {
            return Err(AdapterError::UnsupportedPeftType {
                path,
                peft_type: self.peft_type.clone(),
            });
        }
        if self.use_dora {
            return Err(AdapterError::Dora { path });
        }
        if !self.modules_to_save.is_empty() {
            return Err(AdapterError::ModulesToSave {
                path,
                modules: self.modules_to_save.clone(),
            });
        }
        let set = |key: &str| self.raw.get(key).filter(|v| !is_empty(v));
        if let Some(v) = set("trainable_token_indices") {
            return Err(AdapterError::TrainableTokens {
                path,
                value: v.to_string(),
            });
        }
        let unsupported: [(&str, &str); 4] = [
            ("alora_invocation_tokens", "activated LoRA (aLoRA) applies only after invocation tokens, while moerge applies adapters to every token"),
            ("layer_replication", "layer replication changes the base model's layer stack, which moerge does not do"),
            ("target_parameters", "LoRA on raw parameters (target_parameters) is not a LoRA on linear layers"),
            ("use_qalora", "QA-LoRA pools the input before lora_A, which moerge does not do"),
        ];
        for (key, why) in unsupported {
            if let Some(v) = set(key).filter(|v| v.as_bool() != Some(false)) {
                return Err(AdapterError::UnsupportedOption {
                    path,
                    key: key.into(),
                    value: v.to_string(),
                    why: why.into(),
                });
            }
        }
        Ok(())
    }

    /// Whether PEFT would have put a LoRA layer on `module`.
    pub fn targets(&self, module: &str) -> bool {
        let m = &self.matchers;
        if m.exclude.as_ref().is_some_and(|e| e.matches(module)) || !m.target.matches(module) {
            return false;
        }
        match &m.layers_to_transform {
            None => true,
            Some((layers, patterns)) => {
                layer_index(module, patterns).is_some_and(|i| layers.contains(&i))
            }
        }
    }

    /// The rank PEFT gives `module`, and the config key it comes from (`r` or
    /// `rank_pattern[<key>]`), for error messages.
    pub fn rank_for(&self, module: &str) -> (usize, String) {
        match first_match(&self.matchers.rank, module) {
            Some(i) => (
                self.rank_pattern[i].1,
                format!("rank_pattern[{:?}]", self.rank_pattern[i].0),
            ),
            None => (self.r, "r".to_owned()),
        }
    }

    /// The `lora_alpha` PEFT gives `module`.
    pub fn alpha_for(&self, module: &str) -> f64 {
        first_match(&self.matchers.alpha, module)
            .map_or(self.lora_alpha, |i| self.alpha_pattern[i].1)
    }

    /// PEFT's scaling for a module of this rank and alpha: `alpha / r`, or `alpha / sqrt(r)`
    /// with rsLoRA.
    pub fn scale(&self, rank: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (rank as f64).sqrt()
        } else {
            alpha / rank as f64
        }
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn first_match(patterns: &[Regex], module: &str) -> Option<usize> {
    patterns.iter().position(|re| re.is_match(module))
}

fn compile(path: &Path, key: &str, pattern: &str, anchored: String) -> Result<Regex, AdapterError> {
    Regex::new(&anchored).map_err(|e| AdapterError::InvalidPattern {
        path: path.to_owned(),
        key: key.to_owned(),
        pattern: pattern.to_owned(),
        message: e.to_string(),
    })
}

/// PEFT: `re.match(rf"(.*\.)?({key})$", module)`.
fn pattern_regex(path: &Path, field: &str, key: &str) -> Result<Regex, AdapterError> {
    compile(path, field, key, format!(r"^(?:.*\.)?(?:{key})$"))
}

fn parse_selector(
    path: &Path,
    key: &str,
    v: &Value,
) -> Result<(TargetModules, Selector), AdapterError> {
    if let Some(s) = v.as_str() {
        if s.eq_ignore_ascii_case("all-linear") {
            return Ok((TargetModules::AllLinear, Selector::All));
        }
        // PEFT uses `re.fullmatch`.
        let re = compile(path, key, s, format!("^(?:{s})$"))?;
        return Ok((TargetModules::Regex(s.to_owned()), Selector::Regex(re)));
    }
    let names = v
        .as_array()
        .and_then(|a| {
            a.iter()
                .map(|n| n.as_str().map(str::to_owned))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| AdapterError::ConfigKey {
            path: path.to_owned(),
            key: key.to_owned(),
            problem: "must be a list of module names or a regex string".to_owned(),
        })?;
    Ok((TargetModules::Names(names.clone()), Selector::Names(names)))
}

/// `layers_to_transform` (with `layers_pattern`) restricts a *list* `target_modules` to
/// some layer indices; PEFT ignores it for a regex.
fn parse_layers(
    path: &Path,
    raw: &Value,
    target: &Selector,
) -> Result<Option<LayerFilter>, AdapterError> {
    let bad = |key: &str, problem: &str| AdapterError::ConfigKey {
        path: path.to_owned(),
        key: key.to_owned(),
        problem: problem.to_owned(),
    };
    let layers = match raw.get("layers_to_transform") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Array(a)) if a.is_empty() => return Ok(None),
        Some(Value::Array(a)) => a.iter().map(Value::as_u64).collect::<Option<Vec<_>>>(),
        Some(v) => v.as_u64().map(|i| vec![i]),
    }
    .ok_or_else(|| {
        bad(
            "layers_to_transform",
            "must be a layer index or a list of them",
        )
    })?;
    if !matches!(target, Selector::Names(_)) {
        return Ok(None);
    }
    let names: Vec<String> = match raw.get("layers_pattern") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if s.is_empty() => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|p| p.as_str().map(str::to_owned))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| bad("layers_pattern", "must be a string or a list of strings"))?,
        Some(_) => {
            return Err(bad(
                "layers_pattern",
                "must be a string or a list of strings",
            ))
        }
    };
    // PEFT: lazy `.*?` so the first numbered segment (the layer) is found, not a nested index.
    let patterns = if names.is_empty() {
        vec![compile(
            path,
            "layers_pattern",
            "",
            r"^.*?\.[^.]*\.(\d+)\.".to_owned(),
        )?]
    } else {
        names
            .iter()
            .map(|p| {
                compile(
                    path,
                    "layers_pattern",
                    p,
                    format!(r"^.*?\.(?:{p})\.(\d+)\."),
                )
            })
            .collect::<Result<_, _>>()?
    };
    Ok(Some((layers, patterns)))
}

fn layer_index(module: &str, patterns: &[Regex]) -> Option<u64> {
    patterns
        .iter()
        .find_map(|re| re.captures(module)?.get(1)?.as_str().parse().ok())
}

#[cfg(test)]
#[path = "config_tests.rs"]
mod tests;
