//! Hardware: the optimised training profile for a machine, and detecting the
//! machine: Apple Silicon through `sysctl`, NVIDIA GPUs through `nvidia-smi`
//! ([`nvidia`]), and a Linux CPU and its memory through `/proc` and cgroups
//! ([`linux`]).
//!
//! Apple Silicon has its own rows per (variant, memory); every other machine
//! takes the `[gpu]` or `[cpu]` row of `tables/hardware.toml` with the nearest
//! memory ([`memory_profile`]).

pub mod linux;
pub mod nvidia;
pub mod resolve;

use crate::tables::{
    BUDGET_FRACTION, CPU_BUDGET_FRACTION, CPU_ROWS, ChipVariant, DEFAULT_VARIANT, FALLBACK_PROFILE,
    GPU_BUDGET_FRACTION, GPU_CORE_BATCH_FLOORS, GPU_ROWS, Generation, HARDWARE_ROWS, HardwareRow,
    MemoryRow, Profile, VARIANT_DETECT_ORDER,
};
use linux::LinuxCpu;
use nvidia::NvidiaGpu;

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
    match apple_row(variant, memory_gb) {
        Some(row) => row.profile,
        None => FALLBACK_PROFILE,
    }
}

/// The Apple row [`base_profile`] takes for (variant, memory): the exact
/// row, else the variant's row with the nearest memory (the first listed on
/// a tie); `None` when the variant has no row.
pub const fn apple_row(variant: ChipVariant, memory_gb: u32) -> Option<&'static HardwareRow> {
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
    best
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

/// What a non-Apple profile is sized by: the memory of one GPU, or the memory
/// a CPU run may use (the `[gpu]` and `[cpu]` tables).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    /// An NVIDIA GPU (`[gpu]`).
    Gpu,
    /// The CPU (`[cpu]`).
    Cpu,
}

impl DeviceKind {
    /// The table section and JSON name: `gpu`, `cpu`.
    pub const fn name(self) -> &'static str {
        match self {
            DeviceKind::Gpu => "gpu",
            DeviceKind::Cpu => "cpu",
        }
    }

    /// This kind's rows, smallest memory first.
    pub const fn rows(self) -> &'static [MemoryRow] {
        match self {
            DeviceKind::Gpu => &GPU_ROWS,
            DeviceKind::Cpu => &CPU_ROWS,
        }
    }

    /// Share of the memory a run may use.
    pub const fn budget_fraction(self) -> f64 {
        match self {
            DeviceKind::Gpu => GPU_BUDGET_FRACTION,
            DeviceKind::Cpu => CPU_BUDGET_FRACTION,
        }
    }
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The row of `kind` for `memory_gb`: the exact row, else the one with the
/// nearest memory, the first listed (the smaller) on a tie.
///
/// ```
/// use qlora_scale::hardware::{memory_row, DeviceKind};
/// assert_eq!(memory_row(DeviceKind::Gpu, 79).memory_gb, 80);
/// assert_eq!(memory_row(DeviceKind::Gpu, 20).memory_gb, 16); // tie of 16 and 24
/// ```
pub const fn memory_row(kind: DeviceKind, memory_gb: u32) -> &'static MemoryRow {
    let rows = kind.rows();
    let mut best = &rows[0];
    let mut i = 1;
    while i < rows.len() {
        if rows[i].memory_gb.abs_diff(memory_gb) < best.memory_gb.abs_diff(memory_gb) {
            best = &rows[i];
        }
        i += 1;
    }
    best
}

/// A training profile for a machine other than Apple Silicon: a `[gpu]` or
/// `[cpu]` row, sized by memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryProfile {
    /// What trains: a GPU or the CPU.
    pub device: DeviceKind,
    /// Memory of the device (one GPU), or that a CPU run may use, GB.
    pub memory_gb: u32,
    /// The memory of the table row chosen.
    pub row_memory_gb: u32,
    /// Memory a training run may use: `floor(memory_gb x budget_fraction)`
    /// of the kind.
    pub training_budget_gb: u32,
    /// The training settings.
    #[serde(flatten)]
    pub profile: Profile,
}

/// The profile for `memory_gb` of `kind`: the nearest row and the kind's
/// budget.
///
/// ```
/// use qlora_scale::hardware::{memory_profile, DeviceKind};
/// let p = memory_profile(DeviceKind::Gpu, 79); // an H100 "80GB"
/// assert_eq!((p.row_memory_gb, p.training_budget_gb), (80, 71));
/// ```
pub const fn memory_profile(kind: DeviceKind, memory_gb: u32) -> MemoryProfile {
    let row = memory_row(kind, memory_gb);
    MemoryProfile {
        device: kind,
        memory_gb,
        row_memory_gb: row.memory_gb,
        training_budget_gb: (memory_gb as f64 * kind.budget_fraction()).floor() as u32,
        profile: row.profile,
    }
}

/// A training profile for any machine. Serialised untagged: an Apple
/// profile reads and writes exactly as a [`HardwareProfile`] always has, so
/// files saved before other machines were known still load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum MachineProfile {
    /// Apple Silicon.
    Apple(HardwareProfile),
    /// An NVIDIA GPU or a CPU.
    Memory(MemoryProfile),
}

