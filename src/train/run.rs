//! The training loop: data, micro-batches, gradient accumulation and
//! clipping, AdamW with warmup + cosine, validation, metrics, checkpoints
//! and resume.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::json;

use super::checkpoint::{self, CheckpointError, CheckpointState};
use super::config::TrainConfig;
use super::data::{DataError, Dataset, Example, load_jsonl, parse_jsonl};
use super::model::{self, ModelError};
use super::optim::{AdamW, AdamWParams, clip_global_norm, lr_at};
use super::plot::loss_svg;
use crate::qlora::LlamaModel;
use crate::qlora::loss::masked_causal_lm_loss;
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
}

/// One logged step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepLog {
    /// Optimizer step (1-based).
    pub step: u64,
    /// Mean training loss of the step's micro-batches.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Target tokens per second in this step.
    pub tokens_per_s: f64,
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

    fn next_batch<'a>(&mut self, data: &'a [Example], seed: u64, size: usize) -> Vec<&'a Example> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.pos as usize >= self.order.len() {
                self.epoch += 1;
                self.pos = 0;
                self.order = epoch_order(data.len(), seed, self.epoch);
            }
            out.push(&data[self.order[self.pos as usize]]);
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

/// Mean validation loss over the first `eval_batches` batches of `valid`,
/// in file order, without dropout and without a backward pass.
fn evaluate(model: &LlamaModel, valid: &[Example], cfg: &TrainConfig) -> candle_core::Result<f64> {
    let bs = cfg.batch_size as usize;
    let (mut sum, mut tokens) = (0f64, 0usize);
    for chunk in valid.chunks(bs).take(cfg.eval_batches as usize) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let (ids, att, tgt, n) = batch_tensors(&refs, &Device::Cpu)?;
        // The graph recorded by this forward is dropped with `logits`
        // right away; no gradient is computed.
        let logits = model.forward(&ids, Some(&att), None)?.detach();
        let loss = masked_causal_lm_loss(&logits, &ids, &tgt)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        sum += loss * n as f64;
        tokens += n;
    }
    Ok(if tokens == 0 {
        f64::NAN
    } else {
        sum / tokens as f64
    })
}

/// Loads `train.jsonl` (required) and `valid.jsonl` (optional).
fn load_data(
    cfg: &TrainConfig,
    tok: &super::tokenizer::Tokenizer,
    obs: &mut dyn Observer,
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
            tracing::warn!("skipped bad line {b}");
        }
    }
    let bad = train.bad_lines.len() + valid.as_ref().map_or(0, |v| v.bad_lines.len());
    if bad > 0 {
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

/// The newest checkpoint in `dir` that loads and verifies; corrupt ones are
/// reported through `obs` and skipped.
fn newest_good_checkpoint(
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<Option<(PathBuf, checkpoint::Checkpoint)>, TrainError> {
    for (_, path) in checkpoint::list(dir).into_iter().rev() {
        match checkpoint::load(&path) {
            Ok(ck) => return Ok(Some((path, ck))),
            Err(e) => obs.note(&format!("{e}; trying the previous checkpoint")),
        }
    }
    Ok(None)
}

/// Runs training as `cfg` says; with `resume`, continues from the newest
/// good checkpoint in `cfg.output_dir/checkpoints`.
pub fn train(
    cfg: &TrainConfig,
    resume: bool,
    obs: &mut dyn Observer,
) -> Result<RunSummary, TrainError> {
    let out = &cfg.output_dir;
    let ck_dir = out.join("checkpoints");
    std::fs::create_dir_all(&ck_dir).map_err(write_err(&ck_dir))?;
    let (model, tok) = model::build(cfg)?;
    obs.note(&format!(
        "model ready: {:.0} MiB of frozen weights, peak RSS {:.0} MiB so far",
        model.frozen_bytes() as f64 / (1u64 << 20) as f64,
        peak_rss_mib()
    ));
    let (train, valid) = load_data(cfg, &tok, obs)?;
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
        let Some((path, ck)) = newest_good_checkpoint(&ck_dir, obs)? else {
            return Err(TrainError::Resume(format!(
                "no usable checkpoint in {}",
                ck_dir.display()
            )));
        };
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
        if let Ok(text) = std::fs::read_to_string(&metrics_path) {
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
    write_atomic(&metrics_path, text.as_bytes()).map_err(write_err(&metrics_path))?;
    let mut metrics = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .map_err(write_err(&metrics_path))?;

    let dev = Device::Cpu;
    let mut logs = Vec::new();
    let run_start = Instant::now();
    let mut run_tokens = 0usize;
    let dropout_on = cfg.lora_dropout > 0.0;
    for step in start + 1..=cfg.max_steps {
        let t0 = Instant::now();
        let lr = lr_at(
            step,
            cfg.learning_rate,
            cfg.warmup_steps,
            cfg.max_steps,
            cfg.min_lr_ratio,
        );
        let mut grads: HashMap<String, Tensor> = HashMap::new();
        let mut loss_sum = 0f64;
        let mut step_tokens = 0usize;
        for micro in 0..cfg.grad_accum_steps {
            let batch = cursor.next_batch(&train.examples, cfg.seed, cfg.batch_size as usize);
            let (ids, att, tgt, n) = batch_tensors(&batch, &dev)?;
            step_tokens += n;
            let seed = dropout_on.then(|| {
                cfg.seed
                    ^ step.wrapping_mul(0x9e37_79b9_7f4a_7c15)
                    ^ micro.wrapping_mul(0xbf58_476d_1ce4_e5b9)
            });
            let logits = model.forward(&ids, Some(&att), seed)?;
            let loss = masked_causal_lm_loss(&logits, &ids, &tgt)?;
            let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !value.is_finite() {
                return Err(TrainError::NonFinite {
                    step,
                    loss: value,
                    last_good: checkpoint::list(&ck_dir).pop().map(|(_, p)| p),
                });
            }
            loss_sum += value;
            let g = (loss / cfg.grad_accum_steps as f64)?.backward()?;
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
        let loss = loss_sum / cfg.grad_accum_steps as f64;
        let elapsed = t0.elapsed().as_secs_f64();
        let val_loss = match &valid {
            Some(v) if step % cfg.eval_every == 0 || step == cfg.max_steps => {
                Some(evaluate(&model, &v.examples, cfg)?)
            }
            _ => None,
        };
        let log = StepLog {
            step,
            loss,
            lr,
            grad_norm,
            tokens_per_s: step_tokens as f64 / elapsed.max(1e-9),
            val_loss,
            peak_rss_mib: peak_rss_mib(),
        };
        let mut line = json!({
            "step": step,
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": step_tokens,
            "tokens_per_s": log.tokens_per_s,
            "peak_rss_mib": log.peak_rss_mib,
        });
        if let Some(v) = val_loss {
            line["val_loss"] = json!(v);
        }
        let line = line.to_string();
        writeln!(metrics, "{line}").map_err(write_err(&metrics_path))?;
        text.push_str(&line);
        text.push('\n');
        obs.step(&log, cfg.max_steps);
        logs.push(log);
        if step % cfg.checkpoint_every == 0 || step == cfg.max_steps {
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
    metrics.flush().map_err(write_err(&metrics_path))?;
    model::export_adapter(&model, cfg, out)?;
    write_plot(&text, out)?;
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
