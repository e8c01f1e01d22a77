//! `train`: QLoRA fine-tuning sized by the hardware profile and the model.
//!
//! Without arguments it trains the embedded model on the corpus shipped in
//! `data/default` (CPU, a minute or two). The flags and the `--dry-run
//! --json` output are specified in `spec/architecture.md`;
//! `tests/cli_train*.rs` run them and snapshot `--help`.

#[path = "train/args.rs"]
mod args;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use indicatif::{ProgressBar, ProgressStyle};
use qlora_scale::hardware::{DeviceKind, MachineProfile, detect_machine, memory_profile};
use qlora_scale::storage::default_profile_path;
use qlora_scale::train::collective::{self, Collective};
use qlora_scale::train::config::{Settings, TrainConfig, resolve};
use qlora_scale::train::fit::{self, Budget, MemoryReport, OnMisfit};
use qlora_scale::train::run::{Observer, StepLog, train, train_on};

use args::{Cli, Command};
use qlora_scale::report::error_message;

/// Progress bar on a terminal, `tracing` lines otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    last_val: Option<f64>,
}

impl Progress {
    fn new(max_steps: u64, start: u64) -> Self {
        let bar = io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(max_steps);
            bar.set_style(
                ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} eta {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar.set_position(start);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self {
            bar,
            last_val: None,
        }
    }
}

impl Observer for Progress {
    fn step(&mut self, log: &StepLog, max_steps: u64) {
        if let Some(v) = log.val_loss {
            self.last_val = Some(v);
            tracing::info!(step = log.step, val_loss = format!("{v:.4}"), "validation");
        }
        let msg = format!(
            "loss {:.4}{} | {:.0} tok/s | peak {:.0} MiB",
            log.loss,
            self.last_val
                .map(|v| format!(" val {v:.4}"))
                .unwrap_or_default(),
            log.tokens_per_s,
            log.peak_rss_mib
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(log.step);
                bar.set_message(msg);
            }
            None => tracing::info!("step {}/{max_steps} {msg}", log.step),
        }
    }

    fn note(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::info!("{message}")),
            None => tracing::info!("{message}"),
        }
    }
}

/// Set to `off` to skip hardware detection: the run is then sized by the
/// saved profile, the hardware flags or the defaults, whatever the machine.
const DETECT_ENV: &str = "QLORA_SCALE_DETECT";

/// Whether hardware detection is on (it is unless `QLORA_SCALE_DETECT=off`).
fn detection_enabled() -> bool {
    !std::env::var(DETECT_ENV).is_ok_and(|v| v.eq_ignore_ascii_case("off"))
}

/// This machine's profile for the trainer, which runs on the CPU: Apple
/// Silicon's (unified memory), else the CPU's by the memory a run may use
/// (`/proc/meminfo` and the cgroup limit); `None` with
/// `QLORA_SCALE_DETECT=off`. (`--gpu-memory` sizes for a GPU.)
fn detected_machine() -> Option<MachineProfile> {
    if !detection_enabled() {
        return None;
    }
    let m = detect_machine();
    if let Some(apple) = m.apple.and_then(|d| d.profile()) {
        return Some(apple.into());
    }
    m.linux_cpu
        .filter(|c| c.memory_gb > 0)
        .map(|c| memory_profile(DeviceKind::Cpu, c.memory_gb).into())
}

fn resolve_config(cli: &Cli) -> anyhow::Result<(TrainConfig, Settings)> {
    let given = cli.settings();
    let settings = match &cli.config {
        Some(path) => given.or(&Settings::from_file(path)?),
        None => given,
    };
    let profile_path = match &cli.profile_path {
        Some(p) => p.clone(),
        None => default_profile_path().context("cannot tell where the saved profile lives")?,
    };
    let cfg = resolve(&settings, &profile_path, detected_machine)?;
    Ok((cfg, settings))
}

/// A one-step run of `cfg` into a temporary directory: the peak memory it
/// measured, MiB.
fn trial_step(cfg: &TrainConfig) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir().context("cannot create a directory for the trial step")?;
    let mut trial = cfg.clone();
    trial.output_dir = dir.path().to_path_buf();
    trial.max_steps = 1;
    trial.checkpoint_every = 1;
    let summary = train(&trial, false, &mut qlora_scale::train::run::TracingObserver)
        .context("trial step")?;
    Ok(summary.peak_rss_mib)
}

