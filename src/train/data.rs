//! Training data: JSON Lines files of records, tokenized into examples with
//! a per-token loss mask.
//!
//! Each line is one of
//! - `{"text": "..."}`: loss on every token;
//! - `{"prompt": "...", "completion": "..."}`: loss on the completion only;
//! - `{"messages": [{"role": "...", "content": "..."}, ...]}`: the model's
//!   chat template, loss on the assistant turns only.
//!
//! A conversation is written with the model's own Jinja `chat_template`
//! from `tokenizer_config.json` when it has one ([`super::chat`]): loss on
//! each assistant reply (what the template adds after its header for the
//! turn, end-of-turn tokens included). Without one (the embedded model, or a
//! tokenizer without a template) the default template writes each message as
//!
//! ```text
//! <|ROLE|>\nCONTENT\n
//! ```
//!
//! and ends an assistant turn with the EOS token. Every example starts with
//! BOS and text/completion examples end with EOS, when the tokenizer has
//! them. Sequences are truncated to the run's `seq_len`; an example left
//! with no target token is skipped.
//!
//! A line that is not valid JSON or not one of the shapes above is reported
//! with its file and line number, skipped and counted (or fatal with
//! `strict`). Empty lines are ignored.
//!
//! ```
//! use qlora_scale::train::data::{Record, parse_line};
//! let r = parse_line(r#"{"prompt": "2+2=", "completion": "4"}"#).unwrap();
//! assert!(matches!(r, Record::PromptCompletion { .. }));
//! assert!(parse_line(r#"{"txt": "typo"}"#).is_err());
//! ```

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use super::tokenizer::{Tokenizer, TokenizerError};

/// The default corpus's training split (`data/default/train.jsonl`), built
/// into the binary and used without `--data-dir`.
pub const DEFAULT_TRAIN_JSONL: &[u8] = include_bytes!("../../data/default/train.jsonl");
/// The default corpus's validation split (`data/default/valid.jsonl`).
pub const DEFAULT_VALID_JSONL: &[u8] = include_bytes!("../../data/default/valid.jsonl");

/// One record of a JSONL file.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Record {
    /// Plain text.
    Text {
        /// The text.
        text: String,
    },
    /// A prompt and its completion.
    PromptCompletion {
        /// Not trained on.
        prompt: String,
        /// Trained on.
        completion: String,
    },
    /// A conversation.
    Messages {
        /// The turns.
        messages: Vec<Message>,
    },
}

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Message {
    /// `system`, `user`, `assistant`, ...
    pub role: String,
    /// The text.
    pub content: String,
}

/// A tokenized example.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Example {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 where the token is a target of the loss.
    pub targets: Vec<u8>,
}

/// A bad line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {message}", .path.display())]
pub struct BadLine {
    /// The file.
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// What is wrong.
    pub message: String,
}

/// Errors reading data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A bad line with `strict`.
    #[error("{0} (--strict makes bad lines fatal)")]
    Strict(BadLine),
    /// Tokenizing failed.
    #[error("{}:{line}", .path.display())]
    Tokenize {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// Why.
        source: TokenizerError,
    },
    /// No usable example.
    #[error("{0}: no usable examples")]
    Empty(PathBuf),
    /// Building a batch's tensors failed.
    #[error("cannot build a batch")]
    Batch(#[from] candle_core::Error),
}

/// Parses one line.
pub fn parse_line(line: &str) -> Result<Record, String> {
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| format!("invalid JSON: {e}"))?;
    serde_json::from_value(value).map_err(|_| {
        "expected {\"text\"}, {\"prompt\", \"completion\"} or {\"messages\": [{\"role\", \"content\"}, ...]} with string values".to_string()
    })
}

/// A loaded file: examples, bad lines and examples skipped as empty.
#[derive(Debug, Default)]
pub struct Dataset {
    /// Tokenized examples, in file order.
    pub examples: Vec<Example>,
    /// Bad lines (skipped).
    pub bad_lines: Vec<BadLine>,
    /// Records left with no target token after truncation.
    pub skipped_empty: usize,
}

impl Dataset {
    /// Target tokens in all examples.
    pub fn target_tokens(&self) -> usize {
        self.examples
            .iter()
            .map(|e| e.targets.iter().filter(|&&t| t != 0).count())
            .sum()
    }
}

/// Reads and tokenizes `path`. Bad lines are collected (fatal when
/// `strict`); examples are truncated to `seq_len` tokens.
pub fn load_jsonl(
    path: &Path,
    tokenizer: &Tokenizer,
    seq_len: usize,
    strict: bool,
) -> Result<Dataset, DataError> {
    let text = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jsonl(path, &text, tokenizer, seq_len, strict)
}

