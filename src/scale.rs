//! Scaling a hardware profile down to the model being trained.
//!
//! A profile made for big hardware wastes memory on a small model (and can be
//! slower than needed); scaling lowers rank and layers to the model's size
//! category and raises the batch size to use the memory that frees.
//! The rule (docs/reference.md, section 3): only when the profile's tier is
//! above the tier of the model's category, rank and layers become the
//! category's and the batch size becomes `floor(batch x multiplier)`, capped.
//!
//! One deliberate difference from the original project's rule: rank and
//! layers become the smaller of the profile's and the category's, so scaling
//! down never raises them (the original rule would raise a large-tier profile
//! with rank 16 to the category's 32). Every case its tests name gives the
//! original answer.

use serde_json::{Map, Value};

use crate::detect::{ModelName, detect_model_size};
use crate::tables::{BATCH_SIZE_CAP, DEFAULT_BATCH_SIZE, Profile, SizeCategory, Tier};

/// Profile keys as they appear in saved profiles and dynamic maps, generated
/// from `tables/profile.toml`.
pub use crate::tables::profile_keys as keys;

/// `floor(batch x multiplier)`, at least 1 and at most the cap.
pub const fn scaled_batch_size(batch: u32, multiplier: f64) -> u32 {
    // `as` truncates toward zero, which is floor for these non-negative values,
    // and saturates instead of overflowing.
    let b = (batch as f64 * multiplier) as u32;
    if b > BATCH_SIZE_CAP {
        BATCH_SIZE_CAP
    } else if b == 0 {
        1
    } else {
        b
    }
}

const fn min_u32(a: u32, b: u32) -> u32 {
    if a < b { a } else { b }
}

/// Scales `profile` for a model of size `category`. A `const fn`, so profiles
/// can be scaled and checked at compile time.
///
/// ```
/// use qlora_scale::{scale_profile_for_category, Profile, SizeCategory, Tier};
/// const BIG: Profile = Profile {
///     batch_size: 4, lora_rank: 128, lora_num_layers: 24,
///     grad_checkpoint: true, model_tier: Tier::Large,
/// };
/// const FOR_7B: Profile = scale_profile_for_category(BIG, SizeCategory::Small);
/// const _: () = assert!(FOR_7B.lora_rank == 32 && FOR_7B.batch_size == 8);
/// ```
pub const fn scale_profile_for_category(profile: Profile, category: SizeCategory) -> Profile {
    let config = category.config();
    if profile.model_tier as usize <= config.tier as usize {
        return profile;
    }
    Profile {
        batch_size: scaled_batch_size(profile.batch_size, config.batch_size_multiplier),
        lora_rank: min_u32(profile.lora_rank, config.lora_rank),
        lora_num_layers: min_u32(profile.lora_num_layers, config.lora_num_layers),
        grad_checkpoint: profile.grad_checkpoint,
        model_tier: profile.model_tier,
    }
}

/// Scales `profile` for the model `name` (id, name or path). Returns a new
/// profile; allocates nothing.
///
/// ```
/// use qlora_scale::{scale_profile_for_model, Profile, Tier};
/// let large = Profile {
///     batch_size: 4, lora_rank: 128, lora_num_layers: 24,
///     grad_checkpoint: false, model_tier: Tier::Large,
/// };
/// let s = scale_profile_for_model(&large, "huihui-ai/DeepSeek-R1-Distill-Qwen-14B");
/// assert_eq!((s.lora_rank, s.lora_num_layers, s.batch_size), (48, 12, 6));
/// ```
pub fn scale_profile_for_model<N: ModelName + ?Sized>(profile: &Profile, name: &N) -> Profile {
    scale_profile_for_category(*profile, detect_model_size(name).category)
}

/// A value in a dynamic profile that cannot be used.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum ProfileError {
    /// A count that is not a non-negative integer.
    #[error("profile key \"{key}\" must be a non-negative integer, got {value}")]
    NotACount {
        /// The key.
        key: &'static str,
        /// The value found, as JSON.
        value: String,
    },
}

/// The tier of a dynamic profile: its `model_tier`, or the default tier when
/// missing or unknown.
pub fn profile_tier(profile: &Map<String, Value>) -> Tier {
    profile
        .get(keys::MODEL_TIER)
        .and_then(Value::as_str)
        .and_then(Tier::from_name)
        .unwrap_or(Tier::DEFAULT)
}

/// Scales a dynamic profile (any JSON object) for `category`, keeping every
/// key it does not change. The input is not modified.
pub fn scale_profile_map_for_category(
    profile: &Map<String, Value>,
    category: SizeCategory,
) -> Result<Map<String, Value>, ProfileError> {
    let config = category.config();
    let mut out = profile.clone();
    if profile_tier(profile) <= config.tier {
        return Ok(out);
    }
    let batch = match profile.get(keys::BATCH_SIZE) {
        None | Some(Value::Null) => DEFAULT_BATCH_SIZE,
        Some(v) => v
            .as_u64()
            .map(|b| u32::try_from(b).unwrap_or(u32::MAX))
            .ok_or_else(|| ProfileError::NotACount {
                key: keys::BATCH_SIZE,
                value: v.to_string(),
            })?,
    };
    out.insert(
        keys::BATCH_SIZE.into(),
        scaled_batch_size(batch, config.batch_size_multiplier).into(),
    );
    for (key, target) in [
        (keys::LORA_RANK, config.lora_rank),
        (keys::LORA_NUM_LAYERS, config.lora_num_layers),
    ] {
        // Keep a smaller value the profile already has; anything else that is
        // not a count becomes the category's value.
        let current = profile.get(key).and_then(Value::as_u64);
        let value = current.map_or(u64::from(target), |c| c.min(u64::from(target)));
        out.insert(key.into(), value.into());
    }
    Ok(out)
}

/// [`scale_profile_map_for_category`] for the model `name`.
///
/// ```
/// use serde_json::json;
/// let profile = json!({"model_tier": "large", "batch_size": 4, "lora_rank": 128,
///                      "lora_num_layers": 24, "custom": "kept"});
/// let scaled = qlora_scale::scale::scale_profile_map(
///     profile.as_object().unwrap(), "mistralai/Mistral-7B-v0.1").unwrap();
/// assert_eq!(scaled["lora_rank"], 32);
/// assert_eq!(scaled["custom"], "kept");
/// ```
pub fn scale_profile_map<N: ModelName + ?Sized>(
    profile: &Map<String, Value>,
    name: &N,
) -> Result<Map<String, Value>, ProfileError> {
    scale_profile_map_for_category(profile, detect_model_size(name).category)
}
