//! The memory model: the trainer's peak resident memory, predicted from the
//! model's architecture and the run's shape before anything is loaded, and
//! the nearest configuration that fits a budget.
//!
//! The peak is the larger of two phases:
//! - **loading**: the process, the frozen weights quantized so far, and a
//!   few copies of the tensor being quantized (the loader releases each
//!   tensor's mapped file pages once it is read);
//! - **training**: the process, the frozen weights, the adapters with their
//!   gradients and AdamW moments, what autograd keeps from the forward pass
//!   to the end of backward (every adapted block's graph without
//!   checkpointing, only the block inputs with it; the logits and the
//!   loss's saved values), plus the larger of two transients of the backward
//!   pass: the output head's (the logits' gradient and the dequantized head)
//!   and one block's (its gradients, and with checkpointing its rebuilt
//!   graph).
//!
//! Each term is a count of bytes the architecture fixes (exactly, e.g. the
//! NF4 storage) times a coefficient: how many `f32` copies of that quantity
//! are alive at the peak. The coefficients live in `tables/memory.toml`;
//! `scripts/memory_calibrate.sh` measures the real trainer and
//! `examples/memory_fit.rs` fits them, and `tests/memory_model.rs` checks
//! every recorded measurement against the model.
//!
//! ```
//! use qlora_scale::memory::{Architecture, RunShape, estimate};
//! let arch = Architecture::for_params(7_000_000_000);
//! let run = RunShape { batch: 1, seq_len: 512, lora_rank: 16, lora_layers: 16, grad_checkpoint: true, quantize_embeddings: false };
//! let e = estimate(&arch, &run);
//! // NF4 linears of a 7B model and its bf16 embedding and head are about
//! // 3.8 GiB; the peak adds the rest.
//! assert!(e.weights > 3.5e9 && e.weights < 4.5e9);
//! assert!(e.peak > e.weights);
//! ```

mod known;

use serde::Serialize;

pub use self::known::known_architecture;
use crate::qlora::nf4::nf4_storage_bytes;
use crate::qlora::{LlamaConfig, LoraTarget};
use crate::tables::memory as table;

const F32: f64 = 4.0;
/// Bytes in a MiB.
pub const MIB: f64 = (1u64 << 20) as f64;
/// Bytes in a GiB.
pub const GIB: f64 = (1u64 << 30) as f64;

/// The shape of a Llama-family decoder, as the memory model needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Architecture {
    /// Decoder blocks.
    pub layers: u64,
    /// Model width.
    pub hidden: u64,
    /// SwiGLU width.
    pub intermediate: u64,
    /// Query heads.
    pub heads: u64,
    /// Key/value heads.
    pub kv_heads: u64,
    /// Width of one head.
    pub head_dim: u64,
    /// Vocabulary.
    pub vocab: u64,
    /// `lm_head` shares the embedding matrix.
    pub tied: bool,
    /// Biases on q, k and v (Qwen2).
    pub qkv_bias: bool,
    /// q/k/v and gate/up stored and adapted as one linear each (Phi-3).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub fused_projections: bool,
}

impl Architecture {
    /// The architecture of a `config.json`.
    pub fn from_config(c: &LlamaConfig) -> Self {
        Self {
            layers: c.num_hidden_layers as u64,
            hidden: c.hidden_size as u64,
            intermediate: c.intermediate_size as u64,
            heads: c.num_attention_heads as u64,
            kv_heads: c.kv_heads() as u64,
            head_dim: c.head_width() as u64,
            vocab: c.vocab_size as u64,
            tied: c.tie_word_embeddings,
            qkv_bias: c.has_qkv_bias(),
            fused_projections: c.projections().len() < LoraTarget::ALL.len(),
        }
    }

    /// A plausible architecture for a model known only by its parameter
    /// count: the reference shape of `tables/memory.toml` nearest in size,
    /// with its block count scaled so the total matches.
    pub fn for_params(params: u64) -> Self {
        let target = (params.max(1) as f64).ln();
        let mut a = Self::reference(&table::REFERENCE_SHAPES[0]);
        for s in &table::REFERENCE_SHAPES[1..] {
            let b = Self::reference(s);
            if ((b.params() as f64).ln() - target).abs() < ((a.params() as f64).ln() - target).abs()
            {
                a = b;
            }
        }
        let fixed = a.embedding_params();
        let per_block = a.block_params().max(1);
        let want = params.saturating_sub(fixed);
        a.layers = ((want as f64 / per_block as f64).round() as u64).max(1);
        a
    }

