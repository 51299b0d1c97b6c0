//! The moerge SDK: the types shared by the daemon, the CLI and fusion-policy plugins. It
//! depends on nothing heavy (no candle, zbus or sled), so a plugin builds quickly.
//!
//! Today it holds the **plan**: the reviewable recipe a policy produces and the engine runs.
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

pub mod plan;
