//! The training loop: data, micro-batches, gradient accumulation and
//! clipping, AdamW with warmup + cosine, validation, metrics, checkpoints
//! and resume, on one process or data-parallel over several.
//!
//! A step's gradient is the sum of its token losses' gradients divided by
//! the step's token count, over all its micro-batches and all ranks: how
//! the step's examples are split (batch size, accumulation, ranks) changes
//! nothing but rounding. With N ranks, each global micro-batch is the next
//! `batch_size x N` examples of the seeded epoch order, and rank r trains on
//! its contiguous slice ([`shard_range`]); one all-reduce per step sums the
//! flattened adapter gradients, the loss sums and the token counts. Only
//! rank 0 writes files.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::json;

use super::checkpoint::{self, CheckpointError, CheckpointState};
use super::collective::{Collective, CollectiveError, SingleProcess, shard_range};
use super::config::TrainConfig;
use super::data::{DataError, Dataset, Example, load_jsonl, parse_jsonl};
use super::model::{self, ModelError};
use super::optim::{AdamW, AdamWParams, clip_global_norm, lr_at};
use super::plot::loss_svg;
use crate::qlora::LlamaModel;
use crate::qlora::loss::masked_causal_lm_nll_sum;
use crate::storage::write_atomic;

/// The default corpus's training split (`data/default/train.jsonl`), built
/// into the binary and used without `--data-dir`.
pub const DEFAULT_TRAIN_JSONL: &[u8] = include_bytes!("../../data/default/train.jsonl");
/// The default corpus's validation split (`data/default/valid.jsonl`).
pub const DEFAULT_VALID_JSONL: &[u8] = include_bytes!("../../data/default/valid.jsonl");

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
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The loss became NaN or infinite.
    #[error(
        "loss is {loss} at step {step}: training stopped; {}",
        match .last_good { Some(p) => format!("the last good checkpoint is {}", p.display()), None => "no checkpoint was written yet".to_string() }
    )]
    NonFinite {
        /// The step.
        step: u64,
        /// The loss.
        loss: f64,
        /// The newest checkpoint on disk.
        last_good: Option<PathBuf>,
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

/// One logged step.
#[derive(Clone, Debug, PartialEq)]
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
    /// Target tokens per second in this step (all ranks together).
    pub tokens_per_s: f64,
    /// Milliseconds this rank spent in the step's gradient all-reduce (0 in
    /// a single process).
    pub allreduce_ms: f64,
    /// Validation loss, when evaluated at this step.
    pub val_loss: Option<f64>,
    /// Peak resident memory so far, MiB (Linux; 0 elsewhere).
    pub peak_rss_mib: f64,
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
}

/// Hooks for progress display: called after each optimizer step and for
/// notable events (kept out of the library's concern for terminals).
pub trait Observer {
    /// After step `log.step` of `max_steps`.
    fn step(&mut self, log: &StepLog, max_steps: u64);
    /// A message worth showing (checkpoint written, corrupt checkpoint
    /// skipped, bad lines).
    fn note(&mut self, message: &str);
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

/// The shuffled order of epoch `epoch`: a function of the seed and the
/// epoch only, so a resumed run sees the same order.
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    order.shuffle(&mut rng);
    order
}

/// The position in the shuffled training data.
#[derive(Clone, Debug)]
struct Cursor {
    epoch: u64,
    pos: u64,
    order: Vec<usize>,
}

impl Cursor {
    fn new(n: usize, seed: u64, epoch: u64, pos: u64) -> Self {
        Self {
            epoch,
            pos,
            order: epoch_order(n, seed, epoch),
        }
    }

    /// The indices (into the `n` examples) of the next `size` examples.
    fn next_batch(&mut self, n: usize, seed: u64, size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.pos as usize >= self.order.len() {
                self.epoch += 1;
                self.pos = 0;
                self.order = epoch_order(n, seed, self.epoch);
            }
            out.push(self.order[self.pos as usize]);
            self.pos += 1;
        }
        out
    }
}

