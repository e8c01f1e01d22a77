//! The resolved configuration of a training run (spec/reference.md,
//! section 7): the hardware profile (saved, detected, flags or defaults),
//! scaled for the model, then the values given on the command line or in a
//! `--config` file, which win (command line over file).
//!
//! ```
//! use qlora_scale::train::config::{Settings, resolve};
//! let settings = Settings { lora_rank: Some(16), ..Settings::default() };
//! let path = std::path::Path::new("/nonexistent/profile.json");
//! let cfg = resolve(&settings, path, || None).unwrap();
//! assert_eq!(cfg.profile_source, "defaults");
//! assert_eq!((cfg.lora_rank, cfg.lora_alpha), (16, 32.0));
//! ```

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detect::{ModelSize, detect_model_size};
use crate::files::{FilesError, detect_model_size_from_path};
use crate::hardware::MachineProfile;
use crate::resolve::{DeviceOverride, HardwareOverride, ResolveError, resolve_machine};
use crate::scale::scale_profile_for_category;
use crate::tables::{
    ChipVariant, DEFAULT_MODEL, FALLBACK_PROFILE, Generation, LORA_ALPHA_PER_RANK, Profile,
    embedded, trainer,
};

/// Errors of resolving a run's configuration. Each names the file or value.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The hardware could not be resolved.
    #[error(transparent)]
    Hardware(#[from] ResolveError),
    /// `--config` could not be read.
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// `--config` is not valid TOML or has an unknown key or a bad value.
    #[error("config file {path}: {message}")]
    ParseFile {
        /// The file.
        path: PathBuf,
        /// The parser's message (with the line, column and key).
        message: String,
    },
    /// `--model` looks like a path but nothing is there.
    #[error("model path {0} does not exist")]
    ModelPathMissing(PathBuf),
    /// `--model` is a local path whose files could not be read.
    #[error("cannot read the size of model {path}: {source}")]
    ModelFiles {
        /// The path.
        path: PathBuf,
        /// Why.
        source: FilesError,
    },
    /// A value is out of range.
    #[error("{name} is {value}: {why}")]
    Invalid {
        /// The setting (`--lora-rank`).
        name: &'static str,
        /// The value given.
        value: String,
        /// What is allowed.
        why: &'static str,
    },
}

/// Values given by the user: command-line flags or `--config` keys (named
/// like the flags, e.g. `lora-rank = 16`). `None`: not given.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// Model: a local Hugging Face directory, or a name/id (sizing only).
    pub model: Option<String>,
    /// Data directory with `train.jsonl` and optional `valid.jsonl`.
    pub data_dir: Option<PathBuf>,
    /// Output directory.
    pub output_dir: Option<PathBuf>,
    /// Optimizer steps.
    pub max_steps: Option<u64>,
    /// Examples per micro-batch.
    pub batch_size: Option<u32>,
    /// Peak learning rate.
    pub learning_rate: Option<f64>,
    /// The run's seed.
    pub seed: Option<u64>,
    /// LoRA rank.
    pub lora_rank: Option<u32>,
    /// LoRA alpha (default: twice the rank).
    pub lora_alpha: Option<f64>,
    /// Blocks (counted from the last) with adapters.
    pub lora_layers: Option<u32>,
    /// LoRA dropout.
    pub lora_dropout: Option<f64>,
    /// Gradient checkpointing.
    pub grad_checkpoint: Option<bool>,
    /// Chip generation.
    pub generation: Option<Generation>,
    /// Chip variant.
    pub chip: Option<ChipVariant>,
    /// Memory, GB.
    pub memory: Option<u32>,
    /// An NVIDIA GPU's memory, GB: size the run by the `[gpu]` rows.
    pub gpu_memory: Option<u32>,
    /// The memory a CPU run may use, GB: size the run by the `[cpu]` rows.
    pub cpu_memory: Option<u32>,
    /// Micro-batches per optimizer step.
    pub grad_accum_steps: Option<u64>,
    /// Longest sequence, tokens.
    pub seq_len: Option<u64>,
    /// Warmup steps.
    pub warmup_steps: Option<u64>,
    /// Validation interval, steps.
    pub eval_every: Option<u64>,
    /// Checkpoint interval, steps.
    pub checkpoint_every: Option<u64>,
    /// Checkpoints kept.
    pub keep_checkpoints: Option<u64>,
    /// Gradient-norm clip.
    pub grad_clip: Option<f64>,
    /// AdamW weight decay.
    pub weight_decay: Option<f64>,
    /// Bad data lines are fatal.
    pub strict: Option<bool>,
    /// Seconds a rank waits in one collective call before it gives up.
    pub collective_timeout: Option<u64>,
    /// Memory the run may use, GiB (default: the hardware's training
    /// budget).
    pub memory_budget: Option<f64>,
    /// Change a run that does not fit its budget into the nearest one that
    /// does.
    pub auto_fit: Option<bool>,
}

