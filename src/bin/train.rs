//! `train`: QLoRA fine-tuning sized by the hardware profile and the model.
//!
//! Without arguments it trains the embedded model on the corpus shipped in
//! `data/default` (CPU, a minute or two). The flags are the fields of
//! [`Settings`]; `docs/architecture.md` follows a run through the code;
//! `tests/cli_train.rs` runs them and snapshots `--help`.

#[path = "train/args.rs"]
mod args;
#[path = "train/use_model.rs"]
mod use_model;

use std::io::{self, IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use indicatif::{ProgressBar, ProgressStyle};
use qlora_scale::hardware::{DeviceKind, MachineProfile, detect_machine, memory_profile};
use qlora_scale::qlora::bf16_gemm::{self, CpuMatmul, Engine};
use qlora_scale::saved_profile::default_profile_path;
use qlora_scale::train::collective::SingleProcess;
use qlora_scale::train::collective::{self, Collective};
use qlora_scale::train::device::{Compute, DeviceChoice};
use qlora_scale::train::fit::{self, Budget, MemoryReport, OnMisfit};
use qlora_scale::train::merge::{self as merging, MergeBase, MergeOptions, MergeProgress};
use qlora_scale::train::settings::{Settings, ValueSource};
use qlora_scale::train::spec::{RunPlan, RunSpec, Weights, World, plan};
use qlora_scale::train::trainer::{
    Observer, Start, StepLog, TracingObserver, TrainError, request_stop, train,
};

use args::{Cli, Command};

/// Counts the memory a chat template's rendering holds, so a hostile
/// template ends the run with a message instead of exhausting memory.
#[global_allocator]
static ALLOC: qlora_scale::alloc_guard::GuardedAlloc = qlora_scale::alloc_guard::GuardedAlloc;
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
            "loss {:.4}{} | {:.0} tok/s | peak {:.0} MiB{}",
            log.loss,
            self.last_val
                .map(|v| format!(" val {v:.4}"))
                .unwrap_or_default(),
            log.tokens_per_s,
            log.peak_rss_mib,
            log.peak_gpu_mib
                .map(|g| format!(", GPU {g:.0} MiB"))
                .unwrap_or_default()
        );
        match &self.bar {
            Some(bar) => {
                // The run's own step count: a resumed run keeps its
                // checkpoint's, which the command line may not have said.
                bar.set_length(max_steps);
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

    fn warn(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.suspend(|| tracing::warn!("{message}")),
            None => tracing::warn!("{message}"),
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

/// The run the command line asks for: its flags over its `--config` file,
/// resolved against the saved or detected profile.
fn resolve_plan(cli: &Cli) -> anyhow::Result<(RunPlan, Settings)> {
    let given = cli.given();
    let mut settings = match &cli.config {
        Some(path) => given.or(&Settings::from_file(path)?),
        None => given,
    };
    if cli.resume {
        resume_launch_settings(&mut settings);
    }
    let profile_path = match &cli.profile_path {
        Some(p) => p.clone(),
        None => default_profile_path().context("cannot tell where the saved profile lives")?,
    };
    let plan = plan(&settings, &profile_path, detected_machine)?;
    if plan.provenance.saved_profile_skipped.is_some() {
        // The reason names the detected machine, the saved profile and why
        // it does not describe this machine.
        tracing::warn!("sizing for {}", plan.provenance.profile_reason);
    }
    Ok((plan, settings))
}

/// `--resume` alone continues the run in the output directory: the model
/// (a local folder) and the data directory it trained on come from its
/// newest checkpoint unless given. A directory without a checkpoint is left
/// for the trainer to refuse with its own message.
fn resume_launch_settings(settings: &mut Settings) {
    let out = settings
        .output_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(qlora_scale::train::spec::DEFAULT_OUTPUT_DIR));
    let Ok(stored) = qlora_scale::train::model::run_spec(&out) else {
        return;
    };
    if settings.model.is_none() && stored.weights == Weights::LocalDir {
        settings.model = Some(stored.model);
    }
    if settings.data_dir.is_none() {
        settings.data_dir = stored.data_dir;
    }
}

/// A one-step run of `plan` into a temporary directory: the peak memory it
/// measured, MiB.
fn trial_step(plan: &RunPlan, compute: &Compute) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir().context("cannot create a directory for the trial step")?;
    let mut spec = plan.spec.clone();
    spec.settings.max_steps = 1;
    spec.settings.checkpoint_every = 1;
    let summary = train(
        &spec,
        compute,
        dir.path(),
        Start::Fresh,
        &mut TracingObserver,
        &SingleProcess,
    )
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

    fn warn(&mut self, message: &str) {
        tracing::debug!("{message}");
    }
}

/// The device `--device` names; under NCCL (one process per GPU) `auto` is
/// this rank's GPU, the one its communicator uses.
fn device_choice(cli: &Cli) -> DeviceChoice {
    #[cfg(feature = "nccl")]
    if let (DeviceChoice::Auto, Some(rank)) = (cli.device, cli.nccl_rank) {
        return DeviceChoice::Cuda(rank);
    }
    cli.device
}

/// The collective this process trains with: NCCL when its flags are given,
/// else MPI when an MPI launcher started it, else this process alone.
fn connect(cli: &Cli, plan: &RunPlan) -> anyhow::Result<Box<dyn Collective>> {
    let timeout = Duration::from_secs(plan.spec.settings.collective_timeout);
    #[cfg(feature = "nccl")]
    if let (Some(rank), Some(world)) = (cli.nccl_rank, cli.nccl_world_size) {
        let id_file = cli
            .nccl_id_file
            .clone()
            .unwrap_or_else(|| collective::nccl::default_id_file(&plan.output_dir));
        return Ok(Box::new(collective::nccl::NcclCollective::connect(
            rank, world, &id_file, timeout,
        )?));
    }
    #[cfg(not(feature = "nccl"))]
    let _ = cli;
    Ok(collective::connect(timeout)?)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match &cli.command {
        Some(Command::Merge(m)) => return merge(m),
        Some(Command::Generate(g)) => return use_model::run_generate(g),
        Some(Command::Eval(e)) => return use_model::run_eval(e),
        None => {}
    }
    let compute = device_choice(&cli).resolve()?;
    let (mut plan, settings) = resolve_plan(&cli)?;
    let budget = Budget::of(
        settings.memory_budget,
        compute.gpu_memory_mib().map(|(_, total)| total / 1024.0),
        plan.provenance.hardware.as_ref(),
        detection_enabled(),
    );
    let on_misfit = if settings.auto_fit.unwrap_or(false) {
        OnMisfit::AutoFit
    } else if cli.dry_run {
        OnMisfit::Report
    } else {
        OnMisfit::Refuse
    };
    // Every rank fits the same spec (the ranks check at start that they
    // agree), and then learns its rank and the global batch.
    let fitted = fit::check(&plan.spec, budget, on_misfit)?;
    plan.spec = fitted.spec;
    plan.provenance.value_sources.extend(fitted.changed);
    let coll = connect(&cli, &plan)?;
    let world = World::of(coll.as_ref());
    let run = Run {
        cli: &cli,
        plan: &plan,
        world,
        memory: fitted.report.as_ref(),
        budget,
        trial_step: settings.trial_step.unwrap_or(false),
        compute: &compute,
    };
    let result = if cli.dry_run {
        run.print_dry_run()
    } else {
        run.start(coll.as_ref())
    };
    if let Err(err) = &result
        && world.size > 1
        && !stopped(err)
    {
        // The other ranks would wait for this one in their next collective:
        // end them all, after saying why.
        let _ = writeln!(
            io::stderr().lock(),
            "error: rank {} of {}: {}",
            world.rank,
            world.size,
            error_message(err)
        );
        coll.abort(1);
    }
    result
}

/// A resolved run about to start in this process.
struct Run<'a> {
    cli: &'a Cli,
    plan: &'a RunPlan,
    world: World,
    memory: Option<&'a MemoryReport>,
    budget: Option<Budget>,
    trial_step: bool,
    /// Where it computes.
    compute: &'a Compute,
}

