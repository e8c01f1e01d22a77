//! A model's own chat template: the Jinja `chat_template` of its
//! `tokenizer_config.json`, rendered with MiniJinja (with its Python-method
//! compatibility layer, as Hugging Face templates call `.strip()`,
//! `.startswith()` and the like), so a conversation is trained in exactly the
//! format the model is prompted with.
//!
//! ```
//! use qlora_scale::train::chat::ChatTemplate;
//! use qlora_scale::train::data::Message;
//! let t = ChatTemplate::new(
//!     "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}<|end|>{% endfor %}\
//!      {% if add_generation_prompt %}<|assistant|>{% endif %}",
//!     None,
//!     Some("<|end|>".into()),
//! )
//! .unwrap();
//! let m = [Message { role: "user".into(), content: "hi".into() }];
//! assert_eq!(t.render(&m, true).unwrap(), "<|user|>hi<|end|><|assistant|>");
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use minijinja::value::{Enumerator, Object, Value};
use minijinja::{Environment, ErrorKind, context};

use super::data::Message;
use crate::alloc_guard;
use crate::tables::trainer::{
    CHAT_TEMPLATE_FUEL, CHAT_TEMPLATE_MAX_BYTES, CHAT_TEMPLATE_MAX_MEMORY_BYTES,
};

const NAME: &str = "chat_template";

/// Messages at the start of a conversation whose boundaries the linear
/// [`ChatTemplate::segments`] checks against prefix renderings.
const CHECKED_HEAD: usize = 4;

/// A compiled chat template with the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
    origin: Option<PathBuf>,
    /// What the `train` binary prints when a rendering passes
    /// `trainer.chat_template_max_memory_bytes` ([`crate::alloc_guard`]).
    memory_message: String,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("origin", &self.origin)
            .finish_non_exhaustive()
    }
}

/// Where a rendering stands: bytes written so far, and the position at
/// which each message was first looked at.
struct Probe {
    written: AtomicUsize,
    first_seen: Vec<AtomicUsize>,
}

/// A message as the template sees it: a map of `role` and `content` that
/// tells its [`Probe`] when it is first read.
#[derive(Debug)]
struct ProbedMessage {
    index: usize,
    role: Value,
    content: Value,
    probe: Arc<Probe>,
}

impl std::fmt::Debug for Probe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Probe")
    }
}

impl Object for ProbedMessage {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let value = match key.as_str()? {
            "role" => self.role.clone(),
            "content" => self.content.clone(),
            _ => return None,
        };
        let p = &self.probe;
        let at = p.written.load(Ordering::Relaxed);
        p.first_seen[self.index].fetch_min(at, Ordering::Relaxed);
        Some(value)
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(&["role", "content"])
    }
}

/// Collects a rendering, failing past [`CHAT_TEMPLATE_MAX_BYTES`].
struct CappedWriter<'a> {
    out: Vec<u8>,
    over: bool,
    probe: Option<&'a Probe>,
}

impl std::io::Write for CappedWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if (self.out.len() + buf.len()) as u64 > CHAT_TEMPLATE_MAX_BYTES {
            self.over = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.out.extend_from_slice(buf);
        if let Some(p) = self.probe {
            p.written.store(self.out.len(), Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are what `bos_token` and `eos_token`
    /// print. A syntax error is returned as text naming its line. Each
    /// rendering may run `trainer.chat_template_fuel` instructions and write
    /// `trainer.chat_template_max_bytes` bytes (`tables/defaults.toml`).
    /// MiniJinja itself refuses a string repetition (`'a' * n`) longer than
    /// 100 MB. Values a template builds without printing them, such as a
    /// string concatenated with itself (`s ~ s`) again and again, which costs
    /// one instruction per doubling, are bounded by
    /// `trainer.chat_template_max_memory_bytes` where [`crate::alloc_guard`]
    /// is the global allocator (the `train` binary): past it the process
    /// ends with a message naming the template's file.
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        // Templates call raise_exception("...") to reject a conversation.
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| describe(&e))?;
        Ok(Self {
            env,
            bos,
            eos,
            memory_message: memory_message(Path::new("chat template")),
            origin: None,
        })
    }

    /// The same template, read from `path` (`tokenizer_config.json`).
    pub fn with_origin(mut self, path: PathBuf) -> Self {
        self.memory_message = memory_message(&path);
        self.origin = Some(path);
        self
    }

