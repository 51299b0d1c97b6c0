//! What the user typed: the `moerge` command line, parsed by clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// moerge keeps a library of LoRA experts fine-tuned from one base model and serves fused
/// models built from them. These offline commands work on folders directly, without a daemon.
#[derive(Debug, Parser)]
#[command(name = "moerge", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log more (repeat for more detail); RUST_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Describe a PEFT LoRA adapter folder: rank, alpha, scale, targets, shapes, hash, state.
    Inspect(InspectArgs),
    /// Write the logits of one forward pass over TEXT to a safetensors file.
    Logits(LogitsArgs),
    /// Mean negative log-likelihood per token of COMPLETION after PROMPT.
    Score(ScoreArgs),
    /// Continue PROMPT, streaming the text to stdout (greedy unless --temperature > 0).
    Generate(GenerateArgs),
    /// Train a LoRA adapter on JSONL records and write it as a PEFT adapter folder.
    Train(TrainArgs),
    /// Mean loss per completion token, per task, with the mean over tasks and its standard error.
    Eval(EvalArgs),
    /// Write fusion plans (reviewable JSON recipes) from a library of experts.
    #[command(subcommand)]
    Plan(PlanCommand),
    /// List the fusion-policy plugins found, with their versions and parameters.
    Policies(PoliciesArgs),
    /// Run a fusion policy on a library folder and write the plan it makes.
    Fit(FitArgs),
    /// Show which experts a routed plan gives each token of PROMPT, per layer.
    Explain(ExplainArgs),
    /// Export a plan for PEFT: a static merge as one adapter folder, an Arrow plan as its
    /// adapter list and ArrowConfig values.
    Export(ExportArgs),
}

#[derive(Debug, Subcommand)]
pub enum PoliciesCommand {
    /// One policy's parameters, with their types, defaults and meaning.
    Show { name: String },
}

#[derive(Debug, Args)]
pub struct PoliciesArgs {
    #[command(subcommand)]
    pub command: Option<PoliciesCommand>,
    /// Also look for plugins in this folder (repeatable).
    #[arg(long = "policy-dir")]
    pub policy_dir: Vec<PathBuf>,
    /// Print JSON instead of a list.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// The policy's name (see `moerge policies`).
    #[arg(long)]
    pub policy: String,
    /// Base model folder or hub id.
    #[arg(long)]
    pub base: String,
    /// Folder of adapter folders (the experts).
    #[arg(long)]
    pub library: PathBuf,
    /// Only these experts, comma-separated; default every adapter folder in --library.
    #[arg(long, value_delimiter = ',')]
    pub experts: Option<Vec<String>>,
    /// JSONL records the policy may train on.
    #[arg(long)]
    pub train: Option<PathBuf>,
    /// JSONL records the policy may validate on (and the validation loss reported).
    #[arg(long)]
    pub valid: Option<PathBuf>,
    /// A policy parameter, KEY=VALUE (repeatable).
    #[arg(long)]
    pub param: Vec<String>,
    /// Where to write the plan; its tensor file, if any, goes next to it.
    #[arg(long)]
    pub out: PathBuf,
    /// Also look for plugins in this folder (repeatable).
    #[arg(long = "policy-dir")]
    pub policy_dir: Vec<PathBuf>,
    /// Print a JSON report instead of text (and no progress bar).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text whose tokens are routed.
    #[arg(long)]
    pub prompt: String,
    /// Only this module (e.g. model.layers.0.mlp.fc1) instead of per-layer averages.
    #[arg(long)]
    pub module: Option<String>,
    /// Experts shown per token and layer.
    #[arg(long, default_value_t = 2)]
    pub top: usize,
    /// Print every module's weights per token as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// A static weighted merge of experts.
    Merge(PlanMergeArgs),
    /// Arrow routing: each token goes to the experts whose prototypes it aligns with most.
    Arrow(PlanArrowArgs),
    /// An output ensemble: every expert runs, their predictions are mixed.
    Ensemble(PlanEnsembleArgs),
}

/// Which experts a merge or an ensemble combines, with what weights.
#[derive(Debug, Args)]
pub struct WeightedExperts {
    /// Folder of adapter folders; experts are named by their folder names.
    #[arg(long)]
    pub library: PathBuf,
    /// Experts to combine, comma-separated.
    #[arg(long, value_delimiter = ',', required = true)]
    pub experts: Vec<String>,
    /// One weight per expert, comma-separated; default 1/N each (ensemble probability
    /// weights must sum to 1).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    pub weights: Option<Vec<f64>>,
}

#[derive(Debug, Args)]
pub struct PlanEnsembleArgs {
    #[command(flatten)]
    pub pick: WeightedExperts,
    /// prob: mix the next-token distributions; logit: mix the logits.
    #[arg(long, value_enum, default_value_t = LevelArg::Prob)]
    pub level: LevelArg,
    /// Write the plan here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LevelArg {
    Prob,
    Logit,
}

