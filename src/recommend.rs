//! Which known models a machine can fine-tune, and how comfortably.

use std::fmt;

use crate::detect::detect_model_size;
use crate::hardware::training_budget_gb;
use crate::memory::{Architecture, RunShape, estimate};
use crate::scale::scale_profile_for_category;
use crate::tables::{
    COMFORTABLE_BELOW_GB, KNOWN_MODELS, KnownModel, Profile, TIGHT_ADVICE, TIGHT_BELOW_GB,
};

/// How well a model fits a training budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FitStatus {
    /// Fits with plenty of headroom.
    Optimal,
    /// Fits with some headroom.
    Comfortable,
    /// Fits with little headroom: shrink the batch and checkpoint.
    TightFit,
    /// Needs more memory than the budget.
    DoesNotFit,
}

impl FitStatus {
    /// The status name as printed (`TIGHT_FIT`).
    pub const fn name(self) -> &'static str {
        match self {
            FitStatus::Optimal => "OPTIMAL",
            FitStatus::Comfortable => "COMFORTABLE",
            FitStatus::TightFit => "TIGHT_FIT",
            FitStatus::DoesNotFit => "DOES_NOT_FIT",
        }
    }

    /// Whether the model fits at all.
    pub const fn fits(self) -> bool {
        !matches!(self, FitStatus::DoesNotFit)
    }
}

impl fmt::Display for FitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One model's verdict for a memory size.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Recommendation {
    /// The model.
    #[serde(serialize_with = "ser_model")]
    pub model: &'static KnownModel,
    /// How it fits.
    pub status: FitStatus,
    /// Budget minus training memory, GB (negative when it does not fit).
    pub headroom_gb: i64,
    /// The training budget it was judged against, GB.
    pub budget_gb: u32,
    /// Recommended: the table recommends it and it fits.
    pub recommended: bool,
    /// The memory model's estimate of the trainer's peak, GB, with the
    /// settings the verdict assumes (the profile's, or micro-batch 1 with
    /// checkpointing for a tight fit); `None` with the table's figures.
    pub estimated_training_gb: Option<f64>,
}

fn ser_model<S: serde::Serializer>(m: &&'static KnownModel, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeStruct;
    let mut st = s.serialize_struct("KnownModel", 7)?;
    st.serialize_field("key", m.key)?;
    st.serialize_field("id", m.id)?;
    st.serialize_field("params", m.params)?;
    st.serialize_field("inference_gb", &m.inference_gb)?;
    st.serialize_field("training_gb", &m.training_gb)?;
    st.serialize_field("tier", &m.tier)?;
    st.serialize_field("warning", &m.warning)?;
    st.end()
}

impl Recommendation {
    /// What to tell the user beside the status: the tight-fit advice, or what
    /// is missing; `None` otherwise.
    pub fn advice(&self) -> Option<String> {
        match self.status {
            FitStatus::TightFit => Some(TIGHT_ADVICE.to_string()),
            FitStatus::DoesNotFit => Some(format!(
                "needs {} GB, you have {} GB budget",
                match self.estimated_training_gb {
                    Some(gb) => format!("{gb:.1}"),
                    None => self.model.training_gb.to_string(),
                },
                self.budget_gb
            )),
            _ => None,
        }
    }
}

/// The fit of `model` in a budget of `budget_gb`.
pub fn assess(model: &'static KnownModel, budget_gb: u32) -> Recommendation {
    let headroom_gb = i64::from(budget_gb) - i64::from(model.training_gb);
    let status = if headroom_gb < 0 {
        FitStatus::DoesNotFit
    } else if headroom_gb < i64::from(TIGHT_BELOW_GB) {
        FitStatus::TightFit
    } else if headroom_gb < i64::from(COMFORTABLE_BELOW_GB) {
        FitStatus::Comfortable
    } else {
        FitStatus::Optimal
    };
    Recommendation {
        model,
        status,
        headroom_gb,
        budget_gb,
        recommended: model.recommended && status.fits(),
        estimated_training_gb: None,
    }
}