macro_rules! merge_fields {
    ($hi:expr, $lo:expr, $($f:ident),* $(,)?) => {
        Settings { $( $f: $hi.$f.clone().or_else(|| $lo.$f.clone()), )* }
    };
}

impl Settings {
    /// `self` where given, else `other` (command line over file).
    pub fn or(&self, other: &Settings) -> Settings {
        merge_fields!(
            self,
            other,
            model,
            data_dir,
            output_dir,
            max_steps,
            batch_size,
            learning_rate,
            seed,
            lora_rank,
            lora_alpha,
            lora_layers,
            lora_dropout,
            grad_checkpoint,
            generation,
            chip,
            memory,
            grad_accum_steps,
            seq_len,
            warmup_steps,
            eval_every,
            checkpoint_every,
            keep_checkpoints,
            grad_clip,
            weight_decay,
            gpu_memory,
            cpu_memory,
            strict,
            collective_timeout,
            memory_budget,
            auto_fit,
        )
    }

    /// Reads a `--config` TOML file. Unknown keys and bad values are errors
    /// naming the file (and the key, line and column). Relative paths in it
    /// are taken relative to the file's directory.
    pub fn from_file(path: &Path) -> Result<Settings, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_path_buf(),
            source,
        })?;
        let mut s: Settings = toml::from_str(&text).map_err(|e| ConfigError::ParseFile {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().replace('\n', " "),
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        for p in [&mut s.data_dir, &mut s.output_dir].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(m) = &mut s.model
            && looks_like_path(m)
            && Path::new(m).is_relative()
        {
            *m = base.join(&*m).to_string_lossy().into_owned();
        }
        Ok(s)
    }

    fn hardware(&self) -> HardwareOverride {
        HardwareOverride {
            generation: self.generation,
            chip: self.chip,
            memory: self.memory,
        }
    }
}

/// Whether a `--model` value is meant as a path (`./m`, `/m`, `~/m`, `..`).
pub fn looks_like_path(model: &str) -> bool {
    model.starts_with('.') || model.starts_with('/') || model.starts_with('~')
}

/// What will be trained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Weights {
    /// No `--model`: the built-in model (`tables/defaults.toml`,
    /// `[embedded]`) trains; the profile is still scaled for the default
    /// model id.
    Embedded,
    /// A local Hugging Face directory.
    LocalDir,
    /// A name or id: enough to size and scale, not to train (nothing is
    /// downloaded).
    NameOnly,
}

/// The resolved hardware, when there was any: Apple Silicon (generation,
/// chip, GPU cores) or a machine sized by memory (an NVIDIA GPU's, or what a
/// CPU run may use: the table row chosen).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HardwareSummary {
    /// `apple`, `gpu` or `cpu`.
    #[serde(default = "apple")]
    pub device: String,
    /// Chip generation (Apple Silicon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<Generation>,
    /// Chip variant (Apple Silicon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chip: Option<ChipVariant>,
    /// Memory, GB.
    pub memory_gb: u32,
    /// GPU cores (Apple Silicon).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_cores: Option<u32>,
    /// The memory of the `[gpu]`/`[cpu]` table row chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub row_memory_gb: Option<u32>,
    /// Training budget, GB.
    pub training_budget_gb: u32,
}

fn apple() -> String {
    "apple".to_string()
}

