//! Merge speed and the serving cost of merged models. Run: `cargo bench -p moerge-engine --bench merge`.
//!
//! 1. Merge time for N = 4, 16, 64 random adapters with Phi-2's real layer shapes (hidden
//!    2560, intermediate 10240, 2 layers, r = 4, targets q/k/v/dense/fc1/fc2), as GB/s of
//!    LoRA bytes read, next to a plain memory copy of the same bytes in the same run.
//!    Reference (issue): PEFT 0.21 add_weighted_adapter linear 85 / 83 / 196 ms.
//! 2. Forward tokens/s of a low-rank merge of 4 (unfolded), a folded merge of 4, Arrow top-2
//!    of 4 (mixing outputs, and mixing factors), a plan-carried rank-8 update (what TIES, DARE,
//!    magnitude pruning and distillation produce), a layer-wise plan (layer 0 routed, the rest
//!    merged), a 2-of-4 ensemble (a sparse LP solution) and a 4-way probability ensemble
//!    (members stacked in one batch, and one by one), as ratios to one unmerged adapter, on the
//!    tiny
//!    Phi and tiny Llama (8 x 128 tokens). Reference (issue, PEFT at 8x128 on the tiny Phi):
//!    Arrow top-2 about 59k tok/s, a 4-way ensemble about 31k tok/s.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use common::*;
use moerge_engine::{merge, BaseModel, ForwardState, FusedModel, LanguageModel, Precision};
use moerge_library::{Adapter, F32Tensor, TensorMap};
use moerge_sdk::plan::{
    fixed_a_name, fixed_b_name, Ensemble, EnsembleLevel, Granularity, Member, MergeSpace, Mix,
    ModulePlan, Plan, Router,
};

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn plan(experts: &[Adapter], space: MergeSpace) -> Plan {
    let n = experts.len();
    plan_of(
        experts,
        ModulePlan::Static {
            weights: vec![1.0 / n as f64; n],
            space,
            svd_rank: None,
        },
    )
}

fn arrow_plan(experts: &[Adapter]) -> Plan {
    Plan {
        default: ModulePlan::Routed {
            router: Router::Arrow,
            top_k: 2,
            temperature: 1.0,
            granularity: Granularity::Token,
            groups: Vec::new(),
            mix: Default::default(),
        },
        ..plan(experts, MergeSpace::Exact)
    }
}

/// Arrow top-2 mixing the experts' factors instead of their outputs.
fn arrow_factors_plan(experts: &[Adapter]) -> Plan {
    let mut p = arrow_plan(experts);
    if let ModulePlan::Routed { mix, .. } = &mut p.default {
        *mix = Mix::Factors;
    }
    p
}

