//! Command-line arguments. Doc comments here are the `--help` text, which
//! `tests/snapshots/` pins down.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use qlora_scale::hardware::resolve::HardwareOverride;
use qlora_scale::saved_profile::PROFILE_PATH_ENV;
use qlora_scale::tables::MEMORY_OPTIONS_GB;
use qlora_scale::{ChipVariant, Generation};

/// Size QLoRA training to the machine and the model
///
/// Detects the size of models from their names, picks the training profile
/// for the hardware (Apple Silicon, an NVIDIA GPU, or the CPU), saves it (Apple
/// Silicon), and scales it for a model.
#[derive(Debug, Parser)]
#[command(
    name = "profile",
    bin_name = "profile",
    version,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// The saved profile file.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        help = profile_path_help(),
        display_order = 1000
    )]
    pub profile_path: Option<PathBuf>,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Detect the size of models from their names, ids or paths
    #[command(long_about = concat!(
        "Detect the size of models from their names, ids or paths.\n",
        "\n",
        "Prints one line per name: NAME<TAB>CATEGORY<TAB>PARAMS_B, where PARAMS_B is the\n",
        "parameter count in billions (7, 0.5, 0.135), or - when unknown. Without NAME\n",
        "arguments, names are read from stdin, one per line (empty lines are skipped).\n",
        "\n",
        "A name that exists on disk, or looks like a path (./, /, ~), is a local model:\n",
        "sized from its files (config.json, safetensors, GGUF), else from its name. One\n",
        "that is not there, or where neither gives a size, is an error naming the path;\n",
        "the other names still print, and the exit status is 1.",
    ))]
    DetectModel(DetectModelArgs),

    /// Show this machine's hardware and the profile chosen for it
    #[command(long_about = concat!(
        "Show this machine's hardware and the profile chosen for it.\n",
        "\n",
        "Detects an Apple Silicon chip (sysctl), NVIDIA GPUs (nvidia-smi, when installed),\n",
        "and on Linux the CPU, its SIMD features and the memory a run may use (the\n",
        "smaller of /proc/meminfo and the cgroup limit). Prints what it found, the table\n",
        "row it chose (Apple Silicon's own rows; else the [gpu] row nearest the largest\n",
        "GPU's memory; else the [cpu] row nearest the usable memory) and the profile.\n",
        "Exits with status 1 and says so when no memory size can be detected.",
    ))]
    Hardware(JsonArgs),

    /// Create the saved profile of an Apple Silicon Mac: a wizard, or flags
    #[command(long_about = concat!(
        "Create the saved profile of an Apple Silicon Mac: an interactive wizard, or flags.\n",
        "\n",
        "Apple Silicon only. Other machines need no saved profile: `profile hardware` and\n",
        "`profile scale` detect NVIDIA GPUs and the CPU, and `profile scale` takes\n",
        "--gpu-memory or --cpu-memory for a machine other than this one.\n",
        "\n",
        "Asks for each of generation, chip variant and memory not given as a flag,\n",
        "offering detected values as defaults, then shows the profile and saves it\n",
        "(atomically) after confirmation. Works with piped stdin; a bad answer is asked\n",
        "again, a few times at most. With all three flags and --yes it asks nothing.",
    ))]
    Setup(SetupArgs),

    /// Which models of the known model table fit in a machine's memory
    #[command(long_about = concat!(
        "Which models of the known model table fit in a machine's memory.\n",
        "\n",
        "The memory is --memory, else the saved profile's, else the detected hardware's.\n",
        "Each model of tables/known_models.toml ([[architecture]]) is sized by its\n",
        "published architecture and judged by the memory model with the machine's\n",
        "profile scaled for it: FITS, TIGHT (only at micro-batch 1 with checkpointing)\n",
        "or DOES_NOT_FIT, with the estimated peak. Models that fit come first, largest\n",
        "first; models that do not fit last, nearest to fitting first.",
    ))]
    Recommend(RecommendArgs),

    /// Print the saved profile
    #[command(long_about = concat!(
        "Print the saved profile.\n",
        "\n",
        "When there is none, says so and how to create one (exit status 0; with --json\n",
        "it prints null). A file that is not a valid profile is an error and is left as\n",
        "it is.",
    ))]
    Show(JsonArgs),

    /// Print the profile for a machine, scaled for a model, as JSON
    #[command(long_about = concat!(
        "Print the profile for a machine, scaled for a model, as JSON.\n",
        "\n",
        "The machine is the saved profile, else the detected hardware (Apple Silicon, an\n",
        "NVIDIA GPU or the CPU, as `profile hardware` shows); --generation, --chip and\n",
        "--memory override an Apple Silicon one. Without either, all three flags are\n",
        "needed. --gpu-memory or --cpu-memory size it for an NVIDIA GPU or the CPU\n",
        "instead, ignoring the saved and detected hardware.",
    ))]
    Scale(ScaleArgs),
}

