//! Command-line arguments. Doc comments here are the `--help` text, which
//! `tests/snapshots/train-help.txt` pins down.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use qlora_scale::saved_profile::PROFILE_PATH_ENV;
use qlora_scale::tables::trainer;
use qlora_scale::train::merge::MergeDtype;
use qlora_scale::train::settings::Settings;

use qlora_scale::train::device::DeviceChoice;

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
    /// Where to train: auto, cpu or cuda[:N]. The trainer computes on the
    /// CPU only (auto is the CPU); cuda is refused, with what is missing
    /// (the `cuda` build, or GPU training, issue #20)
    #[arg(long, value_name = "DEVICE", default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
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
    /// Generate text with a run's base + adapter, its base alone, or a model
    /// directory
    Generate(GenerateArgs),
    /// Loss and perplexity of the base and of base + adapter on a held-out
    /// JSONL file
    Eval(EvalArgs),
}

/// Which model `generate` and `eval` use.
#[derive(Debug, Args)]
pub struct ModelSource {
    /// The run whose base and adapter to use: a train --output-dir (its
    /// newest checkpoint names the base) [default: runs/default]
    #[arg(long, value_name = "DIR", conflicts_with = "model")]
    pub run_dir: Option<PathBuf>,
    /// A local Hugging Face model directory instead of a run (a plain or a
    /// merged model), loaded as train --model loads it
    #[arg(long, value_name = "DIR")]
    pub model: Option<String>,
    /// Where to compute: auto, cpu, cuda or cuda:N (as train --device)
    #[arg(long, value_name = "DEVICE", default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

impl ModelSource {
    /// The run directory, when no --model is given.
    pub fn run_dir(&self) -> PathBuf {
        self.run_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("runs/default"))
    }
}

/// `generate` arguments.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// The model.
    #[command(flatten)]
    pub source: ModelSource,
    /// With a run: its base alone, without the adapter
    #[arg(long, conflicts_with = "model")]
    pub base_only: bool,
    /// The text to continue (through the model's chat template, as a user
    /// message, when its tokenizer has one, unless --raw)
    #[arg(long, value_name = "TEXT", required_unless_present = "messages")]
    pub prompt: Option<String>,
    /// A JSON file holding an array of {"role", "content"} messages (roles
    /// system, user, assistant, tool), rendered with the model's chat
    /// template and its generation prompt
    #[arg(long, value_name = "FILE", conflicts_with_all = ["prompt", "raw"])]
    pub messages: Option<PathBuf>,
    /// Give --prompt to the model as it is, without the chat template
    #[arg(long)]
    pub raw: bool,
    /// Tokens generated at most (generation also stops at EOS)
    #[arg(long, value_name = "N", default_value_t = trainer::GENERATE_MAX_NEW_TOKENS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub max_new_tokens: u64,
    /// Sampling temperature; 0 is greedy (the likeliest token every step)
    #[arg(long, value_name = "T", default_value_t = trainer::GENERATE_TEMPERATURE,
          value_parser = temperature, allow_negative_numbers = true)]
    pub temperature: f64,
    /// Nucleus sampling: draw from the likeliest tokens whose probabilities
    /// add up to P (0 < P <= 1)
    #[arg(long, value_name = "P", default_value_t = trainer::GENERATE_TOP_P,
          value_parser = top_p, allow_negative_numbers = true)]
    pub top_p: f64,
    /// The sampler's seed: the same seed gives the same text
    #[arg(long, value_name = "N", default_value_t = trainer::GENERATE_SEED)]
    pub seed: u64,
}

/// `eval` arguments.
#[derive(Debug, Args)]
pub struct EvalArgs {
    /// The model.
    #[command(flatten)]
    pub source: ModelSource,
    /// The held-out JSONL file, in the training data's format
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Batches scored at most (the run's batch size each) [default: the
    /// whole file]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_batches: Option<u64>,
    /// Make bad data lines fatal
    #[arg(long)]
    pub strict: bool,
    /// One JSON object on one line
    #[arg(long)]
    pub json: bool,
}

fn temperature(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(t) if t.is_finite() && t >= 0.0 => Ok(t),
        _ => Err(format!("{s} is not a temperature (a number >= 0)")),
    }
}

fn top_p(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(p) if p > 0.0 && p <= 1.0 => Ok(p),
        _ => Err(format!("{s} is not a probability mass (0 < P <= 1)")),
    }
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
