//! Model size detection from a name or path.
//!
//! The rules live in `tables/detect.toml`; `build.rs` compiles its patterns
//! into DFAs that are embedded in the binary and loaded zero-copy. Detection
//! allocates nothing, never panics, and runs in time linear in the input.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex_automata::Input;
use regex_automata::dfa::dense::DFA;
use regex_automata::dfa::regex::Regex;
use regex_automata::dfa::{Automaton, OverlappingState};

use crate::tables::{
    FAMILIES, FAMILY_DFA, PATTERN_KINDS, PatternKind, SIZE_FWD_DFA, SIZE_REV_DFA, SizeCategory,
    UNIT_PARAMS,
};

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
    /// A size written in the name (`7B`, `0.5b`, `135M`).
    Name,
    /// A known family in the name (`mistral`, `phi-2`), no size written.
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
            SizeSource::Family => "from family",
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
    size: Regex<StaticDfa>,
    family: StaticDfa,
}

/// The DFAs, validated once (no allocation: they are read in place).
fn matchers() -> Option<&'static Matchers> {
    static MATCHERS: OnceLock<Option<Matchers>> = OnceLock::new();
    MATCHERS
        .get_or_init(|| {
            let (fwd, _) = DFA::from_bytes(&SIZE_FWD_DFA.bytes).ok()?;
            let (rev, _) = DFA::from_bytes(&SIZE_REV_DFA.bytes).ok()?;
            let (family, _) = DFA::from_bytes(&FAMILY_DFA.bytes).ok()?;
            Some(Matchers {
                size: Regex::builder().build_from_dfas(fwd, rev),
                family,
            })
        })
        .as_ref()
}

/// Whether the embedded DFAs load; `false` means a broken build.
pub fn matchers_ok() -> bool {
    matchers().is_some()
}

/// The last path component of `name`, `/` and `\` both separating, trailing
/// separators ignored.
pub fn last_segment(name: &[u8]) -> &[u8] {
    let is_sep = |b: &u8| *b == b'/' || *b == b'\\';
    let end = name.iter().rposition(|b| !is_sep(b)).map_or(0, |i| i + 1);
    let trimmed = &name[..end];
    let start = trimmed.iter().rposition(is_sep).map_or(0, |i| i + 1);
    &trimmed[start..]
}

/// Reads a parameter count from a matched span: ASCII digits, an optional
/// fraction, optional `-`/`_`, then a unit letter. Saturates on overflow.
fn parse_size(span: &[u8]) -> Option<u64> {
    let mut i = 0;
    let mut int: u128 = 0;
    while let Some(d) = span.get(i).filter(|b| b.is_ascii_digit()) {
        int = int.saturating_mul(10).saturating_add(u128::from(d - b'0'));
        i += 1;
    }
    if i == 0 {
        return None;
    }
    let (mut frac, mut scale) = (0u128, 1u128);
    if span.get(i) == Some(&b'.') {
        i += 1;
        while let Some(d) = span.get(i).filter(|b| b.is_ascii_digit()) {
            if scale < 1_000_000_000_000_000_000 {
                frac = frac * 10 + u128::from(d - b'0');
                scale *= 10;
            }
            i += 1;
        }
    }
    while matches!(span.get(i), Some(b'-' | b'_')) {
        i += 1;
    }
    let letter = span.get(i)?.to_ascii_lowercase();
    if !letter.is_ascii_lowercase() {
        return None;
    }
    let unit = u128::from(UNIT_PARAMS[usize::from(letter - b'a')]);
    if unit == 0 {
        return None;
    }
    let total = int.saturating_mul(unit).saturating_add(frac * unit / scale);
    Some(u64::try_from(total).unwrap_or(u64::MAX))
}

/// The first size written in `segment`, skipping tokens the tables mark as
/// not sizes.
fn size_from_name(m: &Matchers, segment: &[u8]) -> Option<u64> {
    let mut input = Input::new(segment);
    while let Ok(Some(found)) = m.size.try_search(&input) {
        let span = &segment[found.start()..found.end()];
        if PATTERN_KINDS[found.pattern().as_usize()] == PatternKind::Size
            && let Some(params) = parse_size(span).filter(|&p| p > 0)
        {
            return Some(params);
        }
        // Go on after this token; an empty match still advances.
        let next = found.end().max(found.start() + 1);
        if next > segment.len() {
            break;
        }
        input.set_start(next);
    }
    None
}

/// The family fallback: of the families occurring in `segment`, the one
/// listed first in the table.
fn size_from_family(m: &Matchers, segment: &[u8]) -> Option<u64> {
    let input = Input::new(segment);
    let mut state = OverlappingState::start();
    let mut best: Option<usize> = None;
    loop {
        if m.family
            .try_search_overlapping_fwd(&input, &mut state)
            .is_err()
        {
            break;
        }
        match state.get_match() {
            Some(hm) => {
                let id = hm.pattern().as_usize();
                best = Some(best.map_or(id, |b| b.min(id)));
            }
            None => break,
        }
    }
    best.map(|i| FAMILIES[i].params)
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
    let segment = last_segment(name.name_bytes());
    let Some(m) = matchers() else {
        return ModelSize::from_params(0, SizeSource::Unknown);
    };
    if let Some(params) = size_from_name(m, segment) {
        return ModelSize::from_params(params, SizeSource::Name);
    }
    if let Some(params) = size_from_family(m, segment) {
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
