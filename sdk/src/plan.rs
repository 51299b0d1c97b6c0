//! The fusion plan IR (version 1): which experts, and per LoRA'd module how to combine them.
//! A plan file is a user-facing recipe, like a mergekit YAML: small, readable, versioned.
//!
//! ```json
//! {
//!   "moerge_plan": 1,
//!   "experts": [{"name": "upper", "hash": "<64 hex>"}, {"name": "rot13", "hash": "<64 hex>"}],
//!   "default": {"static": {"weights": [0.5, 0.5], "space": "lowrank"}},
//!   "modules": {"model.layers.0.mlp.fc1": "none"}
//! }
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The plan format this SDK reads and writes.
pub const PLAN_VERSION: u32 = 1;

/// A fusion plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// Format version ([`PLAN_VERSION`]).
    #[serde(rename = "moerge_plan")]
    pub version: u32,
    /// The experts, in the order the weights refer to.
    pub experts: Vec<ExpertRef>,
    /// What every module gets unless `modules` says otherwise (a single-pass plan).
    #[serde(
        default = "ModulePlan::none",
        skip_serializing_if = "ModulePlan::is_none"
    )]
    pub default: ModulePlan,
    /// Per-module overrides, by module path (`model.layers.0.self_attn.q_proj`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub modules: BTreeMap<String, ModulePlan>,
    /// Instead of one pass: several single-pass members combined at the output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble: Option<Ensemble>,
    /// Content hash (64 lowercase hex, blake3) of the safetensors file that holds the plan's
    /// large tensors (learned routers), stored next to the plan as `<hash>.safetensors`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensors: Option<String>,
}

/// The name of a learned router's weight tensor `[units, in]` for `module` in the plan's
/// tensor file.
pub fn router_weight_name(module: &str) -> String {
    format!("{module}.router.weight")
}

/// The name of a learned router's bias tensor `[units]` for `module` (optional: absent means 0).
pub fn router_bias_name(module: &str) -> String {
    format!("{module}.router.bias")
}

/// Output ensembling: every member runs (as its own single-pass plan over the same
/// experts) and their outputs are mixed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ensemble {
    #[serde(default)]
    pub level: EnsembleLevel,
    pub members: Vec<Member>,
}

/// One ensemble member: its mixture weight and its module plans.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub weight: f64,
    pub default: ModulePlan,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub modules: BTreeMap<String, ModulePlan>,
}

/// Where members are mixed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnsembleLevel {
    /// A mixture of the members' next-token distributions, `Σ wᵢ softmax(zᵢ)` (weights ≥ 0,
    /// summing to 1); the model's output is the log of the mixture.
    #[default]
    Probability,
    /// Weighted logits, `Σ wᵢ zᵢ`.
    Logit,
}

/// An expert by folder name and content hash: a plan never silently runs on changed files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertRef {
    pub name: String,
    /// Lowercase hex of the adapter's 32-byte content hash.
    pub hash: String,
}

impl ModulePlan {
    /// The base weights only.
    pub fn none() -> Self {
        ModulePlan::None
    }

    /// Whether this is [`ModulePlan::None`].
    pub fn is_none(&self) -> bool {
        matches!(self, ModulePlan::None)
    }

    /// Expert `i` of `n` alone: a static merge with weight 1 on it and 0 on the others.
    pub fn one_hot(i: usize, n: usize, space: MergeSpace) -> Self {
        let mut weights = vec![0.0; n];
        weights[i] = 1.0;
        ModulePlan::Static {
            weights,
            space,
            svd_rank: None,
        }
    }
}

impl Ensemble {
    /// Every one of `n` experts alone as a member (an exact one-hot merge), weighted `1/n`:
    /// the uniform output ensemble.
    pub fn uniform(level: EnsembleLevel, n: usize) -> Self {
        let members = (0..n)
            .map(|i| Member {
                weight: 1.0 / n as f64,
                default: ModulePlan::one_hot(i, n, MergeSpace::Exact),
                modules: BTreeMap::new(),
            })
            .collect();
        Ensemble { level, members }
    }
}