    /// The architecture of a row of `tables/known_models.toml`.
    pub fn from_known(k: &crate::tables::KnownArchitecture) -> Self {
        k.shape
    }

    fn reference(s: &crate::tables::ReferenceShape) -> Self {
        Self {
            layers: s.layers,
            hidden: s.hidden,
            intermediate: s.intermediate,
            heads: s.heads,
            kv_heads: s.kv_heads,
            head_dim: s.hidden / s.heads,
            vocab: s.vocab,
            tied: s.tied,
            qkv_bias: false,
            fused_projections: false,
        }
    }

    /// `(out, in)` of the linears of a block as stored and adapted: the
    /// seven of [`Self::linears`], or with q/k/v and gate/up fused (Phi-3),
    /// which is one LoRA pair each.
    pub fn stored_linears(&self) -> Vec<(u64, u64)> {
        let l = self.linears();
        if !self.fused_projections {
            return l.to_vec();
        }
        vec![
            (l[0].0 + l[1].0 + l[2].0, l[0].1),
            l[3],
            (l[4].0 + l[5].0, l[4].1),
            l[6],
        ]
    }

    /// `(out, in)` of the seven linears of a block: q, k, v, o, gate, up,
    /// down.
    pub fn linears(&self) -> [(u64, u64); 7] {
        let (h, i) = (self.hidden, self.intermediate);
        let q = self.heads * self.head_dim;
        let kv = self.kv_heads * self.head_dim;
        [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    }

    fn block_params(&self) -> u64 {
        let l = self.linears();
        let bias = if self.qkv_bias {
            l[0].0 + l[1].0 + l[2].0
        } else {
            0
        };
        l.iter().map(|(o, i)| o * i).sum::<u64>() + 2 * self.hidden + bias
    }

    fn embedding_params(&self) -> u64 {
        let e = self.vocab * self.hidden;
        e + if self.tied { 0 } else { e } + self.hidden
    }

    /// Parameters of the whole model.
    pub fn params(&self) -> u64 {
        self.embedding_params() + self.layers * self.block_params()
    }
}

/// The settings of a run that decide its memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct RunShape {
    /// Examples per micro-batch.
    pub batch: u64,
    /// Tokens per example (the longest a batch can be).
    pub seq_len: u64,
    /// LoRA rank.
    pub lora_rank: u64,
    /// Blocks with adapters, counted from the last.
    pub lora_layers: u64,
    /// Recompute activations in backward.
    pub grad_checkpoint: bool,
    /// The embedding and the head stored as NF4 (else 16-bit).
    pub quantize_embeddings: bool,
}

/// The byte counts the coefficients multiply: what the architecture and the
/// run fix, before any calibration.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Features {
    /// Frozen weights as the trainer stores them (NF4 linears, 16-bit or
    /// NF4 embedding and head, `f32` norms and biases), exact.
    pub frozen: f64,
    /// One `f32` copy of the trainable adapter parameters.
    pub adapters: f64,
    /// One `f32` copy of the logits, `batch x seq x vocab`.
    pub logits: f64,
    /// One dense `f32` copy of the output head, `vocab x hidden`.
    pub head: f64,
    /// `batch x seq x hidden` `f32` values for each block whose graph
    /// autograd keeps through the whole backward pass (every adapted block
    /// without checkpointing; none with it).
    pub block_hidden: f64,
    /// The same with the SwiGLU width.
    pub block_intermediate: f64,
    /// `batch x heads x seq x seq` `f32` attention scores per such block.
    pub block_attention: f64,
    /// With checkpointing, `batch x seq x hidden` of the one block whose
    /// graph is rebuilt during backward.
    pub recompute_hidden: f64,
    /// The same with the SwiGLU width.
    pub recompute_intermediate: f64,
    /// The same for the attention scores.
    pub recompute_attention: f64,
    /// `batch x seq x hidden` of the one block whose backward runs at a
    /// time (its gradients), when any block is adapted.
    pub backward_hidden: f64,
    /// The same with the SwiGLU width.
    pub backward_intermediate: f64,
    /// The same for the attention scores.
    pub backward_attention: f64,
    /// With checkpointing, the saved input of each adapted block.
    pub checkpoint_hidden: f64,
    /// One `f32` copy of the largest tensor read while loading.
    pub largest_tensor: f64,
}

/// NF4 storage of a tensor of `n` values ([`nf4_storage_bytes`]).
fn nf4_bytes(n: u64) -> u64 {
    nf4_storage_bytes(n as usize) as u64
}

