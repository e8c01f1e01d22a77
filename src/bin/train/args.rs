//! Command-line arguments. Doc comments here are the `--help` text, which
//! `tests/snapshots/train-help.txt` pins down.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use qlora_scale::saved_profile::PROFILE_PATH_ENV;
use qlora_scale::train::merge::MergeDtype;
use qlora_scale::train::settings::Settings;

/// Fine-tune a causal LM with QLoRA, sized for the machine and the model
///
/// Without arguments, trains the built-in Llama-shaped model (seeded NF4
/// weights, byte-level tokenizer) on the corpus in data/default, on CPU.
/// Settings: command line, else --config file, else the hardware profile
/// (saved, else detected, else defaults) scaled for the model, else the
/// defaults in tables/defaults.toml.
#[derive(Debug, Parser)]
#[command(
    name = "train",
    bin_name = "train",
    version,
    args_conflicts_with_subcommands = true,
    args_override_self = true
)]
pub struct Cli {
    /// The run's settings: each is a flag and a `--config` key.
    #[command(flatten)]
    pub settings: Settings,
    /// NCCL: this process's rank, which is also its GPU
    #[cfg(feature = "nccl")]
    #[arg(long, value_name = "R", requires = "nccl_world_size")]
    pub nccl_rank: Option<usize>,
    /// NCCL: processes (GPUs) training together
    #[cfg(feature = "nccl")]
    #[arg(long, value_name = "N", requires = "nccl_rank")]
    pub nccl_world_size: Option<usize>,
    /// NCCL: the file through which rank 0 shares the communicator's id
    /// [default: OUTPUT_DIR/nccl_id]; delete it between runs
    #[cfg(feature = "nccl")]
    #[arg(long, value_name = "FILE")]
    pub nccl_id_file: Option<PathBuf>,
    /// TOML file whose keys mirror these flags (lora-rank = 16); the command
    /// line wins over it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The saved profile file
    #[arg(long, value_name = "PATH", help = profile_path_help())]
    pub profile_path: Option<PathBuf>,
    /// Continue from the newest good checkpoint in the output directory
    #[arg(long, conflicts_with = "overwrite")]
    pub resume: bool,
    /// Start a new run in an output directory that holds one, deleting its
    /// checkpoints, metrics, plot and adapter (without it, a new run refuses
    /// a directory that is not empty)
    #[arg(long)]
    pub overwrite: bool,
    /// Print the resolved configuration and train nothing
    #[arg(long)]
    pub dry_run: bool,
    /// With --dry-run: one JSON object on one line
    #[arg(long)]
    pub json: bool,
    /// Other actions.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Merge a run's adapter into its base and write model.safetensors
    Merge(MergeArgs),
}

/// `merge` arguments.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// The run's output directory (adapter and checkpoints)
    #[arg(long, value_name = "DIR", default_value = "runs/default")]
    pub run_dir: PathBuf,
    /// Where the merged model goes [default: RUN_DIR/merged]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Merge into the NF4-dequantized base the adapter was trained against,
    /// not into the original base weights
    #[arg(long)]
    pub into_quantized: bool,
    /// Dtype of the merged weights: bf16, f16 or f32 [default: the base's]
    #[arg(long, value_name = "DTYPE")]
    pub dtype: Option<MergeDtype>,
}

impl Cli {
    /// The settings given on the command line.
    pub fn given(&self) -> Settings {
        self.settings.clone().normalized()
    }
}

fn profile_path_help() -> String {
    format!(
        "The saved profile file [default: ${PROFILE_PATH_ENV}, else\n\
         qlora-scale/hardware_profile.json in the per-user config directory]"
    )
}