/// `(ids, attention mask, loss mask, target tokens)` of a right-padded batch.
fn batch_tensors(
    batch: &[&Example],
    dev: &Device,
) -> candle_core::Result<(Tensor, Tensor, Tensor, usize)> {
    let t = batch.iter().map(|e| e.ids.len()).max().unwrap_or(1).max(2);
    let b = batch.len();
    let mut ids = vec![0u32; b * t];
    let mut att = vec![0u8; b * t];
    let mut tgt = vec![0f32; b * t];
    let mut n = 0;
    for (i, e) in batch.iter().enumerate() {
        for (j, (&id, &m)) in e.ids.iter().zip(&e.targets).enumerate() {
            ids[i * t + j] = id;
            att[i * t + j] = 1;
            if j > 0 && m != 0 {
                tgt[i * t + j] = 1.0;
                n += 1;
            }
        }
    }
    Ok((
        Tensor::from_vec(ids, (b, t), dev)?,
        Tensor::from_vec(att, (b, t), dev)?,
        Tensor::from_vec(tgt, (b, t), dev)?,
        n,
    ))
}

/// Validation loss (token-weighted) over the first `eval_batches` global
/// batches of `valid`, in file order, without dropout and without a
/// backward pass; each rank evaluates its shard of every batch.
fn evaluate(
    model: &LlamaModel,
    valid: &[Example],
    cfg: &TrainConfig,
    coll: &dyn Collective,
) -> Result<f64, TrainError> {
    let (rank, world) = (coll.rank(), coll.world_size());
    let global = cfg.batch_size as usize * world;
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in valid.chunks(global).take(cfg.eval_batches as usize) {
        let refs: Vec<&Example> = chunk[shard_range(chunk.len(), rank, world)]
            .iter()
            .collect();
        if refs.is_empty() {
            continue;
        }
        let (ids, att, tgt, _) = batch_tensors(&refs, &Device::Cpu)?;
        // The graph recorded by this forward is dropped with `logits`
        // right away; no gradient is computed.
        let logits = model.forward(&ids, Some(&att), None)?.detach();
        let (nll, n) = masked_causal_lm_nll_sum(&logits, &ids, &tgt)?;
        sum += nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        tokens += n;
    }
    if world > 1 {
        let mut buf = [sum as f32, tokens as f32];
        coll.all_reduce_sum(&mut buf)?;
        (sum, tokens) = (buf[0] as f64, buf[1] as usize);
    }
    Ok(if tokens == 0 {
        f64::NAN
    } else {
        sum / tokens as f64
    })
}

/// Appends the gradients of `vars` to `flat` in order, as `f32`, zeros for
/// a variable that has none.
fn flatten_grads(
    vars: &[(String, Var)],
    grads: &HashMap<String, Tensor>,
    flat: &mut Vec<f32>,
) -> candle_core::Result<()> {
    for (name, var) in vars {
        match grads.get(name) {
            Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0f32, var.elem_count())),
        }
    }
    Ok(())
}

/// The gradients of `vars` from the front of `flat` (the inverse of
/// [`flatten_grads`]), each divided by `divisor`.
fn unflatten_grads(
    vars: &[(String, Var)],
    flat: &[f32],
    divisor: f64,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut grads = HashMap::with_capacity(vars.len());
    let mut at = 0;
    for (name, var) in vars {
        let n = var.elem_count();
        let Some(piece) = flat.get(at..at + n) else {
            candle_core::bail!("gradient buffer too short for {name}");
        };
        let g = (Tensor::from_slice(piece, var.shape(), var.device())?.to_dtype(var.dtype())?
            / divisor)?;
        grads.insert(name.clone(), g);
        at += n;
    }
    Ok(grads)
}

/// Configuration keys that may differ between the ranks of one run: the
/// rank itself, and what each process found about its own machine.
const RANK_LOCAL_KEYS: [&str; 9] = [
    "rank",
    "profile_source",
    "hardware_source",
    "hardware",
    "base_profile",
    "scaled_profile",
    "scaled",
    "value_sources",
    "output_dir",
];

