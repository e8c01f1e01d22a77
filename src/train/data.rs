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
//! A line that is not valid JSON or not one of the shapes above, or longer
//! than `[trainer] max_line_bytes` of `tables/defaults.toml`, is reported
//! with its file and line number, skipped and counted (or fatal with
//! `strict`); the first `bad_lines_shown` are kept, the rest only counted.
//! Empty lines are ignored.
//!
//! Files are streamed line by line: no more than one line (at most
//! `max_line_bytes`) is held at once, and a record's text is tokenized from
//! a prefix long enough for `seq_len` tokens ([`tokenize_truncated`]), not
//! in full.
//!
//! ```
//! use qlora_scale::train::data::{Record, parse_line};
//! let r = parse_line(r#"{"prompt": "2+2=", "completion": "4"}"#).unwrap();
//! assert!(matches!(r, Record::PromptCompletion { .. }));
//! assert!(parse_line(r#"{"txt": "typo"}"#).is_err());
//! ```

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde::Deserialize;

use super::tokenizer::{Tokenizer, TokenizerError};
use crate::tables::trainer::{
    BAD_LINES_SHOWN, LOAD_PROGRESS_MIB, MAX_LINE_BYTES, TOKENIZE_PREFIX_BYTES_PER_TOKEN,
};

/// Where the default corpus lives in the repository; a run without
/// `--data-dir` reads the copy compiled into the binary, under these names.
pub const DEFAULT_DATA_DIR: &str = "data/default";
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
    /// The first bad lines (skipped), at most `[trainer] bad_lines_shown`.
    pub bad_lines: Vec<BadLine>,
    /// Every bad line skipped, those in `bad_lines` included.
    pub bad_line_count: usize,
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

/// The longest line a data file may hold, in bytes (`[trainer]
/// max_line_bytes`).
pub const MAX_LINE: usize = MAX_LINE_BYTES as usize;

/// Reads and tokenizes `path`, streamed line by line. Bad lines are
/// collected (fatal when `strict`); examples are truncated to `seq_len`
/// tokens.
pub fn load_jsonl(
    path: &Path,
    tokenizer: &Tokenizer,
    seq_len: usize,
    strict: bool,
) -> Result<Dataset, DataError> {
    let file = std::fs::File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_jsonl(path, BufReader::new(file), tokenizer, seq_len, strict)
}

/// Parses and tokenizes JSONL `text` (the built-in corpus); `path` names it
/// in messages. As [`read_jsonl`].
pub fn parse_jsonl(
    path: &Path,
    text: &[u8],
    tokenizer: &Tokenizer,
    seq_len: usize,
    strict: bool,
) -> Result<Dataset, DataError> {
    read_jsonl(path, text, tokenizer, seq_len, strict)
}

/// One line of a data file read with at most [`MAX_LINE`] bytes held.
enum Line {
    /// The line, without its newline.
    Ok,
    /// Longer than the cap: the rest up to the newline was skipped.
    TooLong,
    /// End of the input.
    End,
}

/// Reads the next line of `reader` into `buf` (cleared first): never more
/// than `max + 1` bytes are buffered; a longer line is skipped to its
/// newline.
fn next_line<R: BufRead>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
    read: &mut u64,
) -> std::io::Result<Line> {
    buf.clear();
    let limit = max as u64 + 1;
    let n = reader.by_ref().take(limit).read_until(b'\n', buf)?;
    *read += n as u64;
    if n == 0 {
        return Ok(Line::End);
    }
    if buf.last() == Some(&b'\n') {
        buf.pop();
        return Ok(Line::Ok);
    }
    if (buf.len() as u64) < limit {
        // The last line, without a newline.
        return Ok(Line::Ok);
    }
    buf.clear();
    buf.shrink_to(max.min(1 << 16));
    *read += reader.skip_until(b'\n')? as u64;
    Ok(Line::TooLong)
}

