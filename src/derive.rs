//! Scaling on your own types: the [`ScaledProfile`] trait and its derive.

use crate::detect::{ModelName, detect_model_size};
use crate::scale::scale_profile_for_category;
use crate::tables::{Profile, SizeCategory};

/// A type that holds a training profile and can be scaled for a model, like
/// [`Profile`] with [`scale_profile_for_model`](crate::scale_profile_for_model).
///
/// Derive it: `use qlora_scale::ScaledProfile;` brings both the trait and the
/// derive. Each field named like a profile key (`tables/profile.toml`:
/// `batch_size`, `lora_rank`, `lora_num_layers`, `grad_checkpoint`,
/// `model_tier`) holds that key; other fields are carried through unchanged
/// (cloned). Field attributes:
///
/// - `#[profile(key = "lora_num_layers")]`: the field holds this key.
/// - `#[profile(tier)]`: the field holds the tier key.
/// - `#[profile(skip)]`: carried unchanged even if named like a key.
///
/// Counts may be `u8`, `u16`, `u32`, `u64` or `usize` (converted with
/// saturation), flags `bool`, the tier [`Tier`](crate::Tier). Generic
/// structs and tuple structs work; the required keys must each have a field.
/// Scaling allocates nothing (beyond what cloning your other fields does).
///
/// ```
/// use qlora_scale::{ScaledProfile, SizeCategory, Tier};
///
/// #[derive(Clone, Debug, PartialEq, ScaledProfile)]
/// struct MyRun {
///     batch_size: u32,
///     lora_rank: u32,
///     #[profile(key = "lora_num_layers")]
///     layers: u16,
///     grad_checkpoint: bool,
///     #[profile(tier)]
///     tier: Tier,
///     learning_rate: f64, // not a profile key: carried through unchanged
/// }
///
/// let run = MyRun {
///     batch_size: 4, lora_rank: 128, layers: 24, grad_checkpoint: false,
///     tier: Tier::Large, learning_rate: 1e-5,
/// };
/// let scaled = run.scaled_for("meta-llama/Llama-2-7b-hf");
/// assert_eq!((scaled.batch_size, scaled.lora_rank, scaled.layers), (8, 32, 8));
/// assert_eq!(scaled.learning_rate, 1e-5);
/// assert_eq!(run.scaled_for_category(SizeCategory::Xlarge), run);
/// ```
pub trait ScaledProfile: Sized {
    /// The profile keys of `self` as a [`Profile`]. A key the type has no
    /// field for reads as `0`, `false` or [`Tier::DEFAULT`](crate::Tier::DEFAULT).
    fn to_profile(&self) -> Profile;

    /// A copy of `self` with the keys of `profile` written into their
    /// fields (counts saturate to the field's type); other fields are cloned.
    fn with_profile(&self, profile: &Profile) -> Self;

    /// `self` scaled for a model of size `category`.
    #[inline]
    fn scaled_for_category(&self, category: SizeCategory) -> Self {
        self.with_profile(&scale_profile_for_category(self.to_profile(), category))
    }

    /// `self` scaled for the model `name` (id, name or path), equal to
    /// [`scale_profile_for_model`](crate::scale_profile_for_model) on the
    /// same profile.
    #[inline]
    fn scaled_for<N: ModelName + ?Sized>(&self, name: &N) -> Self {
        self.scaled_for_category(detect_model_size(name).category)
    }
}

impl ScaledProfile for Profile {
    #[inline]
    fn to_profile(&self) -> Profile {
        *self
    }

    #[inline]
    fn with_profile(&self, profile: &Profile) -> Self {
        *profile
    }
}

/// What the derive's generated code calls. Not public API: no stability
/// promise.
#[doc(hidden)]
pub mod private {
    use crate::tables::Tier;

    /// The value of a count key the type has no field for.
    pub const ABSENT_COUNT: u32 = 0;
    /// The value of a flag key the type has no field for.
    pub const ABSENT_FLAG: bool = false;
    /// The value of the tier key when the type has no field for it.
    pub const ABSENT_TIER: Tier = Tier::DEFAULT;

    /// A field type that can hold a count key.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot hold a profile count",
        label = "a count key needs an unsigned integer field",
        note = "count keys (kind = \"count\" in tables/profile.toml) take u8, u16, u32, u64 or usize"
    )]
    pub trait CountField: Copy {
        /// The count as `u32`, saturating.
        fn to_value(&self) -> u32;
        /// A `u32` count in this type, saturating.
        fn from_value(count: u32) -> Self;
    }

    macro_rules! count_fields {
        ($($t:ty),*) => {$(
            impl CountField for $t {
                #[inline]
                fn to_value(&self) -> u32 {
                    u32::try_from(*self).unwrap_or(u32::MAX)
                }
                #[inline]
                fn from_value(count: u32) -> Self {
                    <$t>::try_from(count).unwrap_or(<$t>::MAX)
                }
            }
        )*};
    }
    count_fields!(u8, u16, u32, u64, usize);

    /// A field type that can hold a flag key.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot hold a profile flag",
        label = "a flag key needs a `bool` field",
        note = "flag keys (kind = \"flag\" in tables/profile.toml) take bool"
    )]
    pub trait FlagField: Copy {
        /// The flag.
        fn to_value(&self) -> bool;
        /// This type from a flag.
        fn from_value(flag: bool) -> Self;
    }

    impl FlagField for bool {
        #[inline]
        fn to_value(&self) -> bool {
            *self
        }
        #[inline]
        fn from_value(flag: bool) -> Self {
            flag
        }
    }

    /// A field type that can hold the tier key.
    #[diagnostic::on_unimplemented(
        message = "`{Self}` cannot hold the profile's tier",
        label = "the tier key needs a `qlora_scale::Tier` field",
        note = "the tier key (kind = \"tier\" in tables/profile.toml) takes qlora_scale::Tier"
    )]
    pub trait TierField: Copy {
        /// The tier.
        fn to_value(&self) -> Tier;
        /// This type from a tier.
        fn from_value(tier: Tier) -> Self;
    }

    impl TierField for Tier {
        #[inline]
        fn to_value(&self) -> Tier {
            *self
        }
        #[inline]
        fn from_value(tier: Tier) -> Self {
            tier
        }
    }
}
