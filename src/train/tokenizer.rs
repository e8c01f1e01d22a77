//! Tokenizers: the embedded model's byte-level one, or a local
//! `tokenizer.json` read with the `tokenizers` crate (pure Rust, no network).
//!
//! The byte-level tokenizer maps each UTF-8 byte to the token of the same
//! number (0..=255); [`BYTE_BOS`] starts and [`BYTE_EOS`] ends a sequence.
//! Any text round-trips; the embedded model's vocabulary is padded beyond
//! 257 to a multiple of the NF4 block.
//!
//! ```
//! use qlora_scale::train::tokenizer::{Tokenizer, BYTE_BOS};
//! let t = Tokenizer::Bytes;
//! assert_eq!(t.encode("hi").unwrap(), vec![b'h' as u32, b'i' as u32]);
//! assert_eq!(t.bos(), Some(BYTE_BOS));
//! ```

use std::path::{Path, PathBuf};

use super::chat::ChatTemplate;

/// Beginning-of-sequence token of the byte-level tokenizer.
pub const BYTE_BOS: u32 = 256;
/// End-of-sequence token of the byte-level tokenizer.
pub const BYTE_EOS: u32 = 257;

/// Errors loading or running a tokenizer. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.json` is absent.
    #[error("{0}: not found (a local model needs its tokenizer.json)")]
    Missing(PathBuf),
    /// `tokenizer.json` could not be loaded.
    #[error("{path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// Why.
        source: tokenizers::Error,
    },
    /// A tokenizer file exists but cannot be read (unreadable, not a
    /// regular file, too large): absent is not unreadable.
    #[error(transparent)]
    Read(#[from] crate::safe_io::ReadError),
    /// `tokenizer_config.json` is not valid JSON.
    #[error("{path}")]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: serde_json::Error,
    },
    /// Encoding failed.
    #[error("cannot tokenize text")]
    Encode(#[source] tokenizers::Error),
    /// Decoding failed (an id outside the vocabulary, say).
    #[error("cannot turn tokens into text")]
    Decode(#[source] tokenizers::Error),
    /// The chat template does not compile.
    #[error("{path}: chat_template: {message}")]
    Template {
        /// `tokenizer_config.json`.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The chat template failed on a conversation (or hit a limit).
    #[error("{path}: chat_template: {message}")]
    Render {
        /// `tokenizer_config.json`, or `chat template` when not from a file.
        path: PathBuf,
        /// Why.
        message: String,
    },
}

impl TokenizerError {
    /// `chat`'s failure on a conversation, named by the file the template
    /// came from.
    pub(crate) fn render(chat: &super::chat::ChatTemplate, message: String) -> Self {
        TokenizerError::Render {
            path: chat
                .origin()
                .map_or_else(|| "chat template".into(), Path::to_path_buf),
            message,
        }
    }
}

/// A tokenizer.
#[derive(Clone)]
pub enum Tokenizer {
    /// UTF-8 bytes as tokens, plus [`BYTE_BOS`] and [`BYTE_EOS`].
    Bytes,
    /// A Hugging Face `tokenizer.json`.
    Hf {
        /// The tokenizer.
        tokenizer: Box<tokenizers::Tokenizer>,
        /// Beginning-of-sequence token, from `tokenizer_config.json`.
        bos: Option<u32>,
        /// End-of-sequence token, from `tokenizer_config.json`.
        eos: Option<u32>,
        /// `tokenizer_config.json`'s `chat_template`, compiled.
        chat: Option<std::sync::Arc<ChatTemplate>>,
    },
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Tokenizer::Bytes => f.write_str("Tokenizer::Bytes"),
            Tokenizer::Hf { bos, eos, .. } => f
                .debug_struct("Tokenizer::Hf")
                .field("bos", bos)
                .field("eos", eos)
                .finish_non_exhaustive(),
        }
    }
}

