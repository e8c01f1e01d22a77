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

use minijinja::{Environment, ErrorKind, context};

use super::data::Message;

const NAME: &str = "chat_template";

/// A compiled chat template with the special tokens it may print.
pub struct ChatTemplate {
    env: Environment<'static>,
    bos: Option<String>,
    eos: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source`; `bos`/`eos` are what `bos_token` and `eos_token`
    /// print. A syntax error is returned as text naming its line.
    pub fn new(source: &str, bos: Option<String>, eos: Option<String>) -> Result<Self, String> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Templates call raise_exception("...") to reject a conversation.
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| describe(&e))?;
        Ok(Self { env, bos, eos })
    }

    /// `messages` in the template's format; `generation_prompt` appends what
    /// starts the assistant's reply.
    pub fn render(&self, messages: &[Message], generation_prompt: bool) -> Result<String, String> {
        let msgs: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| context! { role => m.role.as_str(), content => m.content.as_str() })
            .collect();
        let t = self.env.get_template(NAME).map_err(|e| describe(&e))?;
        t.render(context! {
            messages => msgs,
            add_generation_prompt => generation_prompt,
            bos_token => self.bos.as_deref().unwrap_or(""),
            eos_token => self.eos.as_deref().unwrap_or(""),
        })
        .map_err(|e| describe(&e))
    }

    /// What `bos_token` prints, when the tokenizer has one.
    pub fn bos_text(&self) -> Option<&str> {
        self.bos.as_deref()
    }

    /// A conversation as `(text, trained)` segments: each assistant turn's
    /// reply (after the template's own header for it) is trained, the rest
    /// is not. Needs a template that renders a conversation's prefixes as
    /// prefixes of its rendering, as chat templates do.
    pub fn segments(&self, messages: &[Message]) -> Result<Vec<(String, bool)>, String> {
        let mut out = Vec::new();
        let mut prev = String::new();
        let prefix_error = |i: usize| {
            format!(
                "the chat template does not render message {} as an extension of the messages before it, so the assistant's turns cannot be told apart",
                i + 1
            )
        };
        for (i, m) in messages.iter().enumerate() {
            let full = self.render(&messages[..=i], false)?;
            if m.role == "assistant" {
                let head = self.render(&messages[..i], true)?;
                let (Some(h), Some(reply)) = (
                    head.strip_prefix(prev.as_str()),
                    full.strip_prefix(head.as_str()),
                ) else {
                    return Err(prefix_error(i));
                };
                out.push((h.to_string(), false));
                out.push((reply.to_string(), true));
            } else {
                let Some(rest) = full.strip_prefix(prev.as_str()) else {
                    return Err(prefix_error(i));
                };
                out.push((rest.to_string(), false));
            }
            prev = full;
        }
        // Adjacent segments of the same kind become one.
        let mut merged: Vec<(String, bool)> = Vec::with_capacity(out.len());
        for (text, trained) in out {
            match merged.last_mut() {
                _ if text.is_empty() => {}
                Some(last) if last.1 == trained => last.0.push_str(&text),
                _ => merged.push((text, trained)),
            }
        }
        Ok(merged)
    }
}

fn describe(e: &minijinja::Error) -> String {
    let mut s = e.to_string();
    if let Some(line) = e.line() {
        s = format!("chat template line {line}: {s}");
    }
    s
}