/// Parses and tokenizes JSONL `text`; `path` names it in messages. Bad lines
/// are collected (fatal when `strict`); examples are truncated to `seq_len`
/// tokens.
pub fn parse_jsonl(
    path: &Path,
    text: &[u8],
    tokenizer: &Tokenizer,
    seq_len: usize,
    strict: bool,
) -> Result<Dataset, DataError> {
    let mut out = Dataset::default();
    for (i, raw) in text.split(|&b| b == b'\n').enumerate() {
        let line_no = i + 1;
        let bad = |message: String| BadLine {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let record = match std::str::from_utf8(raw) {
            Err(e) => Err(bad(format!("not UTF-8: {e}"))),
            Ok(s) if s.trim().is_empty() => continue,
            Ok(s) => parse_line(s).map_err(bad),
        };
        let record = match record {
            Ok(r) => r,
            Err(b) if strict => return Err(DataError::Strict(b)),
            Err(b) => {
                out.bad_lines.push(b);
                continue;
            }
        };
        let ex = tokenize(&record, tokenizer).map_err(|source| DataError::Tokenize {
            path: path.to_path_buf(),
            line: line_no,
            source,
        })?;
        let mut ex = ex;
        ex.ids.truncate(seq_len);
        ex.targets.truncate(seq_len);
        // Position 0 is never predicted: a target needs a token before it.
        if ex.targets.iter().skip(1).all(|&t| t == 0) {
            out.skipped_empty += 1;
            continue;
        }
        out.examples.push(ex);
    }
    Ok(out)
}

fn push(ex: &mut Example, ids: &[u32], target: bool) {
    ex.ids.extend_from_slice(ids);
    ex.targets
        .extend(std::iter::repeat_n(u8::from(target), ids.len()));
}

/// Tokenizes a record (see the module docs for the template and masks).
pub fn tokenize(record: &Record, tok: &Tokenizer) -> Result<Example, TokenizerError> {
    let mut ex = Example {
        ids: Vec::new(),
        targets: Vec::new(),
    };
    if let (Record::Messages { messages }, Some(chat)) = (record, tok.chat_template()) {
        let segments = chat
            .segments(messages)
            .map_err(|message| TokenizerError::Render {
                path: chat
                    .origin()
                    .map_or_else(|| "chat template".into(), Path::to_path_buf),
                message,
            })?;
        // The template writes BOS itself when it wants one.
        let writes_bos = chat.bos_text().is_some_and(|b| {
            !b.is_empty() && segments.first().is_some_and(|(s, _)| s.starts_with(b))
        });
        if let (Some(b), false) = (tok.bos(), writes_bos) {
            push(&mut ex, &[b], false);
        }
        for (text, trained) in &segments {
            push(&mut ex, &tok.encode(text)?, *trained);
        }
        return Ok(ex);
    }
    if let Some(b) = tok.bos() {
        push(&mut ex, &[b], false);
    }
    let eos: Vec<u32> = tok.eos().into_iter().collect();
    match record {
        Record::Text { text } => {
            push(&mut ex, &tok.encode(text)?, true);
            push(&mut ex, &eos, true);
        }
        Record::PromptCompletion { prompt, completion } => {
            push(&mut ex, &tok.encode(prompt)?, false);
            push(&mut ex, &tok.encode(completion)?, true);
            push(&mut ex, &eos, true);
        }
        Record::Messages { messages } => {
            for m in messages {
                push(&mut ex, &tok.encode(&format!("<|{}|>\n", m.role))?, false);
                let assistant = m.role == "assistant";
                push(&mut ex, &tok.encode(&m.content)?, assistant);
                if assistant {
                    push(&mut ex, &eos, true);
                }
                push(&mut ex, &tok.encode("\n")?, false);
            }
        }
    }
    Ok(ex)
}

/// A run's data: the training split and the optional validation split.
#[derive(Debug)]
pub struct TrainData {
    /// `train.jsonl`.
    pub train: Dataset,
    /// `valid.jsonl`, when there is one.
    pub valid: Option<Dataset>,
}

impl TrainData {
    /// Reads `dir/train.jsonl` (required) and `dir/valid.jsonl` (when it is
    /// a file); without `dir`, the default corpus built into the binary, so
    /// `train` runs from any directory. Examples are truncated to `seq_len`
    /// tokens; bad lines are collected, or fatal with `strict`. A training
    /// split without one usable example is an error.
    pub fn load(
        dir: Option<&Path>,
        tok: &Tokenizer,
        seq_len: usize,
        strict: bool,
    ) -> Result<TrainData, DataError> {
        let (train_path, data) = match dir {
            Some(dir) => {
                let train_path = dir.join("train.jsonl");
                let valid_path = dir.join("valid.jsonl");
                let train = load_jsonl(&train_path, tok, seq_len, strict)?;
                let valid = if valid_path.is_file() {
                    Some(load_jsonl(&valid_path, tok, seq_len, strict)?)
                } else {
                    None
                };
                (train_path, TrainData { train, valid })
            }
            None => {
                let (train_path, valid_path) = (
                    PathBuf::from("data/default/train.jsonl"),
                    PathBuf::from("data/default/valid.jsonl"),
                );
                let train = parse_jsonl(&train_path, DEFAULT_TRAIN_JSONL, tok, seq_len, strict)?;
                let valid = parse_jsonl(&valid_path, DEFAULT_VALID_JSONL, tok, seq_len, strict)?;
                (
                    train_path,
                    TrainData {
                        train,
                        valid: Some(valid),
                    },
                )
            }
        };
        if data.train.examples.is_empty() {
            return Err(DataError::Empty(train_path));
        }
        Ok(data)
    }

    /// Every bad line skipped, training split first.
    pub fn bad_lines(&self) -> impl Iterator<Item = &BadLine> {
        self.train
            .bad_lines
            .iter()
            .chain(self.valid.iter().flat_map(|v| &v.bad_lines))
    }

    /// A fingerprint of the training examples (count and CRC-32 of their
    /// tokens and masks): ranks compare it to know they train on the same
    /// data.
    pub fn fingerprint(&self) -> String {
        let mut crc = crc32fast::Hasher::new();
        for e in &self.train.examples {
            crc.update(&(e.ids.len() as u64).to_le_bytes());
            for (&id, &m) in e.ids.iter().zip(&e.targets) {
                crc.update(&id.to_le_bytes());
                crc.update(&[u8::from(m != 0)]);
            }
        }
        format!(
            "{} examples, CRC-32 {:08x}",
            self.train.examples.len(),
            crc.finalize()
        )
    }
}

/// The shuffled order of epoch `epoch`: a function of the seed and the
/// epoch only, so a resumed run sees the same order.
fn epoch_order(n: usize, seed: u64, epoch: u64) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    order.shuffle(&mut rng);
    order
}

