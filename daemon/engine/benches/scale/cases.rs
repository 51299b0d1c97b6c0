//! One benchmark case, run in a process of its own so its peak RSS is its own: load the base
//! and the experts, fuse, prefill a 127-token prompt, decode greedily.

use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, D};
use moerge_engine::{BaseModel, ForwardState, FusedModel, LanguageModel, Precision};
use moerge_library::Adapter;
use moerge_sdk::plan::{
    Ensemble, EnsembleLevel, Granularity, MergeSpace, ModulePlan, Plan, Router,
};
use serde::{Deserialize, Serialize};

use super::checkpoint::Res;

/// Tokens in the prompt, as in `peft_scale_bench.py`.
pub const PROMPT: usize = 127;

#[derive(Clone, Copy)]
pub enum Kind {
    One,
    LowRankMerge,
    ArrowTop4,
    Ensemble,
}

pub struct Case {
    /// What the filter matches (with the model's name: `phi:arrow16`).
    pub name: &'static str,
    pub label: &'static str,
    pub experts: usize,
    pub kind: Kind,
    /// `peft_scale_bench.py`'s arguments for the same thing.
    pub peft_args: &'static str,
}

pub const CASES: [Case; 5] = [
    Case {
        name: "one",
        label: "one adapter",
        experts: 1,
        kind: Kind::One,
        peft_args: "--mode one",
    },
    Case {
        name: "merge16",
        label: "low-rank merge of 16",
        experts: 16,
        kind: Kind::LowRankMerge,
        peft_args: "--mode merge --experts 16",
    },
    Case {
        name: "arrow16",
        label: "Arrow top-4 of 16",
        experts: 16,
        kind: Kind::ArrowTop4,
        peft_args: "--mode arrow --experts 16",
    },
    Case {
        name: "arrow64",
        label: "Arrow top-4 of 64",
        experts: 64,
        kind: Kind::ArrowTop4,
        peft_args: "--mode arrow --experts 64",
    },
    Case {
        name: "ensemble4",
        label: "4-way prob. ensemble",
        experts: 4,
        kind: Kind::Ensemble,
        peft_args: "--mode ensemble --experts 4",
    },
];

/// What a case's process reports to the parent (one JSON line on stdout).
#[derive(Serialize, Deserialize)]
pub struct Measured {
    pub base_s: f64,
    pub experts_s: f64,
    pub fuse_s: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
    /// Resident set after loading and fusing, before any forward.
    pub loaded_rss_gb: f64,
    /// The process's peak resident set (VmHWM).
    pub peak_rss_gb: f64,
}

fn plan(experts: &[Adapter], default: ModulePlan, ensemble: Option<Ensemble>) -> Plan {
    Plan {
        ensemble,
        ..super::common::plan_of(experts, default)
    }
}

fn fuse(base: &BaseModel, kind: Kind, experts: &[Adapter]) -> Res<FusedModel> {
    let n = experts.len();
    let model = match kind {
        Kind::One => FusedModel::Single(base.with_adapter(&experts[0])?),
        // The uniform-merge policy's plan; PEFT's `linear` merge costs the same to serve.
        Kind::LowRankMerge => {
            let merge = ModulePlan::Static {
                weights: vec![1.0 / n as f64; n],
                space: MergeSpace::LowRank,
                svd_rank: None,
            };
            base.fuse(&plan(experts, merge, None), experts)?
        }
        Kind::ArrowTop4 => {
            let arrow = ModulePlan::Routed {
                router: Router::Arrow,
                top_k: 4,
                temperature: 1.0,
                granularity: Granularity::Token,
                groups: Vec::new(),
                mix: Default::default(),
            };
            base.fuse(&plan(experts, arrow, None), experts)?
        }
        Kind::Ensemble => {
            let members = Ensemble::uniform(EnsembleLevel::Probability, n);
            base.fuse(&plan(experts, ModulePlan::None, Some(members)), experts)?
        }
    };
    Ok(model)
}

/// Loads, fuses and times one case on the checkpoint in `dir` (`base/`, `experts/`).
pub fn run(dir: &Path, case: &Case, precision: Precision, decode: usize) -> Res<Measured> {
    let start = Instant::now();
    let base = BaseModel::load_dir(&dir.join("base"), precision)?;
    let base_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let experts = (0..case.experts)
        .map(|k| Adapter::load(&dir.join(format!("experts/expert-{k:03}"))))
        .collect::<Result<Vec<_>, _>>()?;
    let experts_s = start.elapsed().as_secs_f64();

    let start = Instant::now();
    let model = fuse(&base, case.kind, &experts)?;
    let fuse_s = start.elapsed().as_secs_f64();
    let loaded_rss_gb = proc_status_gb("VmRSS")?;

    // The prompt peft_scale_bench.py scores; one forward over all of it, no warm-up (as
    // there).
    let vocab = model.vocab_size() as u32;
    let ids: Vec<u32> = (1..=PROMPT as u32).map(|i| i * 37 % vocab).collect();
    let prompt = Tensor::from_vec(ids, (1, PROMPT), model.device())?;
    let mut state = ForwardState::new();
    let start = Instant::now();
    let logits = model.forward_last(&prompt, &mut state)?;
    let prefill_s = start.elapsed().as_secs_f64();

    // Greedy decode, continuing the prompt's state (its KV cache).
    let mut next = argmax(&logits)?;
    let start = Instant::now();
    for _ in 0..decode {
        let input = Tensor::new(&[[next]], model.device())?;
        next = argmax(&model.forward_last(&input, &mut state)?)?;
    }
    let decode_s = start.elapsed().as_secs_f64();

    Ok(Measured {
        base_s,
        experts_s,
        fuse_s,
        prefill_tok_s: PROMPT as f64 / prefill_s,
        decode_tok_s: decode as f64 / decode_s,
        loaded_rss_gb,
        peak_rss_gb: proc_status_gb("VmHWM")?,
    })
}

fn argmax(logits: &Tensor) -> Res<u32> {
    Ok(logits.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?[0])
}

/// A `kB` field of `/proc/self/status` (`VmRSS`, `VmHWM`), in GB.
fn proc_status_gb(field: &str) -> Res<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} in /proc/self/status"))?;
    Ok(kb * 1024.0 / 1e9)
}
