//! Every rule a table must satisfy, checked at once, into a clean model.
//!
//! This file holds the clean model ([`Tables`] and its parts), the schema of
//! the numeric settings ([`SETTINGS`]) and [`validate`], which runs the checks
//! of each table file in turn: one module per file below `validate/`, each
//! reporting through that file's view of the [`Checker`](checker::Checker).

mod checker;
mod defaults;
mod detect;
mod hardware;
mod known_models;
mod memory;
mod profile;
mod size;

use std::collections::BTreeMap;
use std::ops::Range;

use toml::Spanned;

use super::diag::Diagnostic;
use super::model::{self, Loaded, SettingValue};
use checker::{Checker, FileChecker};

/// What a detection pattern marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternKind {
    /// A parameter count.
    Size,
    /// A token that looks like a size but is not; skipped.
    Ignore,
    /// A mixture of experts: `8x7B`.
    Moe,
}

pub struct FamilyRule {
    /// Lower-case substring.
    pub substring: String,
    pub params: u64,
    /// Beats a size written in the name.
    pub overrides: bool,
    /// Where the substring is written in `tables/known_models.toml`.
    pub span: Range<usize>,
}

pub struct MoeLayout {
    pub experts: u32,
    pub expert_params: u64,
    pub total_params: u64,
}

pub struct Category {
    pub name: String,
    /// Inclusive upper bound in parameters; `None` for the last category.
    pub max_params: Option<u64>,
    pub max_params_b: Option<i64>,
    pub lora_rank: u32,
    pub lora_num_layers: u32,
    pub batch_size_multiplier: f64,
    /// Index into `Tables::tiers`.
    pub tier: usize,
}

pub struct Limits {
    pub lora_rank_min: u32,
    pub lora_rank_max: u32,
    pub lora_rank_multiple_of: u32,
    pub lora_num_layers_min: u32,
    pub lora_num_layers_max: u32,
    pub batch_size_multiplier_max: f64,
}

#[derive(Clone)]
pub struct Profile {
    pub batch_size: u32,
    pub lora_rank: u32,
    pub lora_num_layers: u32,
    pub grad_checkpoint: bool,
    pub tier: usize,
}

pub struct HardwareRow {
    pub variant: usize,
    pub memory_gb: u32,
    pub profile: Profile,
}

/// A `[[gpu.profile]]` or `[[cpu.profile]]` row.
pub struct MemoryRow {
    pub memory_gb: u32,
    pub profile: Profile,
}

/// A `[[cpu.simd]]` feature: its name and the cpuinfo flags that show it.
pub struct SimdFeature {
    pub name: String,
    pub flags: Vec<String>,
}

pub struct Generation {
    pub name: String,
    /// GPU cores per variant, in the order of `Tables::variants`.
    pub gpu_cores: Vec<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A non-negative integer.
    Count,
    /// A boolean.
    Flag,
    /// A model tier.
    Tier,
}

impl KeyKind {
    /// The name used in `tables/profile.toml`.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Count => "count",
            KeyKind::Flag => "flag",
            KeyKind::Tier => "tier",
        }
    }
}

/// One key of a training profile.
pub struct ProfileKey {
    pub name: String,
    pub kind: KeyKind,
    pub required: bool,
    /// A field of the library's `Profile`, read and written by scaling.
    pub in_profile: bool,
    pub doc: String,
}