/// The features of `run` on `arch`.
pub fn features(arch: &Architecture, run: &RunShape) -> Features {
    let (h, v) = (arch.hidden, arch.vocab);
    let lora_layers = run.lora_layers.min(arch.layers);
    let linears = arch.linears();
    let stored = arch.stored_linears();
    let block_frozen: u64 = stored.iter().map(|(o, i)| nf4_bytes(o * i)).sum::<u64>()
        + 2 * h * 4
        + if arch.qkv_bias {
            (linears[0].0 + linears[1].0 + linears[2].0) * 4
        } else {
            0
        };
    let embed = if run.quantize_embeddings {
        nf4_bytes(v * h)
    } else {
        v * h * 2
    };
    let frozen = embed + if arch.tied { 0 } else { embed } + h * 4 + arch.layers * block_frozen;
    let adapter_params: u64 = if run.lora_rank == 0 {
        0
    } else {
        lora_layers
            * stored
                .iter()
                .map(|(o, i)| run.lora_rank * (o + i))
                .sum::<u64>()
    };
    let tokens = (run.batch * run.seq_len) as f64;
    let (saved, rebuilt) = if run.grad_checkpoint {
        (0.0, lora_layers.min(1) as f64)
    } else {
        (lora_layers as f64, 0.0)
    };
    let one = lora_layers.min(1) as f64;
    let hidden_bytes = tokens * h as f64 * F32;
    let inter_bytes = tokens * arch.intermediate as f64 * F32;
    let attention_bytes =
        (run.batch * arch.heads) as f64 * (run.seq_len * run.seq_len) as f64 * F32;
    let largest = stored
        .iter()
        .map(|(o, i)| o * i)
        .chain([v * h])
        .max()
        .unwrap_or(0);
    Features {
        frozen: frozen as f64,
        adapters: adapter_params as f64 * F32,
        logits: tokens * v as f64 * F32,
        head: (v * h) as f64 * F32,
        block_hidden: saved * hidden_bytes,
        block_intermediate: saved * inter_bytes,
        block_attention: saved * attention_bytes,
        recompute_hidden: rebuilt * hidden_bytes,
        recompute_intermediate: rebuilt * inter_bytes,
        recompute_attention: rebuilt * attention_bytes,
        backward_hidden: one * hidden_bytes,
        backward_intermediate: one * inter_bytes,
        backward_attention: one * attention_bytes,
        checkpoint_hidden: if run.grad_checkpoint {
            lora_layers as f64 * hidden_bytes
        } else {
            0.0
        },
        largest_tensor: largest as f64 * F32,
    }
}

/// How many copies of each feature are alive at the peak, and the process's
/// own footprint: `tables/memory.toml`, `[coefficients]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Coefficients {
    /// The process without a model (runtime, tokenizer, data), MiB.
    pub runtime_mib: f64,
    /// Copies of the largest tensor while it is read and quantized.
    pub load_tensor: f64,
    /// Copies of the adapters (value, gradient, AdamW moments, checkpoint
    /// buffers).
    pub adapters: f64,
    /// Copies of the logits kept through backward (the logits, the loss's
    /// saved softmax).
    pub logits_forward: f64,
    /// Copies of the logits alive while the head's backward runs (their
    /// gradient).
    pub logits_backward: f64,
    /// Copies of the dense output head.
    pub head: f64,
    /// Copies of `hidden`-wide activations per token per live block.
    pub block_hidden: f64,
    /// Copies of SwiGLU-wide activations per token per live block.
    pub block_intermediate: f64,
    /// Copies of the attention scores per live block.
    pub block_attention: f64,
    /// Copies of each saved block input with checkpointing.
    pub checkpoint_hidden: f64,
    /// Copies of hidden-wide gradients per token of the block in backward.
    pub backward_hidden: f64,
    /// Copies of SwiGLU-wide gradients per token of the block in backward.
    pub backward_intermediate: f64,
    /// Copies of the attention scores' gradients of the block in backward.
    pub backward_attention: f64,
}

