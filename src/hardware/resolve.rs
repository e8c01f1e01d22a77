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

/// Whether a saved profile may size a run for a machine it does not
/// describe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SavedProfileUse {
    /// Whatever the machine (`train --use-saved-profile`, and `profile`).
    Always,
    /// Only when it describes the detected machine, or nothing is detected
    /// (`train` by default): see [`saved_profile_mismatch`].
    IfItMatches,
}

/// The machine a run is sized for, and why.
#[derive(Clone, Debug, PartialEq)]
pub struct Resolution {
    /// The profile and where it came from; `None`: no base and no flags.
    pub machine: Option<(MachineProfile, HardwareSource)>,
    /// Why the saved profile was skipped for the detected machine, when it
    /// was.
    pub saved_skipped: Option<String>,
    /// Which machine the run is sized for and why, in words.
    pub reason: String,
}

/// Why `saved` does not describe the `detected` machine, if it does not: the
/// detected machine is not Apple Silicon (another device and OS), or has
/// far less memory than the profile says (more than
/// `[trainer] saved_profile_memory_ratio` times less).
pub fn saved_profile_mismatch(
    saved: &HardwareProfile,
    detected: &MachineProfile,
) -> Option<String> {
    let what = describe_machine(&MachineProfile::Apple(*saved));
    match detected {
        MachineProfile::Memory(_) => Some(format!(
            "it is for {what}, and this machine is not Apple Silicon"
        )),
        MachineProfile::Apple(here) => {
            let ratio = crate::tables::trainer::SAVED_PROFILE_MEMORY_RATIO;
            (f64::from(saved.memory_gb) > f64::from(here.memory_gb) * ratio).then(|| {
                format!(
                    "it is for {what}, far more memory than this machine's {} GB",
                    here.memory_gb
                )
            })
        }
    }
}

/// A machine in words: `Apple Silicon m2 ultra with 192 GB`, `a cpu with
/// 23 GB (the 24 GB row)`.
pub fn describe_machine(machine: &MachineProfile) -> String {
    match machine {
        MachineProfile::Apple(p) => format!(
            "Apple Silicon {} {} with {} GB",
            p.generation, p.variant, p.memory_gb
        ),
        MachineProfile::Memory(p) => format!(
            "a {} with {} GB (the {} GB row)",
            p.device, p.memory_gb, p.row_memory_gb
        ),
    }
}

/// [`resolve_machine`] for a run that must not be sized for another
/// machine by mistake: with `use_saved` [`SavedProfileUse::IfItMatches`]
/// and no hardware flag, a saved profile that does not describe the
/// detected machine ([`saved_profile_mismatch`]) is skipped and the
/// detected machine wins; the resolution says which machine and why.
pub fn resolve_machine_checked(
    flags: &HardwareOverride,
    devices: DeviceOverride,
    saved_path: &Path,
    use_saved: SavedProfileUse,
    detect: impl FnOnce() -> Option<MachineProfile>,
) -> Result<Resolution, ResolveError> {
    let by_flags = devices.gpu_memory.is_some() || devices.cpu_memory.is_some() || flags.any();
    if use_saved == SavedProfileUse::IfItMatches
        && !by_flags
        && let Some(saved) = load_profile(saved_path)?
    {
        let path = saved_path.display();
        let saved_machine = MachineProfile::Apple(saved);
        let Some(here) = detect() else {
            return Ok(Resolution {
                reason: format!(
                    "the saved profile {path}: {} (no machine detected to compare it with)",
                    describe_machine(&saved_machine)
                ),
                machine: Some((saved_machine, HardwareSource::SavedProfile)),
                saved_skipped: None,
            });
        };
        let Some(why) = saved_profile_mismatch(&saved, &here) else {
            return Ok(Resolution {
                reason: format!(
                    "the saved profile {path}: {}, which fits this machine ({})",
                    describe_machine(&saved_machine),
                    describe_machine(&here)
                ),
                machine: Some((saved_machine, HardwareSource::SavedProfile)),
                saved_skipped: None,
            });
        };
        let skipped = format!("the saved profile {path} was skipped: {why}");
        return Ok(Resolution {
            reason: format!(
                "this machine, detected: {}; {skipped} (--use-saved-profile sizes for it)",
                describe_machine(&here)
            ),
            machine: Some((here, HardwareSource::Detected)),
            saved_skipped: Some(skipped),
        });
    }
    let machine = resolve_machine(flags, devices, saved_path, detect)?;
    let reason = reason_of(machine.as_ref(), saved_path, use_saved);
    Ok(Resolution {
        machine,
        saved_skipped: None,
        reason,
    })
}

