//! Output ensembles against PEFT's reference (log of the mean of the five adapters'
//! softmaxes) and against running the members one at a time and mixing by hand.

mod common;

use candle_core::{DType, Device, Tensor, D};
use common::{fixtures, max_abs_diff, plan_of};
use moerge_engine::{inference, BaseModel, FusedModel, LanguageModel, Precision};
use moerge_library::Adapter;
use moerge_sdk::plan::*;

const NAMES: [&str; 5] = ["swapcase", "rot13", "twice", "length", "minus"];

fn ensemble_plan(experts: &[Adapter], weights: &[f64], level: EnsembleLevel) -> Plan {
    let n = experts.len();
    Plan {
        ensemble: Some(Ensemble {
            level,
            // Member i is expert i alone: a one-hot exact merge is the adapter itself.
            members: (0..n)
                .map(|i| Member {
                    weight: weights[i],
                    default: ModulePlan::Static {
                        weights: (0..n).map(|j| if i == j { 1.0 } else { 0.0 }).collect(),
                        space: MergeSpace::Exact,
                        svd_rank: None,
                    },
                    modules: Default::default(),
                })
                .collect(),
        }),
        ..plan_of(experts, ModulePlan::None)
    }
}

#[test]
fn uniform_probability_ensemble_equals_peft_reference() {
    for base_name in ["dev-phi", "dev-llama"] {
        let experts: Vec<Adapter> = NAMES
            .iter()
            .map(|n| Adapter::load(&fixtures().join(base_name).join("adapters").join(n)).unwrap())
            .collect();
        let base = BaseModel::load_dir(&fixtures().join(base_name), Precision::F32).unwrap();
        let model = base
            .fuse(
                &ensemble_plan(&experts, &[0.2; 5], EnsembleLevel::Probability),
                &experts,
            )
            .unwrap();
        assert!(matches!(model, FusedModel::Ensemble(_)));
        let sequences =
            common::reference_sequences(base_name, "ensemble_uniform.safetensors", "log_probs");
        for (i, (ids, want)) in sequences.into_iter().enumerate() {
            let got = inference::logits(&model, &ids).unwrap();
            let diff = max_abs_diff(&got, &want);
            assert!(diff <= 1e-4, "{base_name} sequence {i}: max |diff| {diff}");
        }
    }
}

#[test]
fn weighted_ensembles_equal_members_run_one_at_a_time() {
    let experts: Vec<Adapter> = NAMES
        .iter()
        .map(|n| Adapter::load(&fixtures().join("dev-phi/adapters").join(n)).unwrap())
        .collect();
    let base = BaseModel::load_dir(&fixtures().join("dev-phi"), Precision::F32).unwrap();
    let ids = [72u32, 101, 76, 76, 111, 62, 104];
    let singles: Vec<Tensor> = experts
        .iter()
        .map(|e| inference::logits(&base.with_adapter(e).unwrap(), &ids).unwrap())
        .collect();
    let weights = [0.1, 0.4, 0.0, 0.3, 0.2];
    // Probability level, by hand: log Σ w softmax(z).
    let mut mix = Tensor::zeros(singles[0].shape(), DType::F32, &Device::Cpu).unwrap();
    for (w, z) in weights.iter().zip(&singles) {
        mix = (mix + (candle_nn::ops::softmax(z, D::Minus1).unwrap() * *w).unwrap()).unwrap();
    }
    let want = mix.log().unwrap();
    let model = base
        .fuse(
            &ensemble_plan(&experts, &weights, EnsembleLevel::Probability),
            &experts,
        )
        .unwrap();
    assert!(max_abs_diff(&inference::logits(&model, &ids).unwrap(), &want) < 1e-4);
    // Logit level, any weights: Σ w z.
    let logit_weights = [1.5, -0.5, 0.25, 0.0, 0.1];
    let mut want = Tensor::zeros(singles[0].shape(), DType::F32, &Device::Cpu).unwrap();
    for (w, z) in logit_weights.iter().zip(&singles) {
        want = (want + (z * *w).unwrap()).unwrap();
    }
    let model = base
        .fuse(
            &ensemble_plan(&experts, &logit_weights, EnsembleLevel::Logit),
            &experts,
        )
        .unwrap();
    assert!(max_abs_diff(&inference::logits(&model, &ids).unwrap(), &want) < 1e-4);
    // Cached generation through an ensemble: every member keeps its own cache.
    let mut cache = moerge_engine::ForwardState::new();
    let first = Tensor::new(&ids[..4], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let a = model
        .forward(&first, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    let rest = Tensor::new(&ids[4..], &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let b = model
        .forward(&rest, &mut cache)
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(cache.len(), ids.len());
    assert!(max_abs_diff(&Tensor::cat(&[a, b], 0).unwrap(), &want) < 1e-4);
}

#[test]
fn stacked_members_equal_members_run_one_after_another() {
    let experts: Vec<Adapter> = NAMES
        .iter()
        .map(|n| Adapter::load(&fixtures().join("dev-phi/adapters").join(n)).unwrap())
        .collect();
    let base = BaseModel::load_dir(&fixtures().join("dev-phi"), Precision::F32).unwrap();
    let mut plan = ensemble_plan(
        &experts,
        &[0.3, 0.2, 0.1, 0.15, 0.25],
        EnsembleLevel::Probability,
    );
    // One member routes by sequence (its running sums must stay its own), one is the base.
    let members = &mut plan.ensemble.as_mut().unwrap().members;
    members[1].default = moerge_sdk::plan::ModulePlan::Routed {
        router: moerge_sdk::plan::Router::Arrow,
        top_k: 2,
        temperature: 1.0,
        granularity: moerge_sdk::plan::Granularity::Sequence,
        groups: Vec::new(),
        mix: Default::default(),
    };
    members[3].default = ModulePlan::None;
    let FusedModel::Ensemble(stacked) = base.fuse(&plan, &experts).unwrap() else {
        panic!("an ensemble")
    };
    assert!(stacked.is_stacked());
    let sequential = stacked.sequential();
    // A batch of two sequences, then one decoding step with the cache.
    let ids = Tensor::new(&[[72u32, 101, 76, 76], [5, 99, 31, 200]], &Device::Cpu).unwrap();
    let next = Tensor::new(&[[111u32], [62]], &Device::Cpu).unwrap();
    let run = |m: &moerge_engine::EnsembleModel| {
        let mut cache = moerge_engine::ForwardState::new();
        let a = m.forward(&ids, &mut cache).unwrap();
        let b = m.forward_last(&next, &mut cache).unwrap();
        (a, b)
    };
    let (sa, sb) = run(&stacked);
    let (qa, qb) = run(&sequential);
    assert!(
        max_abs_diff(&sa, &qa) < 1e-4,
        "prompt: {}",
        max_abs_diff(&sa, &qa)
    );
    assert!(
        max_abs_diff(&sb, &qb) < 1e-4,
        "step: {}",
        max_abs_diff(&sb, &qb)
    );
    // A folded member changes the base weights: that ensemble runs its members one by one.
    let members = &mut plan.ensemble.as_mut().unwrap().members;
    members[0].default = ModulePlan::Static {
        weights: vec![1.0, 0.0, 0.0, 0.0, 0.0],
        space: MergeSpace::Folded,
        svd_rank: None,
    };
    let FusedModel::Ensemble(folded) = base.fuse(&plan, &experts).unwrap() else {
        panic!("an ensemble")
    };
    assert!(!folded.is_stacked());
}
