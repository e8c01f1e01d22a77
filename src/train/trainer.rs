//! The training loop as a [`Trainer`]: micro-batches, gradient accumulation
//! and clipping, AdamW with warmup + cosine, validation, metrics,
//! checkpoints and resume, on one process or data-parallel over several.
//!
//! A step's gradient is the sum of its token losses' gradients divided by
//! the step's token count, over all its micro-batches and all ranks: how
//! the step's examples are split (batch size, accumulation, ranks) changes
//! nothing but rounding. With N ranks, each global micro-batch is the next
//! `batch_size x N` examples of the seeded epoch order, and rank r trains on
//! its contiguous slice ([`shard_range`]); one all-reduce per step sums the
//! flattened adapter gradients, the loss sums and the token counts
//! ([`super::sync`]). Only rank 0 writes files.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::checkpoint::{self, CheckpointError, CheckpointState};
use super::collective::{Collective, CollectiveError, shard_range};
use super::data::{Batch, Cursor, DataError, Example, TrainData};
use super::device::Compute;
use super::model::{self, ModelError};
use super::optim::{AdamW, AdamWParams, clip_global_norm, lr_at};
use super::plot::loss_svg;
use super::spec::{RunSpec, World};
use super::sync;
use crate::memory::MIB;
use crate::qlora::loss::masked_causal_lm_nll_sum;
use crate::qlora::{FrozenStorage, LlamaModel};
use crate::safe_io::write_atomic;

/// Errors of a run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The model could not be built.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The data could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// A checkpoint could not be written or read.
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    /// A file could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The loss became NaN or infinite.
    #[error(
        "{what} is {value} at step {step}: training stopped; {}{}",
        match .last_good { Some(p) => format!("the last good checkpoint is {}", p.display()), None => "no checkpoint is known good".to_string() },
        match .culprit { Some(p) => format!(" ({} holds the weights that gave it)", p.display()), None => String::new() }
    )]
    NonFinite {
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The step.
        step: u64,
        /// The value.
        value: f64,
        /// The newest checkpoint whose weights gave a finite loss in the
        /// step after it.
        last_good: Option<PathBuf>,
        /// The checkpoint of the step just before, whose weights gave this
        /// value, when there is one.
        culprit: Option<PathBuf>,
    },
    /// The output directory already holds files, and neither `--resume`
    /// nor `--overwrite` was given.
    #[error(
        "{0} is not empty (it holds {1}): pass --resume to continue the run there, --overwrite to replace it, or another --output-dir"
    )]
    OutputInUse(PathBuf, String),
    /// A stop was requested (SIGINT or SIGTERM): the run stopped after a
    /// step, with a checkpoint of it and the adapter written.
    #[error(
        "stopped after step {step}: checkpoint and adapter written; continue with `train --resume --output-dir {}`",
        .dir.display()
    )]
    Stopped {
        /// The last step taken.
        step: u64,
        /// The output directory.
        dir: PathBuf,
    },
    /// `--resume` found nothing usable.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// A Candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The ranks of a data-parallel run could not work together.
    #[error(transparent)]
    Collective(#[from] CollectiveError),
}

/// One optimizer step, as `metrics.jsonl` records it (one JSON object a
/// line) and the plot and progress display read it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Training loss of the step: its summed token losses over all
    /// micro-batches and ranks, divided by its token count.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens of the step (all ranks together).
    pub tokens: u64,
    /// Target tokens per second in this step (all ranks together).
    pub tokens_per_s: f64,
    /// Peak resident memory so far, MiB (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
    /// On a GPU: the most GPU memory this rank's allocations have held so
    /// far, MiB (the CUDA context not counted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_gpu_mib: Option<f64>,
    /// Milliseconds this rank spent in the step's gradient all-reduce (0 in
    /// a single process).
    pub allreduce_ms: f64,
    /// Validation loss, when evaluated at this step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Wall-clock time at the end of the step, RFC 3339 UTC with
    /// milliseconds (`2026-12-06T09:30:00.123Z`); absent in rows written
    /// before timestamps were recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// Seconds the run had been going at the end of the step, counted from
    /// its first start and continued across resumes (the time between a
    /// stop and its resume is not counted).
    #[serde(default)]
    pub elapsed_s: f64,
}