/// Checks that every rank trains the same run on the same data as rank 0:
/// rank 0 sends its configuration and a fingerprint of its training data.
fn check_same_run(
    coll: &dyn Collective,
    cfg: &TrainConfig,
    train: &[Example],
) -> Result<(), TrainError> {
    let mut crc = crc32fast::Hasher::new();
    for e in train {
        crc.update(&(e.ids.len() as u64).to_le_bytes());
        for (&id, &m) in e.ids.iter().zip(&e.targets) {
            crc.update(&id.to_le_bytes());
            crc.update(&[u8::from(m != 0)]);
        }
    }
    let mut mine = serde_json::to_value(cfg).unwrap_or_default();
    if let Some(map) = mine.as_object_mut() {
        for key in RANK_LOCAL_KEYS {
            map.shift_remove(key);
        }
        map.insert(
            "training data".into(),
            json!(format!(
                "{} examples, CRC-32 {:08x}",
                train.len(),
                crc.finalize()
            )),
        );
    }
    let text = mine.to_string();
    let mut theirs = text.clone().into_bytes();
    coll.broadcast(0, &mut theirs)?;
    if theirs == text.as_bytes() {
        return Ok(());
    }
    let theirs: serde_json::Value = serde_json::from_slice(&theirs).unwrap_or_default();
    let differ: Vec<String> = mine
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| theirs.get(k.as_str()) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{k} is {} on rank 0 but {v} here",
                theirs.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect();
    Err(CollectiveError::Mismatch {
        rank: coll.rank(),
        what: if differ.is_empty() {
            "the configurations differ".to_string()
        } else {
            differ.join("; ")
        },
    }
    .into())
}

/// Loads `train.jsonl` (required) and `valid.jsonl` (optional).
fn load_data(
    cfg: &TrainConfig,
    tok: &super::tokenizer::Tokenizer,
    obs: &mut dyn Observer,
    lead: bool,
) -> Result<(Dataset, Option<Dataset>), TrainError> {
    let seq = cfg.seq_len as usize;
    let (train, valid) = match &cfg.data_dir {
        Some(dir) => {
            let train = load_jsonl(&dir.join("train.jsonl"), tok, seq, cfg.strict)?;
            let valid_path = dir.join("valid.jsonl");
            let valid = if valid_path.is_file() {
                Some(load_jsonl(&valid_path, tok, seq, cfg.strict)?)
            } else {
                None
            };
            (train, valid)
        }
        // The default corpus is built into the binary, so `train` runs from
        // any directory.
        None => {
            let train = parse_jsonl(
                Path::new("data/default/train.jsonl"),
                DEFAULT_TRAIN_JSONL,
                tok,
                seq,
                cfg.strict,
            )?;
            let valid = parse_jsonl(
                Path::new("data/default/valid.jsonl"),
                DEFAULT_VALID_JSONL,
                tok,
                seq,
                cfg.strict,
            )?;
            (train, Some(valid))
        }
    };
    for d in std::iter::once(&train).chain(valid.as_ref()) {
        for b in &d.bad_lines {
            if lead {
                tracing::warn!("skipped bad line {b}");
            } else {
                tracing::debug!("skipped bad line {b}");
            }
        }
    }
    let bad = train.bad_lines.len() + valid.as_ref().map_or(0, |v| v.bad_lines.len());
    if bad > 0 && lead {
        obs.note(&format!(
            "{bad} bad data line(s) skipped (first: {}); --strict makes them fatal",
            train
                .bad_lines
                .first()
                .or(valid.as_ref().and_then(|v| v.bad_lines.first()))
                .map(ToString::to_string)
                .unwrap_or_default()
        ));
    }
    if train.examples.is_empty() {
        let train_path = match &cfg.data_dir {
            Some(dir) => dir.join("train.jsonl"),
            None => PathBuf::from("data/default/train.jsonl"),
        };
        return Err(DataError::Empty(train_path).into());
    }
    Ok((train, valid))
}

fn write_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// The newest checkpoint in `dir` that loads and verifies, with its bytes;
/// corrupt ones are reported through `obs` and skipped.
fn newest_good_checkpoint(
    dir: &Path,
    obs: &mut dyn Observer,
) -> Option<(PathBuf, Vec<u8>, checkpoint::Checkpoint)> {
    for (_, path) in checkpoint::list(dir).into_iter().rev() {
        match std::fs::read(&path)
            .map_err(|source| CheckpointError::Io {
                path: path.clone(),
                source,
            })
            .and_then(|bytes| checkpoint::parse(&path, &bytes).map(|ck| (bytes, ck)))
        {
            Ok((bytes, ck)) => return Some((path, bytes, ck)),
            Err(e) => obs.note(&format!("{e}; trying the previous checkpoint")),
        }
    }
    None
}

