//! A run, resolved: [`RunSpec`] (what trains: the same on every rank,
//! compared by `==`, stored in checkpoints), [`Provenance`] (where each value
//! came from; printed by `--dry-run`) and [`World`] (this process's rank and
//! the number of ranks; passed beside the spec, never stored).
//!
//! [`plan`] resolves [`Settings`] (command line over `--config` file): the
//! hardware profile (saved, else detected, else flags, else defaults) is
//! scaled for the model; each setting then takes the given value, else its
//! rule in [`super::settings`].
//!
//! ```
//! use qlora_scale::train::settings::{Settings, ValueSource};
//! use qlora_scale::train::spec::{ProfileSource, plan};
//! let settings = Settings { lora_rank: Some(16), ..Settings::default() };
//! let path = std::path::Path::new("/nonexistent/profile.json");
//! let run = plan(&settings, path, || None).unwrap();
//! assert_eq!(run.provenance.profile_source, ProfileSource::Defaults);
//! assert_eq!((run.spec.settings.lora_rank, run.spec.settings.lora_alpha), (16, 32.0));
//! assert_eq!(run.provenance.value_sources["lora_rank"], ValueSource::CliOrConfig);
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

use super::collective::Collective;
use super::data::DEFAULT_DATA_DIR;
use super::model::embedded_config;
use super::settings::{
    Fallback, Settings, SettingsError, TrainSettings, ValueSource, ValueSources,
};
use crate::detect::{ModelSize, detect_model_size};
use crate::files::{FilesError, detect_model_size_from_path, detect_model_size_from_path_with};
use crate::hardware::MachineProfile;
use crate::hardware::resolve::{
    DeviceOverride, HardwareOverride, HardwareSource, ResolveError, SavedProfileUse,
    resolve_machine_checked,
};
use crate::qlora::{LlamaConfig, LoadError, config_from_json, read_config_json};
use crate::scale::scale_profile_for_category;
use crate::tables::{DEFAULT_MODEL, FALLBACK_PROFILE, Profile, SizeCategory, trainer};

pub use super::settings::looks_like_path;

/// The default output directory (relative to the working directory).
pub const DEFAULT_OUTPUT_DIR: &str = "runs/default";

/// Errors of resolving a run. Each names the file or value.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The hardware could not be resolved.
    #[error(transparent)]
    Hardware(#[from] ResolveError),
    /// `--config` could not be read.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// `--model` looks like a path but nothing is there.
    #[error("model path {0} does not exist")]
    ModelPathMissing(PathBuf),
    /// `--model` is a local path whose files could not be read.
    #[error("cannot read the size of model {path}")]
    ModelFiles {
        /// The path.
        path: PathBuf,
        /// Why.
        source: FilesError,
    },
    /// The local model's `config.json` cannot be read or is invalid.
    #[error(transparent)]
    Model(#[from] LoadError),
    /// A value is out of range.
    #[error("{name} is {value}: {why}")]
    Invalid {
        /// The setting as the user gave it (`--lora-rank`), or where the
        /// value came from (`lora_rank of the saved hardware profile`).
        name: String,
        /// The value given.
        value: String,
        /// What is allowed.
        why: &'static str,
    },
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

/// What trains: everything every rank of a run must agree on, and what a
/// checkpoint records.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The model as given (or the default id).
    pub model: String,
    /// What trains.
    pub weights: Weights,
    /// The model's size: category, parameters (billions) and source.
    pub model_size: ModelSizeSummary,
    /// The model's architecture, parsed and validated once: the local
    /// directory's `config.json`, or the embedded model's; `None` for a
    /// model known only by name (the memory model then takes the published
    /// shape nearest its size). The memory check, the model builder and
    /// `train merge` all take this one value.
    pub architecture: Option<LlamaConfig>,
    /// The resolved settings (flattened: `lora_rank`, `max_steps`, ...).
    #[serde(flatten)]
    pub settings: TrainSettings,
    /// Cosine floor as a fraction of the peak learning rate.
    pub min_lr_ratio: f64,
    /// AdamW betas.
    pub adam_betas: (f64, f64),
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Validation batches per evaluation.
    pub eval_batches: u64,
    /// Data directory; `None`: the corpus shipped in the repository.
    pub data_dir: Option<PathBuf>,
}

impl RunSpec {
    /// What trains, in words, as the logs and the plot name it: the
    /// built-in model by its shape (its profile is sized for the default
    /// id, which is not what trains), a local folder, or a name known only
    /// by its size.
    pub fn describe_model(&self) -> String {
        match (self.weights, &self.architecture) {
            (Weights::Embedded, Some(a)) => format!(
                "the built-in model ({} blocks, width {}, seeded NF4 weights)",
                a.num_hidden_layers, a.hidden_size
            ),
            (Weights::Embedded, None) => "the built-in model (seeded NF4 weights)".to_string(),
            (Weights::LocalDir, _) => format!("{} (local folder)", self.model),
            (Weights::NameOnly, _) => format!("{} (name only: no weights to train)", self.model),
        }
    }

    /// The data directory the run reads: `data_dir`, else the default
    /// corpus's ([`DEFAULT_DATA_DIR`], compiled into the binary).
    pub fn data_dir_used(&self) -> &Path {
        self.data_dir
            .as_deref()
            .unwrap_or(Path::new(DEFAULT_DATA_DIR))
    }

    /// The blocks that get adapters: `lora_layers`, but never more than the
    /// model has (unknown for a name-only model: then `lora_layers`).
    pub fn lora_layers_applied(&self) -> u32 {
        let blocks = self.architecture.as_ref().map_or(u32::MAX, |a| {
            u32::try_from(a.num_hidden_layers).unwrap_or(u32::MAX)
        });
        self.settings.lora_layers.min(blocks)
    }
}

/// Where a run's data directory came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// `--data-dir` or the `--config` file's `data-dir`.
    CliOrConfig,
    /// Nobody gave one: the corpus shipped in `data/default`, compiled into
    /// the binary (so it is read whatever the working directory).
    BuiltIn,
}

