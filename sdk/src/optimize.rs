//! What a policy asks the host's trainer to learn ([`OptimizeOptions`]): which parts of a
//! plan template are parameters, the loss, and the optimiser settings. The host runs Adam with
//! autograd over exactly those parts; the base model and the experts stay frozen.
//!
//! The loss is the mean NLL per completion token, or with a `teacher` plan the mean
//! `KL(teacher ‖ template)` per completion token (distillation): the teacher's tensors then
//! travel in the template's tensors under [`TEACHER_TENSOR_PREFIX`] (see
//! [`distillation_template`]) and are not part of the result.
//!
//! ```
//! use moerge_sdk::optimize::{OptimizeOptions, RouterInit};
//! let options: OptimizeOptions =
//!     serde_json::from_str(r#"{"train_routers": true, "router_init": "arrow"}"#).unwrap();
//! assert_eq!(options.steps, 100);
//! assert!(options.train_routers && !options.train_merge_weights);
//! assert_eq!(options.router_init, RouterInit::Arrow);
//! assert!(!options.train_fixed && options.teacher.is_none());
//! // Unset later fields stay out of the JSON, so older hosts read it.
//! assert!(!serde_json::to_string(&options).unwrap().contains("teacher"));
//!
//! // A policy exposes the optimiser settings as parameters and reads them back:
//! use moerge_sdk::params::Params;
//! let specs = OptimizeOptions::param_specs();
//! let params = Params::parse(&specs, &[("steps".into(), "20".into())]).unwrap();
//! let options = OptimizeOptions::from_params(&params).unwrap();
//! assert_eq!((options.steps, options.learning_rate), (20, 0.05));
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::params::{ParamError, ParamSpec, Params};
use crate::plan::Plan;
use crate::policy::{Fitted, Split, TensorData};

/// Where a teacher's own tensors (its learned routers, fixed factors) travel in an
/// optimisation template's tensors: under their names with this prefix, e.g.
/// `teacher.model.layers.0.mlp.fc1.lora_A.weight`. The host strips them from the result.
pub const TEACHER_TENSOR_PREFIX: &str = "teacher.";

/// Options of `FitContext::optimize`. Unset fields take their defaults; nothing is trained
/// unless a `train_*` flag says so.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimizeOptions {
    /// The data the loss (mean NLL, or with a `teacher` mean KL, per completion token) is
    /// computed on.
    pub split: Split,
    /// Optimiser steps (default 100).
    pub steps: usize,
    /// Adam's learning rate (default 0.05).
    pub learning_rate: f64,
    /// Records per step (default 8).
    pub batch_size: usize,
    /// Seed of the batch order and of any random initialisation (default 0).
    pub seed: u64,
    /// Train every `Static` entry's weights: one parameter vector per plan entry. The
    /// `default` entry is one vector shared by all modules it covers; each `modules` key
    /// (a module path, or a layer prefix such as `model.layers.3`) has its own. A policy
    /// that wants per-layer weights writes one override per layer prefix.
    pub train_merge_weights: bool,
    /// Train the weights of `Routed` modules' `groups` (hierarchical routing).
    pub train_group_weights: bool,
    /// Train `Routed` modules with `Router::Learned`: a `[units, in]` weight and a `[units]`
    /// bias per module, taken from the template's tensors when present, else initialised by
    /// `router_init`.
    pub train_routers: bool,
    /// How routers without tensors in the template start.
    pub router_init: RouterInit,
    /// Train the mixture weights of an ensemble's members (at probability level the
    /// weights are parametrised by a softmax, so they stay a distribution).
    pub train_ensemble_weights: bool,
    /// Train `Fixed` modules' factors (`A` `[r, in]` and `B` `[out, r]`, scale 1), starting
    /// from the template's tensors, which must hold them: the policy chooses the rank and the
    /// initialisation (PEFT's is `A` small and random, `B` zero).
    #[serde(skip_serializing_if = "is_false")]
    pub train_fixed: bool,
    /// Distil from this plan over the same experts (single-pass or an ensemble): the loss
    /// becomes `KL(teacher ‖ template)` over the next-token distributions at every
    /// completion token, averaged over those tokens, instead of the NLL of the data's
    /// completions. The teacher is frozen; its tensors, if it has any, go in the template's
    /// tensors under [`TEACHER_TENSOR_PREFIX`].
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher: Option<Box<Plan>>,
}

