//! Which models of the known model table (`tables/known_models.toml`,
//! `[[architecture]]`) a machine can fine-tune, judged by the memory model.
//!
//! Each model is sized by its published architecture and trained, in the
//! estimate, with the machine's profile scaled for it, at the sequence
//! length of `tables/defaults.toml`. It fits when that estimate stays within
//! the share of the budget `train` allows (`[fit] estimate_share` of
//! `tables/memory.toml`); it is a tight fit when only micro-batch 1 with
//! checkpointing stays within it; else it does not fit.

use std::cmp::Ordering;
use std::fmt;

use crate::memory::{Architecture, GIB, RunShape, estimate};
use crate::scale::scale_profile_for_category;
use crate::tables::memory_fit::ESTIMATE_SHARE;
use crate::tables::{KNOWN_ARCHITECTURES, KnownArchitecture, Profile, SizeCategory};

/// How a model fits a training budget.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FitStatus {
    /// Fits with the profile's settings.
    Fits,
    /// Fits only at micro-batch 1 with checkpointing.
    Tight,
    /// Does not fit even at micro-batch 1 with checkpointing.
    DoesNotFit,
}

impl FitStatus {
    /// The status name as printed (`DOES_NOT_FIT`).
    pub const fn name(self) -> &'static str {
        match self {
            FitStatus::Fits => "FITS",
            FitStatus::Tight => "TIGHT",
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

/// One model's verdict for a budget.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Recommendation {
    /// The model.
    #[serde(skip)]
    pub model: &'static KnownArchitecture,
    /// Its parameters, counted from its architecture.
    pub params: u64,
    /// How it fits.
    pub status: FitStatus,
    /// The settings the estimate assumes: the profile's scaled for the
    /// model, or micro-batch 1 with checkpointing for a tight fit or a
    /// misfit.
    pub run: RunShape,
    /// The memory model's estimate of the trainer's peak with `run`, GiB.
    pub estimated_peak_gb: f64,
    /// The training budget, GiB.
    pub budget_gb: u32,
    /// The part of the budget an estimate may take (`estimate_share` x
    /// budget), GiB.
    pub limit_gb: f64,
}

impl Recommendation {
    /// What to tell the user beside the status; `None` when it fits as it
    /// is.
    pub fn advice(&self) -> Option<String> {
        match self.status {
            FitStatus::Fits => None,
            FitStatus::Tight => Some("train with --batch-size 1 --grad-checkpoint".to_string()),
            FitStatus::DoesNotFit => Some(format!(
                "needs about {:.1} GB even at micro-batch 1 with checkpointing; {:.1} GB of the {} GB budget is usable",
                self.estimated_peak_gb, self.limit_gb, self.budget_gb
            )),
        }
    }
}

/// The run `profile` trains `arch` with, scaled for its size (`tight`:
/// micro-batch 1 and checkpointing).
fn run_shape(arch: &Architecture, profile: Profile, tight: bool) -> RunShape {
    let p = scale_profile_for_category(profile, SizeCategory::for_params(arch.params()));
    RunShape {
        batch: if tight { 1 } else { u64::from(p.batch_size) },
        seq_len: crate::tables::trainer::SEQ_LEN,
        lora_rank: u64::from(p.lora_rank),
        lora_layers: u64::from(p.lora_num_layers),
        grad_checkpoint: tight || p.grad_checkpoint,
        quantize_embeddings: crate::tables::trainer::QUANTIZE_EMBEDDINGS,
    }
}

/// The fit of `model` in a training budget of `budget_gb` GiB on a machine
/// whose profile is `profile`.
pub fn assess(
    model: &'static KnownArchitecture,
    budget_gb: u32,
    profile: Profile,
) -> Recommendation {
    let arch = Architecture::from_known(model);
    let limit = f64::from(budget_gb) * GIB * ESTIMATE_SHARE;
    let full = run_shape(&arch, profile, false);
    let tight = run_shape(&arch, profile, true);
    let full_peak = estimate(&arch, &full).peak;
    let (status, run, peak) = if full_peak <= limit {
        (FitStatus::Fits, full, full_peak)
    } else {
        let tight_peak = estimate(&arch, &tight).peak;
        let status = if tight_peak <= limit {
            FitStatus::Tight
        } else {
            FitStatus::DoesNotFit
        };
        (status, tight, tight_peak)
    };
    Recommendation {
        model,
        params: arch.params(),
        status,
        run,
        estimated_peak_gb: (peak / GIB * 10.0).round() / 10.0,
        budget_gb,
        limit_gb: (limit / GIB * 10.0).round() / 10.0,
    }
}

/// Every model of the known model table judged for a training budget of
/// `budget_gb` GiB and a machine whose profile is `profile`. Models that fit
/// come first, then tight fits, then misfits; among those that fit (or fit
/// tightly) the largest model first, among misfits the one nearest to
/// fitting first; table order on ties.
///
/// ```
/// use qlora_scale::recommend::{recommend, FitStatus};
/// use qlora_scale::tables::FALLBACK_PROFILE;
/// let list = recommend(12, FALLBACK_PROFILE);
/// let find = |id| list.iter().find(|r| r.model.id == id).unwrap();
/// assert!(find("Qwen/Qwen2.5-0.5B").status.fits());
/// assert_eq!(find("meta-llama/Llama-3.1-70B").status, FitStatus::DoesNotFit);
/// assert!(list[0].status.fits());
/// ```
pub fn recommend(budget_gb: u32, profile: Profile) -> Vec<Recommendation> {
    let mut list: Vec<Recommendation> = KNOWN_ARCHITECTURES
        .iter()
        .map(|m| assess(m, budget_gb, profile))
        .collect();
    list.sort_by(order);
    list
}

/// Status first; then larger models first where they fit, smaller peaks
/// first where they do not.
fn order(a: &Recommendation, b: &Recommendation) -> Ordering {
    a.status.cmp(&b.status).then_with(|| {
        if a.status.fits() {
            b.params.cmp(&a.params)
        } else {
            a.estimated_peak_gb.total_cmp(&b.estimated_peak_gb)
        }
    })
}
