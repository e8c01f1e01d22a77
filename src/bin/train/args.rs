//! Command-line arguments. Doc comments here are the `--help` text, which
//! `tests/snapshots/train-help.txt` pins down.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use qlora_scale::storage::PROFILE_PATH_ENV;
use qlora_scale::train::config::Settings;
use qlora_scale::{ChipVariant, Generation};

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
    /// Model: a local Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json), or a name/id used for sizing only [default: the
    /// embedded model; scaled for the default model id]
    #[arg(long, value_name = "PATH_OR_ID")]
    pub model: Option<String>,
    /// Directory with train.jsonl and optional valid.jsonl [default: data/default]
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where the adapter, adapter_config.json, checkpoints, metrics.jsonl and
    /// loss.svg go [default: runs/default]
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,
    /// Optimizer steps
    #[arg(long, value_name = "N")]
    pub max_steps: Option<u64>,
    /// Examples per micro-batch [default: the profile's]
    #[arg(long, value_name = "N")]
    pub batch_size: Option<u32>,
    /// Peak learning rate (warmup, then cosine decay)
    #[arg(long, value_name = "X")]
    pub learning_rate: Option<f64>,
    /// The run's one seed (shuffling, adapter init, dropout)
    #[arg(long, value_name = "N")]
    pub seed: Option<u64>,
    /// LoRA rank [default: the profile's]
    #[arg(long, value_name = "N")]
    pub lora_rank: Option<u32>,
    /// LoRA alpha [default: 2 x rank]
    #[arg(long, value_name = "X")]
    pub lora_alpha: Option<f64>,
    /// Blocks, counted from the last, with adapters [default: the profile's]
    #[arg(long, value_name = "N")]
    pub lora_layers: Option<u32>,
    /// Dropout on the LoRA path in training
    #[arg(long, value_name = "X")]
    pub lora_dropout: Option<f64>,
    /// Recompute activations in backward to save memory [default: the profile's]
    #[arg(long, overrides_with = "no_grad_checkpoint")]
    pub grad_checkpoint: bool,
    /// Keep activations (faster, more memory)
    #[arg(long, overrides_with = "grad_checkpoint")]
    pub no_grad_checkpoint: bool,
    /// Micro-batches per optimizer step
    #[arg(long, value_name = "N")]
    pub grad_accum_steps: Option<u64>,
    /// Longest sequence in tokens (longer records are truncated)
    #[arg(long, value_name = "N")]
    pub seq_len: Option<u64>,
    /// Warmup steps
    #[arg(long, value_name = "N")]
    pub warmup_steps: Option<u64>,
    /// Validation loss every N steps
    #[arg(long, value_name = "N")]
    pub eval_every: Option<u64>,
    /// A checkpoint every N steps
    #[arg(long, value_name = "N")]
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept
    #[arg(long, value_name = "N")]
    pub keep_checkpoints: Option<u64>,
    /// Global gradient-norm clip
    #[arg(long, value_name = "X")]
    pub grad_clip: Option<f64>,
    /// AdamW weight decay
    #[arg(long, value_name = "X")]
    pub weight_decay: Option<f64>,
    /// Make bad data lines fatal (otherwise skipped and counted)
    #[arg(long)]
    pub strict: bool,
    /// Several processes (mpirun): seconds a rank waits in one collective
    /// call before it decides another rank died or hangs
    #[arg(long, value_name = "SECS")]
    pub collective_timeout: Option<u64>,
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
    /// Memory the run may use, GiB [default: the hardware profile's training
    /// budget, else this machine's memory times the [cpu] budget fraction]
    #[arg(long, value_name = "GIB", value_parser = positive_gib)]
    pub memory_budget: Option<f64>,
    /// When the memory model says the run will not fit its budget, train the
    /// nearest configuration that does (smaller micro-batch with more
    /// accumulation, then fewer LoRA layers, shorter sequences,
    /// checkpointing on) instead of stopping
    #[arg(long)]
    pub auto_fit: bool,
    /// Before the run, train one step and compare the peak memory with the
    /// estimate and the budget
    #[arg(long)]
    pub trial_step: bool,
    /// Hardware overriding the saved or detected one.
    #[command(flatten)]
    pub hardware: HardwareArgs,
    /// TOML file whose keys mirror these flags (lora-rank = 16); the command
    /// line wins over it
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The saved profile file
    #[arg(long, value_name = "PATH", help = profile_path_help())]
    pub profile_path: Option<PathBuf>,
    /// Continue from the newest good checkpoint in the output directory
    #[arg(long)]
    pub resume: bool,
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

/// The hardware flags.
#[derive(Debug, Args)]
pub struct HardwareArgs {
    /// Apple Silicon generation
    #[arg(long, value_name = "GEN", value_enum, ignore_case = true)]
    pub generation: Option<Generation>,
    /// Chip variant
    #[arg(long, value_name = "VARIANT", value_enum, ignore_case = true)]
    pub chip: Option<ChipVariant>,
    /// Unified memory in GB
    #[arg(long, value_name = "GB", value_parser = clap::value_parser!(u32).range(1..))]
    pub memory: Option<u32>,
    /// Size the run for an NVIDIA GPU with this much memory, GB (the [gpu]
    /// rows of tables/hardware.toml)
    #[arg(long, value_name = "GB", value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with_all = ["generation", "chip", "memory", "cpu_memory"])]
    pub gpu_memory: Option<u32>,
    /// Size the run for a CPU that may use this much memory, GB (the [cpu]
    /// rows)
    #[arg(long, value_name = "GB", value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with_all = ["generation", "chip", "memory"])]
    pub cpu_memory: Option<u32>,
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
}

impl Cli {
    /// The values given on the command line.
    pub fn settings(&self) -> Settings {
        Settings {
            model: self.model.clone(),
            data_dir: self.data_dir.clone(),
            output_dir: self.output_dir.clone(),
            max_steps: self.max_steps,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            seed: self.seed,
            lora_rank: self.lora_rank,
            lora_alpha: self.lora_alpha,
            lora_layers: self.lora_layers,
            lora_dropout: self.lora_dropout,
            grad_checkpoint: if self.grad_checkpoint {
                Some(true)
            } else if self.no_grad_checkpoint {
                Some(false)
            } else {
                None
            },
            generation: self.hardware.generation,
            chip: self.hardware.chip,
            memory: self.hardware.memory,
            gpu_memory: self.hardware.gpu_memory,
            cpu_memory: self.hardware.cpu_memory,
            grad_accum_steps: self.grad_accum_steps,
            seq_len: self.seq_len,
            warmup_steps: self.warmup_steps,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            keep_checkpoints: self.keep_checkpoints,
            grad_clip: self.grad_clip,
            weight_decay: self.weight_decay,
            strict: self.strict.then_some(true),
            collective_timeout: self.collective_timeout,
            memory_budget: self.memory_budget,
            auto_fit: self.auto_fit.then_some(true),
        }
    }
}

fn profile_path_help() -> String {
    format!(
        "The saved profile file [default: ${PROFILE_PATH_ENV}, else\n\
         qlora-scale/hardware_profile.json in the per-user config directory]"
    )
}

fn positive_gib(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a positive number of GiB")),
    }
}