/// What a run did.
#[derive(Clone, Debug)]
pub struct RunSummary {
    /// Steps logged by this process (a resumed run: only the new ones).
    pub steps: Vec<StepLog>,
    /// The step the run resumed from, if it did.
    pub resumed_from: Option<u64>,
    /// Bad data lines skipped.
    pub bad_lines: usize,
    /// Mean target tokens per second over the run.
    pub tokens_per_s: f64,
    /// Peak resident memory, MiB.
    pub peak_rss_mib: f64,
    /// On a GPU: its peak memory, MiB, as [`StepLog::peak_gpu_mib`].
    pub peak_gpu_mib: Option<f64>,
}

/// Hooks for progress display: called after each optimizer step and for
/// notable events (kept out of the library's concern for terminals).
pub trait Observer {
    /// After step `log.step` of `max_steps`.
    fn step(&mut self, log: &StepLog, max_steps: u64);
    /// A message worth showing (checkpoint written, bad lines).
    fn note(&mut self, message: &str);
    /// Something went wrong that the run works around (a corrupt
    /// checkpoint skipped): logged at WARN unless an observer says
    /// otherwise.
    fn warn(&mut self, message: &str) {
        tracing::warn!("{message}");
    }
}

/// An observer that logs through `tracing` only.
#[derive(Debug, Default)]
pub struct TracingObserver;

impl Observer for TracingObserver {
    fn step(&mut self, log: &StepLog, max_steps: u64) {
        tracing::debug!(
            step = log.step,
            max_steps,
            loss = log.loss,
            lr = log.lr,
            "step"
        );
    }
    fn note(&mut self, message: &str) {
        tracing::info!("{message}");
    }
}

static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks every run of this process to stop after its current step, with a
/// checkpoint (the binary calls it on SIGINT or SIGTERM). Returns whether a
/// stop had already been asked for.
pub fn request_stop() -> bool {
    STOP_REQUESTED.swap(true, Ordering::SeqCst)
}

fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Peak resident memory of this process in MiB (`VmHWM`), 0 when unknown.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// A run in progress: the model with its adapters, the optimizer, the
/// position in the data, and the ranks it trains with. Every rank holds
/// one and calls the same methods in the same order.
pub struct Trainer<'c> {
    spec: RunSpec,
    compute: Compute,
    world: World,
    out: PathBuf,
    model: LlamaModel,
    optimizer: AdamW,
    cursor: Cursor,
    data: TrainData,
    collective: &'c dyn Collective,
    /// Optimizer steps taken.
    step: u64,
    tokens_seen: u64,
    /// Every step logged so far, the resumed run's included (rank 0).
    history: Vec<StepLog>,
    /// Some rank was asked to stop: every rank stops after this step.
    stopping: bool,
    /// When this process's part of the run started, and the seconds the
    /// run had already been going then (a resumed run: its checkpoint's).
    started: Instant,
    elapsed_before: f64,
}

impl<'c> Trainer<'c> {
    /// Builds the model and reads the data of `spec`, writing into `out`, as
    /// one rank of `collective` (the ranks check they train the same run on
    /// the same data).
    pub fn new(
        spec: &RunSpec,
        compute: &Compute,
        out: &Path,
        collective: &'c dyn Collective,
        obs: &mut dyn Observer,
    ) -> Result<Self, TrainError> {
        let world = World::of(collective);
        let (model, tok) = model::build_on(spec, compute, FrozenStorage::Nf4)?;
        obs.note(&format!(
            "model ready: {:.0} MiB of frozen weights, peak RSS {:.0} MiB so far",
            model.frozen_bytes() as f64 / MIB,
            peak_rss_mib()
        ));
        let s = &spec.settings;
        let data = TrainData::load(spec.data_dir.as_deref(), &tok, s.seq_len as usize, s.strict)?;
        report_bad_lines(&data, world.is_lead(), obs);
        if world.size > 1 {
            sync::check_same_run(collective, spec, &data.fingerprint())?;
        }
        let optimizer = AdamW::new(
            model.trainable_vars(),
            AdamWParams {
                beta1: spec.adam_betas.0,
                beta2: spec.adam_betas.1,
                eps: spec.adam_eps,
                weight_decay: s.weight_decay,
            },
        )?;
        Ok(Trainer {
            cursor: Cursor::new(data.train.examples.len(), s.seed, 0, 0),
            spec: spec.clone(),
            compute: compute.clone(),
            world,
            out: out.to_path_buf(),
            model,
            optimizer,
            data,
            collective,
            step: 0,
            tokens_seen: 0,
            history: Vec::new(),
            stopping: false,
            started: Instant::now(),
            elapsed_before: 0.0,
        })
    }

