//! Model size detection from a name or path.
//!
//! The rules live in `tables/detect.toml` and `tables/known_models.toml`;
//! `build.rs` compiles the size patterns and the families into DFAs that are
//! embedded in the binary and loaded zero-copy (the small size DFA is then
//! re-laid once into a compact table held in a static). The other lookups
//! go through filters derived from the tables at compile time: the
//! overriding families by the bytes around a written size, the known models
//! by length and end bytes. Detection allocates nothing, never panics, and
//! runs in time linear in the input.

mod compact_dfa;
mod family;
mod filter;
mod number;
mod segment;
mod swar;
mod written_size;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex_automata::Anchored;
use regex_automata::dfa::Automaton;
use regex_automata::dfa::dense::DFA;
use unicase::Ascii;

use self::compact_dfa::CompactDfa;
use self::family::FamilyMatcher;
use self::filter::{KNOWN_NAME_FILTER, overriding_family};
pub use self::segment::{last_segment, model_segment};
use self::written_size::size_from_name;
use crate::tables::{FALLBACK_DFA, FALLBACK_FAMILIES, KNOWN_MODEL_PARAMS, SIZE_DFA, SizeCategory};

/// Anything a model can be named by: a Hugging Face id, a bare name, or a
/// local path, as text or as raw bytes (invalid UTF-8 is fine).
pub trait ModelName {
    /// The name's bytes (for an `OsStr`, its platform encoding).
    fn name_bytes(&self) -> &[u8];
}

impl ModelName for str {
    fn name_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl ModelName for String {
    fn name_bytes(&self) -> &[u8] {
        self.as_bytes()
    }
}
impl ModelName for [u8] {
    fn name_bytes(&self) -> &[u8] {
        self
    }
}
impl<const N: usize> ModelName for [u8; N] {
    fn name_bytes(&self) -> &[u8] {
        self
    }
}
impl ModelName for Vec<u8> {
    fn name_bytes(&self) -> &[u8] {
        self
    }
}
impl ModelName for OsStr {
    fn name_bytes(&self) -> &[u8] {
        self.as_encoded_bytes()
    }
}
impl ModelName for OsString {
    fn name_bytes(&self) -> &[u8] {
        self.as_encoded_bytes()
    }
}
impl ModelName for Path {
    fn name_bytes(&self) -> &[u8] {
        self.as_os_str().as_encoded_bytes()
    }
}
impl ModelName for PathBuf {
    fn name_bytes(&self) -> &[u8] {
        self.as_os_str().as_encoded_bytes()
    }
}
impl<T: ModelName + ?Sized> ModelName for &T {
    fn name_bytes(&self) -> &[u8] {
        (**self).name_bytes()
    }
}

/// How a model's size was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeSource {
    /// A size written in the name (`7B`, `0.5b`, `135M`, a known `8x7B`).
    Name,
    /// A mixture of experts of unknown layout written in the name (`4x7B`):
    /// experts times expert size, an upper estimate (experts share weights).
    NameEstimate,
    /// A model known by its exact name (`tables/known_models.toml`).
    KnownModel,
    /// A known family in the name (`mistral`, `phi-4`, `Llama-4-Scout-17B-16E`).
    Family,
    /// Nothing found: category of the smallest size, count 0.
    Unknown,
    /// Counted from the model's local files (`config.json`, safetensors or
    /// GGUF headers); see [`crate::files`].
    Files,
}

impl SizeSource {
    /// Human-readable description (`from name`, ...).
    pub const fn describe(self) -> &'static str {
        match self {
            SizeSource::Name => "from name",
            SizeSource::NameEstimate => "from name (MoE upper estimate)",
            SizeSource::KnownModel => "from known model",
            SizeSource::Family => "from known family",
            SizeSource::Unknown => "unknown",
            SizeSource::Files => "from files",
        }
    }
}

/// A detected model size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
pub struct ModelSize {
    /// Size category, which picks the scaling configuration.
    pub category: SizeCategory,
    /// Parameter count; 0 when unknown.
    pub params: u64,
    /// How the size was found.
    pub source: SizeSource,
}

impl ModelSize {
    /// The size of a model with `params` parameters (0: unknown).
    #[inline]
    pub const fn from_params(params: u64, source: SizeSource) -> ModelSize {
        ModelSize {
            category: SizeCategory::for_params(params),
            params,
            source,
        }
    }

