//! The tables as written: serde models with spans, and loading them.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;
use toml::Spanned;

use super::diag::{Diagnostic, Source};

type S<T> = Spanned<T>;

/// The table files, in the order they are read and hashed.
pub const FILES: [&str; 7] = [
    "size.toml",
    "detect.toml",
    "hardware.toml",
    "defaults.toml",
    "known_models.toml",
    "profile.toml",
    "memory.toml",
];
pub const SIZE: usize = 0;
pub const DETECT: usize = 1;
pub const HARDWARE: usize = 2;
pub const DEFAULTS: usize = 3;
pub const KNOWN: usize = 4;
pub const PROFILE: usize = 5;
pub const MEMORY: usize = 6;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeFile {
    pub category: Vec<S<Category>>,
    pub tiers: S<Tiers>,
    pub scaling: S<Scaling>,
    pub limits: S<Limits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Category {
    pub name: S<String>,
    pub max_params_b: Option<S<i64>>,
    pub lora_rank: S<i64>,
    pub lora_num_layers: S<i64>,
    pub batch_size_multiplier: S<f64>,
    pub tier: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tiers {
    pub order: Vec<S<String>>,
    pub default: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scaling {
    pub batch_size_cap: S<i64>,
    pub default_batch_size: S<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub lora_rank_min: S<i64>,
    pub lora_rank_max: S<i64>,
    pub lora_rank_multiple_of: S<i64>,
    pub lora_num_layers_min: S<i64>,
    pub lora_num_layers_max: S<i64>,
    pub batch_size_multiplier_max: S<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DetectFile {
    pub pattern: Vec<S<Pattern>>,
    pub unit: Vec<S<Unit>>,
    pub moe: Vec<S<Moe>>,
    pub path: S<PathRules>,
    pub files: S<FilesRules>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesRules {
    pub disagreement_fraction: S<f64>,
    pub max_safetensors_header_bytes: S<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Moe {
    pub experts: S<i64>,
    pub expert_params_b: S<f64>,
    pub total_params_b: S<f64>,
    pub source: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PathRules {
    pub skip_segments: Vec<S<String>>,
    pub hash_min_len: S<i64>,
    pub cache_prefix: S<String>,
    pub cache_separator: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownFile {
    pub model: Vec<S<KnownModel>>,
    pub family: Vec<S<Family>>,
    pub shape_match: S<ShapeMatch>,
    pub architecture: Vec<S<KnownArchitecture>>,
}

/// `[shape_match]`: the words a name may carry after a known
/// architecture's name and still match it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShapeMatch {
    pub suffixes: Vec<S<String>>,
}

/// One `[[architecture]]`: a published architecture and the names it
/// answers to.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownArchitecture {
    pub id: S<String>,
    pub names: Vec<S<String>>,
    pub layers: S<i64>,
    pub hidden: S<i64>,
    pub intermediate: S<i64>,
    pub heads: S<i64>,
    pub kv_heads: S<i64>,
    pub head_dim: Option<S<i64>>,
    pub vocab: S<i64>,
    pub tied: S<bool>,
    pub qkv_bias: Option<S<bool>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnownModel {
    pub name: S<String>,
    pub params_b: S<f64>,
    pub source: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pattern {
    pub kind: S<String>,
    pub regex: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Unit {
    pub letter: S<String>,
    pub params: S<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub substring: S<String>,
    pub params_b: S<f64>,
    #[serde(rename = "override", default)]
    pub overrides: Option<S<bool>>,
    pub source: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HardwareFile {
    pub budget_fraction: S<f64>,
    pub apple: S<Apple>,
    pub gpu: S<MemoryTiers>,
    pub cpu: S<CpuTiers>,
}

/// `[gpu]`: profiles by the memory of one GPU.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryTiers {
    pub budget_fraction: S<f64>,
    pub profile: Vec<S<RawProfile>>,
}

/// `[cpu]`: profiles by the memory a CPU run may use, and the SIMD features
/// reported.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuTiers {
    pub budget_fraction: S<f64>,
    pub simd: Vec<S<Simd>>,
    pub profile: Vec<S<RawProfile>>,
}

/// A SIMD feature and the `/proc/cpuinfo` flags that show it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Simd {
    pub name: S<String>,
    pub flags: Vec<S<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Apple {
    pub variants: Vec<S<String>>,
    pub variant_detect_order: Vec<S<String>>,
    pub default_variant: S<String>,
    pub generation: Vec<S<Generation>>,
    pub memory_options_gb: S<BTreeMap<String, S<Vec<S<i64>>>>>,
    pub gpu_core_batch_floor: Vec<S<Floor>>,
    pub fallback_profile: S<RawProfile>,
    pub profile: Vec<S<RawProfile>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Generation {
    pub name: S<String>,
    pub gpu_cores: S<BTreeMap<String, S<i64>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Floor {
    pub min_gpu_cores: S<i64>,
    pub min_batch_size: S<i64>,
}

/// A training profile row; `variant` and `memory_gb` are set on Apple rows
/// and absent on the fallback profile; `[gpu]` and `[cpu]` rows set only
/// `memory_gb`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub variant: Option<S<String>>,
    pub memory_gb: Option<S<i64>>,
    pub batch_size: S<i64>,
    pub lora_rank: S<i64>,
    pub lora_num_layers: S<i64>,
    pub grad_checkpoint: S<bool>,
    pub tier: S<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DefaultsFile {
    pub train: S<TrainDefaults>,
    /// `[trainer]`: name -> number or flag, checked against
    /// `validate::SETTINGS`.
    pub trainer: S<BTreeMap<String, S<SettingValue>>>,
    /// `[embedded]`: name -> number or flag, checked against
    /// `validate::SETTINGS`.
    pub embedded: S<BTreeMap<String, S<SettingValue>>>,
}

/// A value of a settings table: a number or a flag (`validate::SETTINGS`
/// says which each key must be).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum SettingValue {
    /// `true` or `false`.
    Flag(bool),
    /// A number (integers read as numbers too).
    Number(f64),
}

impl From<f64> for SettingValue {
    fn from(x: f64) -> Self {
        SettingValue::Number(x)
    }
}

impl std::fmt::Display for SettingValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SettingValue::Flag(b) => write!(f, "{b}"),
            SettingValue::Number(x) => write!(f, "{x}"),
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainDefaults {
    pub default_model: S<String>,
    pub lora_alpha_per_rank: S<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileFile {
    pub key: Vec<S<ProfileKey>>,
}

/// One key of a training profile, as `#[derive(ScaledProfile)]` sees it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileKey {
    pub name: S<String>,
    pub kind: S<String>,
    pub required: S<bool>,
    pub in_profile: S<bool>,
    pub doc: S<String>,
}

/// `memory.toml`: the memory model's coefficients, the auto-fit's limits and
/// reference architectures.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFile {
    /// `[coefficients]`: name -> number, checked against `validate::SETTINGS`.
    pub coefficients: S<BTreeMap<String, S<f64>>>,
    /// `[fit]`: name -> number, checked against `validate::SETTINGS`.
    pub fit: S<BTreeMap<String, S<f64>>>,
    pub reference_shape: Vec<S<ReferenceShape>>,
}

/// One `[[reference_shape]]`: a published architecture.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceShape {
    pub source: S<String>,
    pub layers: S<i64>,
    pub hidden: S<i64>,
    pub intermediate: S<i64>,
    pub heads: S<i64>,
    pub kv_heads: S<i64>,
    pub vocab: S<i64>,
    pub tied: S<bool>,
}

/// All tables, parsed but not yet validated.
pub struct Loaded {
    /// One per entry of [`FILES`], in that order.
    pub sources: Vec<Source>,
    pub size: SizeFile,
    pub detect: DetectFile,
    pub hardware: HardwareFile,
    pub defaults: DefaultsFile,
    pub known: KnownFile,
    pub profile: ProfileFile,
    pub memory: MemoryFile,
}

fn parse<T: for<'de> Deserialize<'de>>(src: &Source, errors: &mut Vec<Diagnostic>) -> Option<T> {
    match toml::from_str::<T>(&src.text) {
        Ok(v) => Some(v),
        Err(e) => {
            let message = e.message().trim_end().to_string();
            errors.push(match e.span() {
                Some(span) => src.error(span, message),
                None => Diagnostic::file(src.display.clone(), message),
            });
            None
        }
    }
}

/// Reads and parses every table file in `dir`, reporting every problem.
pub fn load(dir: &Path) -> Result<Loaded, Vec<Diagnostic>> {
    let mut errors = Vec::new();
    let mut sources = Vec::new();
    for name in FILES {
        let path = dir.join(name);
        let display = format!("tables/{name}");
        match std::fs::read_to_string(&path) {
            Ok(text) => sources.push(Source {
                path,
                display,
                text,
            }),
            Err(e) => {
                errors.push(Diagnostic::file(
                    display.clone(),
                    format!("cannot read: {e}"),
                ));
                sources.push(Source {
                    path,
                    display,
                    text: String::new(),
                });
            }
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    let size = parse::<SizeFile>(&sources[SIZE], &mut errors);
    let detect = parse::<DetectFile>(&sources[DETECT], &mut errors);
    let hardware = parse::<HardwareFile>(&sources[HARDWARE], &mut errors);
    let defaults = parse::<DefaultsFile>(&sources[DEFAULTS], &mut errors);
    let known = parse::<KnownFile>(&sources[KNOWN], &mut errors);
    let profile = parse::<ProfileFile>(&sources[PROFILE], &mut errors);
    let memory = parse::<MemoryFile>(&sources[MEMORY], &mut errors);
    match (size, detect, hardware, defaults, known, profile, memory) {
        (
            Some(size),
            Some(detect),
            Some(hardware),
            Some(defaults),
            Some(known),
            Some(profile),
            Some(memory),
        ) if errors.is_empty() => Ok(Loaded {
            sources,
            size,
            detect,
            hardware,
            defaults,
            known,
            profile,
            memory,
        }),
        _ => Err(errors),
    }
}
