//! # qlora-scale
//!
//! QLoRA fine-tuning that sizes itself to the machine and the model: detect a
//! model's size from its name, pick a hardware profile, and scale LoRA rank,
//! layers and batch size to fit.
//!
//! Every number and name comes from `tables/*.toml`, compiled at build time
//! into DFAs, `phf` maps and constants.
//!
//! ```
//! use qlora_scale::{detect_model_size, scale_profile_for_model, optimized_profile};
//! use qlora_scale::{ChipVariant, Generation, SizeCategory};
//!
//! let size = detect_model_size("mistralai/Mistral-7B-v0.1");
//! assert_eq!(size.category, SizeCategory::Small);
//!
//! let hw = optimized_profile(Generation::M2, ChipVariant::Ultra, 192);
//! let scaled = scale_profile_for_model(&hw.profile, "mistralai/Mistral-7B-v0.1");
//! assert_eq!((scaled.batch_size, scaled.lora_rank, scaled.lora_num_layers), (8, 32, 8));
//! ```

pub mod alloc_guard;
mod derive;
pub mod detect;
pub mod files;
pub mod hardware;
pub mod memory;
pub mod qlora;
pub mod recommend;
pub mod report;
pub mod safe_io;
pub mod saved_profile;
pub mod scale;
pub mod tables;
pub mod train;

// The derive's generated code names `::qlora_scale`; this makes that path
// work inside this crate too.
extern crate self as qlora_scale;

#[doc(hidden)]
pub use derive::private as __private;

pub use detect::{ModelName, ModelSize, SizeSource, detect_model_size};
pub use files::{FileSize, FilesError, detect_model_size_from_path};
pub use hardware::{
    DeviceKind, HardwareProfile, Machine, MachineProfile, MemoryProfile, detect_machine,
    memory_profile, optimized_profile,
};
pub use scale::{scale_profile_for_category, scale_profile_for_model};
pub use tables::{ChipVariant, Generation, Profile, SizeCategory, SizeConfig, Tier};

/// The trait: scale your own profile type for a model.
pub use derive::ScaledProfile;
/// `#[derive(ScaledProfile)]`: implements [`ScaledProfile`](trait@ScaledProfile)
/// for a struct whose fields hold profile keys.
pub use qlora_scale_macros::ScaledProfile;

/// A `const` profile for a row of `tables/hardware.toml`, checked when it
/// compiles: an unknown variant or generation, or a memory size without a
/// row, is a compile error that lists what exists.
///
/// - `hardware_profile!(VARIANT, MEMORY_GB)` is the row's [`Profile`]
///   (what [`hardware::base_profile`] returns for it).
/// - `hardware_profile!(GENERATION, VARIANT, MEMORY_GB)` is the
///   [`HardwareProfile`] of that machine (what [`optimized_profile`]
///   returns: the row, the memory budget and the GPU-core batch floors).
///
/// ```
/// use qlora_scale::{hardware_profile, scale_profile_for_category};
/// use qlora_scale::{HardwareProfile, Profile, SizeCategory};
///
/// const ULTRA_96: Profile = hardware_profile!(ultra, 96);
/// const M2_ULTRA_96: HardwareProfile = hardware_profile!(m2, ultra, 96);
/// const FOR_7B: Profile = scale_profile_for_category(ULTRA_96, SizeCategory::Small);
/// const _: () = assert!(FOR_7B.lora_rank == 32 && FOR_7B.lora_num_layers == 8);
/// const _: () = assert!(M2_ULTRA_96.training_budget_gb == 76);
/// assert_eq!(M2_ULTRA_96.profile.lora_rank, ULTRA_96.lora_rank);
/// ```
///
/// A size the tables have no row for does not compile:
///
/// ```compile_fail
/// const P: qlora_scale::Profile = qlora_scale::hardware_profile!(ultra, 100);
/// ```
pub use qlora_scale_macros::hardware_profile;

/// README.md's examples, compiled and run as doctests so the README stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
mod readme_doctests {}