/// What `--dry-run` prints: the spec, its provenance, where it writes,
/// this process's world, the global batch and the memory check, as one
/// flat JSON object.
#[derive(serde::Serialize)]
struct DryRun<'a> {
    #[serde(flatten)]
    spec: &'a qlora_scale::train::spec::RunSpec,
    #[serde(flatten)]
    provenance: &'a qlora_scale::train::spec::Provenance,
    output_dir: &'a std::path::Path,
    #[serde(flatten)]
    world: World,
    per_rank_batch_size: u32,
    global_batch_size: u64,
    /// What trains, in words (the built-in model by its shape).
    model_description: String,
    /// `lora_layers` capped by the model's blocks: the blocks that get
    /// adapters.
    lora_layers_applied: u32,
    memory: Option<&'a MemoryReport>,
    /// `cpu` or `cuda:N`, as `--device` resolved.
    device: String,
    /// The activations' dtype there (`f32`, `bf16`).
    compute_dtype: &'static str,
    /// How the frozen weights multiply, and on what: `f32`, `bf16 (AMX)`,
    /// `bf16 (emulated in f32: no AMX)` on the CPU (`cpu_matmul`), the
    /// compute dtype on a GPU.
    frozen_products: &'static str,
}

impl Run<'_> {
    fn print_dry_run(&self) -> anyhow::Result<()> {
        let spec = &self.plan.spec;
        let view = DryRun {
            spec,
            provenance: &self.plan.provenance,
            output_dir: &self.plan.output_dir,
            world: self.world,
            per_rank_batch_size: spec.settings.batch_size,
            global_batch_size: self.world.global_batch(spec),
            model_description: spec.describe_model(),
            lora_layers_applied: spec.lora_layers_applied(),
            memory: self.memory,
            device: self.compute.name(),
            compute_dtype: self.compute.dtype_name(),
            frozen_products: self.frozen_products(),
        };
        let mut value =
            serde_json::to_value(&view).context("cannot serialise the configuration")?;
        // The spec keeps `data_dir: null` for the default corpus (it is what
        // checkpoints compare); the dry run shows the directory read.
        value["data_dir"] = serde_json::json!(spec.data_dir_used());
        let mut text = if self.cli.json {
            serde_json::to_string(&value)
        } else {
            serde_json::to_string_pretty(&value)
        }
        .context("cannot serialise the configuration")?;
        text.push('\n');
        // One write: under `mpirun` every rank prints its configuration, and
        // stdout's 1 KiB line buffer would otherwise hand a longer line to
        // the pipe in pieces that interleave with the other ranks'.
        let stdout = io::stdout();
        let mut out = stdout.lock();
        out.write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .context("cannot write to stdout")
    }

    /// How the frozen weights multiply: `cpu_matmul` on the CPU (with the
    /// engine this CPU has), the compute dtype on a GPU.
    fn frozen_products(&self) -> &'static str {
        if self.compute.device.is_cpu() {
            self.plan.spec.settings.cpu_matmul.describe()
        } else {
            self.compute.dtype_name()
        }
    }

    /// The one line that says what will train.
    fn setup_line(&self) -> String {
        let (spec, prov, world) = (&self.plan.spec, &self.plan.provenance, self.world);
        let s = &spec.settings;
        let dtype = match self.frozen_products() {
            p if p == self.compute.dtype_name() => p.to_string(),
            p => format!("{}, frozen products {p}", self.compute.dtype_name()),
        };
        format!(
            "profile: {}; model {}; on {} ({}); batch {} x {} accum{}, rank {}, alpha {}, {}, checkpointing {}",
            prov.profile_source.describe(),
            model_line(spec),
            self.compute.name(),
            dtype,
            s.batch_size,
            s.grad_accum_steps,
            if world.size > 1 {
                format!(
                    " x {} ranks ({}) = {} examples per step",
                    world.size,
                    world.backend,
                    world.global_batch(spec)
                )
            } else {
                String::new()
            },
            s.lora_rank,
            s.lora_alpha,
            lora_layers_line(spec),
            s.grad_checkpoint
        )
    }

    /// Logs the memory estimate and, with `--trial-step`, measures one step
    /// against it and the budget.
    fn check_memory(&self, m: &MemoryReport) -> anyhow::Result<()> {
        let e = &m.estimate_mib;
        let a = &m.architecture;
        tracing::info!(
            "memory: sized as {} layers, hidden {}, {} heads ({} KV), vocabulary {} ({}{})",
            a.layers,
            a.hidden,
            a.heads,
            a.kv_heads,
            a.vocab,
            m.architecture_source.describe(),
            m.architecture_id
                .map(|id| format!(": {id}"))
                .unwrap_or_default()
        );
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
        if !self.trial_step {
            return Ok(());
        }
        let measured = trial_step(self.plan, self.compute)?;
        tracing::info!(
            "trial step: peak {measured:.0} MiB measured, {:.0} MiB estimated ({:+.0}%)",
            e.peak,
            100.0 * (e.peak / measured - 1.0)
        );
        if let Some(b) = self.budget
            && measured > b.mib()
        {
            anyhow::bail!(
                "the trial step peaked at {measured:.0} MiB, over the budget of {:.0} MiB: lower --batch-size or --seq-len, or raise --memory-budget",
                b.mib()
            );
        }
        Ok(())
    }

    /// How this run treats its output directory.
    fn start_mode(&self) -> Start {
        if self.cli.resume {
            let given = self
                .plan
                .provenance
                .value_sources
                .iter()
                .filter(|(_, s)| **s == ValueSource::CliOrConfig)
                .map(|(k, _)| *k)
                .collect();
            Start::Resume { given }
        } else if self.cli.overwrite {
            Start::Overwrite
        } else {
            Start::Fresh
        }
    }

    /// Trains, with the progress display on rank 0.
    fn start(&self, coll: &dyn Collective) -> anyhow::Result<()> {
        // Only a training run stops gracefully; a dry run or a merge ends
        // on the first signal as usual.
        if let Err(e) = ctrlc::set_handler(on_signal) {
            tracing::warn!(
                "cannot handle SIGINT/SIGTERM ({e}): a stop loses the progress since the last checkpoint"
            );
        }
        let (spec, out) = (&self.plan.spec, &self.plan.output_dir);
        let context = || format!("training into {}", out.display());
        if !self.world.is_lead() {
            tracing::debug!(
                "rank {} of {}: {}",
                self.world.rank,
                self.world.size,
                self.setup_line()
            );
            train(
                spec,
                self.compute,
                out,
                self.start_mode(),
                &mut QuietObserver,
                coll,
            )
            .with_context(context)?;
            return Ok(());
        }
        tracing::info!("{}", self.setup_line());
        if self.compute.device.is_cpu()
            && spec.settings.cpu_matmul == CpuMatmul::Bf16
            && bf16_gemm::engine() == Engine::Emulated
        {
            tracing::warn!(
                "--cpu-matmul bf16: this CPU has no Intel AMX (or the OS does not grant it), so the bf16 products are emulated at f32 speed or slower; --cpu-matmul f32 is faster here"
            );
        }
        if let Some(m) = self.memory {
            self.check_memory(m)?;
        }
        let mut progress = Progress::new(spec.settings.max_steps, 0);
        let summary = train(
            spec,
            self.compute,
            out,
            self.start_mode(),
            &mut progress,
            coll,
        )
        .with_context(context)?;
        if let Some(bar) = &progress.bar {
            bar.finish_and_clear();
        }
        match (summary.steps.first(), summary.steps.last()) {
            (Some(f), Some(l)) => tracing::info!(
                "done: loss {:.4} (step {}) -> {:.4} (step {}), {:.0} tokens/s, peak RSS {:.0} MiB{}; wrote {}",
                f.loss,
                f.step,
                l.loss,
                l.step,
                summary.tokens_per_s,
                summary.peak_rss_mib,
                summary
                    .peak_gpu_mib
                    .map(|g| format!(", peak GPU {g:.0} MiB"))
                    .unwrap_or_default(),
                out.display()
            ),
            _ => tracing::info!(
                "nothing to do: the run already reached step {}",
                spec.settings.max_steps
            ),
        }
        Ok(())
    }
}