/// The validated tables.
pub struct Tables {
    pub tiers: Vec<String>,
    pub default_tier: usize,
    pub categories: Vec<Category>,
    pub batch_size_cap: u32,
    pub default_batch_size: u32,
    pub limits: Limits,
    pub patterns: Vec<(PatternKind, String)>,
    /// Parameters per unit, indexed by `letter - b'a'`; 0 where no unit.
    pub units: [u64; 26],
    /// Family rules, in priority order.
    pub families: Vec<FamilyRule>,
    /// (name, parameters, span in `tables/known_models.toml`) of models
    /// known by exact name.
    pub known_models: Vec<(String, u64, Range<usize>)>,
    pub moe: Vec<MoeLayout>,
    pub skip_segments: Vec<String>,
    pub hash_min_len: u32,
    /// Files sources differing by more than this fraction disagree.
    pub disagreement_fraction: f64,
    /// Longest safetensors header read, in bytes.
    pub max_safetensors_header_bytes: u32,
    pub cache_prefix: String,
    pub cache_separator: String,
    pub budget_fraction: f64,
    pub variants: Vec<String>,
    pub variant_detect_order: Vec<usize>,
    pub default_variant: usize,
    pub generations: Vec<Generation>,
    /// Memory options per variant.
    pub memory_options: Vec<Vec<u32>>,
    /// (min GPU cores, min batch size).
    pub gpu_core_batch_floors: Vec<(u32, u32)>,
    pub fallback_profile: Profile,
    pub profiles: Vec<HardwareRow>,
    /// `[gpu] budget_fraction`.
    pub gpu_budget_fraction: f64,
    /// `[[gpu.profile]]`, smallest memory first.
    pub gpu_rows: Vec<MemoryRow>,
    /// `[cpu] budget_fraction`.
    pub cpu_budget_fraction: f64,
    /// `[[cpu.profile]]`, smallest memory first.
    pub cpu_rows: Vec<MemoryRow>,
    /// `[[cpu.simd]]`, in table order.
    pub simd: Vec<SimdFeature>,
    pub default_model: String,
    pub lora_alpha_per_rank: f64,
    /// `[trainer]` and `[embedded]` values, in [`SETTINGS`] order.
    pub settings: Vec<(&'static Setting, f64)>,
    /// Profile keys, in table order.
    pub profile_keys: Vec<ProfileKey>,
    /// `memory.toml`'s `[[reference_shape]]`s, in table order.
    pub reference_shapes: Vec<RefShape>,
    /// `known_models.toml`'s `[[architecture]]`s, in table order.
    pub known_shapes: Vec<KnownShape>,
    /// `known_models.toml`'s `[shape_match] suffixes`.
    pub shape_suffixes: Vec<String>,
}

/// A validated `[[architecture]]` of `known_models.toml`.
#[derive(Clone, Debug)]
pub struct KnownShape {
    pub id: String,
    pub names: Vec<String>,
    pub layers: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub heads: u64,
    pub kv_heads: u64,
    /// Written, or hidden / heads.
    pub head_dim: u64,
    pub vocab: u64,
    pub tied: bool,
    pub qkv_bias: bool,
}

/// A validated `[[reference_shape]]`.
#[derive(Clone, Debug)]
pub struct RefShape {
    pub source: String,
    pub layers: u64,
    pub hidden: u64,
    pub intermediate: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub vocab: u64,
    pub tied: bool,
}

const BILLION: u64 = 1_000_000_000;

/// Checks every rule; returns the clean model or every problem found.
///
/// The files are checked in this order, and so are their problems reported.
pub fn validate(t: &Loaded) -> Result<Tables, Vec<Diagnostic>> {
    use model::{DEFAULTS, DETECT, HARDWARE, KNOWN, MEMORY, PROFILE, SIZE};
    let mut c = Checker::new(&t.sources);
    let size = size::check(&mut c.file(SIZE), &t.size);
    let detect = detect::check(&mut c.file(DETECT), &t.detect);
    let known = known_models::check(&mut c.file(KNOWN), &t.known);
    let hardware = hardware::check(
        &mut c.file(HARDWARE),
        &t.hardware,
        &size.tiers,
        &size.limits,
    );
    let train = defaults::train(&mut c.file(DEFAULTS), &t.defaults);
    // The settings in [`SETTINGS`] order, then the embedded model's shape
    // they describe.
    let mut settings = Vec::new();
    defaults::settings(&mut c.file(DEFAULTS), &t.defaults, &mut settings);
    memory::settings(&mut c.file(MEMORY), &t.memory, &mut settings);
    defaults::embedded_shape(&mut c.file(DEFAULTS), &t.defaults, &settings);
    let profile_keys = profile::keys(&mut c.file(PROFILE), &t.profile);
    let reference_shapes = memory::reference_shapes(&mut c.file(MEMORY), &t.memory);

    if !c.errors.is_empty() {
        return Err(c.errors);
    }
    Ok(Tables {
        tiers: size.tiers,
        default_tier: size.default_tier,
        categories: size.categories,
        batch_size_cap: size.batch_size_cap,
        default_batch_size: size.default_batch_size,
        limits: size.limits,
        patterns: detect.patterns,
        units: detect.units,
        families: known.families,
        known_models: known.models,
        moe: detect.moe,
        skip_segments: detect.skip_segments,
        hash_min_len: detect.hash_min_len,
        disagreement_fraction: detect.disagreement_fraction,
        max_safetensors_header_bytes: detect.max_safetensors_header_bytes,
        cache_prefix: detect.cache_prefix,
        cache_separator: detect.cache_separator,
        budget_fraction: hardware.budget_fraction,
        variants: hardware.variants,
        variant_detect_order: hardware.variant_detect_order,
        default_variant: hardware.default_variant,
        generations: hardware.generations,
        memory_options: hardware.memory_options,
        gpu_core_batch_floors: hardware.gpu_core_batch_floors,
        fallback_profile: hardware.fallback_profile,
        profiles: hardware.profiles,
        gpu_budget_fraction: hardware.gpu_budget_fraction,
        gpu_rows: hardware.gpu_rows,
        cpu_budget_fraction: hardware.cpu_budget_fraction,
        cpu_rows: hardware.cpu_rows,
        simd: hardware.simd,
        default_model: train.default_model,
        lora_alpha_per_rank: train.lora_alpha_per_rank,
        settings,
        profile_keys,
        reference_shapes,
        known_shapes: known.shapes,
        shape_suffixes: known.shape_suffixes,
    })
}

/// The type of a `[trainer]`/`[embedded]` value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum SettingKind {
    /// A real number in `lo..=hi`, or `lo < x <= hi` when `open_low`.
    Float { lo: f64, hi: f64, open_low: bool },
    /// An integer in `lo..=hi`.
    Int { lo: u64, hi: u64 },
    /// `true` or `false` (carried as 1 or 0 beside the numbers).
    Flag,
}