impl Coefficients {
    /// The calibrated coefficients of `tables/memory.toml`.
    pub const TABLE: Coefficients = Coefficients {
        runtime_mib: table::RUNTIME_MIB,
        load_tensor: table::LOAD_TENSOR,
        adapters: table::ADAPTERS,
        logits_forward: table::LOGITS_FORWARD,
        logits_backward: table::LOGITS_BACKWARD,
        head: table::HEAD,
        block_hidden: table::BLOCK_HIDDEN,
        block_intermediate: table::BLOCK_INTERMEDIATE,
        block_attention: table::BLOCK_ATTENTION,
        checkpoint_hidden: table::CHECKPOINT_HIDDEN,
        backward_hidden: table::BACKWARD_HIDDEN,
        backward_intermediate: table::BACKWARD_INTERMEDIATE,
        backward_attention: table::BACKWARD_ATTENTION,
    };
}

/// A predicted peak and its parts, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Estimate {
    /// The process without a model.
    pub runtime: f64,
    /// Frozen weights.
    pub weights: f64,
    /// Adapters, gradients, optimizer state.
    pub adapters: f64,
    /// Activations kept for backward (and a rebuilt block's, when that is
    /// the larger transient).
    pub activations: f64,
    /// Logits, the loss's saved values and (when the head's backward is the
    /// larger transient) their gradient.
    pub logits: f64,
    /// The dequantized output head, when the head's backward is the larger
    /// transient.
    pub workspace: f64,
    /// Peak while loading.
    pub load_peak: f64,
    /// Peak while training.
    pub train_peak: f64,
    /// The larger of the two.
    pub peak: f64,
}

impl Estimate {
    /// The same estimate with every part in MiB, to 0.1 MiB (as
    /// `--dry-run --json` prints it).
    pub fn in_mib(&self) -> Estimate {
        let m = |x: f64| (x / MIB * 10.0).round() / 10.0;
        Estimate {
            runtime: m(self.runtime),
            weights: m(self.weights),
            adapters: m(self.adapters),
            activations: m(self.activations),
            logits: m(self.logits),
            workspace: m(self.workspace),
            load_peak: m(self.load_peak),
            train_peak: m(self.train_peak),
            peak: m(self.peak),
        }
    }

    /// The peak in MiB.
    pub fn peak_mib(&self) -> f64 {
        self.peak / MIB
    }

    /// The peak in GiB.
    pub fn peak_gib(&self) -> f64 {
        self.peak / GIB
    }
}

/// The predicted peak of `run` on `arch` with `c`.
pub fn estimate_with(c: &Coefficients, arch: &Architecture, run: &RunShape) -> Estimate {
    let f = features(arch, run);
    let runtime = c.runtime_mib * MIB;
    let adapters = c.adapters * f.adapters;
    // Kept from the forward pass to the end of backward.
    let saved = c.block_hidden * f.block_hidden
        + c.block_intermediate * f.block_intermediate
        + c.block_attention * f.block_attention
        + c.checkpoint_hidden * f.checkpoint_hidden;
    // Two transient peaks during backward: the head's (logits gradient, the
    // dequantized head) and, with checkpointing, a rebuilt block's graph.
    let head_phase = c.logits_backward * f.logits + c.head * f.head;
    let block_phase = c.block_hidden * f.recompute_hidden
        + c.block_intermediate * f.recompute_intermediate
        + c.block_attention * f.recompute_attention
        + c.backward_hidden * f.backward_hidden
        + c.backward_intermediate * f.backward_intermediate
        + c.backward_attention * f.backward_attention;
    let logits = c.logits_forward * f.logits;
    let load_peak = runtime + f.frozen + c.load_tensor * f.largest_tensor;
    let (activations, workspace, logits) = if head_phase >= block_phase {
        (
            saved,
            c.head * f.head,
            logits + c.logits_backward * f.logits,
        )
    } else {
        (saved + block_phase, 0.0, logits)
    };
    let train_peak = runtime + f.frozen + adapters + activations + logits + workspace;
    Estimate {
        runtime,
        weights: f.frozen,
        adapters,
        activations,
        logits,
        workspace,
        load_peak,
        train_peak,
        peak: load_peak.max(train_peak),
    }
}

/// The predicted peak of `run` on `arch` with the table's coefficients.
pub fn estimate(arch: &Architecture, run: &RunShape) -> Estimate {
    estimate_with(&Coefficients::TABLE, arch, run)
}

