//! The moerge SDK: the types and the C ABI shared by the daemon, the CLI and fusion-policy
//! plugins. It depends on nothing heavy (no candle, zbus or sled), so a plugin builds in
//! seconds.
//!
//! - [`plan`] — the plan IR: the reviewable recipe a policy produces and the engine runs.
//! - [`policy`] — the [`policy::Policy`] trait a plugin implements, the
//!   [`policy::FitContext`] it reads (experts as borrowed f32 views, data, host services)
//!   and the [`policy::Fitted`] result; [`params`] — parameter schemas and checked values;
//!   [`optimize`] — what a policy asks the host's trainer to learn.
//! - [`abi`] — the versioned C ABI and [`export_policy!`], the one macro a plugin writes.
//! - `testing` (cargo feature) — run a policy through that same ABI in a test, no daemon.
//! - [`cluster`] and [`greedy`] — model-based clustering and greedy expert selection, shared
//!   by the daemon, the CLI's reports and policies.
//! - [`linalg`] — small dense helpers (symmetric eigen-decomposition) for policies' maths.
//!
//! ```
//! use moerge_sdk::plan::{Plan, ModulePlan, MergeSpace};
//! let json = r#"{
//!   "moerge_plan": 1,
//!   "experts": [{"name": "upper", "hash": "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},
//!               {"name": "rot13", "hash": "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb"}],
//!   "default": {"static": {"weights": [0.5, 0.5], "space": "exact"}}
//! }"#;
//! let plan = Plan::from_json(json).unwrap();
//! assert_eq!(plan.default, ModulePlan::Static { weights: vec![0.5, 0.5], space: MergeSpace::Exact, svd_rank: None });
//! ```
//!
//! A whole plugin (`crate-type = ["cdylib", "rlib"]`):
//!
//! ```
//! use moerge_sdk::params::{ParamSpec, Params};
//! use moerge_sdk::plan::{MergeSpace, ModulePlan, Plan, PLAN_VERSION};
//! use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError};
//!
//! #[derive(Default)]
//! pub struct FirstExpert;
//!
//! impl Policy for FirstExpert {
//!     fn name(&self) -> &str { "first-expert" }
//!     fn version(&self) -> &str { "0.1.0" }
//!     fn parameters(&self) -> Vec<ParamSpec> { vec![] }
//!     fn fit(&self, ctx: &FitContext<'_>, _params: &Params) -> Result<Fitted, PolicyError> {
//!         let mut weights = vec![0.0; ctx.experts().len()];
//!         weights[0] = 1.0;
//!         Ok(Fitted::plan(Plan {
//!             version: PLAN_VERSION,
//!             experts: ctx.expert_refs(),
//!             default: ModulePlan::Static { weights, space: MergeSpace::Exact, svd_rank: None },
//!             modules: Default::default(),
//!             ensemble: None,
//!             tensors: None,
//!         }))
//!     }
//! }
//!
//! moerge_sdk::export_policy!(FirstExpert);
//! ```

pub mod abi;
mod checks;
pub mod cluster;
pub mod greedy;
pub mod linalg;
pub mod optimize;
pub mod params;
pub mod plan;
pub mod policy;
#[cfg(feature = "testing")]
pub mod testing;

pub use checks::{check_fitted, RouterTensors};