/// One value of `defaults.toml`'s `[trainer]` or `[embedded]` tables: the
/// table holds the number, this schema its section, name, range and doc.
#[derive(Debug)]
pub struct Setting {
    /// `trainer` or `embedded` (the generated module's name too).
    pub section: &'static str,
    /// The key (the constant is its upper-case form).
    pub name: &'static str,
    /// Type and range.
    pub kind: SettingKind,
    /// The constant's doc.
    pub doc: &'static str,
}

const fn float(
    section: &'static str,
    name: &'static str,
    lo: f64,
    hi: f64,
    open_low: bool,
    doc: &'static str,
) -> Setting {
    Setting {
        section,
        name,
        kind: SettingKind::Float { lo, hi, open_low },
        doc,
    }
}

const fn flag(section: &'static str, name: &'static str, doc: &'static str) -> Setting {
    Setting {
        section,
        name,
        kind: SettingKind::Flag,
        doc,
    }
}

const fn int(
    section: &'static str,
    name: &'static str,
    lo: u64,
    hi: u64,
    doc: &'static str,
) -> Setting {
    Setting {
        section,
        name,
        kind: SettingKind::Int { lo, hi },
        doc,
    }
}

const MAX_STEPS: u64 = 1 << 40;
const MAX_DIM: u64 = 1 << 20;