impl MachineProfile {
    /// The training settings.
    pub const fn profile(&self) -> Profile {
        match self {
            MachineProfile::Apple(p) => p.profile,
            MachineProfile::Memory(p) => p.profile,
        }
    }

    /// The same machine with other training settings.
    pub const fn with_profile(self, profile: Profile) -> MachineProfile {
        match self {
            MachineProfile::Apple(mut p) => {
                p.profile = profile;
                MachineProfile::Apple(p)
            }
            MachineProfile::Memory(mut p) => {
                p.profile = profile;
                MachineProfile::Memory(p)
            }
        }
    }

    /// The machine's memory, GB.
    pub const fn memory_gb(&self) -> u32 {
        match self {
            MachineProfile::Apple(p) => p.memory_gb,
            MachineProfile::Memory(p) => p.memory_gb,
        }
    }

    /// Memory a training run may use, GB.
    pub const fn training_budget_gb(&self) -> u32 {
        match self {
            MachineProfile::Apple(p) => p.training_budget_gb,
            MachineProfile::Memory(p) => p.training_budget_gb,
        }
    }
}

impl From<HardwareProfile> for MachineProfile {
    fn from(p: HardwareProfile) -> Self {
        MachineProfile::Apple(p)
    }
}

impl From<MemoryProfile> for MachineProfile {
    fn from(p: MemoryProfile) -> Self {
        MachineProfile::Memory(p)
    }
}

/// What hardware detection found on a Mac (`sysctl`).
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

/// Detects a Mac's hardware through `sysctl`. Elsewhere, and on any failure,
/// it returns `None`; [`detect_machine`] detects every kind.
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

/// Everything detection found on this machine. Each part is read on its own;
/// a part that cannot be read is absent, never an error.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Machine {
    /// A Mac's chip and memory (`sysctl`); flattened into the JSON, where it
    /// reads as it did before other machines were known.
    #[serde(flatten)]
    pub apple: Option<DetectedHardware>,
    /// NVIDIA GPUs (`nvidia-smi`), in its order.
    pub gpus: Vec<NvidiaGpu>,
    /// Why no GPU was found, when none was (`nvidia-smi not found`).
    pub gpu_note: Option<String>,
    /// A Linux machine's CPU and the memory a run may use.
    pub linux_cpu: Option<LinuxCpu>,
}

/// Which table a machine's profile comes from, and why.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Choice {
    /// An Apple Silicon chip: its (variant, memory) row.
    Apple,
    /// An NVIDIA GPU, the one at this index in [`Machine::gpus`] (the one
    /// with the most memory; the first of those on a tie).
    Gpu(usize),
    /// A Linux CPU: the memory a run may use.
    LinuxCpu,
    /// A Mac without Apple Silicon: its memory, as a CPU.
    MacCpu,
}

impl Machine {
    /// What the profile is chosen by: Apple Silicon, else the largest NVIDIA
    /// GPU (a QLoRA run sits on one device), else the CPU and its memory;
    /// `None` when no memory size is known.
    pub fn choice(&self) -> Option<Choice> {
        if self
            .apple
            .is_some_and(|a| a.generation.is_some() && a.variant.is_some())
        {
            return Some(Choice::Apple);
        }
        let largest = self
            .gpus
            .iter()
            .enumerate()
            .filter(|(_, g)| g.memory_gb > 0)
            .rev()
            .max_by_key(|(_, g)| g.memory_total_mib)
            .map(|(i, _)| i);
        if let Some(i) = largest {
            return Some(Choice::Gpu(i));
        }
        if self.linux_cpu.as_ref().is_some_and(|c| c.memory_gb > 0) {
            return Some(Choice::LinuxCpu);
        }
        if self.apple.is_some_and(|a| a.memory_gb > 0) {
            return Some(Choice::MacCpu);
        }
        None
    }

    /// The profile for this machine, by [`Machine::choice`].
    pub fn profile(&self) -> Option<MachineProfile> {
        Some(match self.choice()? {
            Choice::Apple => MachineProfile::Apple(self.apple?.profile()?),
            Choice::Gpu(i) => memory_profile(DeviceKind::Gpu, self.gpus[i].memory_gb).into(),
            Choice::LinuxCpu => {
                memory_profile(DeviceKind::Cpu, self.linux_cpu.as_ref()?.memory_gb).into()
            }
            Choice::MacCpu => memory_profile(DeviceKind::Cpu, self.apple?.memory_gb).into(),
        })
    }
}

/// Detects this machine: `sysctl` on macOS; `nvidia-smi` (when installed)
/// and `/proc` with the cgroup files on Linux. Nothing is fetched over a
/// network; each part that fails is left out.
pub fn detect_machine() -> Machine {
    let apple = detect_hardware();
    let (gpus, gpu_note) = if cfg!(target_os = "macos") {
        (Vec::new(), Some("no NVIDIA GPU on macOS".to_string()))
    } else {
        match nvidia::query_nvidia_smi() {
            Ok(gpus) => (gpus, None),
            Err(e) => (Vec::new(), Some(crate::report::chain_message(&e))),
        }
    };
    let linux_cpu = if cfg!(target_os = "linux") {
        linux::read_linux_cpu(std::path::Path::new("/"))
    } else {
        None
    };
    Machine {
        apple,
        gpus,
        gpu_note,
        linux_cpu,
    }
}