/// One line of `tests/data/memory_measurements.jsonl`, as
/// `scripts/memory_calibrate.sh` writes it: a configuration and the
/// trainer's measured peaks.
#[derive(Clone, Debug, PartialEq, serde::Deserialize, Serialize)]
pub struct Measurement {
    /// The model's label in the grid.
    pub name: String,
    /// Decoder blocks.
    pub num_hidden_layers: u64,
    /// Width.
    pub hidden_size: u64,
    /// SwiGLU width.
    pub intermediate_size: u64,
    /// Query heads.
    pub num_attention_heads: u64,
    /// Key/value heads.
    pub num_key_value_heads: u64,
    /// Vocabulary.
    pub vocab_size: u64,
    /// Tied embeddings.
    pub tie_word_embeddings: bool,
    /// Micro-batch.
    pub batch_size: u64,
    /// Sequence length (every row filled).
    pub seq_len: u64,
    /// LoRA rank.
    pub lora_rank: u64,
    /// Adapted blocks.
    pub lora_layers: u64,
    /// Checkpointing.
    pub grad_checkpoint: bool,
    /// The embedding and the head stored as NF4: so they were in every run
    /// recorded before 16-bit ones became the default, hence `true` when the
    /// line does not say.
    #[serde(default = "recorded_with_nf4_embeddings")]
    pub quantize_embeddings: bool,
    /// Peak RSS when the model was ready (the median of the runs), MiB.
    pub measured_load_mib: f64,
    /// Peak RSS of each of the runs, MiB.
    #[serde(default)]
    pub measured_peaks_mib: Vec<f64>,
    /// Peak RSS of the whole run (the median of the runs), MiB.
    pub measured_peak_mib: f64,
}

fn recorded_with_nf4_embeddings() -> bool {
    true
}

impl Measurement {
    /// The architecture measured.
    pub fn architecture(&self) -> Architecture {
        Architecture {
            layers: self.num_hidden_layers,
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            kv_heads: self.num_key_value_heads,
            head_dim: self.hidden_size / self.num_attention_heads.max(1),
            vocab: self.vocab_size,
            tied: self.tie_word_embeddings,
            qkv_bias: false,
            fused_projections: false,
        }
    }

    /// The run measured.
    pub fn run(&self) -> RunShape {
        RunShape {
            batch: self.batch_size,
            seq_len: self.seq_len,
            lora_rank: self.lora_rank,
            lora_layers: self.lora_layers,
            grad_checkpoint: self.grad_checkpoint,
            quantize_embeddings: self.quantize_embeddings,
        }
    }

    /// Reads a JSON-lines file of measurements; errors name the line.
    pub fn read_all(path: &std::path::Path) -> Result<Vec<Measurement>, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| {
                serde_json::from_str(l).map_err(|e| format!("{}:{}: {e}", path.display(), i + 1))
            })
            .collect()
    }
}

/// A run's knobs the fit may turn: the run's shape and its gradient
/// accumulation (micro-batch x accumulation is the global batch, which the
/// fit keeps).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct FitConfig {
    /// The run's shape.
    pub run: RunShape,
    /// Micro-batches per optimizer step.
    pub grad_accum: u64,
}

/// One change the fit made, for messages and `--dry-run --json`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "setting", rename_all = "snake_case")]
pub enum FitChange {
    /// Smaller micro-batch, more accumulation: the same global batch.
    BatchSize {
        /// Before.
        from: u64,
        /// After.
        to: u64,
        /// Accumulation after.
        grad_accum_steps: u64,
    },
    /// Fewer adapted blocks.
    LoraLayers {
        /// Before.
        from: u64,
        /// After.
        to: u64,
    },
    /// Shorter sequences.
    SeqLen {
        /// Before.
        from: u64,
        /// After.
        to: u64,
    },
    /// Checkpointing turned on.
    GradCheckpoint,
}

impl std::fmt::Display for FitChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FitChange::BatchSize {
                to,
                grad_accum_steps,
                ..
            } => write!(f, "--batch-size {to} --grad-accum-steps {grad_accum_steps}"),
            FitChange::LoraLayers { to, .. } => write!(f, "--lora-layers {to}"),
            FitChange::SeqLen { to, .. } => write!(f, "--seq-len {to}"),
            FitChange::GradCheckpoint => f.write_str("--grad-checkpoint"),
        }
    }
}

/// The fit's answer: the nearest configuration whose estimate stays under
/// the limit, and what changed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Fitted {
    /// The configuration.
    pub config: FitConfig,
    /// Its estimate.
    pub estimate: Estimate,
    /// What changed, in the fit's order; empty when the run fit as it was.
    pub changes: Vec<FitChange>,
}

/// The largest value of `candidates` (ascending) for which `ok` holds.
fn largest(candidates: &[u64], ok: impl Fn(u64) -> bool) -> Option<u64> {
    candidates.iter().rev().copied().find(|&v| ok(v))
}

