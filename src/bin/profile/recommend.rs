//! `profile recommend`: which models of the known model table fit a
//! machine's memory, by the memory model.

use std::io::{self, Write};

use anyhow::{Context as _, bail};
use qlora_scale::hardware::{detect_machine, training_budget_gb};
use qlora_scale::recommend::{FitStatus, Recommendation, recommend};
use qlora_scale::saved_profile::load_profile;
use qlora_scale::tables::memory_fit::ESTIMATE_SHARE;
use qlora_scale::tables::{FALLBACK_PROFILE, Profile};
use serde_json::{Value, json};

use crate::Context;
use crate::args::RecommendArgs;
use crate::render::write_json_pretty;

/// Where the memory size came from.
#[derive(Debug, PartialEq, Eq)]
enum MemorySource {
    Flag,
    SavedProfile,
    Detected,
}

impl MemorySource {
    fn key(&self) -> &'static str {
        match self {
            MemorySource::Flag => "flag",
            MemorySource::SavedProfile => "saved_profile",
            MemorySource::Detected => "detected",
        }
    }

    fn describe(&self, ctx: &Context) -> String {
        match self {
            MemorySource::Flag => "from --memory".to_string(),
            MemorySource::SavedProfile => {
                format!("from the saved profile {}", ctx.profile_path.display())
            }
            MemorySource::Detected => "detected".to_string(),
        }
    }
}

/// The memory to judge, its training budget and the training settings the
/// estimates assume: `--memory` (the Apple Silicon budget fraction and the
/// default settings), else the saved profile's, else the detected
/// hardware's. A saved profile that cannot be read is an error.
fn machine(args: &RecommendArgs, ctx: &Context) -> anyhow::Result<Machine> {
    if let Some(m) = args.memory {
        return Ok(Machine {
            memory_gb: m,
            budget_gb: training_budget_gb(m),
            source: MemorySource::Flag,
            profile: FALLBACK_PROFILE,
        });
    }
    if let Some(p) = load_profile(&ctx.profile_path)? {
        return Ok(Machine {
            memory_gb: p.memory_gb,
            budget_gb: p.training_budget_gb,
            source: MemorySource::SavedProfile,
            profile: p.profile,
        });
    }
    // Apple Silicon, else the largest NVIDIA GPU, else the memory a CPU run
    // may use (the smaller of /proc/meminfo and the cgroup limit).
    if let Some(m) = detect_machine().profile().filter(|m| m.memory_gb() > 0) {
        return Ok(Machine {
            memory_gb: m.memory_gb(),
            budget_gb: m.training_budget_gb(),
            source: MemorySource::Detected,
            profile: m.profile(),
        });
    }
    bail!(
        "no memory size: pass --memory GB (no saved profile at {}, and the hardware \
         could not be detected)",
        ctx.profile_path.display()
    )
}

/// The machine the models are judged for.
struct Machine {
    memory_gb: u32,
    budget_gb: u32,
    source: MemorySource,
    profile: Profile,
}

/// Runs `recommend`.
pub fn run(args: &RecommendArgs, ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let m = machine(args, ctx)?;
    let list = recommend(m.budget_gb, m.profile);
    let written = if args.json {
        let models: Vec<Value> = list.iter().map(recommendation_json).collect();
        write_json_pretty(
            out,
            &json!({
                "memory_gb": m.memory_gb,
                "memory_source": m.source.key(),
                "training_budget_gb": m.budget_gb,
                "usable_gb": list.first().map(|r| r.limit_gb),
                "models": models,
            }),
        )
    } else {
        write_table(out, &m, &m.source.describe(ctx), &list)
    };
    written.context("cannot write to stdout")
}

/// One model's verdict as a flat JSON object.
fn recommendation_json(r: &Recommendation) -> Value {
    json!({
        "id": r.model.id,
        "params_b": (r.params as f64 / 1e7).round() / 100.0,
        "status": r.status,
        "estimated_peak_gb": r.estimated_peak_gb,
        "batch_size": r.run.batch,
        "seq_len": r.run.seq_len,
        "lora_rank": r.run.lora_rank,
        "lora_layers": r.run.lora_layers,
        "grad_checkpoint": r.run.grad_checkpoint,
        "advice": r.advice(),
    })
}

/// The width of the widest of `header` and `cells`.
fn width<'a>(header: &str, cells: impl Iterator<Item = &'a str>) -> usize {
    cells
        .map(str::len)
        .chain([header.len()])
        .max()
        .unwrap_or_default()
}

/// The table: one row per model, advice indented beneath.
fn write_table(
    out: &mut dyn Write,
    m: &Machine,
    source: &str,
    list: &[Recommendation],
) -> io::Result<()> {
    writeln!(
        out,
        "Memory: {} GB ({source}); training budget: {} GB; a run's estimate may take {:.0}% of it, {:.1} GB",
        m.memory_gb,
        m.budget_gb,
        ESTIMATE_SHARE * 100.0,
        list.first().map_or(0.0, |r| r.limit_gb)
    )?;
    writeln!(out)?;
    let params: Vec<String> = list
        .iter()
        .map(|r| format!("{:.1}B", r.params as f64 / 1e9))
        .collect();
    let id_w = width("MODEL", list.iter().map(|r| r.model.id));
    let params_w = width("PARAMS", params.iter().map(String::as_str));
    let status_w = width("STATUS", list.iter().map(|r| r.status.name()));
    writeln!(
        out,
        "{:<id_w$}  {:>params_w$}  {:>9}  {:<status_w$}  SETTINGS",
        "MODEL", "PARAMS", "PEAK", "STATUS"
    )?;
    for (r, p) in list.iter().zip(&params) {
        writeln!(
            out,
            "{:<id_w$}  {:>params_w$}  {:>6.1} GB  {:<status_w$}  batch {}, seq {}, rank {}, {} layers{}",
            r.model.id,
            p,
            r.estimated_peak_gb,
            r.status.name(),
            r.run.batch,
            r.run.seq_len,
            r.run.lora_rank,
            r.run.lora_layers,
            if r.run.grad_checkpoint {
                ", checkpointing"
            } else {
                ""
            }
        )?;
        if r.status == FitStatus::Tight
            && let Some(advice) = r.advice()
        {
            writeln!(out, "    {advice}")?;
        }
    }
    writeln!(out)?;
    writeln!(
        out,
        "PEAK: the trainer's peak by the memory model (tables/memory.toml) for the model's \
         published architecture (tables/known_models.toml), with the profile's settings \
         scaled for it, or micro-batch 1 with checkpointing when those do not fit."
    )
}
