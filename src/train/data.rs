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

use serde::Deserialize;

use super::tokenizer::{Tokenizer, TokenizerError};

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
    #[error("cannot read {path}: {source}")]
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
    #[error("{}:{line}: {source}", .path.display())]
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
        let segments = chat.segments(messages).map_err(TokenizerError::Render)?;
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