    fn checkpoint_dir(&self) -> PathBuf {
        self.out.join(CHECKPOINT_DIR)
    }

    fn metrics_path(&self) -> PathBuf {
        self.out.join(METRICS_FILE)
    }

    /// The steps taken so far.
    pub fn steps_done(&self) -> u64 {
        self.step
    }

    /// Continues from the newest good checkpoint in the output directory
    /// (rank 0 reads it and sends it to the others; corrupt ones are
    /// reported and skipped): adapters, optimizer, data position, and the
    /// metrics of the steps it covers. Returns its step.
    pub fn resume(&mut self, obs: &mut dyn Observer) -> Result<u64, TrainError> {
        let dir = self.checkpoint_dir();
        let (path, ck) = sync::checkpoint_to_resume(self.collective, &dir, obs)?;
        self.resume_from(&path, ck, obs)
    }

    /// [`Trainer::resume`] from the checkpoint `ck` read from `path`.
    pub fn resume_from(
        &mut self,
        path: &Path,
        ck: checkpoint::Checkpoint,
        obs: &mut dyn Observer,
    ) -> Result<u64, TrainError> {
        let path = path.to_path_buf();
        let (theirs, mine) = (&ck.state.spec, &self.spec);
        if theirs.model != mine.model || theirs.settings.lora_rank != mine.settings.lora_rank {
            return Err(TrainError::Resume(format!(
                "{} was written for model {} with rank {}, not {} with rank {}",
                path.display(),
                theirs.model,
                theirs.settings.lora_rank,
                mine.model,
                mine.settings.lora_rank
            )));
        }
        if theirs.architecture != mine.architecture {
            return Err(TrainError::Resume(format!(
                "{} was written for a model of another architecture than {}'s config.json now describes",
                path.display(),
                mine.model
            )));
        }
        self.check_world(&path, &ck.state)?;
        for (name, var) in self.optimizer.vars() {
            let a = ck
                .adapters
                .get(name)
                .ok_or_else(|| TrainError::Resume(format!("{} lacks {name}", path.display())))?;
            var.set(&a.to_device(var.device())?.to_dtype(var.dtype())?)?;
        }
        self.optimizer
            .restore(ck.optimizer())
            .map_err(|why| TrainError::Resume(format!("{}: {why}", path.display())))?;
        let st = &ck.state;
        self.step = st.step;
        self.tokens_seen = st.tokens_seen;
        self.elapsed_before = st.elapsed_s;
        self.cursor = Cursor::new(
            self.data.train.examples.len(),
            self.spec.settings.seed,
            st.epoch,
            st.cursor,
        );
        obs.note(&format!(
            "resumed from {} (step {})",
            path.display(),
            st.step
        ));
        if self.world.is_lead() {
            // Keep the metrics of the steps the checkpoint covers.
            self.history = read_metrics(&self.metrics_path())
                .into_iter()
                .filter(|l| l.step <= st.step)
                .collect();
            // A checkpoint written before it recorded elapsed_s says 0: go on
            // from the metrics' count instead.
            if let Some(last) = self.history.last() {
                self.elapsed_before = self.elapsed_before.max(last.elapsed_s);
            }
        }
        Ok(st.step)
    }

    /// An error when this run can not continue the checkpoint at `path`:
    /// another number of ranks is allowed only with the same global batch
    /// (the data order and every step's examples are then the same).
    fn check_world(&self, path: &Path, ck: &CheckpointState) -> Result<(), TrainError> {
        let ck_world = World {
            size: ck.world_size.max(1),
            ..self.world
        };
        let ck_global = ck_world.global_batch(&ck.spec);
        let global = self.world.global_batch(&self.spec);
        if ck_world.size == self.world.size || ck_global == global {
            return Ok(());
        }
        let (s, cs) = (&self.spec.settings, &ck.spec.settings);
        Err(TrainError::Resume(format!(
            "{} was written by {} rank(s) with a global batch of {ck_global} examples \
             ({} per rank x {} rank(s) x {} accumulation steps), but this run has \
             {} rank(s) and a global batch of {global} ({} x {} x {}): resume with {} rank(s), \
             or choose --batch-size and --grad-accum-steps so that the global batch stays {ck_global}",
            path.display(),
            ck_world.size,
            cs.batch_size,
            ck_world.size,
            cs.grad_accum_steps,
            self.world.size,
            s.batch_size,
            self.world.size,
            s.grad_accum_steps,
            ck_world.size,
        )))
    }