/// The nearest configuration to `cfg` whose estimate on `arch` is at most
/// `limit` bytes, or `None` when even the smallest the fit allows is over.
///
/// The knobs, in the order the fit turns them: a smaller micro-batch with
/// more accumulation (the global batch kept: micro-batches divide it), fewer
/// adapted blocks (not below `tables/memory.toml`'s `min_lora_layers`),
/// shorter sequences (multiples of its `min_seq_len`), checkpointing on. A
/// knob is turned only when every earlier one at its smallest is not enough;
/// it is then turned as little as fits, and the earlier ones are given back
/// as much as fits.
///
/// ```
/// use qlora_scale::memory::{Architecture, FitConfig, RunShape, estimate, fit};
/// let arch = Architecture::for_params(1_100_000_000);
/// let run = RunShape { batch: 8, seq_len: 1024, lora_rank: 16, lora_layers: 16, grad_checkpoint: false, quantize_embeddings: false };
/// let cfg = FitConfig { run, grad_accum: 1 };
/// let limit = 0.5 * estimate(&arch, &run).peak;
/// let f = fit(&arch, &cfg, limit).unwrap();
/// assert!(f.estimate.peak <= limit);
/// assert_eq!(f.config.run.batch * f.config.grad_accum, 8);
/// ```
pub fn fit(arch: &Architecture, cfg: &FitConfig, limit: f64) -> Option<Fitted> {
    let orig = *cfg;
    let global = orig.run.batch.max(1) * orig.grad_accum.max(1);
    let batches: Vec<u64> = (1..=orig.run.batch.max(1))
        .filter(|b| global.is_multiple_of(*b))
        .collect();
    let min_layers = crate::tables::memory_fit::MIN_LORA_LAYERS.min(orig.run.lora_layers.max(1));
    let layers: Vec<u64> = (min_layers..=orig.run.lora_layers.max(1)).collect();
    let step = crate::tables::memory_fit::MIN_SEQ_LEN.max(1);
    let mut seqs: Vec<u64> = (1..)
        .map(|k| k * step)
        .take_while(|&s| s < orig.run.seq_len)
        .collect();
    seqs.push(orig.run.seq_len);
    let ckpts: Vec<u64> = if orig.run.grad_checkpoint {
        vec![1]
    } else {
        vec![1, 0]
    };
    // Knob values, ascending by memory; the original is the last.
    let knobs: [&[u64]; 4] = [&batches, &layers, &seqs, &ckpts];
    let shape = |v: [u64; 4]| RunShape {
        batch: v[0],
        lora_layers: v[1],
        seq_len: v[2],
        grad_checkpoint: v[3] == 1,
        lora_rank: orig.run.lora_rank,
        quantize_embeddings: orig.run.quantize_embeddings,
    };
    let fits = |v: [u64; 4]| estimate(arch, &shape(v)).peak <= limit;
    let mut v = knobs.map(|k| *k.last().unwrap_or(&1));
    if !fits(v) {
        let mut found = false;
        for stage in 0..4 {
            for (k, knob) in knobs.iter().enumerate().take(stage + 1) {
                v[k] = knob[0];
            }
            if fits(v) {
                for k in (0..=stage).rev() {
                    v[k] = largest(knobs[k], |x| {
                        let mut w = v;
                        w[k] = x;
                        fits(w)
                    })
                    .unwrap_or(knobs[k][0]);
                }
                found = true;
                break;
            }
        }
        if !found {
            return None;
        }
    }
    let run = shape(v);
    let mut changes = Vec::new();
    if run.batch != orig.run.batch {
        changes.push(FitChange::BatchSize {
            from: orig.run.batch,
            to: run.batch,
            grad_accum_steps: global / run.batch,
        });
    }
    if run.lora_layers != orig.run.lora_layers {
        changes.push(FitChange::LoraLayers {
            from: orig.run.lora_layers,
            to: run.lora_layers,
        });
    }
    if run.seq_len != orig.run.seq_len {
        changes.push(FitChange::SeqLen {
            from: orig.run.seq_len,
            to: run.seq_len,
        });
    }
    if run.grad_checkpoint != orig.run.grad_checkpoint {
        changes.push(FitChange::GradCheckpoint);
    }
    Some(Fitted {
        config: FitConfig {
            run,
            grad_accum: if run.batch == orig.run.batch {
                orig.grad_accum
            } else {
                global / run.batch
            },
        },
        estimate: estimate(arch, &run),
        changes,
    })
}
