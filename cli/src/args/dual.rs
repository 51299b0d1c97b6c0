//! Commands that run offline when given a local model and ask the daemon otherwise.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::{ConnectArgs, LocalModelArgs, PrecisionArg};

/// Which model the daemon should fuse: exactly one of `--policy`, `--plan` or `--saved`.
#[derive(Debug, Clone, Args)]
pub struct RemoteModelArgs {
    /// Over the daemon: fuse with this policy (`moerge policies` lists them), e.g. arrow.
    #[arg(long, conflicts_with = "saved")]
    pub policy: Option<String>,
    /// With --policy: a policy parameter KEY=VALUE (repeatable), e.g. --param top_k=2.
    /// Numbers and true/false are sent as JSON numbers and booleans.
    #[arg(long, value_name = "KEY=VALUE", requires = "policy")]
    pub param: Vec<String>,
    /// With --policy: only these experts, comma-separated [default: every ready expert].
    #[arg(long, value_delimiter = ',', requires = "policy")]
    pub experts: Option<Vec<String>>,
    /// Over the daemon: fuse the stored plan of this name (`moerge plans` lists them).
    #[arg(long, value_name = "NAME")]
    pub saved: Option<String>,
}

/// The model to run: local folders (offline), or a model the daemon fuses.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Base model folder (config.json, model.safetensors, tokenizer.json) or hub id
    /// org/name[@rev]. Given: the command runs offline, without a daemon.
    #[arg(long, conflicts_with_all = ["policy", "saved"])]
    pub base: Option<String>,
    /// Offline: attach this LoRA adapter (folder or hub id), unmerged.
    #[arg(long, conflicts_with = "plan", requires = "base")]
    pub adapter: Option<String>,
    /// Offline: folder of adapter folders that --plan names its experts from.
    #[arg(long, requires_all = ["plan", "base"])]
    pub library: Option<PathBuf>,
    /// A plan file (JSON). Offline with --base and --library; otherwise the daemon fuses it
    /// (FusePlan) from its own library.
    #[arg(long, conflicts_with_all = ["policy", "saved"])]
    pub plan: Option<PathBuf>,
    /// Offline: compute precision.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Auto)]
    pub precision: PrecisionArg,
    #[command(flatten)]
    pub remote: RemoteModelArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
}

impl ModelArgs {
    /// The offline model, when `--base` was given.
    pub fn local(&self) -> Option<LocalModelArgs> {
        self.base.as_ref().map(|base| LocalModelArgs {
            base: base.clone(),
            adapter: self.adapter.clone(),
            library: self.library.clone(),
            plan: self.plan.clone(),
            precision: self.precision,
        })
    }
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
    /// Print one JSON object {"text": ...} at the end instead of streaming.
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

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// JSONL records with a task each (over the daemon: read here, scored one per call).
    /// Required unless --policies is given.
    #[arg(long, required_unless_present = "policies")]
    pub data: Option<PathBuf>,
    /// Over the daemon: Score calls in flight at once (the daemon's --max-calls caps it).
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub report: ReportArgs,
}

impl EvalArgs {
    /// `--data`, which clap requires unless `--policies` is given.
    pub fn data_file(&self) -> anyhow::Result<&std::path::Path> {
        self.data
            .as_deref()
            .ok_or_else(|| anyhow::anyhow!("--data FILE is required (or --policies)"))
    }
}

/// `moerge eval --policies all`: the paper's table, offline on a tiny-library-shaped folder.
#[derive(Debug, Clone, Args)]
pub struct ReportArgs {
    /// Compare fusion policies and baselines on a library (offline, no daemon): `all`,
    /// `paper` (the paper's main table: base, shared, oracle, oracle-cluster,
    /// uniform-merge-lowrank, uniform-merge-exact, learned-merge, uniform-ensemble,
    /// learned-ensemble, arrow, sgd-router, hierarchical), or a comma-separated list of rows
    /// (an unknown name lists them all). Prints each row's mean loss over tasks ± standard
    /// error and its cost.
    #[arg(long, value_name = "all|paper|ROWS", conflicts_with_all = ["base", "policy", "saved", "plan", "data"])]
    pub policies: Option<String>,
    /// With --policies: the library folder (base/, experts/ with moerge.json task metadata,
    /// data/{train,valid,test}.jsonl) [default: the embedded tiny library].
    #[arg(long, value_name = "DIR", requires = "policies")]
    pub tiny: Option<PathBuf>,
    /// With --policies: the split the table is scored on.
    #[arg(long, value_enum, default_value_t = SplitArg::Test, requires = "policies")]
    pub split: SplitArg,
    /// With --policies: only these tasks (comma-separated), or the first N tasks [default: all].
    #[arg(long, value_name = "N|LIST", requires = "policies")]
    pub tasks: Option<String>,
    /// With --policies: score (and validate on) at most N records per task [default: all].
    #[arg(long, value_name = "N", requires = "policies")]
    pub records: Option<usize>,
    /// With --policies: optimiser steps of the learned rows (learned merges and ensembles,
    /// SGD routers, hierarchical, distillation).
    #[arg(long, default_value_t = 200, requires = "policies")]
    pub steps: usize,
    /// With --policies: experts per token of the Arrow rows.
    #[arg(long, default_value_t = 3, requires = "policies")]
    pub arrow_top_k: usize,
    /// With --policies: draw the figures (loss vs cost, greedy curve, routing heat map,
    /// cluster similarity) into DIR as SVG and PNG.
    #[arg(long, value_name = "DIR", requires = "policies")]
    pub plot: Option<PathBuf>,
    /// With --policies: another folder of policy plugins (repeatable).
    #[arg(long, value_name = "DIR", requires = "policies")]
    pub policy_dir: Vec<PathBuf>,
}