    /// The file the template was read from, when known.
    pub fn origin(&self) -> Option<&Path> {
        self.origin.as_deref()
    }

    /// `messages` in the template's format; `generation_prompt` appends what
    /// starts the assistant's reply.
    pub fn render(&self, messages: &[Message], generation_prompt: bool) -> Result<String, String> {
        self.render_values(messages_values(messages), generation_prompt, None)
            .map(|(text, _)| text)
    }

    /// Renders `msgs`; returns the text and the fuel it used.
    fn render_values(
        &self,
        msgs: Vec<Value>,
        generation_prompt: bool,
        probe: Option<&Probe>,
    ) -> Result<(String, u64), String> {
        let t = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        let mut w = CappedWriter {
            out: Vec::new(),
            over: false,
            probe,
        };
        let ctx = context! {
            messages => msgs,
            add_generation_prompt => generation_prompt,
            bos_token => self.bos.as_deref().unwrap_or(""),
            eos_token => self.eos.as_deref().unwrap_or(""),
        };
        let rendered =
            alloc_guard::limit(CHAT_TEMPLATE_MAX_MEMORY_BYTES, &self.memory_message, || {
                t.render_captured_to(ctx, &mut w)
                    .map(|c| c.state().fuel_levels().map_or(0, |(used, _)| used))
            });
        let used = match rendered {
            Ok(used) => used,
            Err(_) if w.over => {
                return Err(format!(
                    "rendering a conversation wrote more than the output limit of {CHAT_TEMPLATE_MAX_BYTES} bytes (trainer.chat_template_max_bytes)"
                ));
            }
            Err(e) if e.kind() == ErrorKind::OutOfFuel => return Err(out_of_fuel()),
            Err(e) => return Err(describe(&e)),
        };
        let text = String::from_utf8(w.out)
            .map_err(|_| "the chat template wrote text that is not UTF-8".to_string())?;
        Ok((text, used))
    }