/// How one module combines the experts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ModulePlan {
    /// A fixed weighted merge, one weight per expert.
    Static {
        weights: Vec<f64>,
        space: MergeSpace,
        /// For exact and folded merges: keep only the top `svd_rank` singular directions of
        /// the merged delta (PEFT's `svd` combination).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        svd_rank: Option<usize>,
    },
    /// Input-dependent weights: each token's input `x` scores every routed unit, the `top_k`
    /// best get `softmax(score / temperature)`, the others exactly 0, and the module adds
    /// `Σ_u c_u ΔW_u x`. A unit is one expert (`ΔW_e = s_e B_e A_e`), or with `groups` a
    /// static exact merge of several (hierarchical routing).
    Routed {
        router: Router,
        #[serde(default = "default_top_k")]
        top_k: usize,
        #[serde(default = "default_temperature")]
        temperature: f64,
        #[serde(default)]
        granularity: Granularity,
        /// The routed units, each a weighted exact merge of experts; empty means one unit per
        /// expert.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        groups: Vec<Group>,
        /// What the routing weights mix: the units' outputs (the default) or their factors.
        #[serde(default, skip_serializing_if = "Mix::is_outputs")]
        mix: Mix,
    },
    /// A LoRA update the plan carries itself, read from its tensor file as
    /// [`fixed_a_name`] `[r, in]` and [`fixed_b_name`] `[out, r]` with scale 1: what merges
    /// that are not weighted sums of the experts produce (TIES, DARE, distillation).
    Fixed,
    /// The base weights only.
    None,
}

/// The name of a fixed module's `A` factor `[r, in]` in the plan's tensor file.
pub fn fixed_a_name(module: &str) -> String {
    format!("{module}.lora_A.weight")
}

/// The name of a fixed module's `B` factor `[out, r]` in the plan's tensor file.
pub fn fixed_b_name(module: &str) -> String {
    format!("{module}.lora_B.weight")
}

fn default_top_k() -> usize {
    4
}

fn default_temperature() -> f64 {
    1.0
}

/// How a routed module scores its units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Router {
    /// Arrow (Ostapenko et al. 2024): score `|x · v_u|`, `v_u` the top right singular vector
    /// of the unit's `ΔW`, computed from the factors (no training).
    Arrow,
    /// A trained router: score `x · w_u + b_u`, with `w` (`[units, in]`) and `b` (`[units]`,
    /// optional) read from the plan's tensor file under [`router_weight_name`] and
    /// [`router_bias_name`].
    Learned,
}

/// One routed unit of a hierarchical plan: a static exact merge, one weight per expert of the
/// plan (0 for experts outside the group).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub weights: Vec<f64>,
}

/// What a routed module's weights `c_u` mix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mix {
    /// The units' outputs: `Σ_u c_u s_u B_u A_u x` (PEFT's and mttl's Arrow).
    #[default]
    Outputs,
    /// The units' factors: `A(x) = Σ_u c_u √s_u A_u`, `B(x) = Σ_u c_u √s_u B_u`, update
    /// `B(x) A(x) x` (the paper's "routed model parameters", an input-dependent low-rank merge).
    /// Needs one expert per unit (no `groups`) and equal ranks within each module.
    Factors,
}