/// The base a run's hardware profile stands on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProfileSource {
    /// The saved profile (possibly with hardware flags over it).
    Saved,
    /// This machine, detected (possibly with hardware flags over it).
    Detected,
    /// Hardware flags alone.
    Flags,
    /// No profile: the defaults of `tables/defaults.toml`.
    Defaults,
}

impl ProfileSource {
    fn of(source: HardwareSource) -> Self {
        match source {
            HardwareSource::Flags => ProfileSource::Flags,
            HardwareSource::SavedProfile | HardwareSource::SavedProfileWithFlags => {
                ProfileSource::Saved
            }
            HardwareSource::Detected | HardwareSource::DetectedWithFlags => ProfileSource::Detected,
        }
    }

    /// How the run's summary line says it.
    pub fn describe(self) -> &'static str {
        match self {
            ProfileSource::Saved => "saved",
            ProfileSource::Detected => "detected",
            ProfileSource::Flags => "flags",
            ProfileSource::Defaults => "defaults (no saved profile and no detected hardware)",
        }
    }
}

/// The resolved hardware, when there was any: Apple Silicon (generation,
/// chip, GPU cores) or a machine sized by memory (an NVIDIA GPU's, or what a
/// CPU run may use: the table row chosen).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HardwareSummary {
    /// `apple`, `gpu` or `cpu`.
    pub device: &'static str,
    /// Chip generation (Apple Silicon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generation: Option<crate::tables::Generation>,
    /// Chip variant (Apple Silicon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chip: Option<crate::tables::ChipVariant>,
    /// Memory, GB.
    pub memory_gb: u32,
    /// GPU cores (Apple Silicon).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_cores: Option<u32>,
    /// The memory of the `[gpu]`/`[cpu]` table row chosen.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub row_memory_gb: Option<u32>,
    /// Training budget, GB.
    pub training_budget_gb: u32,
}

impl HardwareSummary {
    fn of(machine: &MachineProfile) -> Self {
        match machine {
            MachineProfile::Apple(hp) => HardwareSummary {
                device: "apple",
                generation: Some(hp.generation),
                chip: Some(hp.variant),
                memory_gb: hp.memory_gb,
                gpu_cores: Some(hp.gpu_cores),
                row_memory_gb: None,
                training_budget_gb: hp.training_budget_gb,
            },
            MachineProfile::Memory(p) => HardwareSummary {
                device: p.device.name(),
                generation: None,
                chip: None,
                memory_gb: p.memory_gb,
                gpu_cores: None,
                row_memory_gb: Some(p.row_memory_gb),
                training_budget_gb: p.training_budget_gb,
            },
        }
    }
}

