//! Which hardware profile a run uses (docs/reference.md, section 7): a saved
//! profile, else the detected hardware, else nothing; `--generation`,
//! `--chip` and `--memory` override it. Shared by `profile scale` and
//! `train`.
//!
//! ```
//! use qlora_scale::hardware::resolve::{HardwareOverride, HardwareSource, resolve_hardware};
//! use qlora_scale::{ChipVariant, Generation};
//! let flags = HardwareOverride {
//!     generation: Some(Generation::M2),
//!     chip: Some(ChipVariant::Ultra),
//!     memory: Some(192),
//! };
//! let path = std::path::Path::new("/nonexistent/profile.json");
//! let (hw, source) = resolve_hardware(&flags, path, || None).unwrap().unwrap();
//! assert_eq!((hw.memory_gb, source), (192, HardwareSource::Flags));
//! ```

use std::path::{Path, PathBuf};

use crate::hardware::{
    DetectedHardware, DeviceKind, HardwareProfile, MachineProfile, memory_profile,
    optimized_profile,
};
use crate::saved_profile::{StoreError, load_profile};
use crate::tables::{ChipVariant, Generation};

/// The hardware flags, each optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardwareOverride {
    /// `--generation`.
    pub generation: Option<Generation>,
    /// `--chip`.
    pub chip: Option<ChipVariant>,
    /// `--memory` (GB).
    pub memory: Option<u32>,
}

impl HardwareOverride {
    /// The flags that were not given, as `--name`s.
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.generation.is_none() {
            missing.push("--generation");
        }
        if self.chip.is_none() {
            missing.push("--chip");
        }
        if self.memory.is_none() {
            missing.push("--memory");
        }
        missing
    }

    /// Whether any flag was given.
    pub fn any(&self) -> bool {
        self.generation.is_some() || self.chip.is_some() || self.memory.is_some()
    }
}

/// Where the resolved hardware came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HardwareSource {
    /// All three flags.
    Flags,
    /// The saved profile, as saved.
    SavedProfile,
    /// The saved profile's hardware with some flags overriding it.
    SavedProfileWithFlags,
    /// The detected hardware.
    Detected,
    /// The detected hardware with some flags overriding it.
    DetectedWithFlags,
}

impl HardwareSource {
    /// The detailed name (`saved_profile+flags`), as `profile scale` prints it.
    pub fn key(self) -> &'static str {
        match self {
            HardwareSource::Flags => "flags",
            HardwareSource::SavedProfile => "saved_profile",
            HardwareSource::SavedProfileWithFlags => "saved_profile+flags",
            HardwareSource::Detected => "detected",
            HardwareSource::DetectedWithFlags => "detected+flags",
        }
    }

    /// The base the profile stands on: `saved`, `detected` or `flags`.
    pub fn base(self) -> &'static str {
        match self {
            HardwareSource::Flags => "flags",
            HardwareSource::SavedProfile | HardwareSource::SavedProfileWithFlags => "saved",
            HardwareSource::Detected | HardwareSource::DetectedWithFlags => "detected",
        }
    }
}

/// Errors of resolving the hardware.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// Some hardware flags were given but there is no base to take the
    /// others from.
    #[error(
        "missing {}: no saved profile at {} and no detected hardware to take them from \
         (give all of --generation, --chip and --memory)",
        .missing.join(", "),
        .saved_path.display()
    )]
    MissingFlags {
        /// The flags not given.
        missing: Vec<&'static str>,
        /// Where the saved profile was looked for.
        saved_path: PathBuf,
    },
    /// Apple Silicon flags were given, there is no saved profile, and the
    /// detected machine is not Apple Silicon.
    #[error(
        "missing {}: no saved profile at {} and the detected machine is not Apple \
         Silicon (it takes the [{device}] row) to take them from (give all of --generation, \
         --chip and --memory, or --gpu-memory/--cpu-memory)",
        .missing.join(", "),
        .saved_path.display()
    )]
    NotApple {
        /// The flags not given.
        missing: Vec<&'static str>,
        /// Where the saved profile was looked for.
        saved_path: PathBuf,
        /// What the detected machine trains on.
        device: DeviceKind,
    },
    /// The saved profile could not be read or is invalid (left untouched).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `--gpu-memory` / `--cpu-memory`: a machine other than Apple Silicon.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceOverride {
    /// `--gpu-memory GB`.
    pub gpu_memory: Option<u32>,
    /// `--cpu-memory GB`.
    pub cpu_memory: Option<u32>,
}

