//! `profile recommend`: which known models fit a machine's memory.

use std::io::{self, Write};

use anyhow::{Context as _, bail};
use qlora_scale::hardware::{detect_machine, training_budget_gb};
use qlora_scale::recommend::{Recommendation, recommend, recommend_estimated};
use qlora_scale::saved_profile::load_profile;
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

/// The memory to judge and the training settings the estimates assume:
/// `--memory` (with the default settings), else the saved profile's, else
/// the detected hardware's. A saved profile that cannot be read is an error.
fn memory_gb(args: &RecommendArgs, ctx: &Context) -> anyhow::Result<(u32, MemorySource, Profile)> {
    if let Some(m) = args.memory {
        return Ok((m, MemorySource::Flag, FALLBACK_PROFILE));
    }
    if let Some(p) = load_profile(&ctx.profile_path)? {
        return Ok((p.memory_gb, MemorySource::SavedProfile, p.profile));
    }
    // Apple Silicon, else the largest NVIDIA GPU, else the memory a CPU run
    // may use (the smaller of /proc/meminfo and the cgroup limit).
    if let Some(machine) = detect_machine().profile().filter(|m| m.memory_gb() > 0) {
        return Ok((
            machine.memory_gb(),
            MemorySource::Detected,
            machine.profile(),
        ));
    }
    bail!(
        "no memory size: pass --memory GB (no saved profile at {}, and the hardware \
         could not be detected)",
        ctx.profile_path.display()
    )
}

/// Runs `recommend`.
pub fn run(args: &RecommendArgs, ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let (memory, source, profile) = memory_gb(args, ctx)?;
    let list = if args.table_figures {
        recommend(memory)
    } else {
        recommend_estimated(memory, profile)
    };
    let written = if args.json {
        let models: Vec<Value> = list.iter().map(recommendation_json).collect();
        write_json_pretty(
            out,
            &json!({
                "memory_gb": memory,
                "memory_source": source.key(),
                "training_budget_gb": training_budget_gb(memory),
                "judged_by": if args.table_figures { "table_figures" } else { "memory_model" },
                "models": models,
            }),
        )
    } else {
        write_table(out, memory, &source.describe(ctx), &list)
    };
    written.context("cannot write to stdout")
}

/// One model's verdict as a flat JSON object.
fn recommendation_json(r: &Recommendation) -> Value {
    json!({
        "key": r.model.key,
        "id": r.model.id,
        "params": r.model.params,
        "tier": r.model.tier,
        "inference_gb": r.model.inference_gb,
        "training_gb": r.model.training_gb,
        "estimated_training_gb": r.estimated_training_gb,
        "status": r.status,
        "headroom_gb": r.headroom_gb,
        "recommended": r.recommended,
        "advice": r.advice(),
        "warning": r.model.warning,
    })
}

/// The table: one row per model, advice and warnings indented beneath.
fn write_table(
    out: &mut dyn Write,
    memory: u32,
    source: &str,
    list: &[Recommendation],
) -> io::Result<()> {
    let budget = training_budget_gb(memory);
    writeln!(
        out,
        "Memory: {memory} GB ({source}); training budget: {budget} GB"
    )?;
    writeln!(out)?;
    let key_width = list
        .iter()
        .map(|r| r.model.key.len())
        .chain(["MODEL".len()])
        .max()
        .unwrap_or_default();
    let params_width = list
        .iter()
        .map(|r| r.model.params.len())
        .chain(["PARAMS".len()])
        .max()
        .unwrap_or_default();
    let status_width = list
        .iter()
        .map(|r| r.status.name().len())
        .chain(["STATUS".len()])
        .max()
        .unwrap_or_default();
    writeln!(
        out,
        "  {:<key_width$}  {:<params_width$}  {:>8}  {:>8}  {:<status_width$}  ID",
        "MODEL", "PARAMS", "TRAINING", "HEADROOM", "STATUS"
    )?;
    for r in list {
        let mark = if r.recommended { '*' } else { ' ' };
        writeln!(
            out,
            "{mark} {:<key_width$}  {:<params_width$}  {:>5} GB  {:>5} GB  {:<status_width$}  {}",
            r.model.key,
            r.model.params,
            match r.estimated_training_gb {
                Some(gb) => format!("{gb:.1}"),
                None => r.model.training_gb.to_string(),
            },
            r.headroom_gb,
            r.status.name(),
            r.model.id
        )?;
        if let Some(advice) = r.advice() {
            writeln!(out, "    advice: {advice}")?;
        }
        if let Some(warning) = r.model.warning {
            writeln!(out, "    warning: {warning}")?;
        }
    }
    writeln!(out)?;
    writeln!(out, "* recommended: fits, and recommended for fine-tuning")?;
    writeln!(
        out,
        "TRAINING: {}",
        if list.iter().any(|r| r.estimated_training_gb.is_some()) {
            "the trainer's peak by the memory model (tables/memory.toml), with the profile's settings (micro-batch 1 and checkpointing for a tight fit)"
        } else {
            "the original project's fixed figures (tables/models.toml)"
        }
    )
}