/// Parses and tokenizes the JSONL of `reader`, one line at a time; `path`
/// names it in messages. Bad lines (invalid, or over `[trainer]
/// max_line_bytes`) are collected, the first `bad_lines_shown` kept and all
/// counted (the first is fatal when `strict`); examples are truncated to
/// `seq_len` tokens. A progress line is logged every `load_progress_mib`
/// MiB read.
pub fn read_jsonl<R: BufRead>(
    path: &Path,
    reader: R,
    tokenizer: &Tokenizer,
    seq_len: usize,
    strict: bool,
) -> Result<Dataset, DataError> {
    let mut examples = Vec::new();
    let mut out = stream_jsonl(path, reader, tokenizer, seq_len, strict, |ex| {
        examples.push(ex);
        Ok::<_, DataError>(true)
    })?;
    out.examples = examples;
    Ok(out)
}

/// [`read_jsonl`] without holding the examples: each is handed to
/// `on_example` as its line is read, and reading stops when it returns
/// `false`. The returned [`Dataset`] holds no examples, only the bad lines
/// and the count of empty records.
pub fn stream_jsonl<R: BufRead, E: From<DataError>>(
    path: &Path,
    mut reader: R,
    tokenizer: &Tokenizer,
    seq_len: usize,
    strict: bool,
    mut on_example: impl FnMut(Example) -> Result<bool, E>,
) -> Result<Dataset, E> {
    let io = |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let progress_every = LOAD_PROGRESS_MIB << 20;
    let mut next_progress = progress_every;
    let mut read = 0u64;
    let mut out = Dataset::default();
    let mut buf = Vec::new();
    let mut line_no = 0usize;
    let mut examples = 0usize;
    loop {
        let line = next_line(&mut reader, &mut buf, MAX_LINE, &mut read).map_err(io)?;
        if read >= next_progress {
            tracing::info!(
                "{}: {} MiB read, {} examples",
                path.display(),
                read >> 20,
                examples
            );
            next_progress = (read / progress_every + 1) * progress_every;
        }
        line_no += 1;
        let bad = |message: String| BadLine {
            path: path.to_path_buf(),
            line: line_no,
            message,
        };
        let record = match line {
            Line::End => break,
            Line::TooLong => Err(bad(format!(
                "line longer than {MAX_LINE} bytes (the cap, [trainer] max_line_bytes)"
            ))),
            Line::Ok => match std::str::from_utf8(&buf) {
                Err(e) => Err(bad(format!("not UTF-8: {e}"))),
                Ok(s) if s.trim().is_empty() => continue,
                Ok(s) => parse_line(s).map_err(bad),
            },
        };
        let record = match record {
            Ok(r) => r,
            Err(b) if strict => return Err(DataError::Strict(b).into()),
            Err(b) => {
                out.bad_line_count += 1;
                if out.bad_lines.len() < BAD_LINES_SHOWN as usize {
                    out.bad_lines.push(b);
                }
                continue;
            }
        };
        let ex = tokenize_truncated(&record, tokenizer, seq_len).map_err(|source| {
            DataError::Tokenize {
                path: path.to_path_buf(),
                line: line_no,
                source,
            }
        })?;
        // Position 0 is never predicted: a target needs a token before it.
        if ex.targets.iter().skip(1).all(|&t| t == 0) {
            out.skipped_empty += 1;
            continue;
        }
        examples += 1;
        if !on_example(ex)? {
            break;
        }
    }
    Ok(out)
}

/// The first `want` token ids of `text`, exactly as of [`Tokenizer::encode`]
/// on the whole text, without tokenizing all of a long text.
///
/// A prefix of `want * tokenize_prefix_bytes_per_token` bytes (cut at a char
/// boundary) is tokenized; when it is shorter than the text and gives fewer
/// than `2 * want` tokens, the prefix is doubled and tokenized again, until
/// it does or is the whole text. The cut can change only the tokens of the
/// pre-tokenizer's word it falls in (BPE merges, WordPiece and word-level
/// lookups stay within a word), so with `want` more tokens after the kept
/// ones those are the whole text's. The one approximation: a single word of
/// more than `want` tokens that straddles the cut, whose BPE merges could in
/// principle cascade back that far; normal text never has one. Work is
/// bounded by about twice the prefix finally needed, not the text.
pub fn encode_prefix(tok: &Tokenizer, text: &str, want: usize) -> Result<Vec<u32>, TokenizerError> {
    if want == 0 {
        return Ok(Vec::new());
    }
    let mut limit = want.saturating_mul(TOKENIZE_PREFIX_BYTES_PER_TOKEN as usize);
    loop {
        if limit >= text.len() {
            let mut ids = tok.encode(text)?;
            ids.truncate(want);
            return Ok(ids);
        }
        let mut cut = limit;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        let mut ids = tok.encode(&text[..cut])?;
        if ids.len() >= want.saturating_mul(2) {
            ids.truncate(want);
            return Ok(ids);
        }
        limit = limit.saturating_mul(2);
    }
}

