//! Text generation with a trained model (`train generate`): a prompt, as
//! text or as a conversation rendered with the model's chat template, is
//! read once into the KV cache ([`LlamaModel::forward_cached`]); then one
//! token at a time is sampled, greedily or with temperature and nucleus
//! (top-p) sampling from one seeded RNG, until EOS, the token limit or the
//! model's context. Text is handed out as tokens complete it
//! ([`Tokenizer::decode_stream`]).
//!
//! ```
//! use qlora_scale::train::generate::Sampler;
//! let logits = [0.1f32, 2.0, 0.5];
//! assert_eq!(Sampler::new(0.0, 1.0, 7).next_token(&logits), 1);
//! // The same seed draws the same tokens.
//! let draw = |seed| {
//!     let mut s = Sampler::new(1.0, 0.9, seed);
//!     (0..20).map(|_| s.next_token(&logits)).collect::<Vec<_>>()
//! };
//! assert_eq!(draw(3), draw(3));
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{D, DType};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::data::{Message, Record, tokenize};
use super::tokenizer::{Tokenizer, TokenizerError};
use crate::qlora::{KvCache, LlamaModel};

/// The roles a `--messages` file may use.
pub const ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

/// What is wrong with the prompt or the sampling settings: the user's
/// input, named by its flag or file.
#[derive(Debug, thiserror::Error)]
pub enum InputError {
    /// `--prompt ""`.
    #[error("--prompt is empty: give the text the model should continue")]
    EmptyPrompt,
    /// The messages file cannot be read.
    #[error("--messages {}: cannot read it", .0.display())]
    Unreadable(PathBuf, #[source] crate::safe_io::ReadError),
    /// The messages file is not a JSON array of `{role, content}`.
    #[error(
        "--messages {}: expected a JSON array of {{\"role\": ..., \"content\": ...}} objects",
        .0.display()
    )]
    Malformed(PathBuf, #[source] serde_json::Error),
    /// The messages file holds no message.
    #[error("--messages {}: the conversation holds no message", .0.display())]
    NoMessages(PathBuf),
    /// A message's role is not one of [`ROLES`].
    #[error(
        "--messages {}: message {index} has role {role:?}; the roles are system, user, assistant and tool",
        .path.display()
    )]
    UnknownRole {
        /// The file.
        path: PathBuf,
        /// 1-based.
        index: usize,
        /// The role given.
        role: String,
    },
    /// The prompt leaves no room in the model's context.
    #[error(
        "the prompt is {tokens} tokens, but the model's context is {context} (max_position_embeddings): shorten --prompt or --messages to at most {} tokens",
        .context - 1
    )]
    TooLong {
        /// Prompt tokens.
        tokens: usize,
        /// The model's context, tokens.
        context: usize,
    },
}

/// Errors generating text.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Bad input.
    #[error(transparent)]
    Input(#[from] InputError),
    /// Tokenizing the prompt or decoding the output failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The model failed.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The text could not be written.
    #[error("cannot write the generated text")]
    Output(#[source] std::io::Error),
}

/// The prompt of a `train generate`.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// `--prompt TEXT`; `raw`: never through the chat template.
    Text {
        /// The text.
        text: String,
        /// `--raw`.
        raw: bool,
    },
    /// `--messages FILE`, read.
    Messages(Vec<Message>),
}

/// Reads a `--messages` file: a JSON array of `{role, content}` objects,
/// each role one of [`ROLES`]. Read with the bounded small-file reader.
pub fn read_messages(path: &Path) -> Result<Vec<Message>, InputError> {
    let bytes = crate::safe_io::read_small(path)
        .map_err(|e| InputError::Unreadable(path.to_path_buf(), e))?;
    let messages: Vec<Message> =
        serde_json::from_slice(&bytes).map_err(|e| InputError::Malformed(path.to_path_buf(), e))?;
    if messages.is_empty() {
        return Err(InputError::NoMessages(path.to_path_buf()));
    }
    if let Some((i, m)) = messages
        .iter()
        .enumerate()
        .find(|(_, m)| !ROLES.contains(&m.role.as_str()))
    {
        return Err(InputError::UnknownRole {
            path: path.to_path_buf(),
            index: i + 1,
            role: m.role.clone(),
        });
    }
    Ok(messages)
}

