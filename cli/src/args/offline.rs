//! The offline commands' arguments: they work on folders (or hub ids) directly, no daemon.

use std::path::PathBuf;

use clap::{Args, Subcommand};

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
pub struct LocalModelArgs {
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
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    pub precision: PrecisionArg,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum PrecisionArg {
    /// The checkpoint's own: bf16 for a bf16 checkpoint, else f32.
    Auto,
    F32,
    Bf16,
}

#[derive(Debug, Args)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: LocalModelArgs,
    /// Text to run (tokenized without special tokens; batch 1, no padding).
    #[arg(long)]
    pub text: String,
    /// Output file: `logits` f32 [T, vocab] and `input_ids` i64 [T].
    #[arg(long)]
    pub out: PathBuf,
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
pub struct PlotArgs {
    /// The report: what `moerge eval --policies all --json` printed, saved to a file.
    pub report: PathBuf,
    /// Folder to draw into (created if missing): tradeoff, greedy, routing and similarity,
    /// each as .svg and .png.
    #[arg(long)]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct InterpolateArgs {
    /// The expert at t = 0, by folder name in the library's experts/.
    pub a: String,
    /// The expert at t = 1.
    pub b: String,
    /// Points from t = 0 to t = 1, both ends included (at least 2).
    #[arg(long, default_value_t = 11)]
    pub steps: usize,
    /// Where the merge is computed: exact interpolates the updates (the weights), lowrank
    /// the factors.
    #[arg(long, value_enum, default_value_t = SpaceArg::Exact)]
    pub space: SpaceArg,
    /// The library folder (base/, experts/ with moerge.json task metadata,
    /// data/{train,valid,test}.jsonl) [default: the embedded tiny library].
    #[arg(long, value_name = "DIR")]
    pub tiny: Option<PathBuf>,
    /// The split scored: the records of A's and B's tasks.
    #[arg(long, value_enum, default_value_t = crate::args::SplitArg::Valid)]
    pub split: crate::args::SplitArg,
    /// At most N records per task [default: all].
    #[arg(long, value_name = "N")]
    pub records: Option<usize>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Draw the curve into DIR as interpolation.svg and interpolation.png.
    #[arg(long, value_name = "DIR")]
    pub plot: Option<PathBuf>,
}