/// Every value `[trainer]` and `[embedded]` must hold.
pub static SETTINGS: &[Setting] = &[
    float(
        "trainer",
        "learning_rate",
        0.0,
        1.0,
        true,
        "Peak learning rate.",
    ),
    float(
        "trainer",
        "min_lr_ratio",
        0.0,
        1.0,
        false,
        "The cosine schedule decays to this fraction of the peak.",
    ),
    int(
        "trainer",
        "warmup_steps",
        0,
        MAX_STEPS,
        "Linear warmup, optimizer steps.",
    ),
    int(
        "trainer",
        "max_steps",
        1,
        MAX_STEPS,
        "Optimizer steps of a run on a real model.",
    ),
    int(
        "trainer",
        "grad_accum_steps",
        1,
        1 << 16,
        "Micro-batches accumulated per optimizer step.",
    ),
    float(
        "trainer",
        "grad_clip",
        0.0,
        1e9,
        true,
        "Global gradient-norm clip.",
    ),
    float(
        "trainer",
        "weight_decay",
        0.0,
        1.0,
        false,
        "AdamW decoupled weight decay.",
    ),
    float(
        "trainer",
        "adam_beta1",
        0.0,
        1.0,
        false,
        "AdamW first-moment decay.",
    ),
    float(
        "trainer",
        "adam_beta2",
        0.0,
        1.0,
        false,
        "AdamW second-moment decay.",
    ),
    float(
        "trainer",
        "adam_eps",
        0.0,
        1.0,
        true,
        "AdamW denominator epsilon.",
    ),
    float(
        "trainer",
        "lora_dropout",
        0.0,
        0.99,
        false,
        "Dropout on the LoRA path's input, in training.",
    ),
    int("trainer", "seed", 0, u32::MAX as u64, "The run's one seed."),
    flag(
        "trainer",
        "quantize_embeddings",
        "Store the embedding and the output head as NF4 too (QLoRA keeps them 16-bit).",
    ),
    flag(
        "trainer",
        "cpu_matmul_bf16",
        "Multiply the frozen weights on the CPU in bf16 with f32 sums (AMX where present) instead of f32.",
    ),
    int(
        "trainer",
        "seq_len",
        2,
        1 << 20,
        "Longest training sequence, tokens.",
    ),
    int(
        "trainer",
        "eval_every",
        1,
        MAX_STEPS,
        "Validation loss every this many optimizer steps.",
    ),
    int(
        "trainer",
        "eval_batches",
        1,
        1 << 20,
        "Validation batches per evaluation.",
    ),
    int(
        "trainer",
        "checkpoint_every",
        1,
        MAX_STEPS,
        "A checkpoint every this many optimizer steps.",
    ),
    int(
        "trainer",
        "keep_checkpoints",
        1,
        1 << 10,
        "Checkpoints kept.",
    ),
    int(
        "trainer",
        "collective_timeout_s",
        1,
        1 << 20,
        "Seconds a rank waits in one collective call before it gives up.",
    ),
    int(
        "trainer",
        "max_small_file_bytes",
        1 << 10,
        1 << 40,
        "Largest small file read whole (config.json, tokenizer_config.json, a shard index, the saved profile, a --config file), bytes.",
    ),
    int(
        "trainer",
        "max_line_bytes",
        1 << 10,
        1 << 32,
        "Longest line of a data file, bytes; longer lines are bad lines.",
    ),
    int(
        "trainer",
        "tokenize_prefix_bytes_per_token",
        1,
        1 << 10,
        "Bytes of a record's text tokenized per token wanted (first try; doubled as needed).",
    ),
    int(
        "trainer",
        "bad_lines_shown",
        1,
        1 << 10,
        "Bad data lines shown one by one; the rest are counted.",
    ),
    int(
        "trainer",
        "load_progress_mib",
        1,
        1 << 20,
        "A progress line every this many MiB read of a data file.",
    ),
    int(
        "trainer",
        "chat_template_fuel",
        1000,
        1 << 40,
        "MiniJinja instructions one rendering of a chat template may run.",
    ),
    int(
        "trainer",
        "chat_template_max_bytes",
        1 << 10,
        1 << 32,
        "Bytes one rendering of a chat template may write.",
    ),
    int(
        "trainer",
        "chat_template_max_memory_bytes",
        1 << 20,
        1 << 40,
        "Bytes of memory one rendering of a chat template may hold.",
    ),
    int(
        "trainer",
        "generate_max_new_tokens",
        1,
        1 << 20,
        "train generate: tokens generated at most after the prompt.",
    ),
    float(
        "trainer",
        "generate_temperature",
        0.0,
        100.0,
        false,
        "train generate: sampling temperature; 0 is greedy.",
    ),
    float(
        "trainer",
        "generate_top_p",
        0.0,
        1.0,
        true,
        "train generate: nucleus sampling's probability mass.",
    ),
    int(
        "trainer",
        "generate_seed",
        0,
        u32::MAX as u64,
        "train generate: the sampler's seed.",
    ),
    int(
        "trainer",
        "kv_cache_chunk",
        1,
        1 << 20,
        "train generate: positions the KV cache grows by at a time.",
    ),
    int(
        "trainer",
        "eval_progress_batches",
        1,
        1 << 20,
        "train eval: a progress line every this many batches.",
    ),
    int(
        "trainer",
        "plot_ticks",
        3,
        20,
        "Labelled ticks aimed for on each axis of the loss plot.",
    ),
    int(
        "trainer",
        "plot_max_points",
        10,
        1 << 20,
        "Most points drawn per series of the loss plot; longer runs are thinned.",
    ),
    float(
        "trainer",
        "saved_profile_memory_ratio",
        1.0,
        100.0,
        false,
        "A saved profile whose memory is more than this many times the detected machine's is for another machine.",
    ),
    int(
        "trainer",
        "candle_elementwise_threads",
        1,
        1 << 10,
        "Threads of Candle's element-wise pool when CANDLE_NUM_THREADS is unset.",
    ),
    int(
        "trainer",
        "malloc_mmap_threshold_bytes",
        128 << 10,
        32 << 20,
        "glibc malloc serves blocks up to this size from the heap (M_MMAP_THRESHOLD).",
    ),
    int(
        "trainer",
        "malloc_trim_threshold_bytes",
        128 << 10,
        (1 << 31) - 1,
        "glibc malloc keeps up to this much freed memory at the heap's top (M_TRIM_THRESHOLD).",
    ),
    int(
        "trainer",
        "malloc_arena_max",
        1,
        1 << 10,
        "glibc malloc heaps at most (M_ARENA_MAX).",
    ),
    int(
        "trainer",
        "parallel_zero_min_bytes",
        4 << 10,
        32 << 20,
        "Op output buffers from this size up are zero-filled on rayon's threads.",
    ),
    int(
        "trainer",
        "parallel_zero_task_bytes",
        4 << 10,
        32 << 20,
        "Bytes each parallel zero-filling task clears.",
    ),
    int(
        "trainer",
        "lora_kernel_task_rows",
        1,
        1 << 16,
        "Rows of the input per parallel task of LoRA's rank-wide product kernel.",
    ),
    int(
        "trainer",
        "amx_pass_depth_blocks",
        1,
        1 << 10,
        "Depth blocks of 32 per pass of the AMX kernel when the depth needs several passes.",
    ),
    int(
        "trainer",
        "amx_one_pass_depth_blocks",
        1,
        1 << 10,
        "Depth blocks of 32 the AMX kernel still does in one pass.",
    ),
    int(
        "embedded",
        "num_layers",
        1,
        1 << 10,
        "Decoder blocks of the embedded model.",
    ),
    int(
        "embedded",
        "hidden_size",
        64,
        MAX_DIM,
        "Width of the embedded model.",
    ),
    int(
        "embedded",
        "intermediate_size",
        64,
        MAX_DIM,
        "SwiGLU width of the embedded model.",
    ),
    int(
        "embedded",
        "num_attention_heads",
        1,
        1 << 10,
        "Query heads of the embedded model.",
    ),
    int(
        "embedded",
        "num_key_value_heads",
        1,
        1 << 10,
        "Key/value heads of the embedded model.",
    ),
    int(
        "embedded",
        "vocab_size",
        258,
        MAX_DIM,
        "Vocabulary of the embedded model (256 bytes, BOS, EOS, padding).",
    ),
    int(
        "embedded",
        "weight_seed",
        0,
        u32::MAX as u64,
        "Seed of the embedded model's frozen weights.",
    ),
    int(
        "embedded",
        "seq_len",
        2,
        1 << 20,
        "Sequence length of the embedded run.",
    ),
    int(
        "embedded",
        "max_steps",
        1,
        MAX_STEPS,
        "Optimizer steps of the embedded run.",
    ),
    float(
        "embedded",
        "learning_rate",
        0.0,
        1.0,
        true,
        "Peak learning rate of the embedded run.",
    ),
    int(
        "embedded",
        "warmup_steps",
        0,
        MAX_STEPS,
        "Warmup steps of the embedded run.",
    ),
    int(
        "embedded",
        "eval_every",
        1,
        MAX_STEPS,
        "Validation interval of the embedded run.",
    ),
    int(
        "embedded",
        "checkpoint_every",
        1,
        MAX_STEPS,
        "Checkpoint interval of the embedded run.",
    ),
    float(
        "coefficients",
        "runtime_mib",
        0.0,
        1e6,
        false,
        "The process without a model (runtime, tokenizer, data), MiB.",
    ),
    float(
        "coefficients",
        "load_tensor",
        0.0,
        100.0,
        false,
        "Copies of the largest tensor alive while it is read and quantized.",
    ),
    float(
        "coefficients",
        "adapters",
        0.0,
        100.0,
        false,
        "Copies of the adapters (value, gradient, AdamW moments, checkpoint buffers).",
    ),
    float(
        "coefficients",
        "logits_forward",
        0.0,
        100.0,
        false,
        "Copies of the logits (batch x seq x vocab) kept from the forward pass to the end of backward.",
    ),
    float(
        "coefficients",
        "logits_backward",
        0.0,
        100.0,
        false,
        "Copies of the logits alive while the output head's backward runs (their gradient).",
    ),
    float(
        "coefficients",
        "head",
        0.0,
        100.0,
        false,
        "Copies of the dense output head (vocab x hidden) while its backward runs.",
    ),
    float(
        "coefficients",
        "block_hidden",
        0.0,
        1000.0,
        false,
        "Copies of hidden-wide activations per token of each block whose graph is kept (or rebuilt).",
    ),
    float(
        "coefficients",
        "block_intermediate",
        0.0,
        1000.0,
        false,
        "Copies of SwiGLU-wide activations per token of each block whose graph is kept (or rebuilt).",
    ),
    float(
        "coefficients",
        "block_attention",
        0.0,
        1000.0,
        false,
        "Copies of the attention scores (batch x heads x seq x seq) of each block whose graph is kept (or rebuilt).",
    ),
    float(
        "coefficients",
        "checkpoint_hidden",
        0.0,
        100.0,
        false,
        "Copies of each adapted block's saved input with checkpointing.",
    ),
    float(
        "coefficients",
        "backward_hidden",
        0.0,
        1000.0,
        false,
        "Copies of hidden-wide gradients per token of the block whose backward runs.",
    ),
    float(
        "coefficients",
        "backward_intermediate",
        0.0,
        1000.0,
        false,
        "Copies of SwiGLU-wide gradients per token of the block whose backward runs.",
    ),
    float(
        "coefficients",
        "backward_attention",
        0.0,
        1000.0,
        false,
        "Copies of the attention scores' gradients of the block whose backward runs.",
    ),
    float(
        "fit",
        "estimate_share",
        0.0,
        1.0,
        true,
        "Share of the budget a fitted run's estimate may take (room for the model's error).",
    ),
    int(
        "fit",
        "min_seq_len",
        2,
        1 << 20,
        "Shortest sequence the fit cuts to.",
    ),
    int(
        "fit",
        "min_lora_layers",
        1,
        1 << 16,
        "Fewest adapted blocks the fit cuts to.",
    ),
];

