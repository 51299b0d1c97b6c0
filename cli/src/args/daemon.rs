//! The daemon-only commands' arguments, the connection options they all share, and `demo`.

use std::path::PathBuf;

use clap::{Args, Subcommand};

use super::RemoteModelArgs;

/// Where the daemon is. Default: `$MOERGE_ADDRESS` when set, else the session bus.
#[derive(Debug, Clone, Default, Args)]
pub struct ConnectArgs {
    /// Talk to a moerged serving a private socket (`moerged --address unix:path=PATH`)
    /// [default: $MOERGE_ADDRESS, if set].
    #[arg(long, value_name = "unix:path=PATH", conflicts_with_all = ["bus_address", "system"])]
    pub address: Option<String>,
    /// Talk to the moerged on the bus daemon at this address (`moerged --bus-address ADDR`).
    #[arg(long, value_name = "ADDRESS", conflicts_with = "system")]
    pub bus_address: Option<String>,
    /// Talk to the moerged on the system bus (`moerged --system`) instead of the session bus.
    #[arg(long)]
    pub system: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `--json` and the connection, for commands that take nothing else.
#[derive(Debug, Clone, Args)]
pub struct Common {
    #[command(flatten)]
    pub connect: ConnectArgs,
    /// Print JSON instead of a table or a sentence.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ExpertsCommand {
    /// Every expert of the library, ready or not (rejected ones with the reason).
    List(Common),
    /// One expert: hash, state, reason, size, generation.
    Show {
        /// The expert's name (its folder name).
        name: String,
        #[command(flatten)]
        common: Common,
    },
    /// Copy an adapter folder into the library (validated, atomically); it is named after
    /// the folder. The daemon's own user or root only.
    Add {
        /// The PEFT adapter folder (made absolute; it must be readable by the daemon).
        path: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Remove an expert's folder from the library. The daemon's own user or root only.
    Remove {
        /// The expert's name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct PlansArgs {
    #[command(subcommand)]
    pub command: Option<PlansCommand>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// The stored plans, with their experts and whether they went stale (the default).
    List(Common),
    /// Store a plan file under NAME (then `--saved NAME` fuses it).
    Save {
        /// The name to store it under.
        name: String,
        /// The plan file (JSON); made absolute, read by the daemon.
        file: PathBuf,
        #[command(flatten)]
        common: Common,
    },
    /// Forget a stored plan.
    Remove {
        /// The plan's name.
        name: String,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Debug, Args)]
pub struct FuseArgs {
    /// A plan file (JSON) to fuse (FusePlan).
    #[arg(long, conflicts_with_all = ["policy", "saved"])]
    pub plan: Option<PathBuf>,
    #[command(flatten)]
    pub remote: RemoteModelArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct SelectArgs {
    /// The data: a JSONL file or a folder with train.jsonl (and valid.jsonl), on the
    /// daemon's machine.
    #[arg(long)]
    pub data: PathBuf,
    /// A selection parameter KEY=VALUE (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub param: Vec<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// The tiny library (base/, experts/, data/) [default: $MOERGE_TINY_LIBRARY, else the
    /// one next to this build or install].
    #[arg(long, value_name = "DIR")]
    pub tiny: Option<PathBuf>,
    /// The moerged executable [default: next to this moerge, else on PATH].
    #[arg(long, value_name = "FILE")]
    pub moerged: Option<PathBuf>,
    /// How many tasks (one per family first, then more), each with its own expert.
    #[arg(long, default_value_t = 5)]
    pub tasks: usize,
    /// Test records scored per task.
    #[arg(long, default_value_t = 20)]
    pub records: usize,
    /// Optimiser steps of the learned policies' short fits.
    #[arg(long, default_value_t = 200)]
    pub fit_steps: usize,
    /// Print the table as JSON (and no progress bar).
    #[arg(long)]
    pub json: bool,
}
