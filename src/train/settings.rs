//! What a user can set for a run: one [`Settings`] struct that is both the
//! command line (clap flattens it into `train`) and the schema of a
//! `--config` TOML file (keys spelled like the flags: `lora-rank = 16`).
//!
//! Every setting is declared once, in the [`settings!`] table below: its doc
//! line (the `--help` text), its clap attributes, its type and how it
//! resolves when nobody gave it. From that one entry come the flag, the TOML
//! key, the merge of command line over file ([`Settings::or`]), the resolved
//! value in [`TrainSettings`] (part of the run's spec, so it is printed by
//! `--dry-run`, compared between ranks and stored in checkpoints) and its
//! [`ValueSource`] in the run's provenance.
//!
//! The resolution rules of an entry:
//! - `launch`: not part of what trains (the model, paths, hardware, memory
//!   budget); [`super::spec`] reads it by hand.
//! - `profile(f)`: the hardware profile's value, `f(&profile)`.
//! - `default(embedded, trainer)`: a constant of `tables/defaults.toml`, the
//!   first for the embedded model, the second for a model from files.
//! - `derived(expr)`: computed from settings resolved before it.
//!
//! Optional attributes of an entry: `#[json = "name"]` renames a trained
//! setting in the spec's JSON; `#[absent = "function"]` gives the value a
//! stored spec (a checkpoint's) that lacks the setting stands for: what runs
//! did before it existed; `#[resume = changeable]` lets a `--resume` change
//! it from the checkpoint's value ([`CHANGEABLE_ON_RESUME`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::qlora::bf16_gemm::CpuMatmul;
use crate::qlora::lora::LoraTarget;
use crate::tables::{ChipVariant, Generation, LORA_ALPHA_PER_RANK, Profile, embedded, trainer};

/// Where a resolved value came from (`value_sources` in `--dry-run`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueSource {
    /// The command line or the `--config` file.
    CliOrConfig,
    /// The hardware profile, scaled for the model.
    Profile,
    /// `tables/defaults.toml` (or derived from other values).
    Default,
    /// `--auto-fit` changed it so the run fits its memory budget.
    AutoFit,
}

/// Each resolved setting's source, by setting name.
pub type ValueSources = BTreeMap<&'static str, ValueSource>;

/// What a setting nobody gave falls back to.
#[derive(Clone, Copy, Debug)]
pub struct Fallback {
    /// The hardware profile scaled for the model.
    pub profile: Profile,
    /// Whether that profile stands on hardware (saved, detected or flags);
    /// without hardware its values count as defaults.
    pub from_hardware: bool,
    /// Whether the embedded model trains (its own defaults apply).
    pub embedded: bool,
}