/// The prompt's token ids. A conversation (or a `--prompt` without `--raw`,
/// as one user message, when the tokenizer has a chat template) is rendered
/// with the model's chat template and its generation prompt; without a
/// template, a conversation takes the default format training uses
/// (`<|role|>\ncontent\n` per message) followed by `<|assistant|>\n`. BOS
/// starts the prompt unless the template writes it.
pub fn prompt_ids(tok: &Tokenizer, prompt: &Prompt) -> Result<Vec<u32>, GenerateError> {
    let messages = match prompt {
        Prompt::Text { text, .. } if text.is_empty() => return Err(InputError::EmptyPrompt.into()),
        Prompt::Text { text, raw } if *raw || tok.chat_template().is_none() => {
            let mut ids: Vec<u32> = tok.bos().into_iter().collect();
            ids.extend(tok.encode(text)?);
            return Ok(ids);
        }
        Prompt::Text { text, .. } => vec![Message {
            role: "user".into(),
            content: text.clone(),
        }],
        Prompt::Messages(m) => m.clone(),
    };
    let Some(chat) = tok.chat_template() else {
        let record = Record::Messages { messages };
        let mut ids = tokenize(&record, tok)?.ids;
        ids.extend(tok.encode("<|assistant|>\n")?);
        return Ok(ids);
    };
    let text = chat
        .render(&messages, true)
        .map_err(|message| TokenizerError::render(chat, message))?;
    let writes_bos = chat
        .bos_text()
        .is_some_and(|b| !b.is_empty() && text.starts_with(b));
    let mut ids: Vec<u32> = tok.bos().filter(|_| !writes_bos).into_iter().collect();
    ids.extend(tok.encode(&text)?);
    Ok(ids)
}

/// Picks each next token from the logits: the likeliest when the
/// temperature is 0, else a draw from the softmax of `logits / temperature`
/// restricted to the likeliest tokens whose probabilities add up to `top_p`.
#[derive(Debug, Clone)]
pub struct Sampler {
    temperature: f64,
    top_p: f64,
    rng: StdRng,
}

impl Sampler {
    /// A sampler with its own RNG seeded with `seed`.
    pub fn new(temperature: f64, top_p: f64, seed: u64) -> Self {
        Self {
            temperature,
            top_p,
            rng: StdRng::seed_from_u64(seed),
        }
    }

    /// The next token of `logits` (one per vocabulary entry).
    pub fn next_token(&mut self, logits: &[f32]) -> u32 {
        let argmax = || {
            logits
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .map_or(0, |(i, _)| i as u32)
        };
        if self.temperature <= 0.0 {
            return argmax();
        }
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (f64::from(l - max) / self.temperature).exp()))
            .filter(|(_, p)| p.is_finite() && *p > 0.0)
            .collect();
        if probs.is_empty() {
            return argmax();
        }
        let total: f64 = probs.iter().map(|p| p.1).sum();
        probs.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // The nucleus: the likeliest tokens up to top_p of the mass (at
        // least one).
        let (mut kept, mut mass) = (0, 0.0);
        for (_, p) in &probs {
            kept += 1;
            mass += p / total;
            if mass >= self.top_p {
                break;
            }
        }
        probs.truncate(kept);
        let kept_mass: f64 = probs.iter().map(|p| p.1).sum();
        let mut r = self.rng.random::<f64>() * kept_mass;
        for &(id, p) in &probs {
            if r < p {
                return id;
            }
            r -= p;
        }
        probs[probs.len() - 1].0
    }
}

/// How generation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// The model wrote EOS.
    Eos,
    /// `max_new_tokens` were generated.
    MaxTokens,
    /// The model's context is full.
    Context,
}

/// Counts and speeds of a generation.
#[derive(Debug, Clone, Copy)]
pub struct GenerationStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Seconds reading the prompt.
    pub prompt_secs: f64,
    /// Tokens generated (EOS not counted).
    pub generated_tokens: usize,
    /// Seconds generating them.
    pub generation_secs: f64,
    /// Why it stopped.
    pub stop: Stop,
}

/// What to generate with.
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    /// Tokens generated at most.
    pub max_new_tokens: usize,
    /// Whether the adapters take part (else the base alone).
    pub adapters: bool,
}