    /// Parameter count in billions (`7.0`, `0.5`, `0.135`); 0 when unknown.
    pub fn params_billions(&self) -> f64 {
        self.params as f64 / 1e9
    }

    /// Whether a parameter count was found.
    pub const fn is_known(&self) -> bool {
        self.params != 0
    }
}

impl SizeCategory {
    /// The category of a model with `params` parameters: the first whose
    /// upper bound admits it. 0 (unknown) gives the first category.
    #[inline]
    pub const fn for_params(params: u64) -> SizeCategory {
        let mut i = 0;
        while i < SizeCategory::ALL.len() {
            match SizeCategory::ALL[i].config().max_params {
                Some(max) if params > max => {}
                _ => return SizeCategory::ALL[i],
            }
            i += 1;
        }
        SizeCategory::ALL[SizeCategory::ALL.len() - 1]
    }
}

type StaticDfa = DFA<&'static [u32]>;

struct Matchers {
    /// Size patterns, anchored, leftmost-first, as a compact table.
    size: CompactDfa,
    /// Other families, consulted when no size is written.
    fallback: FamilyMatcher,
}

/// The DFAs, validated once (no heap allocation: they are read in place, and
/// the size DFA's compact table lives in this static).
#[inline]
fn matchers() -> Option<&'static Matchers> {
    static MATCHERS: OnceLock<Option<Matchers>> = OnceLock::new();
    MATCHERS
        .get_or_init(|| {
            let (size, _) = DFA::from_bytes(&SIZE_DFA.bytes).ok()?;
            // The start states exist because no table pattern uses a
            // look-behind assertion (`^`, `\b`) at its start; a table that did
            // would make every detection "unknown", which tests catch.
            let size_start = size.universal_start_state(Anchored::Yes)?;
            Some(Matchers {
                size: CompactDfa::new(&size, size_start)?,
                fallback: FamilyMatcher::load(&FALLBACK_DFA.bytes, &FALLBACK_FAMILIES)?,
            })
        })
        .as_ref()
}

/// Whether the embedded DFAs load; `false` means a broken build.
pub fn matchers_ok() -> bool {
    matchers().is_some()
}

/// Detects a model's size from its name: a Hugging Face id (`org/name`), a
/// bare name, or a local path.
///
/// Never fails: an unknown size gives the smallest category and count 0.
/// Allocates nothing.
///
/// ```
/// use qlora_scale::{detect_model_size, SizeCategory};
/// let size = detect_model_size("meta-llama/Llama-2-13b-chat-hf");
/// assert_eq!(size.category, SizeCategory::Medium);
/// assert_eq!(size.params, 13_000_000_000);
/// assert_eq!(detect_model_size("Qwen/Qwen2.5-0.5B").params_billions(), 0.5);
/// ```
pub fn detect_model_size<N: ModelName + ?Sized>(name: &N) -> ModelSize {
    detect_bytes(name.name_bytes())
}

/// [`detect_model_size`] of a name's bytes: one function, compiled in this
/// crate with its helpers inlined, whatever crate calls the generic wrapper.
fn detect_bytes(name: &[u8]) -> ModelSize {
    let segment = model_segment(name);
    let Some(m) = matchers() else {
        return ModelSize::from_params(0, SizeSource::Unknown);
    };
    // Names that write a size: an overriding family beats the written size.
    // (The generator checks that every overriding family writes a size and
    // that no exact model name does, so each name needs one family pass.)
    if let Some((params, source, at)) = size_from_name(m, segment) {
        return match overriding_family(segment, at) {
            Some(params) => ModelSize::from_params(params, SizeSource::Family),
            None => ModelSize::from_params(params, source),
        };
    }
    let known = KNOWN_NAME_FILTER
        .admits(segment)
        .then(|| std::str::from_utf8(segment).ok())
        .flatten()
        .and_then(|s| KNOWN_MODEL_PARAMS.get(&Ascii::new(s)));
    if let Some(&params) = known {
        return ModelSize::from_params(params, SizeSource::KnownModel);
    }
    if let Some(params) = m.fallback.find(segment) {
        return ModelSize::from_params(params, SizeSource::Family);
    }
    ModelSize::from_params(0, SizeSource::Unknown)
}

/// Formats a parameter count in billions as the CLI prints it: `7`, `0.5`,
/// `46.7`, `0.135` (shortest exact decimal, at most 3 places).
pub fn format_params_billions(params: u64) -> String {
    let billions = params as f64 / 1e9;
    let s = format!("{billions:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}