/// The fully resolved configuration: what `--dry-run --json` prints and
/// what a checkpoint records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// The model as given (or the default id).
    pub model: String,
    /// What trains.
    pub weights: Weights,
    /// The model's size: category, parameters (billions) and source.
    pub model_size: ModelSizeSummary,
    /// `saved`, `detected`, `flags` or `defaults`.
    pub profile_source: String,
    /// The detailed hardware source (`saved_profile+flags`); `None` with
    /// defaults.
    pub hardware_source: Option<String>,
    /// The hardware, when resolved.
    pub hardware: Option<HardwareSummary>,
    /// The profile before scaling.
    pub base_profile: Profile,
    /// The profile scaled for the model (equal to the base with defaults:
    /// scaling is skipped without a profile).
    pub scaled_profile: Profile,
    /// Whether scaling changed anything.
    pub scaled: bool,
    /// Examples per micro-batch.
    pub batch_size: u32,
    /// LoRA rank.
    pub lora_rank: u32,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// Blocks (from the last) with adapters.
    pub lora_layers: u32,
    /// LoRA dropout.
    pub lora_dropout: f64,
    /// Gradient checkpointing.
    pub grad_checkpoint: bool,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Cosine floor as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Warmup steps.
    pub warmup_steps: u64,
    /// Optimizer steps.
    pub max_steps: u64,
    /// Micro-batches per optimizer step.
    pub grad_accum_steps: u64,
    /// Global gradient-norm clip.
    pub grad_clip: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// AdamW betas.
    pub adam_betas: (f64, f64),
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// The run's seed.
    pub seed: u64,
    /// Longest sequence, tokens.
    pub seq_len: u64,
    /// Validation interval, steps.
    pub eval_every: u64,
    /// Validation batches per evaluation.
    pub eval_batches: u64,
    /// Checkpoint interval, steps.
    pub checkpoint_every: u64,
    /// Checkpoints kept.
    pub keep_checkpoints: u64,
    /// Data directory; `None`: the corpus shipped in the repository.
    pub data_dir: Option<PathBuf>,
    /// Output directory.
    pub output_dir: PathBuf,
    /// Bad data lines are fatal.
    pub strict: bool,
    /// Where each user-settable value came from: `cli_or_config`, `profile`
    /// or `default`.
    pub value_sources: BTreeMap<String, String>,
    /// How the ranks of a data-parallel run talk: `single` (one process),
    /// `mpi` or `nccl`.
    #[serde(default = "single_backend")]
    pub collective: String,
    /// This process's rank (0 in a single process).
    #[serde(default)]
    pub rank: u32,
    /// Processes training together, each on its own shard of every batch.
    #[serde(default = "one")]
    pub world_size: u32,
    /// Examples per micro-batch on each rank (`--batch-size`).
    #[serde(default)]
    pub per_rank_batch_size: u32,
    /// Examples per optimizer step over all ranks: per-rank batch x world
    /// size x accumulation steps. A resume with another world size must
    /// keep it.
    #[serde(default)]
    pub global_batch_size: u64,
    /// Seconds a rank waits in one collective call before it gives up.
    #[serde(default = "default_collective_timeout")]
    pub collective_timeout_s: u64,
}

fn single_backend() -> String {
    "single".to_string()
}

fn one() -> u32 {
    1
}

fn default_collective_timeout() -> u64 {
    trainer::COLLECTIVE_TIMEOUT_S
}

impl TrainConfig {
    /// This configuration as rank `rank` of `world_size` processes talking
    /// over `collective` sees it: the rank, the world and the global batch.
    pub fn for_rank(mut self, collective: &str, rank: u32, world_size: u32) -> Self {
        self.collective = collective.to_string();
        self.rank = rank;
        self.world_size = world_size.max(1);
        self.per_rank_batch_size = self.batch_size;
        self.global_batch_size =
            self.batch_size as u64 * self.world_size as u64 * self.grad_accum_steps;
        self
    }
}

/// A model size as printed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelSizeSummary {
    /// Category name.
    pub category: String,
    /// Parameters, billions (0 when unknown).
    pub params_b: f64,
    /// How it was found (`name`, `files`, ...).
    pub source: String,
}

impl ModelSizeSummary {
    fn of(size: &ModelSize) -> Self {
        let source = serde_json::to_value(size.source)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        Self {
            category: size.category.name().to_string(),
            params_b: size.params_billions(),
            source,
        }
    }
}

/// The default output directory (relative to the working directory).
pub const DEFAULT_OUTPUT_DIR: &str = "runs/default";

