//! The embedded tiny library's recipe: its data, its base model and its experts, all from
//! fixed seeds, so `cargo run --release -p tiny-library` rebuilds the committed files and the
//! tests can re-derive a cheap part of them.

pub mod tasks;

use std::collections::HashSet;
use std::path::Path;

use moerge_engine::trainer::{Example, TrainOptions};
use moerge_engine::LoraSpec;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Seed of everything; each part derives its own from it.
pub const SEED: u64 = 2026;
/// Examples per task and split.
pub const SPLIT_SIZES: [(&str, usize); 3] = [("train", 800), ("valid", 50), ("test", 50)];
/// Every linear layer of a Phi block carries the LoRA, as in the paper's Phi-2 experts.
pub const TARGETS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"];

pub use moerge_library::records::{read_jsonl, to_jsonl, Record};

/// `config.json` of the tiny base: a Phi with partial rotary embeddings, like Phi-2 but small.
pub fn base_config() -> serde_json::Value {
    serde_json::json!({
        "architectures": ["PhiForCausalLM"],
        "model_type": "phi",
        "vocab_size": 256,
        "hidden_size": 96,
        "intermediate_size": 384,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
        "hidden_act": "gelu_new",
        "max_position_embeddings": 64,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "qk_layernorm": false,
        "bos_token_id": null,
        "eos_token_id": 10,
        "rope_parameters": {"rope_theta": 10000.0, "partial_rotary_factor": 0.5, "rope_type": "default"},
        "torch_dtype": "float32"
    })
}

/// The train, valid and test records of every task: distinct inputs across splits.
pub fn splits() -> Vec<(&'static str, Vec<Record>)> {
    let mut out: Vec<(&'static str, Vec<Record>)> =
        SPLIT_SIZES.iter().map(|(s, _)| (*s, Vec::new())).collect();
    for (i, task) in tasks::all().iter().enumerate() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(SEED + 1000 + i as u64);
        let mut seen = HashSet::new();
        for (split, (_, size)) in out.iter_mut().zip(SPLIT_SIZES) {
            while split
                .1
                .iter()
                .filter(|r| r.task.as_deref() == Some(task.name))
                .count()
                < size
            {
                let input = task.draw_input(&mut rng);
                let prompt = task.prompt(&input);
                if seen.insert(prompt.clone()) {
                    split.1.push(Record {
                        task: Some(task.name.into()),
                        prompt,
                        completion: task.completion(&input),
                    });
                }
            }
        }
    }
    out
}

/// What the base is pre-trained on: every task's prompts with answers of the right form but
/// drawn for another input (so it learns the formats, not the rules), and an `echo` task per
/// family that copies its input (so it can attend to and copy what it reads, a skill every
/// expert builds on).
pub fn pretraining_records(count_per_task: usize) -> Vec<Record> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED + 7);
    let mut out = Vec::new();
    let all = tasks::all();
    for task in &all {
        for _ in 0..count_per_task {
            let input = task.draw_input(&mut rng);
            let decoy = task.draw_input(&mut rng);
            out.push(Record {
                task: Some(task.name.into()),
                prompt: task.prompt(&input),
                completion: task.completion(&decoy),
            });
        }
    }
    for family in tasks::families() {
        let members: Vec<&tasks::Task> = all.iter().filter(|t| t.family == family).collect();
        for _ in 0..count_per_task * 2 {
            // Any source of the family: the base learns to copy what each of them reads.
            let source = members[rng.random_range(0..members.len())];
            let text = source.draw_input(&mut rng).text();
            out.push(Record {
                task: Some(format!("echo-{family}")),
                prompt: format!("echo {text}>"),
                completion: format!("{text}\n"),
            });
        }
    }
    out
}

/// Byte-level tokenization (the tiny base's tokenizer maps each byte to its value).
pub fn examples(records: &[Record]) -> Vec<Example> {
    records
        .iter()
        .map(|r| Example {
            task: r.task.clone(),
            prompt: r.prompt.bytes().map(u32::from).collect(),
            completion: r.completion.bytes().map(u32::from).collect(),
        })
        .collect()
}

/// Pre-training of the base (every weight trained).
pub fn base_training() -> TrainOptions {
    TrainOptions {
        steps: 1200,
        batch_size: 32,
        lr: 3e-3,
        warmup_steps: 50,
        weight_decay: 0.01,
        grad_clip: 1.0,
        seed: SEED + 11,
    }
}

/// The kinds of expert, each with its LoRA and schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertKind {
    /// One task (the paper's 256 Flan experts).
    Private,
    /// The union of one family's tasks (MBC's cluster experts).
    Cluster,
    /// Every task (the "shared expert" baseline).
    Shared,
}

/// LoRA shape and training schedule of an expert; `index` makes its seeds distinct.
pub fn expert_recipe(kind: ExpertKind, index: u64) -> (LoraSpec, TrainOptions) {
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        use_rslora: false,
        targets: TARGETS.iter().map(|t| t.to_string()).collect(),
        seed: SEED + 100 + index,
    };
    let steps = match kind {
        ExpertKind::Private => 300,
        ExpertKind::Cluster => 500,
        ExpertKind::Shared => 700,
    };
    let opts = TrainOptions {
        steps,
        batch_size: 32,
        lr: 5e-3,
        warmup_steps: 20,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: SEED + 200 + index,
    };
    (spec, opts)
}

/// Trains one expert of `kind` (the `index`-th in the manifest's order) on `records` from
/// `base`, writes it as a PEFT adapter folder at `dir`, and returns the run's summary and
/// the adapter's content hash.
pub fn train_expert(
    base: &moerge_engine::BaseModel,
    kind: ExpertKind,
    index: u64,
    records: &[Record],
    dir: &Path,
) -> moerge_engine::Result<(
    moerge_engine::trainer::TrainSummary,
    moerge_library::ContentHash,
)> {
    let (spec, opts) = expert_recipe(kind, index);
    let (model, lora) = base.with_trainable_lora(&spec)?;
    let summary =
        moerge_engine::trainer::train(&model, lora.vars(), &examples(records), &opts, |_| {
            std::ops::ControlFlow::Continue(())
        })?;
    let hash = lora.save_peft(dir)?;
    Ok((summary, hash))
}