/// Which split of a library's data to score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SplitArg {
    Valid,
    Test,
}

impl SplitArg {
    pub fn file_stem(self) -> &'static str {
        match self {
            SplitArg::Valid => "valid",
            SplitArg::Test => "test",
        }
    }
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Offline: folder of the plan's experts (then --plan is read here, no daemon).
    #[arg(long, requires = "plan")]
    pub library: Option<PathBuf>,
    /// The plan: static (and fixed) merges, or (offline) Arrow routing over experts.
    /// Without --library the daemon fuses it and writes the adapter (ExportPeft).
    #[arg(long, conflicts_with_all = ["policy", "saved"])]
    pub plan: Option<PathBuf>,
    /// Output folder (must not exist yet): a PEFT adapter, or for an Arrow plan
    /// `arrow_config.json`. Over the daemon it is written by the daemon, as an absolute path.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub remote: RemoteModelArgs,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of a sentence.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum PoliciesCommand {
    /// One policy's parameters, with their types, defaults and meaning (--local only shows
    /// parameters; the daemon lists name, version and description).
    Show { name: String },
}

#[derive(Debug, Args)]
pub struct PoliciesArgs {
    #[command(subcommand)]
    pub command: Option<PoliciesCommand>,
    /// List the plugins found on this machine (offline) instead of asking the daemon.
    #[arg(long, global = true)]
    pub local: bool,
    /// Also look for plugins in this folder (repeatable); implies --local.
    #[arg(long = "policy-dir", global = true)]
    pub policy_dir: Vec<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of a list.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct FitArgs {
    /// The policy's name (see `moerge policies`), e.g. sgd-router.
    #[arg(long)]
    pub policy: String,
    /// A policy parameter, KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub param: Vec<String>,
    /// Only these experts, comma-separated [default: every expert of the library].
    #[arg(long, value_delimiter = ',')]
    pub experts: Option<Vec<String>>,
    /// Over the daemon: the data, a JSONL file or a folder with train.jsonl (and
    /// valid.jsonl), on the daemon's machine.
    #[arg(long, conflicts_with_all = ["base", "library", "train", "valid"])]
    pub data: Option<PathBuf>,
    /// Over the daemon: the name to store the plan under [default: the daemon picks one].
    #[arg(long, conflicts_with_all = ["base", "library"])]
    pub name: Option<String>,
    /// Offline: base model folder or hub id (with --library and --out).
    #[arg(long, requires_all = ["library", "out"])]
    pub base: Option<String>,
    /// Offline: folder of adapter folders (the experts).
    #[arg(long, requires_all = ["base", "out"])]
    pub library: Option<PathBuf>,
    /// Offline: JSONL records the policy may train on.
    #[arg(long, requires = "base")]
    pub train: Option<PathBuf>,
    /// Offline: JSONL records the policy may validate on (and the validation loss reported).
    #[arg(long, requires = "base")]
    pub valid: Option<PathBuf>,
    /// Offline: where to write the plan; its tensor file, if any, goes next to it.
    #[arg(long, requires = "base")]
    pub out: Option<PathBuf>,
    /// Offline: also look for plugins in this folder (repeatable).
    #[arg(long = "policy-dir", requires = "base")]
    pub policy_dir: Vec<PathBuf>,
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print a JSON report instead of text (and no progress bar).
    #[arg(long)]
    pub json: bool,
}