/// The checkpoint to resume from: rank 0 picks the newest good one in
/// `dir` and sends it to the other ranks, which need no access to `dir`.
fn checkpoint_to_resume(
    coll: &dyn Collective,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<(PathBuf, checkpoint::Checkpoint), TrainError> {
    let found = if coll.rank() == 0 {
        newest_good_checkpoint(dir, obs)
    } else {
        None
    };
    let none = || TrainError::Resume(format!("no usable checkpoint in {}", dir.display()));
    if coll.world_size() == 1 {
        return found.map(|(p, _, ck)| (p, ck)).ok_or_else(none);
    }
    let (mut name, mut bytes, ck) = match found {
        Some((p, bytes, ck)) => (
            p.to_string_lossy().into_owned().into_bytes(),
            bytes,
            Some(ck),
        ),
        None => (Vec::new(), Vec::new(), None),
    };
    coll.broadcast(0, &mut name)?;
    if name.is_empty() {
        return Err(none());
    }
    coll.broadcast(0, &mut bytes)?;
    let path = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
    match ck {
        Some(ck) => Ok((path, ck)),
        None => {
            let ck = checkpoint::parse(&path, &bytes)?;
            Ok((path, ck))
        }
    }
}

/// Runs training as `cfg` says in this process alone; with `resume`,
/// continues from the newest good checkpoint in `cfg.output_dir/checkpoints`.
pub fn train(
    cfg: &TrainConfig,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<RunSummary, TrainError> {
    train_on(cfg, resume, obs, &SingleProcess)
}

/// The world size and global batch a checkpoint was written with, and an
/// error when this run can not continue it: another world size is allowed
/// only with the same global batch (the data order and every step's
/// examples are then the same).
fn check_world(path: &Path, ck: &TrainConfig, cfg: &TrainConfig) -> Result<(), TrainError> {
    let ck_world = ck.world_size.max(1);
    let ck_global = ck.batch_size as u64 * ck_world as u64 * ck.grad_accum_steps;
    if ck_world == cfg.world_size || ck_global == cfg.global_batch_size {
        return Ok(());
    }
    Err(TrainError::Resume(format!(
        "{} was written by {ck_world} rank(s) with a global batch of {ck_global} examples \
         ({} per rank x {ck_world} rank(s) x {} accumulation steps), but this run has \
         {} rank(s) and a global batch of {} ({} x {} x {}): resume with {ck_world} rank(s), \
         or choose --batch-size and --grad-accum-steps so that the global batch stays {ck_global}",
        path.display(),
        ck.batch_size,
        ck.grad_accum_steps,
        cfg.world_size,
        cfg.global_batch_size,
        cfg.batch_size,
        cfg.world_size,
        cfg.grad_accum_steps,
    )))
}

/// Runs training as `cfg` says as one rank of `coll` (every rank calls it
/// with the same configuration); with `resume`, continues from the newest
/// good checkpoint in `cfg.output_dir/checkpoints`, which rank 0 reads and
/// sends to the others. Only rank 0 writes files and reports through `obs`
/// what a user should see.
pub fn train_on(
    cfg: &TrainConfig,
    resume: bool,
    obs: &mut dyn Observer,
    coll: &dyn Collective,
) -> Result<RunSummary, TrainError> {
    let (rank, world) = (coll.rank(), coll.world_size());
    let cfg = &cfg
        .clone()
        .for_rank(coll.backend(), rank as u32, world as u32);
    let lead = rank == 0;
    let out = &cfg.output_dir;
    let ck_dir = out.join("checkpoints");
    if lead {
        std::fs::create_dir_all(&ck_dir).map_err(write_err(&ck_dir))?;
    }
    let (model, tok) = model::build(cfg)?;
    obs.note(&format!(
        "model ready: {:.0} MiB of frozen weights, peak RSS {:.0} MiB so far",
        model.frozen_bytes() as f64 / (1u64 << 20) as f64,
        peak_rss_mib()
    ));
    let (train, valid) = load_data(cfg, &tok, obs, lead)?;
    if world > 1 {
        check_same_run(coll, cfg, &train.examples)?;
    }
    let bad_lines = train.bad_lines.len() + valid.as_ref().map_or(0, |v| v.bad_lines.len());
    let vars = model.trainable_vars();
    let mut opt = AdamW::new(
        vars.clone(),
        AdamWParams {
            beta1: cfg.adam_betas.0,
            beta2: cfg.adam_betas.1,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
        },
    )?;
    let mut start = 0u64;
    let mut cursor = Cursor::new(train.examples.len(), cfg.seed, 0, 0);
    let mut tokens_seen = 0u64;
    let mut resumed_from = None;
    let metrics_path = out.join("metrics.jsonl");
    let mut history: Vec<String> = Vec::new();
    if resume {
        let (path, ck) = checkpoint_to_resume(coll, &ck_dir, obs)?;
        if ck.state.config.model != cfg.model || ck.state.config.lora_rank != cfg.lora_rank {
            return Err(TrainError::Resume(format!(
                "{} was written for model {} with rank {}, not {} with rank {}",
                path.display(),
                ck.state.config.model,
                ck.state.config.lora_rank,
                cfg.model,
                cfg.lora_rank
            )));
        }
        check_world(&path, &ck.state.config, cfg)?;
        for (name, var) in &vars {
            let (Some(a), Some(m), Some(v)) =
                (ck.adapters.get(name), ck.m.get(name), ck.v.get(name))
            else {
                return Err(TrainError::Resume(format!(
                    "{} lacks {name}",
                    path.display()
                )));
            };
            var.set(a)?;
            opt.m.insert(name.clone(), m.clone());
            opt.v.insert(name.clone(), v.clone());
        }
        opt.t = ck.state.optimizer_t;
        start = ck.state.step;
        tokens_seen = ck.state.tokens_seen;
        cursor = Cursor::new(
            train.examples.len(),
            cfg.seed,
            ck.state.epoch,
            ck.state.cursor,
        );
        resumed_from = Some(start);
        obs.note(&format!("resumed from {} (step {start})", path.display()));
        // Keep the metrics of the steps the checkpoint covers.
        if let (true, Ok(text)) = (lead, std::fs::read_to_string(&metrics_path)) {
            history = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= start)
                })
                .map(str::to_string)
                .collect();
        }
    }
    let mut text: String = history.iter().map(|l| format!("{l}\n")).collect();
    let mut metrics = if lead {
        write_atomic(&metrics_path, text.as_bytes()).map_err(write_err(&metrics_path))?;
        Some(
            std::fs::OpenOptions::new()
                .append(true)
                .open(&metrics_path)
                .map_err(write_err(&metrics_path))?,
        )
    } else {
        None
    };

    let dev = Device::Cpu;
    let mut logs = Vec::new();
    let run_start = Instant::now();
    let mut run_tokens = 0usize;
    let dropout_on = cfg.lora_dropout > 0.0;
    let global_micro = cfg.batch_size as usize * world;
    let grad_len: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    for step in start + 1..=cfg.max_steps {
        let t0 = Instant::now();
        let lr = lr_at(
            step,
            cfg.learning_rate,
            cfg.warmup_steps,
            cfg.max_steps,
            cfg.min_lr_ratio,
        );
        // This rank's sums: gradients of its summed token losses, the
        // losses, the target tokens.
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0f64;
        let mut step_tokens = 0usize;
        for micro in 0..cfg.grad_accum_steps {
            let batch = cursor.next_batch(train.examples.len(), cfg.seed, global_micro);
            let shard = &batch[shard_range(batch.len(), rank, world)];
            // `QLORA_SCALE_LOG=qlora_scale::shard=trace` lists every rank's
            // examples (tests/train_mpi.rs checks an epoch with it).
            tracing::trace!(target: "qlora_scale::shard", step, micro, rank, examples = ?shard);
            let mine: Vec<&Example> = shard.iter().map(|&i| &train.examples[i]).collect();
            let (ids, att, tgt, _) = batch_tensors(&mine, &dev)?;
            let seed = dropout_on.then(|| {
                cfg.seed
                    ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ micro.wrapping_mul(0xbf58_476d_1ce4_e5b9)
                    ^ (rank as u64).wrapping_mul(0x94d0_49bb_1331_11eb)
            });
            let logits = model.forward(&ids, Some(&att), seed)?;
            let (nll, n) = masked_causal_lm_nll_sum(&logits, &ids, &tgt)?;
            loss_sum += nll.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            step_tokens += n;
            let g = nll.backward()?;
            for (name, var) in &vars {
                if let Some(gt) = g.get(var.as_tensor()) {
                    let acc = match grads.remove(name) {
                        Some(prev) => (prev + gt)?,
                        None => gt.clone(),
                    };
                    grads.insert(name.clone(), acc);
                }
            }
        }
        // One all-reduce: every rank's gradients, loss sum and token count.
        let t_reduce = Instant::now();
        let (mut grads, loss_sum, step_tokens) = if world == 1 {
            let n = step_tokens.max(1) as f64;
            for g in grads.values_mut() {
                *g = (&*g / n)?;
            }
            (grads, loss_sum, step_tokens)
        } else {
            let mut flat = Vec::with_capacity(grad_len + 2);
            flatten_grads(&vars, &grads, &mut flat)?;
            drop(grads);
            // Token counts are exact in f32 up to 2^24 per step.
            flat.extend([loss_sum as f32, step_tokens as f32]);
            coll.all_reduce_sum(&mut flat)?;
            let tokens = flat[grad_len + 1].round() as usize;
            let grads = unflatten_grads(&vars, &flat, tokens.max(1) as f64)?;
            (grads, flat[grad_len] as f64, tokens)
        };
        let allreduce_ms = if world == 1 {
            0.0
        } else {
            t_reduce.elapsed().as_secs_f64() * 1e3
        };
        let loss = loss_sum / step_tokens.max(1) as f64;
        if !loss.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                loss,
                last_good: checkpoint::list(&ck_dir).pop().map(|(_, p)| p),
            });
        }
        let grad_norm = clip_global_norm(&mut grads, cfg.grad_clip)?;
        if !grad_norm.is_finite() {
            return Err(TrainError::NonFinite {
                step,
                loss: grad_norm,
                last_good: checkpoint::list(&ck_dir).pop().map(|(_, p)| p),
            });
        }
        opt.step(&grads, lr)?;
        drop(grads);
        tokens_seen += step_tokens as u64;
        run_tokens += step_tokens;
        let elapsed = t0.elapsed().as_secs_f64();
        let val_loss = match &valid {
            Some(v) if step % cfg.eval_every == 0 || step == cfg.max_steps => {
                Some(evaluate(&model, &v.examples, cfg, coll)?)
            }
            _ => None,
        };
        let log = StepLog {
            step,
            loss,
            lr,
            grad_norm,
            tokens_per_s: step_tokens as f64 / elapsed.max(1e-9),
            allreduce_ms,
            val_loss,
            peak_rss_mib: peak_rss_mib(),
        };
        obs.step(&log, cfg.max_steps);
        if let Some(metrics) = &mut metrics {
            let mut line = json!({
                "step": step,
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step_tokens,
                "tokens_per_s": log.tokens_per_s,
                "peak_rss_mib": log.peak_rss_mib,
                "allreduce_ms": allreduce_ms,
            });
            if let Some(v) = val_loss {
                line["val_loss"] = json!(v);
            }
            let line = line.to_string();
            writeln!(metrics, "{line}").map_err(write_err(&metrics_path))?;
            text.push_str(&line);
            text.push('\n');
        }
        logs.push(log);
        if lead && (step % cfg.checkpoint_every == 0 || step == cfg.max_steps) {
            let path = checkpoint::checkpoint_path(&ck_dir, step);
            let state = CheckpointState {
                step,
                optimizer_t: opt.t,
                epoch: cursor.epoch,
                cursor: cursor.pos,
                tokens_seen,
                config: cfg.clone(),
            };
            let adapters: Vec<(String, Tensor)> = vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
                .collect();
            checkpoint::save(&path, &state, &adapters, &opt.m, &opt.v)?;
            checkpoint::prune(&ck_dir, cfg.keep_checkpoints as usize)?;
            model::export_adapter(&model, cfg, out)?;
            obs.note(&format!("step {step}: checkpoint {}", path.display()));
        }
    }
    if let Some(mut metrics) = metrics {
        metrics.flush().map_err(write_err(&metrics_path))?;
        model::export_adapter(&model, cfg, out)?;
        write_plot(&text, out)?;
    }
    let secs = run_start.elapsed().as_secs_f64();
    Ok(RunSummary {
        steps: logs,
        resumed_from,
        bad_lines,
        tokens_per_s: run_tokens as f64 / secs.max(1e-9),
        peak_rss_mib: peak_rss_mib(),
    })
}

/// Writes `loss.svg` from the metrics lines.
fn write_plot(metrics: &str, out: &Path) -> Result<(), TrainError> {
    let mut train = Vec::new();
    let mut valid = Vec::new();
    for l in metrics.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
            continue;
        };
        let Some(step) = v["step"].as_u64() else {
            continue;
        };
        if let Some(loss) = v["loss"].as_f64() {
            train.push((step, loss));
        }
        if let Some(loss) = v["val_loss"].as_f64() {
            valid.push((step, loss));
        }
    }
    let path = out.join("loss.svg");
    write_atomic(&path, loss_svg(&train, &valid).as_bytes()).map_err(write_err(&path))
}
