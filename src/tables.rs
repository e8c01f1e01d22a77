//! The tables of `tables/*.toml`, compiled by `build.rs` into constants, enums,
//! `phf` maps and DFAs.
//!
//! Everything here is generated except the types below and the `const`
//! assertions at the end, which re-check the tables' invariants at compile
//! time: a table that slipped past the generator still fails to build.

use unicase::Ascii;

/// The scaling configuration of one size category.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SizeConfig {
    /// The category this configuration belongs to.
    pub category: SizeCategory,
    /// Largest parameter count in the category (inclusive); `None` for the
    /// last category, which has no bound.
    pub max_params: Option<u64>,
    /// LoRA rank for models of this size.
    pub lora_rank: u32,
    /// Number of transformer layers that get LoRA adapters.
    pub lora_num_layers: u32,
    /// Factor applied to the batch size when a profile is scaled down.
    pub batch_size_multiplier: f64,
    /// The hardware tier that matches this size.
    pub tier: Tier,
}

/// Bounds the tables respect.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Smallest allowed LoRA rank.
    pub lora_rank_min: u32,
    /// Largest allowed LoRA rank.
    pub lora_rank_max: u32,
    /// LoRA ranks are multiples of this.
    pub lora_rank_multiple_of: u32,
    /// Smallest allowed number of LoRA layers.
    pub lora_num_layers_min: u32,
    /// Largest allowed number of LoRA layers.
    pub lora_num_layers_max: u32,
    /// Batch-size multipliers lie in `(0, batch_size_multiplier_max]`.
    pub batch_size_multiplier_max: f64,
}

/// What a detection pattern marks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatternKind {
    /// A parameter count.
    Size,
    /// A token that looks like a size but is not (a quantisation tag, a
    /// context length); skipped.
    Ignore,
    /// A mixture of experts: `8x7B` (experts x size of one expert).
    Moe,
}

/// A mixture-of-experts layout whose total parameter count is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeLayout {
    /// Number of experts.
    pub experts: u32,
    /// Parameters of one expert as the name writes it (`7B` in `8x7B`).
    pub expert_params: u64,
    /// Total parameters of the model.
    pub total_params: u64,
}

/// A family rule: names containing `substring` have `params` parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Family {
    /// Lower-case substring.
    pub substring: &'static str,
    /// Parameter count.
    pub params: u64,
}

/// A family that beats the size a name writes, split where its own written
/// size starts: `gpt-oss-20b` is `gpt-oss-` + `20b`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OverrideFamily {
    /// Lower-case text before the size.
    pub prefix: &'static str,
    /// Lower-case size and what follows.
    pub rest: &'static str,
    /// Parameter count.
    pub params: u64,
}

/// A batch-size floor for chips with many GPU cores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoreBatchFloor {
    /// Applies from this many GPU cores.
    pub min_gpu_cores: u32,
    /// The batch size is raised to at least this.
    pub min_batch_size: u32,
}

/// A training profile: the settings that scaling changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Profile {
    /// Examples per optimiser step.
    pub batch_size: u32,
    /// LoRA rank.
    pub lora_rank: u32,
    /// Number of transformer layers (counted from the last) with adapters.
    pub lora_num_layers: u32,
    /// Recompute activations in backward to save memory.
    pub grad_checkpoint: bool,
    /// The size of model this profile was made for.
    pub model_tier: Tier,
}

/// The type of value a profile key holds (`tables/profile.toml`, `kind`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ProfileKeyKind {
    /// A non-negative integer (`u32` in [`Profile`]).
    Count,
    /// A boolean.
    Flag,
    /// A model [`Tier`].
    Tier,
}

/// One key of a training profile (`tables/profile.toml`, `[[key]]`): what
/// `#[derive(ScaledProfile)]` accepts on a struct's fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ProfileKey {
    /// The key's name, as saved profiles and the derive spell it.
    pub name: &'static str,
    /// The type of value it holds.
    pub kind: ProfileKeyKind,
    /// A struct deriving `ScaledProfile` must have a field for it.
    pub required: bool,
    /// A field of [`Profile`], read and written by scaling; other keys are
    /// checked by the derive and carried through unchanged.
    pub in_profile: bool,
    /// One line of documentation.
    pub doc: &'static str,
}

/// A row of the hardware table: the profile for a (variant, memory) pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HardwareRow {
    /// Chip variant.
    pub variant: ChipVariant,
    /// Memory in GB.
    pub memory_gb: u32,
    /// The profile for this machine.
    pub profile: Profile,
}