/// Why [`resolve_machine`] chose `machine`, in words.
fn reason_of(
    machine: Option<&(MachineProfile, HardwareSource)>,
    saved_path: &Path,
    use_saved: SavedProfileUse,
) -> String {
    let path = saved_path.display();
    let Some((m, source)) = machine else {
        return format!(
            "no saved profile at {path}, no machine detected and no hardware flag: the defaults of tables/defaults.toml"
        );
    };
    let what = describe_machine(m);
    match source {
        HardwareSource::Flags => format!("the hardware flags: {what}"),
        HardwareSource::SavedProfile if use_saved == SavedProfileUse::Always => {
            format!(
                "the saved profile {path}: {what} (--use-saved-profile: whatever this machine is)"
            )
        }
        HardwareSource::SavedProfile => format!("the saved profile {path}: {what}"),
        HardwareSource::SavedProfileWithFlags => {
            format!("the saved profile {path} with the hardware flags over it: {what}")
        }
        HardwareSource::Detected => {
            format!("this machine, detected: {what} (no saved profile at {path})")
        }
        HardwareSource::DetectedWithFlags => {
            format!("this machine, detected, with the hardware flags over it: {what}")
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hardware::{DeviceKind, memory_profile, optimized_profile};

    fn apple(memory: u32) -> HardwareProfile {
        optimized_profile(Generation::M2, ChipVariant::Ultra, memory)
    }

    #[test]
    fn a_saved_profile_for_another_device_or_far_more_memory_does_not_match() {
        let saved = apple(192);
        let cpu = MachineProfile::Memory(memory_profile(DeviceKind::Cpu, 23));
        let why = saved_profile_mismatch(&saved, &cpu).unwrap();
        assert!(
            why.contains("m2 ultra with 192 GB") && why.contains("not Apple Silicon"),
            "{why}"
        );
        let small_mac = MachineProfile::Apple(apple(64));
        let why = saved_profile_mismatch(&saved, &small_mac).unwrap();
        assert!(why.contains("this machine's 64 GB"), "{why}");
        // The same Mac, or one within the ratio, matches.
        assert_eq!(
            saved_profile_mismatch(&saved, &MachineProfile::Apple(apple(192))),
            None
        );
        assert_eq!(
            saved_profile_mismatch(&apple(128), &MachineProfile::Apple(apple(120))),
            None
        );
    }

    #[test]
    fn the_detected_machine_wins_over_a_saved_profile_for_another_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profile.json");
        crate::saved_profile::save_profile(&path, &apple(192)).unwrap();
        let cpu = || Some(MachineProfile::Memory(memory_profile(DeviceKind::Cpu, 23)));
        let none = (HardwareOverride::default(), DeviceOverride::default());
        let r = resolve_machine_checked(&none.0, none.1, &path, SavedProfileUse::IfItMatches, cpu)
            .unwrap();
        assert_eq!(
            r.machine.as_ref().map(|m| m.1),
            Some(HardwareSource::Detected)
        );
        assert!(
            r.saved_skipped
                .unwrap()
                .contains(&path.display().to_string())
        );
        assert!(
            r.reason
                .starts_with("this machine, detected: a cpu with 23 GB"),
            "{}",
            r.reason
        );
        let r =
            resolve_machine_checked(&none.0, none.1, &path, SavedProfileUse::Always, cpu).unwrap();
        assert_eq!(r.machine.map(|m| m.1), Some(HardwareSource::SavedProfile));
        assert_eq!(r.saved_skipped, None);
        // Nothing detected: the saved profile is all there is.
        let r =
            resolve_machine_checked(&none.0, none.1, &path, SavedProfileUse::IfItMatches, || {
                None
            })
            .unwrap();
        assert_eq!(r.machine.map(|m| m.1), Some(HardwareSource::SavedProfile));
        assert!(r.reason.contains("no machine detected"), "{}", r.reason);
    }
}