/// `detect-model` arguments.
#[derive(Debug, Args)]
pub struct DetectModelArgs {
    /// Model names, Hugging Face ids or paths [default: read from stdin]
    #[arg(value_name = "NAME")]
    pub names: Vec<OsString>,

    /// Print one JSON object per line: {"name", "category", "params_b", "source"}
    #[arg(long)]
    pub json: bool,
}

/// Arguments of subcommands whose only option is `--json`.
#[derive(Debug, Args)]
pub struct JsonArgs {
    /// Print JSON instead of text
    #[arg(long)]
    pub json: bool,
}

/// The hardware a profile is built for, each part optional.
#[derive(Clone, Copy, Debug, Default, Args)]
pub struct HardwareFlags {
    /// Apple Silicon generation
    #[arg(long, value_name = "GEN", value_enum, ignore_case = true)]
    pub generation: Option<Generation>,

    /// Apple Silicon chip variant
    #[arg(long, value_name = "VARIANT", value_enum, ignore_case = true)]
    pub chip: Option<ChipVariant>,

    /// Apple Silicon unified memory in GB
    #[arg(
        long,
        value_name = "GB",
        value_parser = clap::value_parser!(u32).range(1..),
        long_help = memory_help()
    )]
    pub memory: Option<u32>,
}

impl HardwareFlags {
    /// The flags as the library's [`HardwareOverride`].
    pub fn to_override(self) -> HardwareOverride {
        HardwareOverride {
            generation: self.generation,
            chip: self.chip,
            memory: self.memory,
        }
    }

    /// The flags that were not given, as `--name`s.
    pub fn missing(&self) -> Vec<&'static str> {
        self.to_override().missing()
    }
}

/// `setup` arguments.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// Hardware given up front; the wizard asks only for the rest.
    #[command(flatten)]
    pub hardware: HardwareFlags,

    /// Save without asking for confirmation
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// `recommend` arguments.
#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// Unified memory in GB [default: the saved profile's, else detected]
    #[arg(long, value_name = "GB", value_parser = clap::value_parser!(u32).range(1..))]
    pub memory: Option<u32>,

    /// Print JSON instead of a table
    #[arg(long)]
    pub json: bool,
}

/// `scale` arguments.
#[derive(Debug, Args)]
pub struct ScaleArgs {
    /// The model: a name, Hugging Face id or path
    #[arg(long, value_name = "NAME")]
    pub model: OsString,

    /// Hardware overriding the saved or detected one.
    #[command(flatten)]
    pub hardware: HardwareFlags,

    /// Size for one NVIDIA GPU with this much memory, GB (the [gpu] table)
    #[arg(
        long,
        value_name = "GB",
        value_parser = clap::value_parser!(u32).range(1..),
        conflicts_with_all = ["generation", "chip", "memory", "cpu_memory"]
    )]
    pub gpu_memory: Option<u32>,

    /// Size for training on the CPU with this much memory, GB (the [cpu] table)
    #[arg(
        long,
        value_name = "GB",
        value_parser = clap::value_parser!(u32).range(1..),
        conflicts_with_all = ["generation", "chip", "memory"]
    )]
    pub cpu_memory: Option<u32>,
}

/// `--memory`'s long help: the sizes each variant is sold with, from the
/// tables.
fn memory_help() -> String {
    let mut help = String::from(
        "Apple Silicon unified memory in GB. Any size is accepted (the variant's profile\n\
         row with the nearest memory applies); the sizes each variant is sold with:",
    );
    for variant in ChipVariant::ALL {
        help.push_str(&format!(
            "\n  {:<6} {}",
            variant.name(),
            join(MEMORY_OPTIONS_GB[variant.index()])
        ));
    }
    help
}

fn profile_path_help() -> String {
    format!(
        "The saved profile file [default: ${PROFILE_PATH_ENV}, else\n\
         qlora-scale/hardware_profile.json in the per-user config directory]"
    )
}

/// `a, b, c`.
pub fn join<T: std::fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