/// A row of the `[gpu]` or `[cpu]` hardware table: the profile for a memory
/// size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryRow {
    /// Memory in GB.
    pub memory_gb: u32,
    /// The profile for this much memory.
    pub profile: Profile,
}

/// A SIMD feature reported for a CPU (`tables/hardware.toml`, `[[cpu.simd]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SimdFeature {
    /// The name shown (`avx512_vnni`, `neon`).
    pub name: &'static str,
    /// The `/proc/cpuinfo` flags that show it; any one suffices.
    pub flags: &'static [&'static str],
}

/// A published architecture of a model known by name
/// (`tables/known_models.toml`, `[[architecture]]`): what the memory model
/// sizes a model by when only its name is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KnownArchitecture {
    /// The repository whose `config.json` gives the numbers.
    pub id: &'static str,
    /// The names it answers to, lower case (`qwen2.5-14b`).
    pub names: &'static [&'static str],
    /// Its shape, as the memory model sizes it.
    pub shape: crate::memory::Architecture,
}

/// A published architecture the memory model sizes unknown models by
/// (`tables/memory.toml`, `[[reference_shape]]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReferenceShape {
    /// The model the shape is from.
    pub source: &'static str,
    /// Decoder blocks.
    pub layers: u64,
    /// Width.
    pub hidden: u64,
    /// SwiGLU width.
    pub intermediate: u64,
    /// Query heads.
    pub heads: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// Vocabulary.
    pub vocab: u64,
    /// Tied embeddings.
    pub tied: bool,
}

/// DFA bytes with the alignment `DFA::from_bytes` needs.
#[repr(C)]
pub struct AlignedDfaBytes<B: ?Sized> {
    /// Zero-sized; forces 4-byte alignment of `bytes`.
    pub _align: [u32; 0],
    /// The serialised DFA.
    pub bytes: B,
}

include!(concat!(env!("OUT_DIR"), "/tables.rs"));

impl SizeCategory {
    /// This category's scaling configuration.
    pub const fn config(self) -> &'static SizeConfig {
        &SIZE_CONFIGS[self as usize]
    }

    /// Looks a category up by name, ASCII case-insensitively.
    pub fn from_name(name: &str) -> Option<SizeCategory> {
        CATEGORY_BY_NAME.get(&Ascii::new(name)).copied()
    }
}

impl Tier {
    /// Looks a tier up by name, ASCII case-insensitively.
    pub fn from_name(name: &str) -> Option<Tier> {
        TIER_BY_NAME.get(&Ascii::new(name)).copied()
    }
}

impl ChipVariant {
    /// Looks a variant up by name, ASCII case-insensitively.
    pub fn from_name(name: &str) -> Option<ChipVariant> {
        VARIANT_BY_NAME.get(&Ascii::new(name)).copied()
    }
}

impl Generation {
    /// Looks a generation up by name, ASCII case-insensitively.
    pub fn from_name(name: &str) -> Option<Generation> {
        GENERATION_BY_NAME.get(&Ascii::new(name)).copied()
    }

    /// GPU cores of this generation's `variant`.
    pub const fn gpu_cores(self, variant: ChipVariant) -> u32 {
        GPU_CORES[self as usize][variant as usize]
    }
}

/// Error of parsing a table name (tier, category, variant, generation).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} \"{value}\" (known: {known})")]
pub struct UnknownName {
    /// What was being parsed.
    pub what: &'static str,
    /// The value given.
    pub value: String,
    /// The accepted names, comma-separated.
    pub known: String,
}

/// `Display`, `FromStr`, serde and clap's `ValueEnum` (as the table name)
/// for a generated enum.
macro_rules! table_name_impls {
    ($($ty:ident: $what:literal),* $(,)?) => {$(
        impl ::core::fmt::Display for $ty {
            fn fmt(&self, f: &mut ::core::fmt::Formatter<'_>) -> ::core::fmt::Result {
                f.write_str(self.name())
            }
        }
        impl ::core::str::FromStr for $ty {
            type Err = UnknownName;
            fn from_str(s: &str) -> Result<Self, UnknownName> {
                $ty::from_name(s).ok_or_else(|| UnknownName {
                    what: $what,
                    value: s.to_string(),
                    known: $ty::ALL.iter().map(|v| v.name()).collect::<Vec<_>>().join(", "),
                })
            }
        }
        impl serde::Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.name())
            }
        }
        impl<'de> serde::Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
        /// Command-line values: the table names, in table order.
        impl clap::ValueEnum for $ty {
            fn value_variants<'a>() -> &'a [Self] {
                &$ty::ALL
            }
            fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
                Some(clap::builder::PossibleValue::new(self.name()))
            }
        }
    )*};
}

