//! `distill`: the paper's "distilled ensemble". A teacher, the output ensemble of one member
//! per expert (mixture weights learned on the training data, or uniform), is distilled into
//! one LoRA adapter of rank `rank` on every module the experts adapt: the host trains the
//! adapter's factors to lower `KL(teacher ‖ student)` over the next-token distributions at
//! the training records' completion tokens. The result is an ordinary single-pass plan
//! (`fixed` modules, factors in the fit's tensors, scale 1) that costs one pass however many
//! passes its teacher took.

use std::collections::BTreeMap;

use moerge_sdk::optimize::{distillation_template, OptimizeOptions};
use moerge_sdk::params::{ParamSpec, ParamValue, Params};
use moerge_sdk::plan::{fixed_a_name, fixed_b_name, Ensemble, EnsembleLevel};
use moerge_sdk::plan::{ModulePlan, Plan};
use moerge_sdk::policy::{FitContext, Fitted, Policy, PolicyError, TensorData};

// The student's defaults, from a sweep on the tiny library (5 experts of rank 4, 500
// training records, a learned-ensemble teacher at validation loss 1.02, base 1.44): rank 8
// reached 1.28 with these (steps 400, batch 16, learning rate 0.01; 110 s on 2 shared cores,
// debug build). At 0.02 the KL climbs again mid-run (1.30); at 0.03 (batch 8, 200 steps) the
// student ended worse than the base (1.81); 0.005 and 0.003 learn too slowly; batch 8
// plateaus at a KL near 0.2 where batch 16 reaches 0.12.
const LEARNING_RATE: f64 = 0.01;
const STEPS: i64 = 400;
const BATCH_SIZE: i64 = 16;

#[derive(Default)]
pub struct Distill;

impl Policy for Distill {
    fn name(&self) -> &str {
        "distill"
    }

    fn version(&self) -> &str {
        env!("CARGO_PKG_VERSION")
    }

    fn parameters(&self) -> Vec<ParamSpec> {
        let shared = OptimizeOptions::default();
        let mut specs = vec![
            ParamSpec::choice(
                "teacher",
                &["learned-ensemble", "uniform-ensemble"],
                "learned-ensemble",
                "the ensemble of all experts to imitate: mixture weights trained on the \
                 training data first, or 1/N each",
            ),
            ParamSpec::int(
                "teacher_steps",
                shared.steps as i64,
                "optimiser steps for the learned teacher's mixture weights",
            )
            .min(1.0),
            ParamSpec::int("rank", 8, "rank of the distilled adapter").min(1.0),
        ];
        specs.extend(OptimizeOptions::param_specs());
        for spec in &mut specs {
            match spec.name.as_str() {
                "steps" => spec.default = Some(ParamValue::Int(STEPS)),
                "learning_rate" => spec.default = Some(ParamValue::Float(LEARNING_RATE)),
                "batch_size" => spec.default = Some(ParamValue::Int(BATCH_SIZE)),
                _ => {}
            }
        }
        specs
    }

    fn fit(&self, ctx: &FitContext<'_>, params: &Params) -> Result<Fitted, PolicyError> {
        if ctx.experts().is_empty() || ctx.module_paths().is_empty() {
            return Err(PolicyError::invalid(
                "distill needs at least one expert that adapts a module",
            ));
        }
        let rank = params.int("rank")? as usize;
        let options = OptimizeOptions::from_params(params)?;
        let teacher = teacher(ctx, params, &options)?;
        ctx.check_cancelled()?;
        let student = Fitted {
            plan: ctx.plan(ModulePlan::Fixed),
            tensors: student_start(ctx, rank, options.seed),
        };
        ctx.progress(
            0.0,
            &format!("distilling the teacher into a rank-{rank} adapter"),
        );
        let options = OptimizeOptions {
            train_fixed: true,
            teacher: Some(Box::new(teacher.plan.clone())),
            ..options
        };
        ctx.optimize(&distillation_template(&student, &teacher), &options)
    }
}

/// The teacher: an ensemble of every expert alone, at probability level, its mixture
/// weights uniform or learned by the host (with the student's batch size and seed).
fn teacher(
    ctx: &FitContext<'_>,
    params: &Params,
    options: &OptimizeOptions,
) -> Result<Fitted, PolicyError> {
    let plan = Plan {
        ensemble: Some(Ensemble::uniform(
            EnsembleLevel::Probability,
            ctx.experts().len(),
        )),
        ..ctx.plan(ModulePlan::None)
    };
    let uniform = Fitted::plan(plan);
    if params.str("teacher")? == "uniform-ensemble" {
        return Ok(uniform);
    }
    ctx.progress(0.0, "learning the teacher's mixture weights");
    let weights = OptimizeOptions {
        train_ensemble_weights: true,
        steps: params.int("teacher_steps")? as usize,
        batch_size: options.batch_size,
        seed: options.seed,
        ..OptimizeOptions::default()
    };
    ctx.optimize(&uniform, &weights)
}

/// The student's starting factors on every module the experts adapt, as PEFT starts a LoRA:
/// `A` uniform in ±1/√in (Kaiming-uniform with a = √5), `B` zero, so training starts from the
/// base model.
fn student_start(ctx: &FitContext<'_>, rank: usize, seed: u64) -> BTreeMap<String, TensorData> {
    let mut rng = SplitMix64(seed ^ 0x6a09_e667_f3bc_c908);
    let mut tensors = BTreeMap::new();
    for module in ctx.module_paths() {
        let Some(m) = ctx.experts().iter().find_map(|e| e.module(module)) else {
            continue;
        };
        let bound = 1.0 / (m.in_features as f64).sqrt();
        let a = (0..rank * m.in_features)
            .map(|_| (rng.uniform() * bound) as f32)
            .collect();
        tensors.insert(
            fixed_a_name(module),
            TensorData {
                shape: vec![rank, m.in_features],
                data: a,
            },
        );
        tensors.insert(
            fixed_b_name(module),
            TensorData::zeros(&[m.out_features, rank]),
        );
    }
    tensors
}

/// A small seeded generator (splitmix64): the same seed gives the same start.
struct SplitMix64(u64);

impl SplitMix64 {
    /// Uniform in `[-1, 1)`.
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        (z >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0
    }
}

moerge_sdk::export_policy!(Distill);