macro_rules! settings {
    (
        $(
            $(#[doc = $doc:literal])*
            #[arg($($clap:tt)*)]
            $(#[json = $json:literal])?
            $(#[absent = $absent:literal])?
            $(#[resume = $resume:ident])?
            $name:ident : $ty:ty => $rule:ident $(($($args:tt)*))?
        ),* $(,)?
    ) => {
        /// The settings a resumed run may change from its checkpoint's (the
        /// entries marked `#[resume = changeable]`): how long it runs, how
        /// often it evaluates and saves, and how the global batch is split
        /// (the trainer checks that the global batch stays the same when the
        /// number of ranks changes). Any other difference would change what
        /// the checkpoint's adapters and optimizer moments mean.
        pub const CHANGEABLE_ON_RESUME: &[&str] = &[
            $( $( settings!(@resume $name $resume), )? )*
        ];

        /// Values given by the user on the command line or in a `--config`
        /// file; `None`: not given. The doc line of each field is its
        /// `--help` text.
        #[derive(Clone, Debug, Default, PartialEq, clap::Args, Deserialize)]
        #[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
        pub struct Settings {
            $(
                $(#[doc = $doc])*
                #[arg($($clap)*)]
                pub $name: Option<$ty>,
            )*
        }

        impl Settings {
            /// `self` where given, else `lower` (command line over file).
            pub fn or(&self, lower: &Settings) -> Settings {
                Settings {
                    $( $name: self.$name.clone().or_else(|| lower.$name.clone()), )*
                }
            }
        }

        settings!(@trained (s fb src) [] [] []
            $( [$(#[doc = $doc])*] [$($json)?] [$($absent)?] $name : $ty => $rule $(($($args)*))? ; )*
        );
    };

    // A launch setting: not part of the spec.
    (@trained ($s:ident $fb:ident $src:ident) [$($f:tt)*] [$($st:tt)*] [$($n:tt)*]
        [$($doc:tt)*] [$($json:literal)?] [$($absent:literal)?] $name:ident : $ty:ty => launch ; $($rest:tt)*
    ) => {
        settings!(@trained ($s $fb $src) [$($f)*] [$($st)*] [$($n)*] $($rest)*);
    };

    // A setting that trains: a field, and a statement resolving it.
    (@trained ($s:ident $fb:ident $src:ident) [$($f:tt)*] [$($st:tt)*] [$($n:tt)*]
        [$($doc:tt)*] [$($json:literal)?] [$($absent:literal)?] $name:ident : $ty:ty => $rule:ident $(($($args:tt)*))? ;
        $($rest:tt)*
    ) => {
        settings!(@trained ($s $fb $src)
            [$($f)* $($doc)* $(#[serde(rename = $json)])? $(#[serde(default = $absent)])? pub $name: $ty,]
            [$($st)*
                let $name: $ty = match $s.$name.clone() {
                    Some(v) => {
                        $src.insert(stringify!($name), ValueSource::CliOrConfig);
                        v
                    }
                    None => settings!(@fallback ($s $fb $src) $name $rule $(($($args)*))?),
                };
            ]
            [$($n)* $name,]
            $($rest)*
        );
    };

    (@trained ($s:ident $fb:ident $src:ident) [$($f:tt)*] [$($st:tt)*] [$($n:ident,)*]) => {
        /// The resolved values of the settings that shape training: part of
        /// the run's spec (flattened into it, so each is a top-level key of
        /// `--dry-run --json` and of a checkpoint's spec).
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        pub struct TrainSettings {
            $($f)*
        }

        impl TrainSettings {
            /// Each setting as given in `$s`, else by its rule; with the
            /// source of each.
            pub fn resolve($s: &Settings, $fb: &Fallback) -> (TrainSettings, ValueSources) {
                let mut $src = ValueSources::new();
                $($st)*
                (TrainSettings { $($n,)* }, $src)
            }

            /// The settings a resumed run trains with: the checkpoint's
            /// (`stored`), except those in `given` (set on the command line
            /// or in `--config`), which may differ from the stored value
            /// only when [`CHANGEABLE_ON_RESUME`] lists them. Returns the
            /// settings and each change as `name: stored -> given`, or the
            /// setting that may not change.
            pub fn on_resume(
                &self,
                stored: &TrainSettings,
                given: &[&'static str],
            ) -> Result<(TrainSettings, Vec<String>), ResumeConflict> {
                let mut out = stored.clone();
                let mut changes = Vec::new();
                $(
                    let name = stringify!($n);
                    if given.contains(&name) && self.$n != stored.$n {
                        let change = format!(
                            "{name}: {} -> {}",
                            serde_json::to_string(&stored.$n).unwrap_or_default(),
                            serde_json::to_string(&self.$n).unwrap_or_default()
                        );
                        if !CHANGEABLE_ON_RESUME.contains(&name) {
                            return Err(ResumeConflict { change });
                        }
                        out.$n = self.$n.clone();
                        changes.push(change);
                    }
                )*
                Ok((out, changes))
            }
        }
    };

    (@resume $name:ident changeable) => {
        stringify!($name)
    };

    (@fallback ($s:ident $fb:ident $src:ident) $name:ident profile($f:expr)) => {{
        $src.insert(
            stringify!($name),
            if $fb.from_hardware { ValueSource::Profile } else { ValueSource::Default },
        );
        ($f)(&$fb.profile)
    }};
    (@fallback ($s:ident $fb:ident $src:ident) $name:ident default($embedded:expr, $trainer:expr)) => {{
        $src.insert(stringify!($name), ValueSource::Default);
        if $fb.embedded { $embedded } else { $trainer }
    }};
    (@fallback ($s:ident $fb:ident $src:ident) $name:ident derived($e:expr)) => {{
        $src.insert(stringify!($name), ValueSource::Default);
        $e
    }};
}

// Every number takes `allow_negative_numbers`: without it clap reads
// `--batch-size -1` as a flag named `-1` and its error names neither the
// flag nor the value; with it the value reaches the flag's parser, whose
// error names both.
settings! {
    /// Model: a local Hugging Face directory (config.json, *.safetensors,
    /// tokenizer.json), or a name/id used for sizing only [default: the
    /// embedded model; scaled for the default model id]
    #[arg(long, value_name = "PATH_OR_ID")]
    model: String => launch,
    /// Directory with train.jsonl and optional valid.jsonl [default: data/default]
    #[arg(long, value_name = "DIR")]
    data_dir: PathBuf => launch,
    /// Where the adapter, adapter_config.json, checkpoints, metrics.jsonl and
    /// loss.svg go [default: runs/default]
    #[arg(long, value_name = "DIR")]
    output_dir: PathBuf => launch,
    /// Optimizer steps
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    #[resume = changeable]
    max_steps: u64 => default(embedded::MAX_STEPS, trainer::MAX_STEPS),
    /// Examples per micro-batch [default: the profile's]
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    #[resume = changeable]
    batch_size: u32 => profile(|p: &Profile| p.batch_size),
    /// Peak learning rate (warmup, then cosine decay)
    #[arg(long, allow_negative_numbers = true, value_name = "X")]
    learning_rate: f64 => default(embedded::LEARNING_RATE, trainer::LEARNING_RATE),
    /// The run's one seed (shuffling, adapter init, dropout)
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    seed: u64 => default(trainer::SEED, trainer::SEED),
    /// LoRA rank [default: the profile's]
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    lora_rank: u32 => profile(|p: &Profile| p.lora_rank),
    /// LoRA alpha [default: 2 x rank]
    #[arg(long, allow_negative_numbers = true, value_name = "X")]
    lora_alpha: f64 => derived(f64::from(lora_rank) * LORA_ALPHA_PER_RANK),
    /// Blocks, counted from the last, with adapters [default: the profile's]
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    lora_layers: u32 => profile(|p: &Profile| p.lora_num_layers),
    /// Dropout on the LoRA path in training
    #[arg(long, allow_negative_numbers = true, value_name = "X")]
    lora_dropout: f64 => default(trainer::LORA_DROPOUT, trainer::LORA_DROPOUT),
    /// Linear layers of each adapted block that get adapters, comma-separated:
    /// q, k, v, o, gate, up, down [default: all]
    #[arg(long, value_name = "LIST")]
    lora_targets: LoraTargets => default(LoraTargets::all(), LoraTargets::all()),
    /// Recompute activations in backward to save memory [default: the profile's]
    #[arg(long, num_args = 0, default_missing_value = "true", overrides_with = "no_grad_checkpoint")]
    grad_checkpoint: bool => profile(|p: &Profile| p.grad_checkpoint),
    /// Keep activations (faster, more memory)
    #[arg(long, num_args = 0, default_missing_value = "true", overrides_with = "grad_checkpoint")]
    no_grad_checkpoint: bool => launch,
    /// Store the embedding and the output head as NF4 too (less memory, more
    /// rounding); by default they stay 16-bit, as in QLoRA
    #[arg(long, num_args = 0, default_missing_value = "true")]
    #[absent = "nf4_before_the_setting"]
    quantize_embeddings: bool => default(trainer::QUANTIZE_EMBEDDINGS, trainer::QUANTIZE_EMBEDDINGS),
    /// How the frozen weights multiply on the CPU: f32, or bf16 operands
    /// with f32 sums (Intel AMX where the CPU has it, several times faster;
    /// emulated at f32 speed elsewhere) [default: f32]
    #[arg(long, value_name = "DTYPE", value_enum, ignore_case = true)]
    #[absent = "f32_before_the_setting"]
    #[resume = changeable]
    cpu_matmul: CpuMatmul => default(CpuMatmul::from_bf16_flag(trainer::CPU_MATMUL_BF16), CpuMatmul::from_bf16_flag(trainer::CPU_MATMUL_BF16)),
    /// Micro-batches per optimizer step
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    #[resume = changeable]
    grad_accum_steps: u64 => default(trainer::GRAD_ACCUM_STEPS, trainer::GRAD_ACCUM_STEPS),
    /// Longest sequence in tokens (longer records are truncated)
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    seq_len: u64 => default(embedded::SEQ_LEN, trainer::SEQ_LEN),
    /// Warmup steps
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    warmup_steps: u64 => default(embedded::WARMUP_STEPS, trainer::WARMUP_STEPS),
    /// Validation loss every N steps
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    #[resume = changeable]
    eval_every: u64 => default(embedded::EVAL_EVERY, trainer::EVAL_EVERY),
    /// A checkpoint every N steps
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    #[resume = changeable]
    checkpoint_every: u64 => default(embedded::CHECKPOINT_EVERY, trainer::CHECKPOINT_EVERY),
    /// Checkpoints kept
    #[arg(long, allow_negative_numbers = true, value_name = "N")]
    #[resume = changeable]
    keep_checkpoints: u64 => default(trainer::KEEP_CHECKPOINTS, trainer::KEEP_CHECKPOINTS),
    /// Global gradient-norm clip
    #[arg(long, allow_negative_numbers = true, value_name = "X")]
    grad_clip: f64 => default(trainer::GRAD_CLIP, trainer::GRAD_CLIP),
    /// AdamW weight decay
    #[arg(long, allow_negative_numbers = true, value_name = "X")]
    weight_decay: f64 => default(trainer::WEIGHT_DECAY, trainer::WEIGHT_DECAY),
    /// Make bad data lines fatal (otherwise skipped and counted)
    #[arg(long, num_args = 0, default_missing_value = "true")]
    strict: bool => default(false, false),
    /// Several processes (mpirun): seconds a rank waits in one collective
    /// call before it decides another rank died or hangs
    #[arg(long, allow_negative_numbers = true, value_name = "SECS")]
    #[json = "collective_timeout_s"]
    #[resume = changeable]
    collective_timeout: u64 => default(trainer::COLLECTIVE_TIMEOUT_S, trainer::COLLECTIVE_TIMEOUT_S),
    /// Memory the run may use, GiB [default: the hardware profile's training
    /// budget, else this machine's memory times the [cpu] budget fraction]
    #[arg(long, allow_negative_numbers = true, value_name = "GIB", value_parser = positive_gib)]
    memory_budget: f64 => launch,
    /// When the memory model says the run will not fit its budget, train the
    /// nearest configuration that does (smaller micro-batch with more
    /// accumulation, then fewer LoRA layers, shorter sequences,
    /// checkpointing on) instead of stopping
    #[arg(long, num_args = 0, default_missing_value = "true")]
    auto_fit: bool => launch,
    /// Before the run, train one step and compare the peak memory with the
    /// estimate and the budget
    #[arg(long, num_args = 0, default_missing_value = "true")]
    trial_step: bool => launch,
    /// Size the run by the saved profile even when it does not describe
    /// this machine (another device, or far more memory than detected);
    /// without it such a profile is skipped with a warning
    #[arg(long, num_args = 0, default_missing_value = "true")]
    use_saved_profile: bool => launch,
    /// Apple Silicon generation
    #[arg(long, value_name = "GEN", value_enum, ignore_case = true)]
    generation: Generation => launch,
    /// Chip variant
    #[arg(long, value_name = "VARIANT", value_enum, ignore_case = true)]
    chip: ChipVariant => launch,
    /// Unified memory in GB
    #[arg(long, allow_negative_numbers = true, value_name = "GB", value_parser = clap::value_parser!(u32).range(1..))]
    memory: u32 => launch,
    /// Size the run for an NVIDIA GPU with this much memory, GB (the [gpu]
    /// rows of tables/hardware.toml)
    #[arg(long, allow_negative_numbers = true, value_name = "GB", value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with_all = ["generation", "chip", "memory", "cpu_memory"])]
    gpu_memory: u32 => launch,
    /// Size the run for a CPU that may use this much memory, GB (the [cpu]
    /// rows)
    #[arg(long, allow_negative_numbers = true, value_name = "GB", value_parser = clap::value_parser!(u32).range(1..),
          conflicts_with_all = ["generation", "chip", "memory"])]
    cpu_memory: u32 => launch,
}

/// `quantize_embeddings` of a spec stored before the setting existed (a
/// checkpoint's): runs then stored the embedding and head as NF4.
fn nf4_before_the_setting() -> bool {
    true
}

/// `cpu_matmul` of a spec stored before the setting existed: `f32`.
fn f32_before_the_setting() -> CpuMatmul {
    CpuMatmul::F32
}

/// A setting given on resume that may not differ from the checkpoint's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{change}: a resumed run keeps the settings it was started with (it may change only {}); start a new run with --overwrite or another --output-dir to change it",
    CHANGEABLE_ON_RESUME.join(", ")
)]
pub struct ResumeConflict {
    /// `name: stored -> given`.
    pub change: String,
}

/// Errors of reading a `--config` file.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The file could not be read.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: crate::safe_io::ReadError,
    },
    /// Not valid TOML, an unknown key or a bad value.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message with its line, column and key, on one line
        /// (the parser's own text spans several, with a snippet).
        message: String,
    },
}

impl Settings {
    /// `--no-grad-checkpoint` folded into `grad_checkpoint`, so that one
    /// source's `--no-grad-checkpoint` beats a lower source's
    /// `grad-checkpoint = true` in [`Settings::or`].
    pub fn normalized(mut self) -> Settings {
        if let Some(off) = self.no_grad_checkpoint.take() {
            self.grad_checkpoint = Some(!off);
        }
        self
    }

    /// Reads a `--config` TOML file. Unknown keys and bad values are errors
    /// naming the file (and the key, line and column). Relative paths in it
    /// are taken relative to the file's directory.
    pub fn from_file(path: &Path) -> Result<Settings, SettingsError> {
        let text =
            crate::safe_io::read_small_string(path).map_err(|source| SettingsError::Read {
                path: path.to_path_buf(),
                source,
            })?;
        let mut s: Settings = toml::from_str(&text).map_err(|e| SettingsError::Parse {
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
        Ok(s.normalized())
    }
}

/// The linear layers of each adapted block that get adapters
/// (`--lora-targets q,v`; in a `--config` file a list or the same string).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoraTargets(pub Vec<LoraTarget>);

impl LoraTargets {
    /// All seven linear layers of a block.
    pub fn all() -> LoraTargets {
        LoraTargets(LoraTarget::ALL.to_vec())
    }
}

impl std::str::FromStr for LoraTargets {
    type Err = String;

    /// A comma-separated list of `q`, `k`, `v`, `o`, `gate`, `up`, `down`
    /// (or PEFT's `q_proj`, ...), or `all`; in block order, each once.
    fn from_str(s: &str) -> Result<Self, String> {
        if s.trim().eq_ignore_ascii_case("all") {
            return Ok(LoraTargets::all());
        }
        let mut targets = Vec::new();
        for name in s.split(',').map(str::trim) {
            let t = LoraTarget::from_module_name(&name.to_ascii_lowercase()).ok_or_else(|| {
                format!("{name:?} is not a linear layer of a block: use q, k, v, o, gate, up, down or all")
            })?;
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        targets.sort();
        Ok(LoraTargets(targets))
    }
}

impl Serialize for LoraTargets {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let names: Vec<&str> = self
            .0
            .iter()
            .map(|t| t.module_name().trim_end_matches("_proj"))
            .collect();
        names.serialize(s)
    }
}

impl<'de> Deserialize<'de> for LoraTargets {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Given {
            List(Vec<String>),
            Text(String),
        }
        let text = match Given::deserialize(d)? {
            Given::List(names) => names.join(","),
            Given::Text(text) => text,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Whether a `--model` value is meant as a path (`./m`, `/m`, `~/m`, `..`).
pub fn looks_like_path(model: &str) -> bool {
    model.starts_with('.') || model.starts_with('/') || model.starts_with('~')
}

fn positive_gib(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(format!("{s:?} is not a positive number of GiB")),
    }
}