/// [`tokenize`], truncated to `seq_len` tokens, tokenizing only as much of
/// each piece of text as can still be kept ([`encode_prefix`]): the same
/// example as `tokenize` then truncating.
pub fn tokenize_truncated(
    record: &Record,
    tok: &Tokenizer,
    seq_len: usize,
) -> Result<Example, TokenizerError> {
    let mut ex = build(record, tok, |ex: &Example, text: &str| {
        encode_prefix(tok, text, seq_len.saturating_sub(ex.ids.len()))
    })?;
    ex.ids.truncate(seq_len);
    ex.targets.truncate(seq_len);
    Ok(ex)
}

fn push(ex: &mut Example, ids: &[u32], target: bool) {
    ex.ids.extend_from_slice(ids);
    ex.targets
        .extend(std::iter::repeat_n(u8::from(target), ids.len()));
}

/// Tokenizes a record (see the module docs for the template and masks).
pub fn tokenize(record: &Record, tok: &Tokenizer) -> Result<Example, TokenizerError> {
    build(record, tok, |_: &Example, text: &str| tok.encode(text))
}

/// The example of `record`, each piece of text tokenized by `encode` (given
/// the example so far).
fn build<E>(record: &Record, tok: &Tokenizer, mut encode: E) -> Result<Example, TokenizerError>
where
    E: FnMut(&Example, &str) -> Result<Vec<u32>, TokenizerError>,
{
    let mut ex = Example {
        ids: Vec::new(),
        targets: Vec::new(),
    };
    if let (Record::Messages { messages }, Some(chat)) = (record, tok.chat_template()) {
        let segments = chat
            .segments(messages)
            .map_err(|message| TokenizerError::render(chat, message))?;
        // The template writes BOS itself when it wants one.
        let writes_bos = chat.bos_text().is_some_and(|b| {
            !b.is_empty() && segments.first().is_some_and(|(s, _)| s.starts_with(b))
        });
        if let (Some(b), false) = (tok.bos(), writes_bos) {
            push(&mut ex, &[b], false);
        }
        for (text, trained) in &segments {
            let ids = encode(&ex, text)?;
            push(&mut ex, &ids, *trained);
        }
        return Ok(ex);
    }
    if let Some(b) = tok.bos() {
        push(&mut ex, &[b], false);
    }
    let eos: Vec<u32> = tok.eos().into_iter().collect();
    match record {
        Record::Text { text } => {
            let ids = encode(&ex, text)?;
            push(&mut ex, &ids, true);
            push(&mut ex, &eos, true);
        }
        Record::PromptCompletion { prompt, completion } => {
            let ids = encode(&ex, prompt)?;
            push(&mut ex, &ids, false);
            let ids = encode(&ex, completion)?;
            push(&mut ex, &ids, true);
            push(&mut ex, &eos, true);
        }
        Record::Messages { messages } => {
            for m in messages {
                let ids = encode(&ex, &format!("<|{}|>\n", m.role))?;
                push(&mut ex, &ids, false);
                let assistant = m.role == "assistant";
                let ids = encode(&ex, &m.content)?;
                push(&mut ex, &ids, assistant);
                if assistant {
                    push(&mut ex, &eos, true);
                }
                let ids = encode(&ex, "\n")?;
                push(&mut ex, &ids, false);
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
                let dir = Path::new(DEFAULT_DATA_DIR);
                let (train_path, valid_path) = (dir.join("train.jsonl"), dir.join("valid.jsonl"));
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

    /// Bad lines skipped, training split first: the first few of each
    /// split ([`Dataset::bad_lines`]); [`Self::bad_line_count`] counts all.
    pub fn bad_lines(&self) -> impl Iterator<Item = &BadLine> {
        self.train
            .bad_lines
            .iter()
            .chain(self.valid.iter().flat_map(|v| &v.bad_lines))
    }

    /// Every bad line skipped, in both splits.
    pub fn bad_line_count(&self) -> usize {
        self.train.bad_line_count + self.valid.as_ref().map_or(0, |v| v.bad_line_count)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Option<Vec<u8>>> {
        let mut r = input;
        let (mut buf, mut read, mut out) = (Vec::new(), 0, Vec::new());
        loop {
            match next_line(&mut r, &mut buf, max, &mut read).unwrap() {
                Line::End => break,
                Line::Ok => out.push(Some(buf.clone())),
                Line::TooLong => out.push(None),
            }
        }
        assert_eq!(read, input.len() as u64);
        out
    }

    #[test]
    fn lines_over_the_cap_are_skipped_to_their_newline() {
        let l = lines(b"abcd\nabcdef\n\nxyz", 5);
        let want: Vec<Option<Vec<u8>>> = vec![
            Some(b"abcd".to_vec()),
            None,
            Some(vec![]),
            Some(b"xyz".to_vec()),
        ];
        assert_eq!(l, want);
        // Exactly at the cap, with or without the newline.
        assert_eq!(lines(b"abcde\nabcde", 5).len(), 2);
        assert!(lines(b"abcde\nabcde", 5).iter().all(Option::is_some));
        assert_eq!(lines(b"abcdef", 5), vec![None]);
    }

    #[test]
    fn prefix_tokenizing_keeps_the_tokens_of_the_whole_text() {
        let tok = Tokenizer::Bytes;
        let text = "héllo wörld — ".repeat(500);
        for want in [0, 1, 2, 3, 7, 16, 100, 1000, 10_000] {
            let mut all = tok.encode(&text).unwrap();
            all.truncate(want);
            assert_eq!(encode_prefix(&tok, &text, want).unwrap(), all, "{want}");
        }
        let records = [
            Record::Text { text: text.clone() },
            Record::PromptCompletion {
                prompt: text.clone(),
                completion: "done".into(),
            },
            Record::PromptCompletion {
                prompt: "q".into(),
                completion: text.clone(),
            },
            Record::Messages {
                messages: vec![
                    Message {
                        role: "user".into(),
                        content: text.clone(),
                    },
                    Message {
                        role: "assistant".into(),
                        content: text.clone(),
                    },
                ],
            },
        ];
        for r in &records {
            for seq_len in [1, 2, 5, 64, 256, 5000, 100_000] {
                let mut full = tokenize(r, &tok).unwrap();
                full.ids.truncate(seq_len);
                full.targets.truncate(seq_len);
                assert_eq!(tokenize_truncated(r, &tok, seq_len).unwrap(), full);
            }
        }
    }

    #[test]
    fn only_the_first_bad_lines_are_kept_but_all_are_counted() {
        let mut text = b"{\"text\": \"the river runs\"}\n".to_vec();
        for _ in 0..BAD_LINES_SHOWN + 15 {
            text.extend_from_slice(b"{\"txt\": 1}\n");
        }
        let d = parse_jsonl(Path::new("t.jsonl"), &text, &Tokenizer::Bytes, 32, false).unwrap();
        assert_eq!(d.examples.len(), 1);
        assert_eq!(d.bad_lines.len(), BAD_LINES_SHOWN as usize);
        assert_eq!(d.bad_line_count, BAD_LINES_SHOWN as usize + 15);
        assert_eq!(d.bad_lines[0].line, 2);
        let e = parse_jsonl(Path::new("t.jsonl"), &text, &Tokenizer::Bytes, 32, true).unwrap_err();
        assert!(e.to_string().starts_with("t.jsonl:2: "), "{e}");
    }
}