fn special(config: &serde_json::Value, key: &str) -> Option<String> {
    match config.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`, with BOS/EOS from
    /// `dir/tokenizer_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let path = dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(TokenizerError::Missing(path));
        }
        let bytes = crate::safe_io::read_small(&path)?;
        let tokenizer =
            tokenizers::Tokenizer::from_bytes(&bytes).map_err(|e| TokenizerError::Load {
                path: path.clone(),
                source: e,
            })?;
        drop(bytes);
        let cfg_path = dir.join("tokenizer_config.json");
        // Absent: no template, no BOS/EOS. Present but unreadable (no
        // permission, a directory, a FIFO, too large): an error, so a run
        // never trains the wrong format silently.
        let config: serde_json::Value = match crate::safe_io::read_small(&cfg_path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map_err(|source| TokenizerError::Config {
                    path: cfg_path.clone(),
                    source,
                })?
            }
            Err(e) if e.is_not_found() => serde_json::Value::Null,
            Err(e) => return Err(e.into()),
        };
        let id = |key| special(&config, key).and_then(|t| tokenizer.token_to_id(&t));
        let (bos, eos) = (id("bos_token"), id("eos_token"));
        // A string, or a list of named templates (the "default" one, else
        // the first).
        let source = match config.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t["name"] == "default")
                .or(list.first())
                .and_then(|t| t["template"].as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat = source
            .map(|src| {
                ChatTemplate::new(
                    &src,
                    special(&config, "bos_token"),
                    special(&config, "eos_token"),
                )
                .map(|t| std::sync::Arc::new(t.with_origin(cfg_path.clone())))
                .map_err(|message| TokenizerError::Template {
                    path: cfg_path.clone(),
                    message,
                })
            })
            .transpose()?;
        Ok(Tokenizer::Hf {
            chat,
            tokenizer: Box::new(tokenizer),
            bos,
            eos,
        })
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(text.bytes().map(u32::from).collect()),
            Tokenizer::Hf { tokenizer, .. } => tokenizer
                .encode(text, false)
                .map(|e| e.get_ids().to_vec())
                .map_err(TokenizerError::Encode),
        }
    }

    /// The text of `ids`, special tokens (BOS, EOS, chat markers) left
    /// out. Byte-level: invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        match self {
            Tokenizer::Bytes => Ok(String::from_utf8_lossy(&byte_tokens(ids)).into_owned()),
            Tokenizer::Hf { tokenizer, .. } => {
                tokenizer.decode(ids, true).map_err(TokenizerError::Decode)
            }
        }
    }

    /// A decoder of a sequence given one token at a time: each step returns
    /// the text that the new token completes, never half a character (a
    /// multi-byte character split over several tokens comes out whole with
    /// its last token). The pieces add up to [`Self::decode`] of all the
    /// tokens.
    pub fn decode_stream(&self) -> DecodeStream<'_> {
        match self {
            Tokenizer::Bytes => DecodeStream::Bytes(Vec::new()),
            Tokenizer::Hf { tokenizer, .. } => {
                DecodeStream::Hf(Box::new(tokenizer.decode_stream(true)))
            }
        }
    }

    /// Beginning-of-sequence token.
    pub fn bos(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => Some(BYTE_BOS),
            Tokenizer::Hf { bos, .. } => *bos,
        }
    }

    /// End-of-sequence token.
    pub fn eos(&self) -> Option<u32> {
        match self {
            Tokenizer::Bytes => Some(BYTE_EOS),
            Tokenizer::Hf { eos, .. } => *eos,
        }
    }

    /// Tokens in the vocabulary (with added tokens).
    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Bytes => BYTE_EOS as usize + 1,
            Tokenizer::Hf { tokenizer, .. } => tokenizer.get_vocab_size(true),
        }
    }

    /// The model's chat template, when its `tokenizer_config.json` has one.
    pub fn chat_template(&self) -> Option<&ChatTemplate> {
        match self {
            Tokenizer::Hf { chat, .. } => chat.as_deref(),
            Tokenizer::Bytes => None,
        }
    }
}

/// The bytes of byte-level tokens; BOS, EOS and padding ids are left out.
fn byte_tokens(ids: &[u32]) -> Vec<u8> {
    ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect()
}

/// The `tokenizers` crate's streaming decoder of a `tokenizer.json`.
type HfDecodeStream<'a> = tokenizers::DecodeStream<
    'a,
    tokenizers::ModelWrapper,
    tokenizers::NormalizerWrapper,
    tokenizers::PreTokenizerWrapper,
    tokenizers::PostProcessorWrapper,
    tokenizers::DecoderWrapper,
>;

/// Incremental decoding ([`Tokenizer::decode_stream`]).
pub enum DecodeStream<'a> {
    /// Byte-level: the bytes of a character not yet complete (at most 3).
    Bytes(Vec<u8>),
    /// A `tokenizer.json`: `tokenizers`' own stream, which re-decodes a
    /// short window of recent tokens and returns what it adds.
    Hf(Box<HfDecodeStream<'a>>),
}

