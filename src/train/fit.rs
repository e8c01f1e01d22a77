//! Checks a resolved run against its memory budget before anything is
//! loaded, with the memory model of [`crate::memory`]; says what does not
//! fit and the nearest configuration that does, and applies it when asked
//! (`--auto-fit`).

use serde::Serialize;

use super::settings::ValueSource;
use super::spec::{HardwareSummary, RunSpec, Weights};
use crate::hardware::{DeviceKind, memory_profile};
use crate::memory::{
    Architecture, Estimate, FitChange, FitConfig, GIB, MIB, RunShape, estimate, fit,
    known_architecture,
};
use crate::tables::memory_fit::ESTIMATE_SHARE;

/// Where a budget came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetSource {
    /// `--memory-budget`.
    Flag,
    /// The memory of the GPU the run trains on (`--device cuda`), times
    /// the `[gpu]` budget fraction of `tables/hardware.toml`.
    Gpu,
    /// The resolved hardware profile's training budget.
    Profile,
    /// This machine's usable memory (physical memory or cgroup limit) times
    /// the `[cpu]` budget fraction of `tables/hardware.toml`.
    Detected,
}

impl BudgetSource {
    fn describe(self) -> &'static str {
        match self {
            BudgetSource::Flag => "--memory-budget flag",
            BudgetSource::Gpu => "memory of the GPU it trains on",
            BudgetSource::Profile => "hardware profile",
            BudgetSource::Detected => "memory detected on this machine",
        }
    }
}

/// The memory a run may use.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Budget {
    /// Bytes.
    pub bytes: f64,
    /// Where it came from.
    pub source: BudgetSource,
}

impl Budget {
    /// The budget of a run: `flag_gib` when given, else the share of the
    /// GPU's memory (`gpu_total_gib`, the device the run trains on) that the
    /// `[gpu]` rows allow, else the resolved hardware's training budget,
    /// else this machine's (Linux: `/proc` and the cgroup limit) when
    /// `detect` allows reading it. `None` when nothing says.
    pub fn of(
        flag_gib: Option<f64>,
        gpu_total_gib: Option<f64>,
        hardware: Option<&HardwareSummary>,
        detect: bool,
    ) -> Option<Budget> {
        if let Some(g) = flag_gib {
            return Some(Budget {
                bytes: g * GIB,
                source: BudgetSource::Flag,
            });
        }
        if let Some(total) = gpu_total_gib {
            let p = memory_profile(DeviceKind::Gpu, total.floor() as u32);
            return Some(Budget {
                bytes: f64::from(p.training_budget_gb) * GIB,
                source: BudgetSource::Gpu,
            });
        }
        if let Some(hw) = hardware {
            return Some(Budget {
                bytes: f64::from(hw.training_budget_gb) * GIB,
                source: BudgetSource::Profile,
            });
        }
        if !detect {
            return None;
        }
        let cpu = crate::hardware::linux::read_linux_cpu(std::path::Path::new("/"))?;
        let p = memory_profile(DeviceKind::Cpu, cpu.memory_gb);
        Some(Budget {
            bytes: f64::from(p.training_budget_gb) * GIB,
            source: BudgetSource::Detected,
        })
    }

    /// The budget in MiB.
    pub fn mib(&self) -> f64 {
        self.bytes / MIB
    }
}

/// What the memory check found: the `memory` object of `--dry-run --json`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MemoryReport {
    /// The architecture estimated (from config.json, the embedded model, the
    /// known model table, or a reference shape scaled to the detected size).
    pub architecture: Architecture,
    /// Where it came from.
    pub architecture_source: ArchitectureSource,
    /// For a model the known model table knows, the repository whose
    /// config.json its numbers are from.
    pub architecture_id: Option<&'static str>,
    /// The estimate of the run as it will train (after any auto-fit), in
    /// MiB.
    pub estimate_mib: Estimate,
    /// The budget, GiB; `None` when unknown (then nothing is checked).
    pub budget_gib: Option<f64>,
    /// Where the budget came from.
    pub budget_source: Option<BudgetSource>,
    /// The share of the budget an estimate may take.
    pub estimate_share: f64,
    /// Whether the run fits (true when no budget is known).
    pub fits: bool,
    /// Changes `--auto-fit` made.
    pub auto_fit: Vec<FitChange>,
    /// When the run does not fit and nothing was applied (a dry run): the
    /// nearest configuration that fits, as flags, and its estimate in MiB;
    /// `None` when it fits or nothing the fit may change is enough.
    pub suggestion: Option<Suggestion>,
}