    /// What `bos_token` prints, when the tokenizer has one.
    pub fn bos_text(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    /// A conversation as `(text, trained)` segments: each assistant turn's
    /// reply (after the template's own header for it) is trained, the rest
    /// is not. Needs a template that renders a conversation's prefixes as
    /// prefixes of its rendering, as chat templates do.
    ///
    /// The conversation is rendered once, noting where the template's output
    /// stood when it first read each message; those boundaries are checked
    /// against renderings of the first messages' prefixes and of all but the
    /// last, so the work is linear in the conversation's length. A template
    /// whose boundaries do not check out is rendered prefix by prefix
    /// instead, within a total of `trainer.chat_template_fuel` instructions.
    pub fn segments(&self, messages: &[Message]) -> Result<Vec<(String, bool)>, String> {
        let bounds = match self.probed_bounds(messages)? {
            Some(b) => b,
            None => self.prefix_bounds(messages)?,
        };
        let Bounds { text, ends, heads } = bounds;
        let mut out = Vec::with_capacity(messages.len() * 2);
        let mut prev = 0;
        for (i, &end) in ends.iter().enumerate() {
            if let Some(head) = heads[i] {
                out.push((&text[prev..head], false));
                out.push((&text[head..end], true));
            } else {
                out.push((&text[prev..end], false));
            }
            prev = end;
        }
        // Adjacent segments of the same kind become one.
        let mut merged: Vec<(String, bool)> = Vec::with_capacity(out.len());
        for (text, trained) in out {
            match merged.last_mut() {
                _ if text.is_empty() => {}
                Some(last) if last.1 == trained => last.0.push_str(text),
                _ => merged.push((text.to_string(), trained)),
            }
        }
        Ok(merged)
    }

    /// Boundaries from one probed rendering, or `None` when they do not
    /// match the prefix renderings they are checked against.
    fn probed_bounds(&self, messages: &[Message]) -> Result<Option<Bounds>, String> {
        let n = messages.len();
        if n == 0 {
            return Ok(None);
        }
        let probe = Arc::new(Probe {
            written: AtomicUsize::new(0),
            first_seen: (0..n).map(|_| AtomicUsize::new(usize::MAX)).collect(),
        });
        let msgs: Vec<Value> = messages
            .iter()
            .enumerate()
            .map(|(index, m)| {
                Value::from_object(ProbedMessage {
                    index,
                    role: Value::from(m.role.as_str()),
                    content: Value::from(m.content.as_str()),
                    probe: probe.clone(),
                })
            })
            .collect();
        let (text, _) = self.render_values(msgs, false, Some(&probe))?;
        // Message i ends where message i + 1 was first read.
        let mut ends = Vec::with_capacity(n);
        for i in 1..n {
            let at = probe.first_seen[i].load(Ordering::Relaxed);
            if at > text.len() || !text.is_char_boundary(at) || ends.last().is_some_and(|&e| e > at)
            {
                return Ok(None);
            }
            ends.push(at);
        }
        ends.push(text.len());
        // An assistant turn starts after what the generation prompt adds.
        let with_prompt = self.render(messages, true)?;
        let Some(prompt) = with_prompt.strip_prefix(text.as_str()) else {
            return Ok(None);
        };
        let mut heads = vec![None; n];
        for (i, m) in messages.iter().enumerate() {
            if m.role == "assistant" {
                let start = if i == 0 { 0 } else { ends[i - 1] };
                if !text[start..ends[i]].starts_with(prompt) {
                    return Ok(None);
                }
                heads[i] = Some(start + prompt.len());
            }
        }
        // Check the first messages and the last one against their prefixes.
        let checked: Vec<usize> = (0..n.min(CHECKED_HEAD))
            .chain((n > CHECKED_HEAD).then_some(n - 1))
            .collect();
        for i in checked {
            let full = self.render(&messages[..=i], false)?;
            if text.get(..ends[i]) != Some(full.as_str()) {
                return Ok(None);
            }
            if let Some(head) = heads[i] {
                let h = self.render(&messages[..i], true)?;
                if text.get(..head) != Some(h.as_str()) {
                    return Ok(None);
                }
            }
        }
        Ok(Some(Bounds { text, ends, heads }))
    }

    /// Boundaries from rendering every prefix, within a total fuel budget.
    fn prefix_bounds(&self, messages: &[Message]) -> Result<Bounds, String> {
        let prefix_error = |i: usize| {
            format!(
                "the chat template does not render message {} as an extension of the messages before it, so the assistant's turns cannot be told apart",
                i + 1
            )
        };
        let mut budget = CHAT_TEMPLATE_FUEL;
        let mut spend = |msgs: &[Message], prompt: bool| -> Result<String, String> {
            let values = messages_values(msgs);
            let (text, used) = self.render_values(values, prompt, None)?;
            budget = budget.checked_sub(used).ok_or_else(out_of_fuel)?;
            Ok(text)
        };
        let mut text = String::new();
        let mut ends = Vec::with_capacity(messages.len());
        let mut heads = vec![None; messages.len()];
        for (i, m) in messages.iter().enumerate() {
            let full = spend(&messages[..=i], false)?;
            if m.role == "assistant" {
                let head = spend(&messages[..i], true)?;
                if !head.starts_with(text.as_str()) || !full.starts_with(head.as_str()) {
                    return Err(prefix_error(i));
                }
                heads[i] = Some(head.len());
            } else if !full.starts_with(text.as_str()) {
                return Err(prefix_error(i));
            }
            ends.push(full.len());
            text = full;
        }
        Ok(Bounds { text, ends, heads })
    }
}

/// A rendered conversation: message i is `text[ends[i-1]..ends[i]]`, its
/// trained reply from `heads[i]` when it is an assistant turn.
struct Bounds {
    text: String,
    ends: Vec<usize>,
    heads: Vec<Option<usize>>,
}

fn messages_values(messages: &[Message]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
        .collect()
}

/// The line the `train` binary prints when a rendering of the template
/// from `path` holds more memory than it may.
fn memory_message(path: &Path) -> String {
    format!(
        "error: {}: chat_template: rendering a conversation held more than the memory limit of {CHAT_TEMPLATE_MAX_MEMORY_BYTES} bytes (trainer.chat_template_max_memory_bytes)",
        path.display()
    )
}

fn out_of_fuel() -> String {
    format!(
        "rendering a conversation ran past the fuel limit of {CHAT_TEMPLATE_FUEL} instructions (trainer.chat_template_fuel)"
    )
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        s = format!("chat template line {line}: {s}");
    }
    s
}