/// Resolves `settings` (command line merged over file) into the run's
/// configuration: hardware from the saved profile at `saved_path`, else
/// `detect()`, else defaults; scaled for the model; given values win.
pub fn resolve(
    settings: &Settings,
    saved_path: &Path,
    detect: impl FnOnce() -> Option<MachineProfile>,
) -> Result<TrainConfig, ConfigError> {
    let (model, weights, size) = model_and_size(settings.model.as_deref())?;
    let devices = DeviceOverride {
        gpu_memory: settings.gpu_memory,
        cpu_memory: settings.cpu_memory,
    };
    let hw = resolve_machine(&settings.hardware(), devices, saved_path, detect)?;
    let (base, scaled_profile, profile_source, hardware_source, hardware) = match hw {
        Some((machine, source)) => {
            let profile = machine.profile();
            let scaled = scale_profile_for_category(profile, size.category);
            (
                profile,
                scaled,
                source.base().to_string(),
                Some(source.key().to_string()),
                Some(summary(&machine)),
            )
        }
        // Without any profile, defaults apply as they are: nothing to scale.
        None => (
            FALLBACK_PROFILE,
            FALLBACK_PROFILE,
            "defaults".to_string(),
            None,
            None,
        ),
    };
    let embedded_run = weights == Weights::Embedded;
    let mut sources = BTreeMap::new();
    let mut pick = |name: &str, given: bool, from_profile: bool| {
        let s = if given {
            "cli_or_config"
        } else if from_profile && profile_source != "defaults" {
            "profile"
        } else {
            "default"
        };
        sources.insert(name.to_string(), s.to_string());
    };
    macro_rules! val {
        ($name:literal, $field:ident, $profile:expr) => {{
            pick($name, settings.$field.is_some(), true);
            settings.$field.unwrap_or($profile)
        }};
        ($name:literal, $field:ident, $embedded:expr, $trainer:expr) => {{
            pick($name, settings.$field.is_some(), false);
            settings
                .$field
                .unwrap_or(if embedded_run { $embedded } else { $trainer })
        }};
    }
    let batch_size = val!("batch_size", batch_size, scaled_profile.batch_size);
    let lora_rank = val!("lora_rank", lora_rank, scaled_profile.lora_rank);
    let lora_layers = val!("lora_layers", lora_layers, scaled_profile.lora_num_layers);
    let grad_checkpoint = val!(
        "grad_checkpoint",
        grad_checkpoint,
        scaled_profile.grad_checkpoint
    );
    pick("lora_alpha", settings.lora_alpha.is_some(), false);
    let lora_alpha = settings
        .lora_alpha
        .unwrap_or(lora_rank as f64 * LORA_ALPHA_PER_RANK);
    let cfg = TrainConfig {
        model,
        weights,
        model_size: ModelSizeSummary::of(&size),
        profile_source: profile_source.clone(),
        hardware_source,
        hardware,
        base_profile: base,
        scaled: scaled_profile != base,
        scaled_profile,
        batch_size,
        lora_rank,
        lora_alpha,
        lora_layers,
        lora_dropout: val!(
            "lora_dropout",
            lora_dropout,
            trainer::LORA_DROPOUT,
            trainer::LORA_DROPOUT
        ),
        grad_checkpoint,
        learning_rate: val!(
            "learning_rate",
            learning_rate,
            embedded::LEARNING_RATE,
            trainer::LEARNING_RATE
        ),
        min_lr_ratio: trainer::MIN_LR_RATIO,
        warmup_steps: val!(
            "warmup_steps",
            warmup_steps,
            embedded::WARMUP_STEPS,
            trainer::WARMUP_STEPS
        ),
        max_steps: val!(
            "max_steps",
            max_steps,
            embedded::MAX_STEPS,
            trainer::MAX_STEPS
        ),
        grad_accum_steps: val!(
            "grad_accum_steps",
            grad_accum_steps,
            trainer::GRAD_ACCUM_STEPS,
            trainer::GRAD_ACCUM_STEPS
        ),
        grad_clip: val!(
            "grad_clip",
            grad_clip,
            trainer::GRAD_CLIP,
            trainer::GRAD_CLIP
        ),
        weight_decay: val!(
            "weight_decay",
            weight_decay,
            trainer::WEIGHT_DECAY,
            trainer::WEIGHT_DECAY
        ),
        adam_betas: (trainer::ADAM_BETA1, trainer::ADAM_BETA2),
        adam_eps: trainer::ADAM_EPS,
        seed: val!("seed", seed, trainer::SEED, trainer::SEED),
        seq_len: val!("seq_len", seq_len, embedded::SEQ_LEN, trainer::SEQ_LEN),
        eval_every: val!(
            "eval_every",
            eval_every,
            embedded::EVAL_EVERY,
            trainer::EVAL_EVERY
        ),
        eval_batches: trainer::EVAL_BATCHES,
        checkpoint_every: val!(
            "checkpoint_every",
            checkpoint_every,
            embedded::CHECKPOINT_EVERY,
            trainer::CHECKPOINT_EVERY
        ),
        keep_checkpoints: val!(
            "keep_checkpoints",
            keep_checkpoints,
            trainer::KEEP_CHECKPOINTS,
            trainer::KEEP_CHECKPOINTS
        ),
        data_dir: settings.data_dir.clone(),
        output_dir: settings
            .output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_OUTPUT_DIR)),
        strict: settings.strict.unwrap_or(false),
        collective_timeout_s: val!(
            "collective_timeout",
            collective_timeout,
            trainer::COLLECTIVE_TIMEOUT_S,
            trainer::COLLECTIVE_TIMEOUT_S
        ),
        value_sources: sources,
        collective: single_backend(),
        rank: 0,
        world_size: 1,
        per_rank_batch_size: 0,
        global_batch_size: 0,
    }
    .for_rank("single", 0, 1);
    validate(&cfg)?;
    Ok(cfg)
}