/// Where a run's values came from: the hardware profile and its scaling,
/// and each setting's [`ValueSource`](super::settings::ValueSource).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Provenance {
    /// The base of the hardware profile.
    pub profile_source: ProfileSource,
    /// The detailed hardware source (`saved_profile+flags`); `None` with
    /// defaults.
    #[serde(serialize_with = "hardware_source_key")]
    pub hardware_source: Option<HardwareSource>,
    /// Which machine the run is sized for and why, in words.
    pub profile_reason: String,
    /// Why the saved profile was skipped (it does not describe the detected
    /// machine and `--use-saved-profile` was not given), when it was.
    pub saved_profile_skipped: Option<String>,
    /// The hardware, when resolved.
    pub hardware: Option<HardwareSummary>,
    /// The profile before scaling.
    pub base_profile: Profile,
    /// The profile scaled for the model (equal to the base with defaults:
    /// scaling is skipped without a profile).
    pub scaled_profile: Profile,
    /// Whether scaling changed anything.
    pub scaled: bool,
    /// Where each setting's value came from.
    pub value_sources: ValueSources,
    /// Where the data directory came from.
    pub data_dir_source: DataSource,
}

fn hardware_source_key<S: Serializer>(
    source: &Option<HardwareSource>,
    s: S,
) -> Result<S::Ok, S::Error> {
    source.map(HardwareSource::key).serialize(s)
}

/// This process's place among the processes training together.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct World {
    /// How the ranks talk: `single`, `mpi` or `nccl`.
    #[serde(rename = "collective")]
    pub backend: &'static str,
    /// This process's rank (0 in a single process).
    pub rank: usize,
    /// Processes training together, each on its own shard of every batch.
    #[serde(rename = "world_size")]
    pub size: usize,
}

impl World {
    /// One process.
    pub const SINGLE: World = World {
        backend: "single",
        rank: 0,
        size: 1,
    };

    /// The world of `collective`.
    pub fn of(collective: &dyn Collective) -> World {
        World {
            backend: collective.backend(),
            rank: collective.rank(),
            size: collective.world_size().max(1),
        }
    }

    /// Whether this process is rank 0, the one that writes files and
    /// reports progress.
    pub fn is_lead(&self) -> bool {
        self.rank == 0
    }

    /// Examples per optimizer step over all ranks: per-rank batch x ranks x
    /// accumulation steps.
    pub fn global_batch(&self, spec: &RunSpec) -> u64 {
        u64::from(spec.settings.batch_size) * self.size as u64 * spec.settings.grad_accum_steps
    }
}

/// A resolved run before it starts: what trains, where each value came
/// from, and where the run writes.
#[derive(Clone, Debug, PartialEq)]
pub struct RunPlan {
    /// What trains.
    pub spec: RunSpec,
    /// Where its values came from.
    pub provenance: Provenance,
    /// Where the adapter, checkpoints and metrics go.
    pub output_dir: PathBuf,
}

/// Resolves `settings` (command line merged over file) into the run:
/// hardware from the saved profile at `saved_path`, else `detect()`, else
/// defaults; scaled for the model; given values win.
pub fn plan(
    settings: &Settings,
    saved_path: &Path,
    detect: impl FnOnce() -> Option<MachineProfile>,
) -> Result<RunPlan, PlanError> {
    let (model, weights, size, architecture) = model_and_size(settings.model.as_deref())?;
    let mut provenance = hardware_provenance(settings, saved_path, detect, size.category)?;
    let fallback = Fallback {
        profile: provenance.scaled_profile,
        from_hardware: provenance.profile_source != ProfileSource::Defaults,
        embedded: weights == Weights::Embedded,
    };
    let (resolved, value_sources) = TrainSettings::resolve(settings, &fallback);
    let spec = RunSpec {
        model,
        weights,
        model_size: ModelSizeSummary::of(&size),
        architecture,
        settings: resolved,
        min_lr_ratio: trainer::MIN_LR_RATIO,
        adam_betas: (trainer::ADAM_BETA1, trainer::ADAM_BETA2),
        adam_eps: trainer::ADAM_EPS,
        eval_batches: trainer::EVAL_BATCHES,
        data_dir: settings.data_dir.clone(),
    };
    validate(&spec.settings, &value_sources, provenance.profile_source)?;
    provenance.value_sources = value_sources;
    if let Some(gib) = settings.memory_budget
        && !(gib.is_finite() && gib > 0.0)
    {
        return Err(PlanError::Invalid {
            name: "--memory-budget".into(),
            value: gib.to_string(),
            why: "must be a positive number of GiB",
        });
    }
    Ok(RunPlan {
        spec,
        provenance,
        output_dir: settings
            .output_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_OUTPUT_DIR)),
    })
}