impl Mix {
    /// The names a plan and a policy parameter use, default first.
    pub const NAMES: [&'static str; 2] = ["outputs", "factors"];

    /// Whether this is the default, [`Mix::Outputs`] (left out when a plan is written).
    pub fn is_outputs(&self) -> bool {
        *self == Mix::Outputs
    }

    /// The `mix` parameter a routing policy exposes (default `outputs`); read it back with
    /// [`Mix::from_name`].
    pub fn param_spec() -> crate::params::ParamSpec {
        crate::params::ParamSpec::choice(
            "mix",
            &Mix::NAMES,
            "outputs",
            "mix the chosen experts' outputs (PEFT's Arrow) or their factors (an input-dependent \
             low-rank merge; needs equal ranks)",
        )
    }

    /// The mode named `name` (one of [`Mix::NAMES`]).
    pub fn from_name(name: &str) -> Option<Mix> {
        match name {
            "outputs" => Some(Mix::Outputs),
            "factors" => Some(Mix::Factors),
            _ => None,
        }
    }
}

/// What one routing decision covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Granularity {
    /// Every token is routed on its own input (the default, as PEFT's and mttl's Arrow).
    #[default]
    Token,
    /// Every token is routed on the mean of the module's inputs over its sequence so far
    /// (prompt and generated tokens up to and including itself): causal, so scoring a text
    /// and generating it make the same decisions, and the decision settles as the sequence
    /// grows.
    Sequence,
}

/// Where a static merge is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeSpace {
    /// The paper's merge: average the factors separately, `A = Σ w_i sqrt(s_i) A_i`,
    /// `B = Σ w_i sqrt(s_i) B_i`, scale 1 (equal ranks needed). PEFT's `linear` with weight
    /// `p_i` is this merge with `w_i = sqrt(p_i)`.
    #[serde(rename = "lowrank")]
    LowRank,
    /// The exact weighted sum of deltas, `ΔW = Σ w_i s_i B_i A_i`, kept as concatenated
    /// factors (rank Σ r_i; PEFT's `cat`).
    Exact,
    /// The exact delta added into the base weight once: serving costs nothing extra.
    Folded,
}

/// Why a plan is refused; the message names the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PlanError {
    #[error("plan is not valid JSON for format {PLAN_VERSION}: {0}")]
    Json(String),
    #[error(
        "moerge_plan: version {found} is not supported; this moerge reads version {PLAN_VERSION}"
    )]
    Version { found: u32 },
    #[error("{field}: {message}")]
    Field { field: String, message: String },
}

