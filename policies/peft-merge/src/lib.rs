//! `peft-merge`: PEFT's merge family, `LoraModel.add_weighted_adapter(combination_type=...)`
//! (huggingface/peft, `src/peft/utils/merge_utils.py` and `src/peft/tuners/lora/model.py`),
//! as a built-in policy, so that researchers moving from PEFT get the same numbers. Every
//! module becomes [`ModulePlan::Fixed`], its merged factors in the fit's tensors with scale 1
//! (PEFT's merged adapter has `lora_alpha = r`, i.e. scaling 1).
//!
//! `combination_type` picks the merge function ([`merge`]: `ties`, `dare_linear`, `dare_ties`,
//! `magnitude_prune`) and the space ([`space`]):
//! - without `_svd`, the low-rank space: the `A`s and the `B`s are merged separately, each
//!   expert's `weight · scale` split as `±sqrt` on `A` and `sqrt` on `B`; every expert must
//!   have the same rank on a module, and the result keeps it;
//! - with `_svd`, the exact space: the dense deltas `scale · B A` are merged with weights
//!   `weight` (each scale applied once, as PEFT 0.21.2's `svd` merge and moerge's exact merge
//!   do; PEFT's main branch applies it a second time on this path), then cut back
//!   by a truncated SVD to `svd_rank`, by default the largest rank of any expert (PEFT's
//!   `svd_rank or max(adapters_ranks)`), at most `min(in, out)`.
//!
//! As in PEFT, a single expert is always merged `linear`ly in the low-rank space (PEFT's
//! `combination_type = "linear" if len(adapters) == 1`): its factors times `±sqrt(w · s)` and
//! `sqrt(w · s)`, whatever `combination_type`, `density` or `svd_rank` say.
//!
//! Where this differs from PEFT: DARE's mask comes from our own seeded generator
//! ([`mask::DropMask`]), not `torch.bernoulli`; arithmetic is in f64 (PEFT works in the
//! adapters' dtype); equal magnitudes at the pruning cut keep the lower index (`torch.topk`
//! leaves it unspecified); equal ranks are required per module rather than per adapter; an
//! `svd_rank` above `min(in, out)` is capped instead of failing; `svd_clamp` and `cat` /
//! `linear` / `svd` are not offered; DARE with `density = 0` is refused (PEFT divides by zero
//! and produces NaN). PEFT's merged adapter inherits `use_rslora` from the first adapter, which
//! makes its scaling `sqrt(r)` instead of 1 for rsLoRA adapters; we always produce scale 1.

pub mod mask;
pub mod merge;
pub mod space;

use std::collections::BTreeMap;

use moerge_sdk::params::{ParamSpec, Params};
use moerge_sdk::plan::{fixed_a_name, fixed_b_name, ModulePlan};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError, TensorData};

use crate::mask::DropMask;
use crate::merge::{Merge, MergeFn, SignMethod};
use crate::space::{merge_low_rank, merge_svd, Factors};

/// The `combination_type` values, as PEFT spells them, with their merge function and whether
/// they work in the exact (SVD) space.
pub const COMBINATION_TYPES: [(&str, MergeFn, bool); 8] = [
    ("ties", MergeFn::Ties, false),
    ("ties_svd", MergeFn::Ties, true),
    ("dare_linear", MergeFn::DareLinear, false),
    ("dare_linear_svd", MergeFn::DareLinear, true),
    ("dare_ties", MergeFn::DareTies, false),
    ("dare_ties_svd", MergeFn::DareTies, true),
    ("magnitude_prune", MergeFn::MagnitudePrune, false),
    ("magnitude_prune_svd", MergeFn::MagnitudePrune, true),
];

/// The policy. Its parameters: `combination_type` (default `ties`), `density` (default 0.2, the
/// value of PEFT's model-merging guide for TIES and DARE; PEFT itself has no default),
/// `majority_sign_method` (`total`), `weights`, `svd_rank`, `seed` (0).
///
/// PEFT has no default for `weights`; ours depend on the merge. The TIES-style merges (`ties`,
/// `dare_ties` and their `_svd` forms) already average the agreeing entries (the disjoint
/// mean), so they default to 1 each, where PEFT's guide starts TIES. The sums (`dare_linear`,
/// `magnitude_prune`) default to `1/N` each, the mean, as passing `weights=[1/N] * N` to
/// `add_weighted_adapter` gives. In the low-rank space each weight is multiplied by the
/// expert's own LoRA scale before the square root, exactly as PEFT does.
#[derive(Default)]
pub struct PeftMerge;