    /// One optimizer step: every micro-batch of this rank's shard, one
    /// all-reduce, clipping, AdamW, and the validation loss when due.
    pub fn step(&mut self) -> Result<StepLog, TrainError> {
        let step = self.step + 1;
        let s = self.spec.settings.clone();
        let t0 = Instant::now();
        let lr = lr_at(
            step,
            s.learning_rate,
            s.warmup_steps,
            s.max_steps,
            self.spec.min_lr_ratio,
        );
        let (grads, loss_sum, tokens) = self.accumulate(step)?;
        let t_reduce = Instant::now();
        // Whether to stop after this step travels with its sums, so that
        // every rank stops after the same step.
        let asked = stop_requested();
        let (mut grads, loss_sum, tokens, stop) = if self.world.size == 1 {
            let n = tokens.max(1) as f64;
            let grads = grads
                .into_iter()
                .map(|(k, g)| Ok((k, (g / n)?)))
                .collect::<candle_core::Result<_>>()?;
            (grads, loss_sum, tokens, asked)
        } else {
            sync::all_reduce_step(
                self.collective,
                self.optimizer.vars(),
                grads,
                loss_sum,
                tokens,
                asked,
            )?
        };
        self.stopping = stop;
        let allreduce_ms = if self.world.size == 1 {
            0.0
        } else {
            t_reduce.elapsed().as_secs_f64() * 1e3
        };
        let loss = loss_sum / tokens.max(1) as f64;
        self.stop_unless_finite("loss", step, loss)?;
        let grad_norm = clip_global_norm(&mut grads, s.grad_clip)?;
        self.stop_unless_finite("gradient norm", step, grad_norm)?;
        self.optimizer.step(&grads, lr)?;
        drop(grads);
        self.step = step;
        self.tokens_seen = self.tokens_seen.saturating_add(tokens);
        let elapsed = t0.elapsed().as_secs_f64();
        let val_loss = if step.is_multiple_of(s.eval_every) || step == s.max_steps {
            self.evaluate()?
        } else {
            None
        };
        Ok(StepLog {
            step,
            loss,
            lr,
            grad_norm,
            tokens,
            tokens_per_s: tokens as f64 / elapsed.max(1e-9),
            peak_rss_mib: peak_rss_mib(),
            peak_gpu_mib: self.compute.gpu_memory_mib().map(|(high, _)| high),
            allreduce_ms,
            val_loss,
            time: Some(humantime::format_rfc3339_millis(SystemTime::now()).to_string()),
            elapsed_s: self.elapsed_s(),
        })
    }

    /// Seconds the run has been going, its resumed part included.
    fn elapsed_s(&self) -> f64 {
        self.elapsed_before + self.started.elapsed().as_secs_f64()
    }