/// What TIES, DARE, magnitude pruning and distillation produce: one rank-`r` update per
/// module carried by the plan (here random factors), and the tensors holding it.
fn fixed_plan(experts: &[Adapter], r: usize) -> (Plan, TensorMap) {
    let mut tensors = TensorMap::new();
    let mut seed = 1u64;
    let mut next = || {
        seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
        ((seed >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.02
    };
    for (module, m) in experts[0].modules() {
        let a = (0..r * m.in_features).map(|_| next()).collect();
        let b = (0..m.out_features * r).map(|_| next()).collect();
        let tensor = |shape: Vec<usize>, data| F32Tensor { shape, data };
        tensors.insert(fixed_a_name(module), tensor(vec![r, m.in_features], a));
        tensors.insert(fixed_b_name(module), tensor(vec![m.out_features, r], b));
    }
    let p = Plan {
        default: ModulePlan::Fixed,
        tensors: Some("0".repeat(64)),
        ..plan(experts, MergeSpace::Exact)
    };
    (p, tensors)
}

/// Mediator-style layer-wise: layer 0 routed (Arrow top-2), the rest a low-rank merge.
fn layerwise_plan(experts: &[Adapter]) -> Plan {
    let mut p = plan(experts, MergeSpace::LowRank);
    p.modules
        .insert("model.layers.0".into(), arrow_plan(experts).default);
    p
}

/// An ensemble of the first `k` experts only (what a sparse LP solution runs).
fn sparse_ensemble_plan(experts: &[Adapter], k: usize) -> Plan {
    let mut p = ensemble_plan(experts);
    if let Some(e) = &mut p.ensemble {
        e.members.truncate(k);
        e.members.iter_mut().for_each(|m| m.weight = 1.0 / k as f64);
    }
    p
}

fn ensemble_plan(experts: &[Adapter]) -> Plan {
    let n = experts.len();
    let members = (0..n)
        .map(|i| Member {
            weight: 1.0 / n as f64,
            default: ModulePlan::Static {
                weights: (0..n).map(|j| f64::from(u8::from(i == j))).collect(),
                space: MergeSpace::Exact,
                svd_rank: None,
            },
            modules: Default::default(),
        })
        .collect();
    Plan {
        default: ModulePlan::None,
        ensemble: Some(Ensemble {
            level: EnsembleLevel::Probability,
            members,
        }),
        ..plan(experts, MergeSpace::Exact)
    }
}

fn median(mut v: Vec<Duration>) -> f64 {
    v.sort();
    v[v.len() / 2].as_secs_f64()
}

fn phi2_adapters(dir: &std::path::Path, n: usize) -> Vec<Adapter> {
    let (h, i) = (2560, 10240);
    let specs: Vec<LoraSpec> = (0..2)
        .flat_map(|l| {
            [
                ("self_attn.q_proj", h, h),
                ("self_attn.k_proj", h, h),
                ("self_attn.v_proj", h, h),
                ("self_attn.dense", h, h),
                ("mlp.fc1", h, i),
                ("mlp.fc2", i, h),
            ]
            .map(|(m, inp, out)| LoraSpec {
                module: format!("model.layers.{l}.{m}"),
                rank: 4,
                in_features: inp,
                out_features: out,
            })
        })
        .collect();
    (0..n)
        .map(|k| {
            let d = dir.join(format!("e{k}"));
            write_adapter(
                &d,
                lora_config(
                    4,
                    8.0,
                    &["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
                ),
                &specs,
                k as u64,
            );
            Adapter::load(&d).unwrap()
        })
        .collect()
}

fn merge_speed() {
    let tmp = tempfile::tempdir().unwrap();
    let all = phi2_adapters(tmp.path(), 64);
    println!("merge, Phi-2 shapes (2 layers, r 4, 6 targets), uniform weights:");
    for n in [4, 16, 64] {
        let experts: Vec<Adapter> = all[..n]
            .iter()
            .map(|e| Adapter::load(e.dir()).unwrap())
            .collect();
        let bytes: usize = experts
            .iter()
            .flat_map(|e| {
                e.modules()
                    .values()
                    .flat_map(move |m| [e.tensor_bytes(&m.a).len(), e.tensor_bytes(&m.b).len()])
            })
            .sum();
        let p = plan(&experts, MergeSpace::LowRank);
        let (mut merge_t, mut copy_t) = (Vec::new(), Vec::new());
        let mut sink = vec![0u8; bytes];
        for _ in 0..7 {
            let start = Instant::now();
            let merged =
                merge::merged_modules(&p, &experts, &Default::default(), &Device::Cpu).unwrap();
            merge_t.push(start.elapsed());
            assert_eq!(merged.len(), 12);
            // Baseline: copy the same LoRA bytes from the same maps.
            let start = Instant::now();
            let mut at = 0;
            for e in &experts {
                for m in e.modules().values() {
                    for t in [&m.a, &m.b] {
                        let src = e.tensor_bytes(t);
                        sink[at..at + src.len()].copy_from_slice(src);
                        at += src.len();
                    }
                }
            }
            copy_t.push(start.elapsed());
            std::hint::black_box(&sink);
        }
        let (m, c) = (median(merge_t), median(copy_t));
        let gb = bytes as f64 / 1e9;
        println!(
            "  N={n:<3} {:>6.1} MB   lowrank merge {:>7.1} ms ({:>5.1} GB/s)   memcpy {:>6.1} ms ({:>5.1} GB/s)   merge/memcpy time {:.2}",
            bytes as f64 / 1e6,
            m * 1e3,
            gb / m,
            c * 1e3,
            gb / c,
            m / c
        );
    }
    println!("  PEFT 0.21 add_weighted_adapter linear (issue reference): 85 / 83 / 196 ms for N = 4 / 16 / 64");
}

fn serving_cost(label: &str, dir: &std::path::Path, targets: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let specs = lora_specs(dir, targets, 8);
    let experts: Vec<Adapter> = (0..4)
        .map(|k| {
            let d = tmp.path().join(format!("e{k}"));
            write_adapter(&d, lora_config(8, 16.0, targets), &specs, 10 + k as u64);
            Adapter::load(&d).unwrap()
        })
        .collect();
    let base = BaseModel::load_dir(dir, Precision::F32).unwrap();
    let single = FusedModel::Single;
    let models = [
        (
            "one adapter",
            single(base.with_adapter(&experts[0]).unwrap()),
        ),
        (
            "lowrank merge of 4",
            single(
                base.with_plan(
                    &plan(&experts, MergeSpace::LowRank),
                    &experts,
                    &Default::default(),
                )
                .unwrap(),
            ),
        ),
        (
            "folded merge of 4",
            single(
                base.with_plan(
                    &plan(&experts, MergeSpace::Folded),
                    &experts,
                    &Default::default(),
                )
                .unwrap(),
            ),
        ),
        (
            "arrow top-2 of 4",
            single(
                base.with_plan(&arrow_plan(&experts), &experts, &Default::default())
                    .unwrap(),
            ),
        ),
        (
            "arrow top-2, factors",
            single(
                base.with_plan(&arrow_factors_plan(&experts), &experts, &Default::default())
                    .unwrap(),
            ),
        ),
        (
            "fixed rank 8 (TIES..)",
            single({
                let (p, tensors) = fixed_plan(&experts, 8);
                base.with_plan(&p, &experts, &tensors).unwrap()
            }),
        ),
        (
            "layerwise 1 routed",
            single(
                base.with_plan(&layerwise_plan(&experts), &experts, &Default::default())
                    .unwrap(),
            ),
        ),
        (
            "2-of-4 ensemble (LP)",
            base.fuse(&sparse_ensemble_plan(&experts, 2), &experts)
                .unwrap(),
        ),
        (
            "4-way prob ensemble",
            base.fuse(&ensemble_plan(&experts), &experts).unwrap(),
        ),
        (
            "same, one by one",
            match base.fuse(&ensemble_plan(&experts), &experts).unwrap() {
                FusedModel::Ensemble(e) => FusedModel::Ensemble(e.sequential()),
                single => single,
            },
        ),
    ];
    let ids: Vec<u32> = (0..8 * 128).map(|i| (i * 7 % 251) as u32).collect();
    let input = Tensor::from_vec(ids, (8, 128), &Device::Cpu).unwrap();
    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); models.len()];
    for round in 0..60 {
        for (k, (_, m)) in models.iter().enumerate() {
            let start = Instant::now();
            m.forward(&input, &mut ForwardState::new()).unwrap();
            if round >= 5 {
                times[k].push(start.elapsed());
            }
        }
    }
    let tps: Vec<f64> = times.into_iter().map(|t| 1024.0 / median(t)).collect();
    for ((name, _), t) in models.iter().zip(&tps) {
        println!(
            "  {label:<6} 8x128 {name:<20} {t:>9.0} tok/s   vs one adapter {:.2}",
            t / tps[0]
        );
    }
}

fn main() {
    moerge_engine::prefer_data_parallelism();
    merge_speed();
    let tmp = tempfile::tempdir().unwrap();
    let phi = tmp.path().join("phi");
    write_phi(&phi, TINY_PHI, 1);
    let llama = tmp.path().join("llama");
    write_llama(&llama, TINY_LLAMA, 3);
    println!("serving cost (alternating runs, same process):");
    serving_cost(
        "phi",
        &phi,
        &["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    );
    serving_cost(
        "llama",
        &llama,
        &[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    );
}