/// The nearest configuration that fits, as `--dry-run --json` shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Suggestion {
    /// The flags to pass.
    pub flags: String,
    /// What changes.
    pub changes: Vec<FitChange>,
    /// Its estimated peak, MiB.
    pub peak_mib: f64,
}

/// Errors of the memory check.
#[derive(Debug, thiserror::Error)]
pub enum FitError {
    /// The run does not fit; `suggestion` is the nearest that does.
    #[error(
        "the run needs about {need_gib:.2} GiB at its peak, more than {limit_gib:.2} GiB ({share:.0}% of the {budget_gib:.2} GiB budget, from the {source_name}){}",
        match suggestion {
            Some(s) => format!("; the nearest configuration that fits is {s}: pass those flags, or --auto-fit to apply them"),
            None => "; nothing the fit may change (micro-batch, adapted blocks, sequence length, checkpointing) brings it under: raise --memory-budget or use a smaller model".to_string(),
        }
    )]
    DoesNotFit {
        /// The estimate, GiB.
        need_gib: f64,
        /// The budget x share, GiB.
        limit_gib: f64,
        /// The budget, GiB.
        budget_gib: f64,
        /// Share in percent.
        share: f64,
        /// Where the budget came from, in words.
        source_name: &'static str,
        /// Flags of the nearest configuration that fits, with its estimate.
        suggestion: Option<String>,
    },
}

/// Where the architecture the memory model sized a run by came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArchitectureSource {
    /// The local model's `config.json`.
    ConfigJson,
    /// The built-in model.
    Embedded,
    /// A model given by name that `tables/known_models.toml` knows
    /// (`[[architecture]]`).
    KnownModelTable,
    /// A model given by name that the table does not know: the reference
    /// shape of `tables/memory.toml` nearest its size, scaled to it.
    EstimatedFromName,
}

impl ArchitectureSource {
    /// In words, for messages.
    pub const fn describe(self) -> &'static str {
        match self {
            ArchitectureSource::ConfigJson => "config.json",
            ArchitectureSource::Embedded => "the built-in model",
            ArchitectureSource::KnownModelTable => "known model table",
            ArchitectureSource::EstimatedFromName => "estimated from the name",
        }
    }
}

/// The architecture the memory model estimates, where it came from and, for
/// a known model, the repository the table's numbers are from: the spec's;
/// for a model known by name, the table's shape when it knows the name, else
/// the reference shape nearest its size; `None` when even the size is
/// unknown.
pub fn architecture(
    spec: &RunSpec,
) -> Option<(Architecture, ArchitectureSource, Option<&'static str>)> {
    if let Some(c) = &spec.architecture {
        let source = match spec.weights {
            Weights::Embedded => ArchitectureSource::Embedded,
            _ => ArchitectureSource::ConfigJson,
        };
        return Some((Architecture::from_config(c), source, None));
    }
    match spec.weights {
        Weights::Embedded | Weights::LocalDir => None,
        Weights::NameOnly => {
            if let Some(k) = known_architecture(spec.model.as_str()) {
                return Some((
                    Architecture::from_known(k),
                    ArchitectureSource::KnownModelTable,
                    Some(k.id),
                ));
            }
            (spec.model_size.params_b > 0.0).then(|| {
                (
                    Architecture::for_params((spec.model_size.params_b * 1e9).round() as u64),
                    ArchitectureSource::EstimatedFromName,
                    None,
                )
            })
        }
    }
}

fn shape(spec: &RunSpec) -> FitConfig {
    let s = &spec.settings;
    FitConfig {
        run: RunShape {
            batch: u64::from(s.batch_size),
            seq_len: s.seq_len,
            lora_rank: u64::from(s.lora_rank),
            lora_layers: u64::from(s.lora_layers),
            grad_checkpoint: s.grad_checkpoint,
            quantize_embeddings: s.quantize_embeddings,
        },
        grad_accum: s.grad_accum_steps,
    }
}

/// What to do with a run that does not fit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnMisfit {
    /// Stop with [`FitError::DoesNotFit`] (a real run without `--auto-fit`).
    Refuse,
    /// Change the run into the nearest configuration that fits.
    AutoFit,
    /// Only report it, with the suggestion (a dry run).
    Report,
}