/// The model that trains and the size its profile was scaled for: the
/// built-in model is trained while its profile is scaled for the default
/// model id, and both are said.
fn model_line(spec: &RunSpec) -> String {
    let size = &spec.model_size;
    let sized = format!(
        "{} {}B from its {}",
        size.category, size.params_b, size.source
    );
    match spec.weights {
        Weights::Embedded => format!(
            "{}; profile scaled for {} ({sized})",
            spec.describe_model(),
            spec.model
        ),
        _ => format!("{}; {sized}", spec.describe_model()),
    }
}

/// The LoRA layers the model gets: `lora_layers`, capped by its blocks.
fn lora_layers_line(spec: &RunSpec) -> String {
    let (asked, applied) = (spec.settings.lora_layers, spec.lora_layers_applied());
    if applied < asked {
        format!("{applied} LoRA layers (all the model's blocks; {asked} asked)")
    } else {
        format!("{applied} LoRA layers")
    }
}

fn merge(m: &args::MergeArgs) -> anyhow::Result<()> {
    let spec = qlora_scale::train::model::run_spec(&m.run_dir)?;
    let out: PathBuf = m.out.clone().unwrap_or_else(|| m.run_dir.join("merged"));
    let options = MergeOptions {
        base: if m.into_quantized {
            MergeBase::Quantized
        } else {
            MergeBase::Original
        },
        dtype: m.dtype,
    };
    let bar = io::stderr().is_terminal().then(|| {
        ProgressBar::new(0).with_style(
            ProgressStyle::with_template("merging {bar:30} {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    });
    let mut last_tenth = 0;
    let mut progress = |p: MergeProgress<'_>| match &bar {
        Some(bar) => {
            bar.set_length(p.total as u64);
            bar.set_position(p.done as u64);
            bar.set_message(p.name.to_string());
        }
        None => {
            // A line per tenth of the tensors (and the last) off a terminal.
            let tenth = p.done * 10 / p.total.max(1);
            if tenth > last_tenth || p.done == p.total {
                last_tenth = tenth;
                tracing::info!("merging: {}/{} tensors ({})", p.done, p.total, p.name);
            }
        }
    };
    let summary = merging::merge(&spec, &m.run_dir, &out, options, &mut progress)
        .with_context(|| format!("merging {} into {}", m.run_dir.display(), out.display()))?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    tracing::info!(
        "wrote {}: {} tensors ({} with the adapter merged into the {} base), {}",
        summary.weights.display(),
        summary.tensors,
        summary.merged,
        match options.base {
            MergeBase::Original => "original",
            MergeBase::Quantized => "NF4-dequantized",
        },
        summary.torch_dtype
    );
    Ok(())
}

/// Whether `err` is a run stopped on request (every rank stops after the
/// same step; nobody needs to be aborted).
fn stopped(err: &anyhow::Error) -> bool {
    err.chain().any(|e| {
        matches!(
            e.downcast_ref::<TrainError>(),
            Some(TrainError::Stopped { .. })
        )
    })
}

/// Whether `err` is a bad prompt or messages file given to `generate`.
fn bad_input(err: &anyhow::Error) -> bool {
    use qlora_scale::train::generate::{GenerateError, InputError};
    err.chain().any(|e| {
        e.is::<InputError>()
            || e.is::<qlora_scale::train::device::DeviceError>()
            || matches!(e.downcast_ref(), Some(GenerateError::Input(_)))
    })
}

/// SIGINT or SIGTERM: the first stops the run after its current step, with
/// a checkpoint; a second ends the process at once.
fn on_signal() {
    if request_stop() {
        std::process::exit(130);
    }
    let _ = writeln!(
        io::stderr().lock(),
        "stopping after the current step with a checkpoint (again to quit at once)"
    );
}

fn main() -> ExitCode {
    // SAFETY: first thing in `main`, before any other thread exists.
    unsafe { qlora_scale::qlora::kernel::limit_candle_threads() };
    // Each step reuses the pages the last one freed (no fault and zero-fill
    // per page); without glibc this does nothing.
    qlora_scale::alloc_guard::keep_freed_memory();
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
            if stopped(&err) {
                // 128 + SIGINT, as a shell reports an interrupted command.
                ExitCode::from(130)
            } else if bad_input(&err) {
                // As clap reports a bad flag.
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
