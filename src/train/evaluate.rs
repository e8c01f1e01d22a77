//! Held-out loss (`train eval`): the mean per-token loss and perplexity of
//! the base and of base + adapter on a JSONL file in the training data's
//! format, tokenized as training tokenizes it (the run's sequence length,
//! the model's chat template, loss only on trained tokens). The file is
//! streamed ([`super::data::stream_jsonl`]): one batch of examples is held
//! at a time, and `max_batches` stops reading early. No graph is recorded.

use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Serialize;

use super::data::{BadLine, Batch, DataError, Example, stream_jsonl};
use super::tokenizer::Tokenizer;
use crate::qlora::LlamaModel;
use crate::qlora::loss::masked_causal_lm_nll_sum;
use crate::tables::trainer::EVAL_PROGRESS_BATCHES;

/// How to evaluate.
#[derive(Debug, Clone, Copy)]
pub struct EvalOptions {
    /// Longest sequence, tokens (the run's `seq_len`).
    pub seq_len: usize,
    /// Examples per batch (the run's `batch_size`).
    pub batch_size: usize,
    /// Batches at most; `None`: the whole file.
    pub max_batches: Option<u64>,
    /// Whether the model has an adapter to score beside the base.
    pub adapter: bool,
    /// Bad lines are fatal.
    pub strict: bool,
}

/// Loss and perplexity of one model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Score {
    /// Mean loss per target token, nats.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
}

/// What `train eval` reports.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    /// The file.
    pub data: PathBuf,
    /// The base model.
    pub base: Score,
    /// Base + adapter, when there is an adapter.
    pub adapter: Option<Score>,
    /// Target tokens counted.
    pub tokens: usize,
    /// Examples scored.
    pub examples: usize,
    /// Batches scored.
    pub batches: u64,
    /// Bad lines skipped.
    pub bad_lines: usize,
    /// The first bad lines, as `file:line: why`.
    #[serde(skip)]
    pub first_bad_lines: Vec<BadLine>,
}

/// Errors evaluating.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Reading or tokenizing the file failed.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model failed.
    #[error("scoring a batch of {}", .0.display())]
    Model(PathBuf, #[source] candle_core::Error),
}

/// Running sums of the scored batches.
struct Scorer<'a> {
    model: &'a LlamaModel,
    path: &'a Path,
    options: EvalOptions,
    /// Negative log-likelihood sums: base, adapter.
    nll: (f64, f64),
    tokens: usize,
    examples: usize,
    batches: u64,
}

impl Scorer<'_> {
    fn nll(&self, b: &Batch, adapters: bool) -> candle_core::Result<(f64, usize)> {
        let logits = self
            .model
            .forward_no_grad(&b.ids, Some(&b.attention), adapters)?;
        let (sum, n) = masked_causal_lm_nll_sum(&logits, &b.ids, &b.targets)?;
        Ok((sum.to_dtype(DType::F64)?.to_scalar::<f64>()?, n))
    }

    fn score(&mut self, examples: &[Example]) -> Result<(), EvalError> {
        let refs: Vec<&Example> = examples.iter().collect();
        let b = Batch::of(&refs, self.model.device()).map_err(DataError::from)?;
        let model_err = |e| EvalError::Model(self.path.to_path_buf(), e);
        let (base, n) = self.nll(&b, false).map_err(model_err)?;
        if self.options.adapter {
            self.nll.1 += self.nll(&b, true).map_err(model_err)?.0;
        }
        self.nll.0 += base;
        self.tokens += n;
        self.examples += examples.len();
        self.batches += 1;
        if self.batches.is_multiple_of(EVAL_PROGRESS_BATCHES) {
            tracing::info!(
                "{}: {} batches, {} tokens, base loss {:.4}",
                self.path.display(),
                self.batches,
                self.tokens,
                self.nll.0 / self.tokens.max(1) as f64
            );
        }
        Ok(())
    }

    fn done(&self) -> bool {
        self.options.max_batches.is_some_and(|m| self.batches >= m)
    }
}

fn score_of(nll: f64, tokens: usize) -> Score {
    let loss = if tokens == 0 {
        f64::NAN
    } else {
        nll / tokens as f64
    };
    Score {
        loss,
        perplexity: loss.exp(),
    }
}

/// Scores `path` with `model` (the base, and base + adapter when
/// `options.adapter`).
pub fn evaluate(
    model: &LlamaModel,
    tok: &Tokenizer,
    path: &Path,
    options: EvalOptions,
) -> Result<EvalReport, EvalError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut scorer = Scorer {
        model,
        path,
        options,
        nll: (0.0, 0.0),
        tokens: 0,
        examples: 0,
        batches: 0,
    };
    let batch_size = options.batch_size.max(1);
    let mut pending: Vec<Example> = Vec::with_capacity(batch_size);
    let lines = stream_jsonl(
        path,
        BufReader::new(file),
        tok,
        options.seq_len,
        options.strict,
        |ex| {
            pending.push(ex);
            if pending.len() == batch_size {
                scorer.score(&pending)?;
                pending.clear();
            }
            Ok::<_, EvalError>(!scorer.done())
        },
    )?;
    if !pending.is_empty() && !scorer.done() {
        scorer.score(&pending)?;
    }
    if scorer.examples == 0 {
        return Err(DataError::Empty(path.to_path_buf()).into());
    }
    Ok(EvalReport {
        data: path.to_path_buf(),
        base: score_of(scorer.nll.0, scorer.tokens),
        adapter: options
            .adapter
            .then(|| score_of(scorer.nll.1, scorer.tokens)),
        tokens: scorer.tokens,
        examples: scorer.examples,
        batches: scorer.batches,
        bad_lines: lines.bad_line_count,
        first_bad_lines: lines.bad_lines,
    })
}