/// Resolves the machine profile: `devices` (a GPU's or a CPU's memory) or
/// all three Apple flags build it outright (the saved profile is not read);
/// otherwise the base is the saved profile at `saved_path`, else
/// `detect()`'s machine, and any Apple flags given override an Apple base's
/// hardware, rebuilding the profile. `Ok(None)`: no base and no flags (the
/// caller falls back to defaults or says so).
///
/// A saved profile is used as saved when no flag is given, so edits to it
/// are kept.
pub fn resolve_machine(
    flags: &HardwareOverride,
    devices: DeviceOverride,
    saved_path: &Path,
    detect: impl FnOnce() -> Option<MachineProfile>,
) -> Result<Option<(MachineProfile, HardwareSource)>, ResolveError> {
    if let Some(gb) = devices.gpu_memory {
        return Ok(Some((
            memory_profile(DeviceKind::Gpu, gb).into(),
            HardwareSource::Flags,
        )));
    }
    if let Some(gb) = devices.cpu_memory {
        return Ok(Some((
            memory_profile(DeviceKind::Cpu, gb).into(),
            HardwareSource::Flags,
        )));
    }
    if let (Some(g), Some(v), Some(m)) = (flags.generation, flags.chip, flags.memory) {
        return Ok(Some((
            optimized_profile(g, v, m).into(),
            HardwareSource::Flags,
        )));
    }
    let (base, source) = if let Some(saved) = load_profile(saved_path)? {
        if !flags.any() {
            return Ok(Some((saved.into(), HardwareSource::SavedProfile)));
        }
        (saved, HardwareSource::SavedProfileWithFlags)
    } else if let Some(detected) = detect() {
        match (detected, flags.any()) {
            (_, false) => return Ok(Some((detected, HardwareSource::Detected))),
            (MachineProfile::Apple(apple), true) => (apple, HardwareSource::DetectedWithFlags),
            (MachineProfile::Memory(p), true) => {
                return Err(ResolveError::NotApple {
                    missing: flags.missing(),
                    saved_path: saved_path.to_path_buf(),
                    device: p.device,
                });
            }
        }
    } else if flags.any() {
        return Err(ResolveError::MissingFlags {
            missing: flags.missing(),
            saved_path: saved_path.to_path_buf(),
        });
    } else {
        return Ok(None);
    };
    let profile = optimized_profile(
        flags.generation.unwrap_or(base.generation),
        flags.chip.unwrap_or(base.variant),
        flags.memory.unwrap_or(base.memory_gb),
    );
    Ok(Some((profile.into(), source)))
}

/// Resolves the hardware profile: all three flags build it outright (the
/// saved profile is not read); otherwise the base is the saved profile at
/// `saved_path`, else `detect()`'s hardware, and any flags given override
/// the base's hardware, rebuilding the profile. `Ok(None)`: no base and no
/// flags (the caller falls back to defaults or says so).
///
/// A saved profile is used as saved when no flag is given, so edits to it
/// are kept.
pub fn resolve_hardware(
    flags: &HardwareOverride,
    saved_path: &Path,
    detect: impl FnOnce() -> Option<DetectedHardware>,
) -> Result<Option<(HardwareProfile, HardwareSource)>, ResolveError> {
    // Apple Silicon only: no device flags, and only an Apple machine is
    // passed on as detected, so every profile resolved is an Apple one.
    let detect_apple = || {
        detect()
            .and_then(|d| d.profile())
            .map(MachineProfile::Apple)
    };
    let resolved = resolve_machine(flags, DeviceOverride::default(), saved_path, detect_apple)?;
    Ok(resolved.and_then(|(machine, source)| match machine {
        MachineProfile::Apple(p) => Some((p, source)),
        MachineProfile::Memory(_) => None,
    }))
}