/// The hardware part of a run's provenance: the profile it stands on (the
/// flags', the saved one unless it is for another machine and
/// `--use-saved-profile` was not given, the detected one, else the
/// defaults), scaled for `category`, and why; `value_sources` is left empty
/// for [`plan`] to fill.
fn hardware_provenance(
    settings: &Settings,
    saved_path: &Path,
    detect: impl FnOnce() -> Option<MachineProfile>,
    category: SizeCategory,
) -> Result<Provenance, PlanError> {
    let use_saved = if settings.use_saved_profile.unwrap_or(false) {
        SavedProfileUse::Always
    } else {
        SavedProfileUse::IfItMatches
    };
    let resolution = resolve_machine_checked(
        &HardwareOverride {
            generation: settings.generation,
            chip: settings.chip,
            memory: settings.memory,
        },
        DeviceOverride {
            gpu_memory: settings.gpu_memory,
            cpu_memory: settings.cpu_memory,
        },
        saved_path,
        use_saved,
        detect,
    )?;
    let (base, scaled_profile, profile_source, hardware_source, hardware) = match resolution.machine
    {
        Some((machine, source)) => (
            machine.profile(),
            scale_profile_for_category(machine.profile(), category),
            ProfileSource::of(source),
            Some(source),
            Some(HardwareSummary::of(&machine)),
        ),
        // Without any profile, defaults apply as they are: nothing to scale.
        None => (
            FALLBACK_PROFILE,
            FALLBACK_PROFILE,
            ProfileSource::Defaults,
            None,
            None,
        ),
    };
    Ok(Provenance {
        profile_source,
        hardware_source,
        profile_reason: resolution.reason,
        saved_profile_skipped: resolution.saved_skipped,
        hardware,
        base_profile: base,
        scaled: scaled_profile != base,
        scaled_profile,
        value_sources: ValueSources::new(),
        data_dir_source: if settings.data_dir.is_some() {
            DataSource::CliOrConfig
        } else {
            DataSource::BuiltIn
        },
    })
}

/// The model (as given, or the default id), what trains, its size (counted
/// from the files of a local directory, else from the name) and its
/// architecture when it trains. A local directory's `config.json` is read
/// once, for both.
fn model_and_size(
    model: Option<&str>,
) -> Result<(String, Weights, ModelSize, Option<LlamaConfig>), PlanError> {
    let Some(model) = model else {
        return Ok((
            DEFAULT_MODEL.to_string(),
            Weights::Embedded,
            detect_model_size(DEFAULT_MODEL),
            Some(embedded_config()),
        ));
    };
    let path = Path::new(model);
    if path.is_dir() {
        let (config_path, json) = read_config_json(path)?;
        let architecture = config_from_json(&json, &config_path)?;
        let found = detect_model_size_from_path_with(path, Some(&json)).map_err(|source| {
            PlanError::ModelFiles {
                path: path.to_path_buf(),
                source,
            }
        })?;
        return Ok((
            model.to_string(),
            Weights::LocalDir,
            found.size,
            Some(architecture),
        ));
    }
    if path.exists() {
        let found = detect_model_size_from_path(path).map_err(|source| PlanError::ModelFiles {
            path: path.to_path_buf(),
            source,
        })?;
        return Ok((model.to_string(), Weights::NameOnly, found.size, None));
    }
    if looks_like_path(model) {
        return Err(PlanError::ModelPathMissing(path.to_path_buf()));
    }
    Ok((
        model.to_string(),
        Weights::NameOnly,
        detect_model_size(model),
        None,
    ))
}

/// Checks the resolved values. A bad value is named as its source gave it:
/// the flag (or `--config` key) the user set, else the profile's or the
/// defaults' key, so a zeroed saved profile is not blamed on a flag nobody
/// passed.
fn validate(
    c: &TrainSettings,
    sources: &ValueSources,
    profile: ProfileSource,
) -> Result<(), PlanError> {
    let bad = |flag: &'static str, value: String, why| {
        let key = flag.trim_start_matches("--").replace('-', "_");
        let name = match sources.get(key.as_str()) {
            Some(ValueSource::Profile) => {
                let key = match key.as_str() {
                    "lora_layers" => "lora_num_layers",
                    k => k,
                };
                format!("{key} of the {} hardware profile", profile.describe())
            }
            Some(ValueSource::Default) => format!("{key} of tables/defaults.toml"),
            _ => flag.to_string(),
        };
        Err(PlanError::Invalid { name, value, why })
    };
    for (name, v) in [
        ("--batch-size", c.batch_size),
        ("--lora-rank", c.lora_rank),
        ("--lora-layers", c.lora_layers),
    ] {
        if v == 0 {
            return bad(name, "0".into(), "must be at least 1");
        }
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
    for (name, v) in [
        ("--learning-rate", c.learning_rate),
        ("--grad-clip", c.grad_clip),
    ] {
        if !(v.is_finite() && v > 0.0) {
            return bad(name, v.to_string(), "must be positive");
        }
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
        ("--collective-timeout", c.collective_timeout),
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
