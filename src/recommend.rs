//! Which known models a machine can fine-tune, and how comfortably.

use std::fmt;

use crate::hardware::training_budget_gb;
use crate::tables::{COMFORTABLE_BELOW_GB, KNOWN_MODELS, KnownModel, TIGHT_ADVICE, TIGHT_BELOW_GB};

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
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
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
                self.model.training_gb, self.budget_gb
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
    let mut list: Vec<Recommendation> = KNOWN_MODELS.iter().map(|m| assess(m, budget)).collect();
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