    /// This rank's sums over the step's micro-batches: the gradients of its
    /// summed token losses, the losses, the target tokens.
    fn accumulate(&mut self, step: u64) -> Result<(HashMap<String, Tensor>, f64, u64), TrainError> {
        let s = &self.spec.settings;
        let (rank, world) = (self.world.rank, self.world.size);
        let global_micro = s.batch_size as usize * world;
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let (mut loss_sum, mut tokens) = (0f64, 0u64);
        for micro in 0..s.grad_accum_steps {
            let batch = self.cursor.next_batch(global_micro);
            let shard = &batch[shard_range(batch.len(), rank, world)];
            // `QLORA_SCALE_LOG=qlora_scale::shard=trace` lists every rank's
            // examples (tests/train_mpi.rs checks an epoch with it).
            tracing::trace!(target: "qlora_scale::shard", step, micro, rank, examples = ?shard);
            let mine: Vec<&Example> = shard
                .iter()
                .map(|&i| &self.data.train.examples[i])
                .collect();
            let b = Batch::of(&mine, &self.compute.device).map_err(DataError::from)?;
            let seed = (s.lora_dropout > 0.0).then(|| {
                s.seed
                    ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ micro.wrapping_mul(0xbf58_476d_1ce4_e5b9)
                    ^ (rank as u64).wrapping_mul(0x94d0_49bb_1331_11eb)
            });
            // Forward and backward on one of rayon's threads: each parallel
            // op then splits with the other workers directly, instead of
            // this thread handing it over and sleeping until it is done (a
            // futex wake and sleep per op, thousands per step).
            let model = &self.model;
            let (nll, n, g) = rayon::scope(|_| -> Result<_, TrainError> {
                let logits = model.forward(&b.ids, Some(&b.attention), seed)?;
                let (nll, n) = masked_causal_lm_nll_sum(&logits, &b.ids, &b.targets)?;
                let g = nll.backward()?;
                Ok((nll.to_dtype(DType::F64)?.to_scalar::<f64>()?, n, g))
            })?;
            loss_sum += nll;
            tokens += n as u64;
            for (name, var) in self.optimizer.vars() {
                if let Some(gt) = g.get(var.as_tensor()) {
                    let acc = match grads.remove(name) {
                        Some(prev) => (prev + gt)?,
                        None => gt.clone(),
                    };
                    grads.insert(name.clone(), acc);
                }
            }
        }
        Ok((grads, loss_sum, tokens))
    }

    fn stop_unless_finite(
        &self,
        what: &'static str,
        step: u64,
        value: f64,
    ) -> Result<(), TrainError> {
        if value.is_finite() {
            return Ok(());
        }
        // A checkpoint of step k is good when step k + 1 had a finite
        // loss: every one before the step just taken.
        let mut checkpoints = checkpoint::list(&self.checkpoint_dir());
        let culprit = match checkpoints.last() {
            Some((k, _)) if k + 1 >= step => checkpoints.pop().map(|(_, p)| p),
            _ => None,
        };
        Err(TrainError::NonFinite {
            what,
            step,
            value,
            last_good: checkpoints.pop().map(|(_, p)| p),
            culprit,
        })
    }

    /// Validation loss (token-weighted) over the first `eval_batches` global
    /// batches of `valid.jsonl`, in file order, without dropout and without
    /// a backward pass; each rank evaluates its shard of every batch.
    /// `None` without a validation split.
    pub fn evaluate(&self) -> Result<Option<f64>, TrainError> {
        let Some(valid) = &self.data.valid else {
            return Ok(None);
        };
        let (rank, world) = (self.world.rank, self.world.size);
        let global = self.spec.settings.batch_size as usize * world;
        let (mut sum, mut tokens) = (0f64, 0usize);
        for chunk in valid
            .examples
            .chunks(global)
            .take(self.spec.eval_batches as usize)
        {
            let refs: Vec<&Example> = chunk[shard_range(chunk.len(), rank, world)]
                .iter()
                .collect();
            if refs.is_empty() {
                continue;
            }
            let b = Batch::of(&refs, &self.compute.device).map_err(DataError::from)?;
            // The graph recorded by this forward is dropped with `logits`
            // right away; no gradient is computed.
            let logits = self
                .model
                .forward(&b.ids, Some(&b.attention), None)?
                .detach();
            let (nll, n) = masked_causal_lm_nll_sum(&logits, &b.ids, &b.targets)?;
            sum += nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            tokens += n;
        }
        if world > 1 {
            let mut buf = [sum as f32, tokens as f32];
            self.collective.all_reduce_sum(&mut buf)?;
            (sum, tokens) = (f64::from(buf[0]), buf[1] as usize);
        }
        Ok(Some(if tokens == 0 {
            f64::NAN
        } else {
            sum / tokens as f64
        }))
    }