// Fields added after the first release are left out of the JSON while unset, so a policy built
// against this SDK still talks to a host that does not know them, as long as it does not use
// them.
fn is_false(b: &bool) -> bool {
    !*b
}

impl Default for OptimizeOptions {
    fn default() -> Self {
        OptimizeOptions {
            split: Split::Train,
            steps: 100,
            learning_rate: 0.05,
            batch_size: 8,
            seed: 0,
            train_merge_weights: false,
            train_group_weights: false,
            train_routers: false,
            router_init: RouterInit::Zero,
            train_ensemble_weights: false,
            train_fixed: false,
            teacher: None,
        }
    }
}

impl OptimizeOptions {
    /// The optimiser parameters a training policy usually exposes: `steps`, `learning_rate`,
    /// `batch_size`, `seed` (defaults as [`OptimizeOptions::default`]). Read them back with
    /// [`OptimizeOptions::from_params`].
    pub fn param_specs() -> Vec<ParamSpec> {
        let d = OptimizeOptions::default();
        vec![
            ParamSpec::int("steps", d.steps as i64, "optimiser steps").min(1.0),
            ParamSpec::float("learning_rate", d.learning_rate, "Adam's learning rate").min(0.0),
            ParamSpec::int("batch_size", d.batch_size as i64, "records per step").min(1.0),
            ParamSpec::int(
                "seed",
                d.seed as i64,
                "seed of batch order and initialisation",
            )
            .min(0.0),
        ]
    }

    /// Options with the optimiser settings of [`OptimizeOptions::param_specs`] taken from
    /// `params` (those it lacks keep their defaults) and nothing trainable yet.
    pub fn from_params(params: &Params) -> Result<OptimizeOptions, ParamError> {
        let mut o = OptimizeOptions::default();
        if let Some(v) = params.opt_int("steps")? {
            o.steps = v as usize;
        }
        if let Some(v) = params.opt_float("learning_rate")? {
            o.learning_rate = v;
        }
        if let Some(v) = params.opt_int("batch_size")? {
            o.batch_size = v as usize;
        }
        if let Some(v) = params.opt_int("seed")? {
            o.seed = v as u64;
        }
        Ok(o)
    }

    /// Whether any part is trainable.
    pub fn trains_anything(&self) -> bool {
        self.train_merge_weights
            || self.train_group_weights
            || self.train_routers
            || self.train_ensemble_weights
            || self.train_fixed
    }
}

/// The template of a distillation: `student` with `teacher`'s tensors added under
/// [`TEACHER_TENSOR_PREFIX`]. Send it with `teacher: Some(Box::new(teacher.plan))`.
pub fn distillation_template(student: &Fitted, teacher: &Fitted) -> Fitted {
    let mut template = student.clone();
    for (name, t) in &teacher.tensors {
        template
            .tensors
            .insert(format!("{TEACHER_TENSOR_PREFIX}{name}"), t.clone());
    }
    template
}

/// Tensors split into the template's own and the teacher's (prefix removed).
pub fn split_teacher_tensors(
    tensors: &BTreeMap<String, TensorData>,
) -> (BTreeMap<String, TensorData>, BTreeMap<String, TensorData>) {
    let mut own = BTreeMap::new();
    let mut teacher = BTreeMap::new();
    for (name, t) in tensors {
        match name.strip_prefix(TEACHER_TENSOR_PREFIX) {
            Some(rest) => teacher.insert(rest.to_owned(), t.clone()),
            None => own.insert(name.clone(), t.clone()),
        };
    }
    (own, teacher)
}

/// How a learned router starts when the template carries no tensors for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterInit {
    /// Weights and bias 0: every unit starts equal.
    #[default]
    Zero,
    /// Each unit's row is its Arrow prototype (the top right singular vector of its delta).
    Arrow,
}