table_name_impls!(
    Tier: "tier",
    SizeCategory: "size category",
    ChipVariant: "chip variant",
    Generation: "generation",
);

/// Checks the category table's invariants; used in `const` assertions.
const fn size_configs_valid(configs: &[SizeConfig], l: &Limits) -> bool {
    let mut i = 0;
    while i < configs.len() {
        let c = &configs[i];
        if c.category as usize != i
            || c.lora_rank < l.lora_rank_min
            || c.lora_rank > l.lora_rank_max
            || !c.lora_rank.is_multiple_of(l.lora_rank_multiple_of)
            || c.lora_num_layers < l.lora_num_layers_min
            || c.lora_num_layers > l.lora_num_layers_max
            || c.batch_size_multiplier.is_nan()
            || c.batch_size_multiplier <= 0.0
            || c.batch_size_multiplier > l.batch_size_multiplier_max
        {
            return false;
        }
        let last = i + 1 == configs.len();
        match (c.max_params, last) {
            (None, true) => {}
            (Some(_), true) | (None, false) => return false,
            (Some(max), false) => {
                if i > 0 {
                    match configs[i - 1].max_params {
                        Some(prev) if prev < max => {}
                        _ => return false,
                    }
                }
            }
        }
        if i > 0
            && (c.lora_rank <= configs[i - 1].lora_rank
                || c.lora_num_layers <= configs[i - 1].lora_num_layers)
        {
            return false;
        }
        i += 1;
    }
    !configs.is_empty()
}

/// Checks every hardware row's profile against the limits.
const fn hardware_rows_valid(rows: &[&[HardwareRow]], l: &Limits) -> bool {
    let mut v = 0;
    while v < rows.len() {
        if rows[v].is_empty() {
            return false;
        }
        let mut i = 0;
        while i < rows[v].len() {
            let r = &rows[v][i];
            if r.variant as usize != v || !profile_valid(&r.profile, l) {
                return false;
            }
            i += 1;
        }
        v += 1;
    }
    true
}

/// Checks `[gpu]`/`[cpu]` rows: ascending memory, valid profiles that never
/// shrink as memory grows.
const fn memory_rows_valid(rows: &[MemoryRow], l: &Limits) -> bool {
    let mut i = 0;
    while i < rows.len() {
        let r = &rows[i];
        if !profile_valid(&r.profile, l) {
            return false;
        }
        if i > 0 {
            let p = &rows[i - 1];
            if r.memory_gb <= p.memory_gb
                || r.profile.batch_size < p.profile.batch_size
                || r.profile.lora_rank < p.profile.lora_rank
                || r.profile.lora_num_layers < p.profile.lora_num_layers
            {
                return false;
            }
        }
        i += 1;
    }
    !rows.is_empty()
}

const fn profile_valid(p: &Profile, l: &Limits) -> bool {
    p.batch_size > 0
        && p.lora_rank >= l.lora_rank_min
        && p.lora_rank <= l.lora_rank_max
        && p.lora_rank.is_multiple_of(l.lora_rank_multiple_of)
        && p.lora_num_layers >= l.lora_num_layers_min
        && p.lora_num_layers <= l.lora_num_layers_max
}

const _: () = assert!(
    size_configs_valid(&SIZE_CONFIGS, &LIMITS),
    "tables/size.toml: categories break an invariant"
);
const _: () = assert!(
    hardware_rows_valid(&HARDWARE_ROWS, &LIMITS),
    "tables/hardware.toml: a profile row breaks an invariant"
);
const _: () = assert!(
    profile_valid(&FALLBACK_PROFILE, &LIMITS),
    "tables/hardware.toml: the fallback profile breaks an invariant"
);
const _: () = assert!(
    memory_rows_valid(&GPU_ROWS, &LIMITS) && memory_rows_valid(&CPU_ROWS, &LIMITS),
    "tables/hardware.toml: a [gpu] or [cpu] row breaks an invariant"
);
const _: () = assert!(GPU_BUDGET_FRACTION > 0.0 && GPU_BUDGET_FRACTION <= 1.0);
const _: () = assert!(CPU_BUDGET_FRACTION > 0.0 && CPU_BUDGET_FRACTION <= 1.0);
const _: () = assert!(BATCH_SIZE_CAP > 0 && DEFAULT_BATCH_SIZE > 0);
const _: () = assert!(BUDGET_FRACTION > 0.0 && BUDGET_FRACTION <= 1.0);