    /// Writes a checkpoint of the step just taken, prunes old ones, and
    /// exports the adapter (rank 0; other ranks write nothing). Returns the
    /// checkpoint's path.
    pub fn save(&self) -> Result<Option<PathBuf>, TrainError> {
        if !self.world.is_lead() {
            return Ok(None);
        }
        let dir = self.checkpoint_dir();
        let path = checkpoint::checkpoint_path(&dir, self.step);
        let optimizer = self.optimizer.state();
        let state = CheckpointState {
            step: self.step,
            optimizer_t: optimizer.t,
            epoch: self.cursor.epoch(),
            cursor: self.cursor.position(),
            tokens_seen: self.tokens_seen,
            spec: self.spec.clone(),
            world_size: self.world.size,
            elapsed_s: self.elapsed_s(),
        };
        let adapters: Vec<(String, Tensor)> = self
            .optimizer
            .vars()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .collect();
        checkpoint::save(&path, &state, &adapters, &optimizer)?;
        checkpoint::prune(&dir, self.spec.settings.keep_checkpoints as usize)?;
        model::export_adapter(&self.model, &self.spec, &self.out)?;
        Ok(Some(path))
    }

    /// Trains up to `max_steps`: each step is reported to `obs` and appended
    /// to `metrics.jsonl`, a checkpoint is written every `checkpoint_every`
    /// steps and at the end, then the adapter and `loss.svg`.
    pub fn run(mut self, obs: &mut dyn Observer) -> Result<RunSummary, TrainError> {
        let resumed_from = (self.step > 0).then_some(self.step);
        let mut metrics = self.open_metrics()?;
        let max_steps = self.spec.settings.max_steps;
        let (run_start, mut run_tokens) = (Instant::now(), 0u64);
        let mut logs = Vec::new();
        while self.step < max_steps && !self.stopping {
            let log = self.step()?;
            obs.step(&log, max_steps);
            if let Some(file) = &mut metrics {
                let line = serde_json::to_string(&log).unwrap_or_default();
                writeln!(file, "{line}").map_err(write_err(&self.metrics_path()))?;
                self.history.push(log.clone());
            }
            run_tokens += log.tokens;
            logs.push(log);
            let due = self
                .step
                .is_multiple_of(self.spec.settings.checkpoint_every);
            if (due || self.step == max_steps || self.stopping)
                && let Some(path) = self.save()?
            {
                // The plot follows every checkpoint, so a long run's
                // progress can be watched (and a killed run keeps one).
                self.write_plot()?;
                obs.note(&format!(
                    "step {}: checkpoint {}",
                    self.step,
                    path.display()
                ));
            }
        }
        if let Some(mut file) = metrics {
            file.flush().map_err(write_err(&self.metrics_path()))?;
            model::export_adapter(&self.model, &self.spec, &self.out)?;
            self.write_plot()?;
        }
        if self.stopping && self.step < max_steps {
            return Err(TrainError::Stopped {
                step: self.step,
                dir: self.out.clone(),
            });
        }
        let secs = run_start.elapsed().as_secs_f64();
        Ok(RunSummary {
            steps: logs,
            resumed_from,
            bad_lines: self.data.bad_line_count(),
            tokens_per_s: run_tokens as f64 / secs.max(1e-9),
            peak_rss_mib: peak_rss_mib(),
            peak_gpu_mib: self.compute.gpu_memory_mib().map(|(high, _)| high),
        })
    }

    /// Rank 0: creates the checkpoint directory, rewrites `metrics.jsonl`
    /// with the history kept (atomically) and opens it to append.
    fn open_metrics(&self) -> Result<Option<std::fs::File>, TrainError> {
        if !self.world.is_lead() {
            return Ok(None);
        }
        let dir = self.checkpoint_dir();
        std::fs::create_dir_all(&dir).map_err(write_err(&dir))?;
        let path = self.metrics_path();
        let text: String = self
            .history
            .iter()
            .map(|l| serde_json::to_string(l).unwrap_or_default() + "\n")
            .collect();
        write_atomic(&path, text.as_bytes()).map_err(write_err(&path))?;
        let file = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(write_err(&path))?;
        Ok(Some(file))
    }

    /// Writes `loss.svg` (atomically) from the steps logged so far: the
    /// rows of `metrics.jsonl`, a resumed run's earlier ones included.
    fn write_plot(&self) -> Result<(), TrainError> {
        let title = format!("{}: loss by optimizer step", self.spec.describe_model());
        let path = self.out.join(PLOT_FILE);
        write_atomic(&path, loss_svg(&title, &self.history).as_bytes()).map_err(write_err(&path))
    }
}

/// The steps of a `metrics.jsonl` file; lines that do not parse are left
/// out, a missing file is no steps.
pub fn read_metrics(path: &Path) -> Vec<StepLog> {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect()
        })
        .unwrap_or_default()
}