/// What ranks other than 0 show: everything at debug level.
struct QuietObserver;

impl Observer for QuietObserver {
    fn step(&mut self, log: &StepLog, max_steps: u64) {
        tracing::debug!(
            "step {}/{max_steps} loss {:.4}, all-reduce {:.1} ms",
            log.step,
            log.loss,
            log.allreduce_ms
        );
    }

    fn note(&mut self, message: &str) {
        tracing::debug!("{message}");
    }
}

/// The collective this process trains with: NCCL when its flags are given,
/// else MPI when an MPI launcher started it, else this process alone.
fn connect(cli: &Cli, cfg: &TrainConfig) -> anyhow::Result<Box<dyn Collective>> {
    let timeout = Duration::from_secs(cfg.collective_timeout_s);
    #[cfg(feature = "nccl")]
    if let (Some(rank), Some(world)) = (cli.nccl_rank, cli.nccl_world_size) {
        let id_file = cli
            .nccl_id_file
            .clone()
            .unwrap_or_else(|| collective::nccl::default_id_file(&cfg.output_dir));
        return Ok(Box::new(collective::nccl::NcclCollective::connect(
            rank, world, &id_file, timeout,
        )?));
    }
    #[cfg(not(feature = "nccl"))]
    let _ = cli;
    Ok(collective::connect(timeout)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Merge(m)) = &cli.command {
        return merge(m);
    }
    let (mut cfg, settings) = resolve_config(&cli)?;
    let budget = Budget::of(settings.memory_budget, &cfg, detection_enabled());
    let on_misfit = if settings.auto_fit.unwrap_or(false) {
        OnMisfit::AutoFit
    } else if cli.dry_run {
        OnMisfit::Report
    } else {
        OnMisfit::Refuse
    };
    // Every rank fits the same configuration (the ranks check at start that
    // they agree), and then learns its rank and the global batch.
    let memory = fit::check(&mut cfg, budget, on_misfit)?;
    let coll = connect(&cli, &cfg)?;
    let (rank, world) = (coll.rank(), coll.world_size());
    let cfg = cfg.for_rank(coll.backend(), rank as u32, world as u32);
    let result = run_as(&cli, &cfg, coll.as_ref(), memory.as_ref(), budget);
    if let Err(err) = &result
        && world > 1
    {
        // The other ranks would wait for this one in their next collective:
        // end them all, after saying why.
        let _ = writeln!(
            io::stderr().lock(),
            "error: rank {rank} of {world}: {}",
            error_message(err)
        );
        coll.abort(1);
    }
    result
}