fn summary(machine: &MachineProfile) -> HardwareSummary {
    match machine {
        MachineProfile::Apple(hp) => HardwareSummary {
            device: apple(),
            generation: Some(hp.generation),
            chip: Some(hp.variant),
            memory_gb: hp.memory_gb,
            gpu_cores: Some(hp.gpu_cores),
            row_memory_gb: None,
            training_budget_gb: hp.training_budget_gb,
        },
        MachineProfile::Memory(p) => HardwareSummary {
            device: p.device.name().to_string(),
            generation: None,
            chip: None,
            memory_gb: p.memory_gb,
            gpu_cores: None,
            row_memory_gb: Some(p.row_memory_gb),
            training_budget_gb: p.training_budget_gb,
        },
    }
}

/// The model (as given, or the default id), what trains, and its size:
/// counted from the files of a local directory, else from the name.
fn model_and_size(model: Option<&str>) -> Result<(String, Weights, ModelSize), ConfigError> {
    let Some(model) = model else {
        return Ok((
            DEFAULT_MODEL.to_string(),
            Weights::Embedded,
            detect_model_size(DEFAULT_MODEL),
        ));
    };
    let path = Path::new(model);
    if path.exists() {
        let found =
            detect_model_size_from_path(path).map_err(|source| ConfigError::ModelFiles {
                path: path.to_path_buf(),
                source,
            })?;
        let weights = if path.is_dir() {
            Weights::LocalDir
        } else {
            Weights::NameOnly
        };
        return Ok((model.to_string(), weights, found.size));
    }
    if looks_like_path(model) {
        return Err(ConfigError::ModelPathMissing(path.to_path_buf()));
    }
    Ok((
        model.to_string(),
        Weights::NameOnly,
        detect_model_size(model),
    ))
}

fn validate(c: &TrainConfig) -> Result<(), ConfigError> {
    let bad = |name, value: String, why| Err(ConfigError::Invalid { name, value, why });
    if c.batch_size == 0 {
        return bad("--batch-size", "0".into(), "must be at least 1");
    }
    if c.lora_rank == 0 {
        return bad("--lora-rank", "0".into(), "must be at least 1");
    }
    if c.lora_layers == 0 {
        return bad("--lora-layers", "0".into(), "must be at least 1");
    }
    if !(c.lora_alpha.is_finite() && c.lora_alpha > 0.0) {
        return bad("--lora-alpha", c.lora_alpha.to_string(), "must be positive");
    }
    if !(0.0..1.0).contains(&c.lora_dropout) {
        return bad(
            "--lora-dropout",
            c.lora_dropout.to_string(),
            "must be in [0, 1)",
        );
    }
    if !(c.learning_rate.is_finite() && c.learning_rate > 0.0) {
        return bad(
            "--learning-rate",
            c.learning_rate.to_string(),
            "must be positive",
        );
    }
    if !(c.grad_clip.is_finite() && c.grad_clip > 0.0) {
        return bad("--grad-clip", c.grad_clip.to_string(), "must be positive");
    }
    if !(c.weight_decay.is_finite() && c.weight_decay >= 0.0) {
        return bad("--weight-decay", c.weight_decay.to_string(), "must be >= 0");
    }
    for (name, v) in [
        ("--max-steps", c.max_steps),
        ("--grad-accum-steps", c.grad_accum_steps),
        ("--eval-every", c.eval_every),
        ("--checkpoint-every", c.checkpoint_every),
        ("--keep-checkpoints", c.keep_checkpoints),
        ("--collective-timeout", c.collective_timeout_s),
    ] {
        if v == 0 {
            return bad(name, "0".into(), "must be at least 1");
        }
    }
    if c.seq_len < 2 {
        return bad("--seq-len", c.seq_len.to_string(), "must be at least 2");
    }
    Ok(())
}