impl Policy for PeftMerge {
    fn name(&self) -> &str {
        "peft-merge"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        let names: Vec<&str> = COMBINATION_TYPES.iter().map(|c| c.0).collect();
        vec![
            ParamSpec::choice(
                "combination_type",
                &names,
                "ties",
                "PEFT's add_weighted_adapter merge: without _svd the A's and B's are merged \
                 separately (equal ranks needed); with _svd the dense deltas are merged and cut \
                 back by SVD",
            ),
            ParamSpec::float(
                "density",
                0.2,
                "fraction of entries each tensor keeps before merging (1 keeps all)",
            )
            .min(0.0)
            .max(1.0),
            ParamSpec::choice(
                "majority_sign_method",
                &["total", "frequency"],
                "total",
                "ties / dare_ties sign election: sign of the sum, or the more frequent sign",
            ),
            ParamSpec::string(
                "weights",
                "",
                "comma-separated weight per expert, in order (default: 1 each for ties and \
                 dare_ties, whose disjoint mean already averages; 1/N each for the sums)",
            ),
            ParamSpec::optional_int(
                "svd_rank",
                "rank of the merged factors for _svd types (default: the largest expert rank)",
            )
            .min(1.0),
            ParamSpec::int("seed", 0, "seed of DARE's random drop mask").min(0.0),
        ]
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        let experts = ctx.experts();
        if experts.is_empty() {
            return Err(PolicyError::invalid("peft-merge needs at least one expert"));
        }
        let combination = params.str("combination_type")?;
        let &(_, function, svd) = COMBINATION_TYPES
            .iter()
            .find(|c| c.0 == combination)
            .ok_or_else(|| {
                PolicyError::invalid(format!("unknown combination_type {combination}"))
            })?;
        let density = params.float("density")?;
        let sign_method = match params.str("majority_sign_method")? {
            "frequency" => SignMethod::Frequency,
            _ => SignMethod::Total,
        };
        let n = experts.len();
        let weights = match parse_weights(params.str("weights")?, n)? {
            Some(w) => w,
            None if matches!(function, MergeFn::Ties | MergeFn::DareTies) => vec![1.0; n],
            None => vec![1.0 / n as f64; n],
        };
        let svd_rank = params.opt_int("svd_rank")?.map(|r| r as usize);
        let seed = params.int("seed")? as u64;
        if svd_rank.is_some() && !svd {
            return Err(PolicyError::invalid(format!(
                "parameter svd_rank needs an _svd combination_type (got {combination})"
            )));
        }
        let single = experts.len() == 1;
        if !single && density == 0.0 && matches!(function, MergeFn::DareLinear | MergeFn::DareTies)
        {
            return Err(PolicyError::invalid(format!(
                "density=0 with combination_type={combination}: DARE rescales the kept entries \
                 by 1/density (PEFT produces NaN); give a density above 0"
            )));
        }
        // PEFT's single-adapter rule: one expert is merged linearly in the low-rank space.
        let (function, svd) = if single {
            (MergeFn::Linear, false)
        } else {
            (function, svd)
        };
        let merge = Merge {
            function,
            density,
            sign_method,
        };
        let max_rank = experts
            .iter()
            .flat_map(|e| &e.modules)
            .map(|m| m.rank)
            .max()
            .unwrap_or(1);
        let rank = svd_rank.unwrap_or(max_rank);
        let modules = ctx.module_paths();
        let mut plan = ctx.plan(ModulePlan::None);
        let mut tensors = BTreeMap::new();
        for (done, module) in modules.iter().enumerate() {
            ctx.check_cancelled()?;
            let mut mask = DropMask::for_module(seed, module);
            let factors = if svd {
                merge_svd(module, experts, &weights, &merge, &mut mask, rank)?
            } else {
                merge_low_rank(module, experts, &weights, &merge, &mut mask, combination)?
            };
            let (a, b) = into_tensors(factors);
            tensors.insert(fixed_a_name(module), a);
            tensors.insert(fixed_b_name(module), b);
            plan.modules.insert((*module).to_owned(), ModulePlan::Fixed);
            ctx.progress((done + 1) as f64 / modules.len() as f64, module);
        }
        Ok(Fitted { plan, tensors })
    }
}

fn into_tensors(f: Factors) -> (TensorData, TensorData) {
    let f32s = |v: Vec<f64>| v.into_iter().map(|x| x as f32).collect();
    let a = TensorData {
        shape: vec![f.rank, f.in_features],
        data: f32s(f.a),
    };
    let b = TensorData {
        shape: vec![f.out_features, f.rank],
        data: f32s(f.b),
    };
    (a, b)
}

/// The `weights` parameter: `None` when empty (the merge's default), else exactly `n` finite
/// numbers.
fn parse_weights(text: &str, n: usize) -> Result<Option<Vec<f64>>, PolicyError> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let parsed: Result<Vec<f64>, _> = text.split(',').map(|w| w.trim().parse::<f64>()).collect();
    match parsed {
        Ok(w) if w.len() != n => Err(PolicyError::invalid(format!(
            "parameter weights has {} values for {n} experts",
            w.len()
        ))),
        Ok(w) if w.iter().all(|x| x.is_finite()) => Ok(Some(w)),
        _ => Err(PolicyError::invalid(format!(
            "parameter weights: {text:?} is not a comma-separated list of finite numbers"
        ))),
    }
}

moerge_sdk::export_policy!(PeftMerge);