fn run_as(
    cli: &Cli,
    cfg: &TrainConfig,
    coll: &dyn Collective,
    memory: Option<&MemoryReport>,
    budget: Option<Budget>,
) -> anyhow::Result<()> {
    if cli.dry_run {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        let mut value = serde_json::to_value(cfg).context("cannot serialise the configuration")?;
        value["memory"] = serde_json::to_value(memory).context("cannot serialise the estimate")?;
        let mut text = if cli.json {
            serde_json::to_string(&value)
        } else {
            serde_json::to_string_pretty(&value)
        }
        .context("cannot serialise the configuration")?;
        text.push('\n');
        // One write: under `mpirun` every rank prints its configuration, and
        // stdout's 1 KiB line buffer would otherwise hand a longer line to
        // the pipe in pieces that interleave with the other ranks'.
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("cannot write to stdout")?;
        return Ok(());
    }
    let lead = coll.rank() == 0;
    let setup = format!(
        "profile: {}{}; model {} ({} {}B, {}); batch {} x {} accum{}, rank {}, alpha {}, {} LoRA layers, checkpointing {}",
        cfg.profile_source,
        if cfg.profile_source == "defaults" {
            " (no saved profile and no detected hardware)"
        } else {
            ""
        },
        cfg.model,
        cfg.model_size.category,
        cfg.model_size.params_b,
        match cfg.weights {
            qlora_scale::train::config::Weights::Embedded => "training the embedded model",
            _ => "local files",
        },
        cfg.batch_size,
        cfg.grad_accum_steps,
        if cfg.world_size > 1 {
            format!(
                " x {} ranks ({}) = {} examples per step",
                cfg.world_size, cfg.collective, cfg.global_batch_size
            )
        } else {
            String::new()
        },
        cfg.lora_rank,
        cfg.lora_alpha,
        cfg.lora_layers,
        cfg.grad_checkpoint
    );
    if !lead {
        tracing::debug!("rank {} of {}: {setup}", cfg.rank, cfg.world_size);
        train_on(cfg, cli.resume, &mut QuietObserver, coll)
            .with_context(|| format!("training into {}", cfg.output_dir.display()))?;
        return Ok(());
    }
    tracing::info!("{setup}");
    if let Some(m) = memory {
        let e = &m.estimate_mib;
        tracing::info!(
            "memory: estimated peak {:.0} MiB (weights {:.0}, adapters {:.0}, activations {:.0}, logits {:.0}){}",
            e.peak,
            e.weights,
            e.adapters,
            e.activations,
            e.logits,
            match m.budget_gib {
                Some(b) => format!("; budget {:.1} GiB", b),
                None => "; no budget known, not checked".to_string(),
            }
        );
        for c in &m.auto_fit {
            tracing::info!("auto-fit: {c}");
        }
        if cli.trial_step {
            let measured = trial_step(cfg)?;
            tracing::info!(
                "trial step: peak {measured:.0} MiB measured, {:.0} MiB estimated ({:+.0}%)",
                e.peak,
                100.0 * (e.peak / measured - 1.0)
            );
            if let Some(b) = budget
                && measured * (1u64 << 20) as f64 > b.bytes
            {
                anyhow::bail!(
                    "the trial step peaked at {measured:.0} MiB, over the budget of {:.0} MiB: lower --batch-size or --seq-len, or raise --memory-budget",
                    b.bytes / (1u64 << 20) as f64
                );
            }
        }
    }
    let mut progress = Progress::new(cfg.max_steps, 0);
    let summary = train_on(cfg, cli.resume, &mut progress, coll)
        .with_context(|| format!("training into {}", cfg.output_dir.display()))?;
    if let Some(bar) = &progress.bar {
        bar.finish_and_clear();
    }
    let (first, last) = (summary.steps.first(), summary.steps.last());
    if let (Some(f), Some(l)) = (first, last) {
        tracing::info!(
            "done: loss {:.4} (step {}) -> {:.4} (step {}), {:.0} tokens/s, peak RSS {:.0} MiB; wrote {}",
            f.loss,
            f.step,
            l.loss,
            l.step,
            summary.tokens_per_s,
            summary.peak_rss_mib,
            cfg.output_dir.display()
        );
    } else {
        tracing::info!(
            "nothing to do: the run already reached step {}",
            cfg.max_steps
        );
    }
    Ok(())
}

fn merge(m: &args::MergeArgs) -> anyhow::Result<()> {
    let ck = qlora_scale::train::checkpoint::list(&m.run_dir.join("checkpoints"));
    let (_, path) = ck.last().with_context(|| {
        format!(
            "no checkpoint in {}",
            m.run_dir.join("checkpoints").display()
        )
    })?;
    let state = qlora_scale::train::checkpoint::load(path)?.state;
    let out: PathBuf = m.out.clone().unwrap_or_else(|| m.run_dir.join("merged"));
    qlora_scale::train::model::merge(&state.config, &m.run_dir, &out)
        .with_context(|| format!("merging {} into {}", m.run_dir.display(), out.display()))?;
    tracing::info!("wrote {}", out.join("model.safetensors").display());
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("QLORA_SCALE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(io::stderr)
        .with_target(false)
        .without_time()
        // Colour only on a terminal: logs piped to a file stay plain text.
        .with_ansi(io::stderr().is_terminal())
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            let _ = writeln!(io::stderr().lock(), "error: {}", error_message(&err));
            ExitCode::FAILURE
        }
    }
}