impl std::fmt::Debug for DecodeStream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DecodeStream::Bytes(pending) => {
                f.debug_tuple("DecodeStream::Bytes").field(pending).finish()
            }
            DecodeStream::Hf(_) => f.write_str("DecodeStream::Hf"),
        }
    }
}

impl DecodeStream<'_> {
    /// The text `id` completes, if any.
    pub fn step(&mut self, id: u32) -> Result<Option<String>, TokenizerError> {
        match self {
            DecodeStream::Bytes(pending) => {
                pending.extend(byte_tokens(&[id]));
                Ok(take_complete_utf8(pending))
            }
            DecodeStream::Hf(stream) => stream.step(id).map_err(TokenizerError::Decode),
        }
    }

    /// What is left at the end: the bytes of an unfinished character, as
    /// U+FFFD (byte-level only; a `tokenizer.json` stream keeps nothing
    /// back that decoding would show).
    pub fn finish(self) -> Option<String> {
        match self {
            DecodeStream::Bytes(pending) if !pending.is_empty() => {
                Some(String::from_utf8_lossy(&pending).into_owned())
            }
            _ => None,
        }
    }
}

/// Removes and returns the text at the start of `pending` up to an
/// unfinished character at its end (invalid bytes become U+FFFD, as
/// [`String::from_utf8_lossy`] writes them).
fn take_complete_utf8(pending: &mut Vec<u8>) -> Option<String> {
    let mut out = String::new();
    let mut rest: &[u8] = pending;
    loop {
        match std::str::from_utf8(rest) {
            Ok(s) => {
                out.push_str(s);
                rest = &[];
                break;
            }
            Err(e) => {
                let (valid, after) = rest.split_at(e.valid_up_to());
                out.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match e.error_len() {
                    Some(n) => {
                        out.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[n..];
                    }
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let kept = rest.len();
    pending.drain(..pending.len() - kept);
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_stream_never_splits_a_character_and_adds_up_to_decode() {
        let text = "a é 中 🦀 z";
        let mut ids: Vec<u32> = text.bytes().map(u32::from).collect();
        ids.insert(0, BYTE_BOS);
        ids.push(BYTE_EOS);
        // An invalid byte (a lone continuation byte) mid-stream.
        ids.insert(3, 0x80);
        let t = Tokenizer::Bytes;
        let mut stream = t.decode_stream();
        let mut pieces = Vec::new();
        for &id in &ids {
            if let Some(p) = stream.step(id).unwrap() {
                pieces.push(p);
            }
        }
        assert_eq!(stream.finish(), None);
        assert_eq!(pieces.concat(), t.decode(&ids).unwrap());
        assert!(pieces.contains(&"🦀".to_string()), "{pieces:?}");
        assert!(pieces.concat().contains('\u{FFFD}'));
        // A character cut off at the end comes out as U+FFFD.
        let mut stream = t.decode_stream();
        assert_eq!(stream.step(0xE4).unwrap(), None);
        assert_eq!(stream.finish().as_deref(), Some("\u{FFFD}"));
    }

    #[test]
    fn a_tokenizer_json_stream_adds_up_to_decode() {
        let dir = tempfile::tempdir().unwrap();
        let tok = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [
                {"id": 2, "content": "</s>", "single_word": false, "lstrip": false,
                 "rstrip": false, "normalized": false, "special": true}
            ],
            "normalizer": null, "pre_tokenizer": {"type": "Whitespace"},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "unk_token": "<unk>",
                      "vocab": {"<unk>": 0, "the": 1, "</s>": 2, "river": 3, "runs": 4}}
        });
        std::fs::write(dir.path().join("tokenizer.json"), tok.to_string()).unwrap();
        let t = Tokenizer::from_dir(dir.path()).unwrap();
        let ids = [1, 3, 4, 2, 1];
        let mut stream = t.decode_stream();
        let pieces: Vec<String> = ids
            .iter()
            .filter_map(|&id| stream.step(id).unwrap())
            .collect();
        assert_eq!(stream.finish(), None);
        assert_eq!(pieces.concat(), t.decode(&ids).unwrap());
        // The special token is left out.
        assert_eq!(t.decode(&ids).unwrap(), "the river runs the");
    }
}
