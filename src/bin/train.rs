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
use qlora_scale::hardware::detect_hardware;
use qlora_scale::storage::default_profile_path;
use qlora_scale::train::config::{Settings, TrainConfig, resolve};
use qlora_scale::train::fit::{self, Budget, OnMisfit};
use qlora_scale::train::run::{Observer, StepLog, train};

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
    let cfg = resolve(&settings, &profile_path, detect_hardware)?;
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

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Merge(m)) = &cli.command {
        return merge(m);
    }
    let (mut cfg, settings) = resolve_config(&cli)?;
    let budget = Budget::of(settings.memory_budget, &cfg);
    let on_misfit = if settings.auto_fit.unwrap_or(false) {
        OnMisfit::AutoFit
    } else if cli.dry_run {
        OnMisfit::Report
    } else {
        OnMisfit::Refuse
    };
    let memory = fit::check(&mut cfg, budget, on_misfit)?;
    if cli.dry_run {
        let stdout = io::stdout();
        let mut out = stdout.lock();
        let mut value = serde_json::to_value(&cfg).context("cannot serialise the configuration")?;
        value["memory"] = serde_json::to_value(&memory).context("cannot serialise the estimate")?;
        if cli.json {
            serde_json::to_writer(&mut out, &value).context("cannot write to stdout")?;
        } else {
            serde_json::to_writer_pretty(&mut out, &value).context("cannot write to stdout")?;
        }
        writeln!(out).context("cannot write to stdout")?;
        return Ok(());
    }
    tracing::info!(
        "profile: {}{}; model {} ({} {}B, {}); batch {} x {} accum, rank {}, alpha {}, {} LoRA layers, checkpointing {}",
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
        cfg.lora_rank,
        cfg.lora_alpha,
        cfg.lora_layers,
        cfg.grad_checkpoint
    );
    if let Some(m) = &memory {
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
            let measured = trial_step(&cfg)?;
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
    let summary = train(&cfg, cli.resume, &mut progress)
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