/// The position in the shuffled training data: the epoch and the next
/// example within it. The whole random state of the data.
#[derive(Clone, Debug)]
pub struct Cursor {
    n: usize,
    seed: u64,
    epoch: u64,
    pos: u64,
    order: Vec<usize>,
}

impl Cursor {
    /// At example `pos` of epoch `epoch` of `n` examples shuffled by `seed`.
    pub fn new(n: usize, seed: u64, epoch: u64, pos: u64) -> Self {
        Self {
            n,
            seed,
            epoch,
            pos,
            order: epoch_order(n, seed, epoch),
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The next example's place in the epoch.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The indices (into the `n` examples) of the next `size` examples.
    pub fn next_batch(&mut self, size: usize) -> Vec<usize> {
        let mut out = Vec::with_capacity(size);
        while out.len() < size {
            if self.pos as usize >= self.order.len() {
                self.epoch += 1;
                self.pos = 0;
                self.order = epoch_order(self.n, self.seed, self.epoch);
            }
            out.push(self.order[self.pos as usize]);
            self.pos += 1;
        }
        out
    }
}

/// A right-padded batch as tensors.
#[derive(Debug)]
pub struct Batch {
    /// Token ids, `(b, t)`.
    pub ids: Tensor,
    /// 1 on real tokens, 0 on padding, `(b, t)`.
    pub attention: Tensor,
    /// 1.0 where a token is a target, `(b, t)`.
    pub targets: Tensor,
}

impl Batch {
    /// The examples, right-padded to the longest (at least 2 tokens).
    pub fn of(examples: &[&Example], dev: &Device) -> candle_core::Result<Batch> {
        let t = examples
            .iter()
            .map(|e| e.ids.len())
            .max()
            .unwrap_or(1)
            .max(2);
        let b = examples.len();
        let mut ids = vec![0u32; b * t];
        let mut att = vec![0u8; b * t];
        let mut tgt = vec![0f32; b * t];
        for (i, e) in examples.iter().enumerate() {
            for (j, (&id, &m)) in e.ids.iter().zip(&e.targets).enumerate() {
                ids[i * t + j] = id;
                att[i * t + j] = 1;
                if j > 0 && m != 0 {
                    tgt[i * t + j] = 1.0;
                }
            }
        }
        Ok(Batch {
            ids: Tensor::from_vec(ids, (b, t), dev)?,
            attention: Tensor::from_vec(att, (b, t), dev)?,
            targets: Tensor::from_vec(tgt, (b, t), dev)?,
        })
    }
}