impl Plan {
    /// Parses and validates a plan file's text.
    pub fn from_json(text: &str) -> Result<Plan, PlanError> {
        // Read the version first so a future plan says "unsupported version", not "unknown field".
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| PlanError::Json(e.to_string()))?;
        if let Some(v) = value.get("moerge_plan").and_then(serde_json::Value::as_u64) {
            if v != u64::from(PLAN_VERSION) {
                return Err(PlanError::Version {
                    found: u32::try_from(v).unwrap_or(u32::MAX),
                });
            }
        }
        let plan: Plan =
            serde_json::from_value(value).map_err(|e| PlanError::Json(e.to_string()))?;
        plan.validate()?;
        Ok(plan)
    }

    /// Pretty JSON, the reviewable form.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plans serialise") + "\n"
    }

    /// The single-pass plans of an ensemble's members, with their weights (each a plan over
    /// the same experts); for a single-pass plan, itself with weight 1.
    pub fn passes(&self) -> Vec<(f64, Plan)> {
        match &self.ensemble {
            None => vec![(1.0, self.clone())],
            Some(e) => e
                .members
                .iter()
                .map(|m| {
                    let plan = Plan {
                        version: self.version,
                        experts: self.experts.clone(),
                        default: m.default.clone(),
                        modules: m.modules.clone(),
                        ensemble: None,
                        tensors: self.tensors.clone(),
                    };
                    (m.weight, plan)
                })
                .collect(),
        }
    }

    /// The plan for `module`: the override whose key is the longest match (the module path
    /// itself, or a prefix of it ending at a `.`, such as `model.layers.3` for every module of
    /// layer 3), else the default.
    pub fn module(&self, module: &str) -> &ModulePlan {
        self.entry(module).1
    }

    /// Which entry gives `module` its plan: the key of the override (`Some`), or the default
    /// (`None`), with the plan. Modules sharing an entry share its learned weights.
    pub fn entry(&self, module: &str) -> (Option<&str>, &ModulePlan) {
        let mut key = module;
        loop {
            if let Some((k, plan)) = self.modules.get_key_value(key) {
                return (Some(k.as_str()), plan);
            }
            match key.rfind('.') {
                Some(i) => key = &key[..i],
                None => return (None, &self.default),
            }
        }
    }

    /// The file name of the plan's tensor file, if it has one (`<hash>.safetensors`).
    pub fn tensors_file(&self) -> Option<String> {
        self.tensors.as_ref().map(|h| format!("{h}.safetensors"))
    }

    /// Checks what the types cannot: version, expert list, weight counts, finite weights.
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.version != PLAN_VERSION {
            return Err(PlanError::Version {
                found: self.version,
            });
        }
        let field = |field: String, message: String| Err(PlanError::Field { field, message });
        if self.experts.is_empty() {
            return field("experts".into(), "names no expert".into());
        }
        for (i, e) in self.experts.iter().enumerate() {
            if e.name.is_empty() {
                return field(format!("experts[{i}].name"), "is empty".into());
            }
            if self.experts[..i].iter().any(|p| p.name == e.name) {
                return field(
                    format!("experts[{i}].name"),
                    format!("{:?} is listed twice", e.name),
                );
            }
            if !is_hash(&e.hash) {
                return field(
                    format!("experts[{i}].hash"),
                    format!("{:?} is not 64 lowercase hex digits", e.hash),
                );
            }
        }
        if let Some(hash) = &self.tensors {
            if !is_hash(hash) {
                return field(
                    "tensors".into(),
                    format!("{hash:?} is not 64 lowercase hex digits"),
                );
            }
        }
        if let Some(ensemble) = &self.ensemble {
            if !self.default.is_none() || !self.modules.is_empty() {
                return field(
                    "default".into(),
                    "an ensemble plan puts its module plans in its members, not at the top level"
                        .into(),
                );
            }
            if ensemble.members.is_empty() {
                return field("ensemble.members".into(), "is empty".into());
            }
            for (i, m) in ensemble.members.iter().enumerate() {
                if !m.weight.is_finite() {
                    return field(
                        format!("ensemble.members[{i}].weight"),
                        format!("{} is not a finite number", m.weight),
                    );
                }
                if ensemble.level == EnsembleLevel::Probability && m.weight < 0.0 {
                    return field(
                        format!("ensemble.members[{i}].weight"),
                        format!("is {}; mixture weights must not be negative", m.weight),
                    );
                }
                self.check_modules(&format!("ensemble.members[{i}]."), &m.default, &m.modules)?;
            }
            let total: f64 = ensemble.members.iter().map(|m| m.weight).sum();
            if ensemble.level == EnsembleLevel::Probability && (total - 1.0).abs() > 1e-6 {
                return field(
                    "ensemble.members".into(),
                    format!("mixture weights sum to {total}, not 1"),
                );
            }
            return Ok(());
        }
        self.check_modules("", &self.default, &self.modules)
    }

    fn check_modules(
        &self,
        prefix: &str,
        default: &ModulePlan,
        modules: &BTreeMap<String, ModulePlan>,
    ) -> Result<(), PlanError> {
        let field = |field: String, message: String| Err(PlanError::Field { field, message });
        let modules = std::iter::once((format!("{prefix}default"), default)).chain(
            modules
                .iter()
                .map(|(m, p)| (format!("{prefix}modules[{m:?}]"), p)),
        );
        for (path, plan) in modules {
            if let ModulePlan::Routed {
                router,
                top_k,
                temperature,
                groups,
                mix,
                ..
            } = plan
            {
                if *mix == Mix::Factors && !groups.is_empty() {
                    return field(
                        format!("{path}.routed.mix"),
                        "is \"factors\", which mixes single experts' factors; it cannot be \
                         combined with groups (use \"outputs\")"
                            .into(),
                    );
                }
                for (g, group) in groups.iter().enumerate() {
                    self.check_weights(&format!("{path}.routed.groups[{g}]"), &group.weights)?;
                }
                let (units, what) = if groups.is_empty() {
                    (self.experts.len(), "experts")
                } else {
                    (groups.len(), "groups")
                };
                if *top_k == 0 || *top_k > units {
                    return field(
                        format!("{path}.routed.top_k"),
                        format!(
                            "is {top_k}; it must be between 1 and the number of {what} ({units})"
                        ),
                    );
                }
                if *router == Router::Learned && self.tensors.is_none() {
                    return field(
                        format!("{path}.routed.router"),
                        "is \"learned\" but the plan names no tensor file (\"tensors\")".into(),
                    );
                }
                if !(temperature.is_finite() && *temperature > 0.0) {
                    return field(
                        format!("{path}.routed.temperature"),
                        format!("is {temperature}; it must be a positive number"),
                    );
                }
            }
            if let ModulePlan::Static {
                space,
                svd_rank: Some(k),
                ..
            } = plan
            {
                if *space == MergeSpace::LowRank || *k == 0 {
                    return field(
                        format!("{path}.static.svd_rank"),
                        format!("is {k}; it needs space \"exact\" or \"folded\" and a rank of at least 1"),
                    );
                }
            }
            if let ModulePlan::Static { weights, .. } = plan {
                self.check_weights(&format!("{path}.static"), weights)?;
            }
            if *plan == ModulePlan::Fixed && self.tensors.is_none() {
                return field(
                    path,
                    "is \"fixed\" but the plan names no tensor file (\"tensors\")".into(),
                );
            }
        }
        Ok(())
    }

    /// One weight per expert, all finite; `path` is the object that holds `weights`.
    fn check_weights(&self, path: &str, weights: &[f64]) -> Result<(), PlanError> {
        let field = |field: String, message: String| Err(PlanError::Field { field, message });
        if weights.len() != self.experts.len() {
            return field(
                format!("{path}.weights"),
                format!(
                    "has {} weights for {} experts",
                    weights.len(),
                    self.experts.len()
                ),
            );
        }
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            return field(
                format!("{path}.weights[{i}]"),
                format!("{} is not a finite number", weights[i]),
            );
        }
        Ok(())
    }
}