#[derive(Debug, Args)]
pub struct PlanArrowArgs {
    /// Folder of adapter folders; experts are named by their folder names.
    #[arg(long)]
    pub library: PathBuf,
    /// Experts to route between, comma-separated; default every adapter folder in --library.
    #[arg(long, value_delimiter = ',')]
    pub experts: Option<Vec<String>>,
    /// Experts each token uses.
    #[arg(long, default_value_t = 4)]
    pub top_k: usize,
    /// Softmax temperature over the top-k scores.
    #[arg(long, default_value_t = 1.0)]
    pub temperature: f64,
    /// Write the plan here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PlanMergeArgs {
    #[command(flatten)]
    pub pick: WeightedExperts,
    /// lowrank: average A and B separately (the paper's merge); exact: Σ w s B A;
    /// folded: the exact delta added into the base weights.
    #[arg(long, value_enum, default_value_t = SpaceArg::Lowrank)]
    pub space: SpaceArg,
    /// With --space exact or folded: keep only the top K singular directions of each merged
    /// delta (PEFT's svd merge).
    #[arg(long)]
    pub svd_rank: Option<usize>,
    /// Write the plan here instead of stdout.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum SpaceArg {
    Lowrank,
    Exact,
    Folded,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Folder of the plan's experts.
    #[arg(long)]
    pub library: PathBuf,
    /// The plan: static (and fixed) merges, or Arrow routing over experts.
    #[arg(long)]
    pub plan: PathBuf,
    /// Output folder (must not exist yet): a PEFT adapter, or for an Arrow plan
    /// `arrow_config.json`.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Adapter folder (adapter_config.json + adapter_model.safetensors) or hub id org/name[@rev].
    pub adapter: String,
    /// Also check compatibility with this base model folder or hub id.
    #[arg(long)]
    pub base: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Which model to run: a base, optionally with one adapter attached.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// Base model folder (config.json, model.safetensors, tokenizer.json) or hub id org/name[@rev].
    #[arg(long)]
    pub base: String,
    /// Attach this LoRA adapter (folder or hub id), unmerged.
    #[arg(long, conflicts_with = "plan")]
    pub adapter: Option<String>,
    /// Folder of adapter folders that --plan names its experts from.
    #[arg(long, requires = "plan")]
    pub library: Option<PathBuf>,
    /// Fuse the experts of --library as this plan file says.
    #[arg(long, requires = "library")]
    pub plan: Option<PathBuf>,
    /// Compute precision.
    #[arg(long, value_enum, default_value_t = PrecisionArg::F32)]
    pub precision: PrecisionArg,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PrecisionArg {
    F32,
    Bf16,
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text to run (tokenized without special tokens; batch 1, no padding).
    #[arg(long)]
    pub text: String,
    /// Output file: `logits` f32 [T, vocab] and `input_ids` i64 [T].
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The context.
    #[arg(long)]
    pub prompt: String,
    /// The text whose tokens are scored.
    #[arg(long)]
    pub completion: String,
    /// Print JSON with the per-token values.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The text to continue.
    #[arg(long)]
    pub prompt: String,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Nucleus sampling mass, in (0, 1].
    #[arg(long)]
    pub top_p: Option<f64>,
    /// Sampler seed, to repeat a sampled generation.
    #[arg(long, default_value_t = 299_792_458)]
    pub seed: u64,
    /// Stop at the first occurrence of this text (e.g. "\n"); may be repeated.
    #[arg(long)]
    pub stop: Vec<String>,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Base model folder or hub id.
    #[arg(long)]
    pub base: String,
    /// JSONL records {"task", "prompt", "completion"} (task optional).
    #[arg(long)]
    pub data: PathBuf,
    /// Train only on the records of this task.
    #[arg(long)]
    pub task: Option<String>,
    /// Output adapter folder (must not exist yet).
    #[arg(long)]
    pub out: PathBuf,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    pub r: usize,
    /// LoRA alpha (scale = alpha / r).
    #[arg(long, default_value_t = 8.0)]
    pub alpha: f64,
    /// Module names to adapt, comma-separated (PEFT's target_modules).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "q_proj,k_proj,v_proj,dense,fc1,fc2"
    )]
    pub targets: Vec<String>,
    /// Optimiser steps.
    #[arg(long, default_value_t = 250)]
    pub steps: usize,
    /// Examples per step.
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Peak learning rate (AdamW, warm-up then cosine decay).
    #[arg(long, default_value_t = 5e-3)]
    pub lr: f64,
    /// Seed of the initialisation and of the example order.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL records with a task each.
    #[arg(long)]
    pub data: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}