/// One `[SECTION]` of [`SETTINGS`], in the file `f` views: no key unknown,
/// every key present, each in its range (integers whole). The values are
/// appended to `out` in [`SETTINGS`] order.
fn check_settings<V: Copy + Into<SettingValue>>(
    f: &mut FileChecker,
    section: &str,
    table: &Spanned<BTreeMap<String, Spanned<V>>>,
    out: &mut Vec<(&'static Setting, f64)>,
) {
    for (key, v) in table.get_ref() {
        if !SETTINGS
            .iter()
            .any(|s| s.section == section && s.name == key)
        {
            let known: Vec<&str> = SETTINGS
                .iter()
                .filter(|s| s.section == section)
                .map(|s| s.name)
                .collect();
            f.err(
                v.span(),
                format!(
                    "unknown key \"{key}\" in [{section}] (known: {})",
                    known.join(", ")
                ),
            );
        }
    }
    for s in SETTINGS.iter().filter(|s| s.section == section) {
        let Some(v) = table.get_ref().get(s.name) else {
            f.err(table.span(), format!("[{section}] lacks \"{}\"", s.name));
            continue;
        };
        let value: SettingValue = (*v.get_ref()).into();
        let (ok, x) = match (s.kind, value) {
            (SettingKind::Float { lo, hi, open_low }, SettingValue::Number(x)) => (
                x.is_finite() && x <= hi && if open_low { x > lo } else { x >= lo },
                x,
            ),
            (SettingKind::Int { lo, hi }, SettingValue::Number(x)) => {
                (x.fract() == 0.0 && x >= lo as f64 && x <= hi as f64, x)
            }
            (SettingKind::Flag, SettingValue::Flag(b)) => (true, f64::from(u8::from(b))),
            _ => (false, 0.0),
        };
        if !ok {
            let range = match s.kind {
                SettingKind::Float {
                    lo,
                    hi,
                    open_low: true,
                } => format!("a number in ({lo}, {hi}]"),
                SettingKind::Float {
                    lo,
                    hi,
                    open_low: false,
                } => format!("a number in [{lo}, {hi}]"),
                SettingKind::Int { lo, hi } => format!("an integer in {lo}..={hi}"),
                SettingKind::Flag => "true or false".to_string(),
            };
            f.err(v.span(), format!("{} is {value}, must be {range}", s.name));
        }
        out.push((s, x));
    }
}