fn report_bad_lines(data: &TrainData, lead: bool, obs: &mut dyn Observer) {
    // Only the first few of each split are kept (`[trainer] bad_lines_shown`).
    for b in data.bad_lines() {
        if lead {
            tracing::warn!("skipped bad line {b}");
        } else {
            tracing::debug!("skipped bad line {b}");
        }
    }
    let bad = data.bad_line_count();
    let shown = data.bad_lines().count();
    if bad > 0 && lead {
        let more = if bad > shown {
            format!(", {} more not shown", bad - shown)
        } else {
            String::new()
        };
        obs.note(&format!(
            "{bad} bad data line(s) skipped (first: {}{more}); --strict makes them fatal",
            data.bad_lines()
                .next()
                .map(ToString::to_string)
                .unwrap_or_default()
        ));
    }
}

/// How a run treats its output directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// A new run: the directory must be absent or empty.
    Fresh,
    /// Continue from the newest good checkpoint there (`--resume`), with
    /// the settings stored in it except those `given` again (on the command
    /// line or in `--config`), which may change only as
    /// [`super::settings::TrainSettings::on_resume`] allows.
    Resume {
        /// The settings the user gave for this run.
        given: Vec<&'static str>,
    },
    /// A new run replacing the one there (`--overwrite`): its checkpoints,
    /// metrics, plot and adapter are deleted first; other files are left.
    Overwrite,
}

/// A run's checkpoints folder, in its output directory.
pub const CHECKPOINT_DIR: &str = "checkpoints";
/// A run's metrics, one `StepLog` a line.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// A run's loss plot.
pub const PLOT_FILE: &str = "loss.svg";

/// The files and folders a run writes in its output directory.
const RUN_FILES: [&str; 5] = [
    CHECKPOINT_DIR,
    METRICS_FILE,
    PLOT_FILE,
    model::ADAPTER_WEIGHTS,
    model::ADAPTER_CONFIG,
];

/// Rank 0's check of the output directory before a run: a fresh run
/// refuses a directory with anything in it (so an earlier run's metrics,
/// adapter and checkpoints are never mixed with a new one's); an overwrite
/// deletes the earlier run's files.
fn prepare_output(out: &Path, start: &Start) -> Result<(), TrainError> {
    match start {
        Start::Resume { .. } => Ok(()),
        Start::Fresh => {
            let Ok(entries) = std::fs::read_dir(out) else {
                return Ok(());
            };
            let names: Vec<String> = entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .take(4)
                .collect();
            if names.is_empty() {
                return Ok(());
            }
            Err(TrainError::OutputInUse(out.to_path_buf(), names.join(", ")))
        }
        Start::Overwrite => {
            for name in RUN_FILES {
                let path = out.join(name);
                let removed = if path.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                match removed {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                        return Err(TrainError::Write { path, source: e });
                    }
                    _ => {}
                }
            }
            Ok(())
        }
    }
}

/// Trains `spec` into `out` as one rank of `collective` (every rank calls
/// it with the same spec); with `resume`, continues from the newest good
/// checkpoint. Only rank 0 writes files and reports through `obs` what a
/// user should see; it first checks the output directory as `start` says.
pub fn train(
    spec: &RunSpec,
    compute: &Compute,
    out: &Path,
    start: Start,
    obs: &mut dyn Observer,
    collective: &dyn Collective,
) -> Result<RunSummary, TrainError> {
    if collective.rank() == 0 {
        prepare_output(out, &start)?;
    }
    let Start::Resume { given } = &start else {
        return Trainer::new(spec, compute, out, collective, obs)?.run(obs);
    };
    let (path, ck) = sync::checkpoint_to_resume(collective, &out.join(CHECKPOINT_DIR), obs)?;
    let (settings, changes) = spec
        .settings
        .on_resume(&ck.state.spec.settings, given)
        .map_err(|e| TrainError::Resume(format!("{}: {e}", path.display())))?;
    for c in &changes {
        obs.note(&format!("resume: {c} (given for this run)"));
    }
    let spec = RunSpec {
        settings,
        ..spec.clone()
    };
    let mut trainer = Trainer::new(&spec, compute, out, collective, obs)?;
    trainer.resume_from(&path, ck, obs)?;
    trainer.run(obs)
}
