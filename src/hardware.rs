//! Hardware: the optimised training profile for a machine, and detecting the
//! machine (Apple Silicon through `sysctl`).

use crate::tables::{
    BUDGET_FRACTION, ChipVariant, DEFAULT_VARIANT, FALLBACK_PROFILE, GPU_CORE_BATCH_FLOORS,
    Generation, HARDWARE_ROWS, HardwareRow, Profile, VARIANT_DETECT_ORDER,
};

/// A training profile for a specific machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HardwareProfile {
    /// Chip generation.
    pub generation: Generation,
    /// Chip variant.
    pub variant: ChipVariant,
    /// Unified memory, GB.
    pub memory_gb: u32,
    /// GPU cores of this chip.
    pub gpu_cores: u32,
    /// Memory a training run may use: `floor(memory_gb x budget_fraction)`.
    pub training_budget_gb: u32,
    /// The training settings.
    #[serde(flatten)]
    pub profile: Profile,
}

/// `floor(memory_gb x budget_fraction)`.
pub const fn training_budget_gb(memory_gb: u32) -> u32 {
    (memory_gb as f64 * BUDGET_FRACTION).floor() as u32
}

/// The table row for (variant, memory): the exact row, else the variant's row
/// with the nearest memory (the first listed on a tie), else the fallback.
/// A `const fn`; [`hardware_profile!`](crate::hardware_profile) checks at
/// compile time that the exact row exists.
pub const fn base_profile(variant: ChipVariant, memory_gb: u32) -> Profile {
    let rows = HARDWARE_ROWS[variant.index()];
    let mut best: Option<&HardwareRow> = None;
    let mut i = 0;
    while i < rows.len() {
        let row = &rows[i];
        match best {
            Some(b) if b.memory_gb.abs_diff(memory_gb) <= row.memory_gb.abs_diff(memory_gb) => {}
            _ => best = Some(row),
        }
        i += 1;
    }
    match best {
        Some(row) => row.profile,
        None => FALLBACK_PROFILE,
    }
}

/// The optimised profile for a machine: its table row, the budget, and the
/// batch floors of chips with many GPU cores.
///
/// ```
/// use qlora_scale::{optimized_profile, ChipVariant, Generation};
/// let p = optimized_profile(Generation::M2, ChipVariant::Ultra, 192);
/// assert_eq!(p.training_budget_gb, 153);
/// assert_eq!(p.profile.lora_rank, 256);
/// ```
pub const fn optimized_profile(
    generation: Generation,
    variant: ChipVariant,
    memory_gb: u32,
) -> HardwareProfile {
    let mut profile = base_profile(variant, memory_gb);
    let gpu_cores = generation.gpu_cores(variant);
    let mut i = 0;
    while i < GPU_CORE_BATCH_FLOORS.len() {
        let floor = &GPU_CORE_BATCH_FLOORS[i];
        if gpu_cores >= floor.min_gpu_cores && profile.batch_size < floor.min_batch_size {
            profile.batch_size = floor.min_batch_size;
        }
        i += 1;
    }
    HardwareProfile {
        generation,
        variant,
        memory_gb,
        gpu_cores,
        training_budget_gb: training_budget_gb(memory_gb),
        profile,
    }
}

/// What hardware detection found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DetectedHardware {
    /// Chip generation; `None` for a chip that is not Apple Silicon.
    pub generation: Option<Generation>,
    /// Chip variant; `None` for a chip that is not Apple Silicon.
    pub variant: Option<ChipVariant>,
    /// Memory in GiB, floored.
    pub memory_gb: u32,
}

impl DetectedHardware {
    /// The optimised profile, when the chip is one the tables know.
    pub fn profile(&self) -> Option<HardwareProfile> {
        Some(optimized_profile(
            self.generation?,
            self.variant?,
            self.memory_gb,
        ))
    }
}

fn contains_ignore_case(haystack: &str, needle: &str) -> bool {
    haystack
        .as_bytes()
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle.as_bytes()))
}

/// Reads the chip name (`machdep.cpu.brand_string`, "Apple M2 Ultra") and the
/// memory size in bytes (`hw.memsize`). A chip that is not Apple Silicon gives
/// no generation and no variant; unreadable memory gives `None`.
///
/// ```
/// use qlora_scale::hardware::parse_sysctl;
/// use qlora_scale::{ChipVariant, Generation};
/// let hw = parse_sysctl("Apple M2 Ultra", "103079215104").unwrap();
/// assert_eq!((hw.generation, hw.variant, hw.memory_gb),
///            (Some(Generation::M2), Some(ChipVariant::Ultra), 96));
/// ```
pub fn parse_sysctl(brand: &str, memsize: &str) -> Option<DetectedHardware> {
    let bytes: u64 = memsize.trim().parse().ok()?;
    let memory_gb = u32::try_from(bytes >> 30).unwrap_or(u32::MAX);
    let brand = brand.trim();
    let generation = Generation::ALL
        .into_iter()
        .find(|g| contains_ignore_case(brand, g.name()));
    let variant = generation.map(|_| {
        VARIANT_DETECT_ORDER
            .into_iter()
            .find(|v| contains_ignore_case(brand, v.name()))
            .unwrap_or(DEFAULT_VARIANT)
    });
    Some(DetectedHardware {
        generation,
        variant,
        memory_gb,
    })
}

/// Detects this machine's hardware. On macOS it asks `sysctl`; elsewhere, and
/// on any failure, it returns `None`.
pub fn detect_hardware() -> Option<DetectedHardware> {
    if !cfg!(target_os = "macos") {
        return None;
    }
    let read = |key: &str| -> Option<String> {
        let out = std::process::Command::new("sysctl")
            .args(["-n", key])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    parse_sysctl(&read("machdep.cpu.brand_string")?, &read("hw.memsize")?)
}
