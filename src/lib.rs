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

pub mod detect;
pub mod hardware;
pub mod qlora;
pub mod recommend;
pub mod scale;
pub mod storage;
pub mod tables;

pub use detect::{ModelName, ModelSize, SizeSource, detect_model_size};
pub use hardware::{HardwareProfile, optimized_profile};
pub use scale::{scale_profile_for_category, scale_profile_for_model};
pub use tables::{ChipVariant, Generation, Profile, SizeCategory, SizeConfig, Tier};