/// Generates after `prompt` (token ids), handing each piece of text to
/// `emit` as soon as tokens complete it.
pub fn generate(
    model: &LlamaModel,
    tok: &Tokenizer,
    prompt: &[u32],
    options: GenerateOptions,
    sampler: &mut Sampler,
    mut emit: impl FnMut(&str) -> std::io::Result<()>,
) -> Result<GenerationStats, GenerateError> {
    let context = model.config().max_position_embeddings;
    if prompt.is_empty() {
        return Err(InputError::EmptyPrompt.into());
    }
    if prompt.len() >= context {
        return Err(InputError::TooLong {
            tokens: prompt.len(),
            context,
        }
        .into());
    }
    // Sample only real tokens, never the padding of a vocabulary rounded up.
    let vocab = tok.vocab_size().min(model.config().vocab_size);
    let mut cache = KvCache::new(model.config());
    let start = Instant::now();
    let logits = model.forward_cached(prompt, &mut cache, options.adapters)?;
    let mut logits = last_row(&logits, vocab)?;
    let prompt_secs = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut stream = tok.decode_stream();
    let (mut generated, mut stop) = (0, Stop::MaxTokens);
    while generated < options.max_new_tokens {
        let id = sampler.next_token(&logits);
        if Some(id) == tok.eos() {
            stop = Stop::Eos;
            break;
        }
        generated += 1;
        if let Some(text) = stream.step(id)? {
            emit(&text).map_err(GenerateError::Output)?;
        }
        if generated == options.max_new_tokens {
            break;
        }
        if cache.len() >= context {
            stop = Stop::Context;
            break;
        }
        let next = model.forward_cached(&[id], &mut cache, options.adapters)?;
        logits = last_row(&next, vocab)?;
    }
    if let Some(text) = stream.finish() {
        emit(&text).map_err(GenerateError::Output)?;
    }
    Ok(GenerationStats {
        prompt_tokens: prompt.len(),
        prompt_secs,
        generated_tokens: generated,
        generation_secs: start.elapsed().as_secs_f64(),
        stop,
    })
}

/// The first `vocab` logits of the last position of `(1, t, v)` logits.
fn last_row(logits: &candle_core::Tensor, vocab: usize) -> candle_core::Result<Vec<f32>> {
    let t = logits.dim(1)?;
    logits
        .squeeze(0)?
        .get(t - 1)?
        .narrow(D::Minus1, 0, vocab)?
        .to_dtype(DType::F32)?
        .to_vec1()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_likeliest_and_top_p_keeps_the_nucleus() {
        let logits = [0.0f32, 5.0, 1.0, 4.9];
        assert_eq!(Sampler::new(0.0, 0.5, 1).next_token(&logits), 1);
        // top_p small: only the likeliest token is ever drawn.
        let mut s = Sampler::new(1.0, 0.01, 1);
        assert!((0..50).all(|_| s.next_token(&logits) == 1));
        // top_p = 1 at a high temperature: every token shows up.
        let mut s = Sampler::new(100.0, 1.0, 1);
        let mut seen = [false; 4];
        (0..400).for_each(|_| seen[s.next_token(&logits) as usize] = true);
        assert_eq!(seen, [true; 4]);
        // Different seeds draw differently.
        let draw = |seed| {
            let mut s = Sampler::new(2.0, 1.0, seed);
            (0..40).map(|_| s.next_token(&logits)).collect::<Vec<_>>()
        };
        assert_ne!(draw(1), draw(2));
    }

    #[test]
    fn a_prompt_takes_the_default_chat_format_without_a_template() {
        let tok = Tokenizer::Bytes;
        let raw = prompt_ids(
            &tok,
            &Prompt::Text {
                text: "hi".into(),
                raw: false,
            },
        )
        .unwrap();
        assert_eq!(raw, vec![256, u32::from(b'h'), u32::from(b'i')]);
        let m = vec![Message {
            role: "user".into(),
            content: "hi".into(),
        }];
        let ids = prompt_ids(&tok, &Prompt::Messages(m)).unwrap();
        let text = tok.decode(&ids).unwrap();
        assert_eq!(text, "<|user|>\nhi\n<|assistant|>\n");
        assert_eq!(ids[0], 256);
        let empty = Prompt::Text {
            text: String::new(),
            raw: true,
        };
        assert!(matches!(
            prompt_ids(&tok, &empty),
            Err(GenerateError::Input(InputError::EmptyPrompt))
        ));
    }
}