fn is_hash(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "1111111111111111111111111111111111111111111111111111111111111111";
    const H2: &str = "2222222222222222222222222222222222222222222222222222222222222222";

    fn plan_json(body: &str) -> String {
        format!(
            r#"{{"moerge_plan": 1, "experts": [{{"name": "a", "hash": "{H1}"}}, {{"name": "b", "hash": "{H2}"}}], {body}}}"#
        )
    }

    fn check(text: &str, expected: Result<(), &[&str]>) {
        match (Plan::from_json(text), expected) {
            (Ok(plan), Ok(())) => assert_eq!(
                Plan::from_json(&plan.to_json()).unwrap(),
                plan,
                "round trip"
            ),
            (Err(e), Err(words)) => {
                let msg = e.to_string();
                for w in words {
                    assert!(msg.contains(w), "{msg:?} lacks {w:?}");
                }
            }
            (got, want) => panic!("{text}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn plans_parse_validate_and_round_trip() {
        check(
            &plan_json(r#""default": {"static": {"weights": [0.5, 0.5], "space": "lowrank"}}"#),
            Ok(()),
        );
        check(
            &plan_json(
                r#""default": {"static": {"weights": [1, -1], "space": "folded"}}, "modules": {"lm_head": "none"}"#,
            ),
            Ok(()),
        );
        check(&plan_json(r#""default": "none""#), Ok(()));
        check(
            &plan_json(
                r#""default": {"static": {"weights": [0.5, 0.5], "space": "exact", "svd_rank": 8}}"#,
            ),
            Ok(()),
        );
        check(
            &plan_json(
                r#""default": {"static": {"weights": [0.5, 0.5], "space": "lowrank", "svd_rank": 8}}"#,
            ),
            Err(&["default.static.svd_rank", "exact"]),
        );
        check(
            &plan_json(
                r#""default": {"routed": {"router": "arrow", "top_k": 2, "temperature": 0.5}}"#,
            ),
            Ok(()),
        );
        check(
            &plan_json(r#""default": {"routed": {"router": "arrow"}}"#).replace("\"a\"", "\"x\""),
            Err(&["top_k", "is 4", "(2)"]),
        );
        check(
            &plan_json(r#""default": {"routed": {"router": "arrow", "top_k": 0}}"#),
            Err(&["default.routed.top_k"]),
        );
        check(
            &plan_json(
                r#""default": {"routed": {"router": "arrow", "top_k": 1, "temperature": 0}}"#,
            ),
            Err(&["default.routed.temperature"]),
        );
        check(
            &plan_json(r#""default": {"routed": {"router": "oracle", "top_k": 1}}"#),
            Err(&["oracle"]),
        );
        check(
            &plan_json(r#""default": {"static": {"weights": [0.5], "space": "exact"}}"#),
            Err(&["default.static.weights", "1 weights for 2 experts"]),
        );
        check(
            &plan_json(
                r#""default": "none", "modules": {"m.q_proj": {"static": {"weights": [1, 2, 3], "space": "exact"}}}"#,
            ),
            Err(&["modules[\"m.q_proj\"].static.weights"]),
        );
        check(
            &plan_json(r#""default": {"static": {"weights": [0.5, 0.5], "space": "sideways"}}"#),
            Err(&["sideways"]),
        );
        check(
            &plan_json(
                r#""default": {"static": {"weights": [0.5, 0.5], "space": "exact"}}, "extra": 1"#,
            ),
            Err(&["extra"]),
        );
        check(
            &plan_json(r#""default": "none""#).replace("\"moerge_plan\": 1", "\"moerge_plan\": 2"),
            Err(&["version 2", "version 1"]),
        );
        check(
            &plan_json(r#""default": "none""#).replace(H2, "xyz"),
            Err(&["experts[1].hash", "xyz"]),
        );
        check(
            &plan_json(r#""default": "none""#).replace("\"b\"", "\"a\""),
            Err(&["experts[1].name", "twice"]),
        );
        check(
            r#"{"moerge_plan": 1, "experts": [], "default": "none"}"#,
            Err(&["experts", "no expert"]),
        );
        // Ensembles: members carry the module plans; probability weights must mix to 1.
        let member = |w: f64| {
            format!(
                r#"{{"weight": {w}, "default": {{"static": {{"weights": [1, 0], "space": "lowrank"}}}}}}"#
            )
        };
        check(
            &plan_json(&format!(
                r#""ensemble": {{"level": "probability", "members": [{}, {}]}}"#,
                member(0.5),
                member(0.5)
            )),
            Ok(()),
        );
        check(
            &plan_json(&format!(
                r#""ensemble": {{"level": "logit", "members": [{}, {}]}}"#,
                member(2.0),
                member(-1.0)
            )),
            Ok(()),
        );
        check(
            &plan_json(&format!(
                r#""ensemble": {{"members": [{}, {}]}}"#,
                member(0.5),
                member(0.6)
            )),
            Err(&["ensemble.members", "sum to 1.1"]),
        );
        check(
            &plan_json(&format!(
                r#""ensemble": {{"members": [{}, {}]}}"#,
                member(1.5),
                member(-0.5)
            )),
            Err(&["ensemble.members[1].weight"]),
        );
        check(
            &plan_json(
                r#""ensemble": {"members": [{"weight": 1, "default": {"static": {"weights": [1], "space": "exact"}}}]}"#,
            ),
            Err(&["ensemble.members[0].default.static.weights"]),
        );
        check(
            &plan_json(&format!(
                r#""default": {{"static": {{"weights": [1, 0], "space": "exact"}}}}, "ensemble": {{"members": [{}]}}"#,
                member(1.0)
            )),
            Err(&["default", "members"]),
        );
        check(
            &plan_json(r#""ensemble": {"members": []}"#),
            Err(&["ensemble.members", "empty"]),
        );
        // Hierarchical routing: groups are the routed units; top_k counts groups.
        check(
            &plan_json(
                r#""default": {"routed": {"router": "arrow", "top_k": 1, "granularity": "sequence", "groups": [{"name": "c0", "weights": [0.5, 0.5]}, {"weights": [0, 1]}]}}"#,
            ),
            Ok(()),
        );
        check(
            &plan_json(
                r#""default": {"routed": {"router": "arrow", "top_k": 2, "groups": [{"weights": [1, 0]}]}}"#,
            ),
            Err(&["default.routed.top_k", "groups (1)"]),
        );
        check(
            &plan_json(
                r#""default": {"routed": {"router": "arrow", "top_k": 1, "groups": [{"weights": [1]}]}}"#,
            ),
            Err(&[
                "default.routed.groups[0].weights",
                "1 weights for 2 experts",
            ]),
        );
        // Mixing factors instead of outputs: single experts only; the default stays unwritten.
        check(
            &plan_json(
                r#""default": {"routed": {"router": "arrow", "top_k": 2, "mix": "factors"}}"#,
            ),
            Ok(()),
        );
        check(
            &plan_json(
                r#""default": {"routed": {"router": "arrow", "top_k": 1, "mix": "factors", "groups": [{"weights": [1, 0]}]}}"#,
            ),
            Err(&["default.routed.mix", "groups"]),
        );
        let outputs = Plan::from_json(&plan_json(
            r#""default": {"routed": {"router": "arrow", "top_k": 2, "mix": "outputs"}}"#,
        ))
        .unwrap();
        assert!(!outputs.to_json().contains("mix"), "{}", outputs.to_json());
        // Learned routers read their matrices from the plan's tensor file.
        check(
            &plan_json(&format!(
                r#""default": {{"routed": {{"router": "learned", "top_k": 2}}}}, "tensors": "{H1}""#
            )),
            Ok(()),
        );
        check(
            &plan_json(r#""default": {"routed": {"router": "learned", "top_k": 2}}"#),
            Err(&["default.routed.router", "tensors"]),
        );
        check(
            &plan_json(&format!(r#""default": "fixed", "tensors": "{H2}""#)),
            Ok(()),
        );
        check(
            &plan_json(r#""default": "none", "modules": {"m": "fixed"}"#),
            Err(&["modules[\"m\"]", "tensors"]),
        );
        check(
            &plan_json(r#""default": "none", "tensors": "abc""#),
            Err(&["tensors", "abc"]),
        );
        // JSON has no NaN; a NaN weight can only come from code, which validate() catches.
        let mut plan = Plan::from_json(&plan_json(
            r#""default": {"static": {"weights": [0.5, 0.5], "space": "exact"}}"#,
        ))
        .unwrap();
        plan.default = ModulePlan::Static {
            weights: vec![f64::NAN, 1.0],
            space: MergeSpace::Exact,
            svd_rank: None,
        };
        assert!(plan
            .validate()
            .unwrap_err()
            .to_string()
            .contains("default.static.weights[0]"));
    }

    #[test]
    fn module_overrides_match_the_longest_prefix() {
        let plan = Plan::from_json(&plan_json(
            r#""default": {"static": {"weights": [1, 0], "space": "exact"}},
               "modules": {"model.layers.1": "none",
                           "model.layers.1.mlp.fc1": {"static": {"weights": [0, 1], "space": "exact"}}}"#,
        ))
        .unwrap();
        let weights = |m: &str| match plan.module(m) {
            ModulePlan::Static { weights, .. } => weights.clone(),
            _ => vec![],
        };
        assert_eq!(weights("model.layers.0.mlp.fc1"), vec![1.0, 0.0]);
        assert_eq!(weights("model.layers.1.mlp.fc1"), vec![0.0, 1.0]);
        assert!(plan.module("model.layers.1.mlp.fc2").is_none());
        // A prefix must end at a dot: layer 10 is not layer 1.
        assert_eq!(weights("model.layers.10.mlp.fc2"), vec![1.0, 0.0]);
    }
}