/// The outcome of the memory check.
#[derive(Clone, Debug, PartialEq)]
pub struct Fitted {
    /// The run as it will train: the spec checked, or the nearest one that
    /// fits when `--auto-fit` changed it.
    pub spec: RunSpec,
    /// The settings `--auto-fit` changed, for the run's provenance.
    pub changed: Vec<(&'static str, ValueSource)>,
    /// What the check found; `None`: the architecture is unknown (a name
    /// without a size), nothing was checked.
    pub report: Option<MemoryReport>,
}

/// Checks `spec` against `budget`. A run that fits is returned as it is;
/// one that does not is, by `on_misfit`, an error naming the nearest
/// configuration that fits, changed into it, or reported with it.
pub fn check(
    spec: &RunSpec,
    budget: Option<Budget>,
    on_misfit: OnMisfit,
) -> Result<Fitted, FitError> {
    let mut out = Fitted {
        spec: spec.clone(),
        changed: Vec::new(),
        report: None,
    };
    let Some((arch, architecture_source, architecture_id)) = architecture(spec) else {
        return Ok(out);
    };
    let current = shape(spec);
    let mut est = estimate(&arch, &current.run);
    let mut applied = Vec::new();
    let mut suggestion = None;
    if let Some(b) = budget {
        let limit = b.bytes * ESTIMATE_SHARE;
        if est.peak > limit {
            match (fit(&arch, &current, limit), on_misfit) {
                (Some(f), OnMisfit::Report) => {
                    suggestion = Some(Suggestion {
                        flags: flags(&f.changes),
                        peak_mib: (f.estimate.peak / MIB).round(),
                        changes: f.changes,
                    });
                }
                (None, OnMisfit::Report) => {}
                (Some(f), OnMisfit::AutoFit) => {
                    let s = &mut out.spec.settings;
                    s.batch_size = u32::try_from(f.config.run.batch).unwrap_or(u32::MAX);
                    s.grad_accum_steps = f.config.grad_accum;
                    s.lora_layers = u32::try_from(f.config.run.lora_layers).unwrap_or(u32::MAX);
                    s.seq_len = f.config.run.seq_len;
                    s.grad_checkpoint = f.config.run.grad_checkpoint;
                    out.changed = f
                        .changes
                        .iter()
                        .flat_map(changed_settings)
                        .map(|k| (*k, ValueSource::AutoFit))
                        .collect();
                    est = f.estimate;
                    applied = f.changes;
                }
                (other, _) => {
                    return Err(FitError::DoesNotFit {
                        need_gib: est.peak / GIB,
                        limit_gib: limit / GIB,
                        budget_gib: b.bytes / GIB,
                        share: ESTIMATE_SHARE * 100.0,
                        source_name: b.source.describe(),
                        suggestion: other.map(|f| {
                            format!(
                                "{} (about {:.2} GiB)",
                                flags(&f.changes),
                                f.estimate.peak_gib()
                            )
                        }),
                    });
                }
            }
        }
    }
    out.report = Some(MemoryReport {
        architecture: arch,
        architecture_source,
        architecture_id,
        estimate_mib: est.in_mib(),
        budget_gib: budget.map(|b| b.bytes / GIB),
        budget_source: budget.map(|b| b.source),
        estimate_share: ESTIMATE_SHARE,
        fits: budget.is_none_or(|b| est.peak <= b.bytes * ESTIMATE_SHARE),
        auto_fit: applied,
        suggestion,
    });
    Ok(out)
}

/// The settings a fit change sets.
fn changed_settings(change: &FitChange) -> &'static [&'static str] {
    match change {
        FitChange::BatchSize { .. } => &["batch_size", "grad_accum_steps"],
        FitChange::LoraLayers { .. } => &["lora_layers"],
        FitChange::SeqLen { .. } => &["seq_len"],
        FitChange::GradCheckpoint => &["grad_checkpoint"],
    }
}

fn flags(changes: &[FitChange]) -> String {
    changes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_then_the_gpu_trained_on_then_the_profile() {
        let flag = Budget::of(Some(3.0), Some(80.0), None, false).unwrap();
        assert_eq!((flag.source, flag.bytes), (BudgetSource::Flag, 3.0 * GIB));
        let gpu = Budget::of(None, Some(79.6), None, false).unwrap();
        assert_eq!(gpu.source, BudgetSource::Gpu);
        let want = memory_profile(DeviceKind::Gpu, 79).training_budget_gb;
        assert_eq!(gpu.bytes, f64::from(want) * GIB);
        assert!(want > 0 && want < 80, "a share of the GPU: {want} GB");
        assert_eq!(Budget::of(None, None, None, false), None);
    }
}