/// Every known model judged for a machine with `memory_gb` of memory:
/// recommended fits first, then other fits, then misfits; within each group,
/// larger headroom first (table order on ties).
///
/// ```
/// use qlora_scale::recommend::{recommend, FitStatus};
/// let list = recommend(16);
/// assert_eq!(list[0].model.key, "hermes-7b");
/// assert_eq!(list.iter().find(|r| r.model.key == "hermes-70b").unwrap().status,
///            FitStatus::DoesNotFit);
/// ```
pub fn recommend(memory_gb: u32) -> Vec<Recommendation> {
    let budget = training_budget_gb(memory_gb);
    sorted(KNOWN_MODELS.iter().map(|m| assess(m, budget)).collect())
}

const GB: f64 = (1u64 << 30) as f64;

/// The memory model's estimate of training `model` with `profile` scaled
/// for it (`tight`: micro-batch 1 and checkpointing), GB; `None` when its
/// size is unknown.
pub fn estimated_training_gb(model: &KnownModel, profile: Profile, tight: bool) -> Option<f64> {
    let size = detect_model_size(model.id);
    if size.params == 0 {
        return None;
    }
    let p = scale_profile_for_category(profile, size.category);
    let run = RunShape {
        batch: if tight { 1 } else { u64::from(p.batch_size) },
        seq_len: crate::tables::trainer::SEQ_LEN,
        lora_rank: u64::from(p.lora_rank),
        lora_layers: u64::from(p.lora_num_layers),
        grad_checkpoint: tight || p.grad_checkpoint,
        quantize_embeddings: crate::tables::trainer::QUANTIZE_EMBEDDINGS,
    };
    Some(estimate(&Architecture::for_params(size.params), &run).peak / GB)
}

/// The fit of `model` in `budget_gb` by the memory model: with `profile`'s
/// settings (scaled for the model) it is OPTIMAL or COMFORTABLE by
/// headroom (TIGHT_FIT when that is under the table's tight threshold);
/// when only micro-batch 1 with checkpointing fits, TIGHT_FIT; else
/// DOES_NOT_FIT. Models of unknown size keep the table's verdict.
pub fn assess_estimated(
    model: &'static KnownModel,
    budget_gb: u32,
    profile: Profile,
) -> Recommendation {
    let (Some(full), Some(tight)) = (
        estimated_training_gb(model, profile, false),
        estimated_training_gb(model, profile, true),
    ) else {
        return assess(model, budget_gb);
    };
    let budget = f64::from(budget_gb);
    let (status, used) = if full <= budget {
        let headroom = budget - full;
        let status = if headroom < f64::from(TIGHT_BELOW_GB) {
            FitStatus::TightFit
        } else if headroom < f64::from(COMFORTABLE_BELOW_GB) {
            FitStatus::Comfortable
        } else {
            FitStatus::Optimal
        };
        (status, full)
    } else if tight <= budget {
        (FitStatus::TightFit, tight)
    } else {
        (FitStatus::DoesNotFit, tight)
    };
    Recommendation {
        model,
        status,
        headroom_gb: (budget - used).floor() as i64,
        budget_gb,
        recommended: model.recommended && status.fits(),
        estimated_training_gb: Some((used * 10.0).round() / 10.0),
    }
}

/// Every known model judged by the memory model for `memory_gb` of memory
/// and a machine whose profile is `profile`; ordered as [`recommend`].
///
/// ```
/// use qlora_scale::recommend::{recommend_estimated, FitStatus};
/// use qlora_scale::tables::FALLBACK_PROFILE;
/// let list = recommend_estimated(16, FALLBACK_PROFILE);
/// let find = |k| list.iter().find(|r| r.model.key == k).unwrap();
/// assert!(find("hermes-7b").status.fits());
/// assert_eq!(find("hermes-70b").status, FitStatus::DoesNotFit);
/// ```
pub fn recommend_estimated(memory_gb: u32, profile: Profile) -> Vec<Recommendation> {
    let budget = training_budget_gb(memory_gb);
    sorted(
        KNOWN_MODELS
            .iter()
            .map(|m| assess_estimated(m, budget, profile))
            .collect(),
    )
}

fn sorted(mut list: Vec<Recommendation>) -> Vec<Recommendation> {
    list.sort_by_key(|r| {
        let group = match (r.recommended, r.status.fits()) {
            (true, _) => 0,
            (false, true) => 1,
            (false, false) => 2,
        };
        (group, std::cmp::Reverse(r.headroom_gb))
    });
    list
}
