//! Model size detection from a name or path.
//!
//! The rules live in `tables/detect.toml`; `build.rs` compiles its patterns
//! into DFAs that are embedded in the binary and loaded zero-copy. Detection
//! allocates nothing, never panics, and runs in time linear in the input.

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex_automata::Anchored;
use regex_automata::dfa::Automaton;
use regex_automata::dfa::dense::DFA;
use regex_automata::util::primitives::StateID;
use unicase::Ascii;

use crate::tables::{
    CACHE_PREFIX, CACHE_SEPARATOR, FALLBACK_DFA, FALLBACK_FAMILIES, Family, HASH_MIN_LEN,
    KNOWN_MODEL_NAME_LENS, KNOWN_MODEL_PARAMS, MOE_LAYOUTS, OVERRIDE_DFA, OVERRIDE_FAMILIES,
    PATTERN_KINDS, PatternKind, SIZE_DFA, SKIP_SEGMENTS, SizeCategory, UNIT_PARAMS,
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
    /// Size patterns, anchored, leftmost-first.
    size: StaticDfa,
    /// The size DFA's start state, the same at every position (no pattern
    /// looks behind its start).
    size_start: StateID,
    /// Overriding families' size-and-rest, anchored, all matches.
    overriding: StaticDfa,
    /// Its anchored start state.
    overriding_start: StateID,
    /// Other families, consulted when no size is written.
    fallback: FamilyMatcher,
}

/// The overriding family whose written size is the name's size at `at`:
/// its rest matches at `at` (anchored DFA, a few bytes) and its prefix ends
/// there. The first listed wins.
fn overriding_family(m: &Matchers, segment: &[u8], at: usize) -> Option<u64> {
    let dfa = &m.overriding;
    let before = &segment[..at];
    let mut best = usize::MAX;
    let mut note = |state: StateID| {
        for k in 0..dfa.match_len(state) {
            let id = dfa.match_pattern(state, k).as_usize();
            let prefix = OVERRIDE_FAMILIES
                .get(id)
                .map_or(&b""[..], |f| f.prefix.as_bytes());
            if id < best
                && before.len() >= prefix.len()
                && before[before.len() - prefix.len()..].eq_ignore_ascii_case(prefix)
            {
                best = id;
            }
        }
    };
    let mut state = m.overriding_start;
    for &b in &segment[at..] {
        state = dfa.next_state(state, b);
        if dfa.is_special_state(state) {
            if dfa.is_match_state(state) {
                note(state);
            } else if dfa.is_dead_state(state) || dfa.is_quit_state(state) {
                return OVERRIDE_FAMILIES.get(best).map(|f| f.params);
            }
        }
    }
    state = dfa.next_eoi_state(state);
    if dfa.is_match_state(state) {
        note(state);
    }
    OVERRIDE_FAMILIES.get(best).map(|f| f.params)
}

/// An all-matches DFA of family substrings and the families it names.
struct FamilyMatcher {
    dfa: StaticDfa,
    start: StateID,
    families: &'static [Family],
}

impl FamilyMatcher {
    fn load(bytes: &'static [u8], families: &'static [Family]) -> Option<FamilyMatcher> {
        let (dfa, _) = DFA::from_bytes(bytes).ok()?;
        let start = dfa.universal_start_state(Anchored::No)?;
        Some(FamilyMatcher {
            dfa,
            start,
            families,
        })
    }

    /// The parameters of the first listed family occurring in `segment`.
    /// One pass; every match state names the families ending there.
    fn find(&self, segment: &[u8]) -> Option<u64> {
        let dfa = &self.dfa;
        let mut best = usize::MAX;
        let note = |state: StateID, best: &mut usize| {
            for k in 0..dfa.match_len(state) {
                *best = (*best).min(dfa.match_pattern(state, k).as_usize());
            }
        };
        let mut state = self.start;
        for &b in segment {
            state = dfa.next_state(state, b);
            if dfa.is_special_state(state) {
                if dfa.is_match_state(state) {
                    note(state, &mut best);
                    if best == 0 {
                        break;
                    }
                } else if dfa.is_dead_state(state) || dfa.is_quit_state(state) {
                    break;
                }
            }
        }
        if best != 0 {
            state = dfa.next_eoi_state(state);
            if dfa.is_match_state(state) {
                note(state, &mut best);
            }
        }
        self.families.get(best).map(|f| f.params)
    }
}

/// The DFAs, validated once (no allocation: they are read in place).
fn matchers() -> Option<&'static Matchers> {
    static MATCHERS: OnceLock<Option<Matchers>> = OnceLock::new();
    MATCHERS
        .get_or_init(|| {
            let (size, _) = DFA::from_bytes(&SIZE_DFA.bytes).ok()?;
            // The start states exist because no table pattern uses a
            // look-behind assertion (`^`, `\b`) at its start; a table that did
            // would make every detection "unknown", which tests catch.
            let size_start = size.universal_start_state(Anchored::Yes)?;
            let (overriding, _) = DFA::from_bytes(&OVERRIDE_DFA.bytes).ok()?;
            let overriding_start = overriding.universal_start_state(Anchored::Yes)?;
            Some(Matchers {
                size,
                size_start,
                overriding_start,
                overriding,
                fallback: FamilyMatcher::load(&FALLBACK_DFA.bytes, &FALLBACK_FAMILIES)?,
            })
        })
        .as_ref()
}

/// Whether the embedded DFAs load; `false` means a broken build.
pub fn matchers_ok() -> bool {
    matchers().is_some()
}

/// The last path component of `name`, `/` and `\\` both separating, trailing
/// separators ignored.
pub fn last_segment(name: &[u8]) -> &[u8] {
    let is_sep = |b: &u8| *b == b'/' || *b == b'\\';
    let end = name.iter().rposition(|b| !is_sep(b)).map_or(0, |i| i + 1);
    let trimmed = &name[..end];
    let start = memchr::memrchr2(b'/', b'\\', trimmed).map_or(0, |i| i + 1);
    &trimmed[start..]
}

/// Whether a path component names no model: a cache directory
/// (`snapshots`) or a commit hash.
fn is_skipped(component: &[u8]) -> bool {
    (component.len() >= HASH_MIN_LEN && component.iter().all(u8::is_ascii_hexdigit))
        || SKIP_SEGMENTS
            .iter()
            .any(|s| component.eq_ignore_ascii_case(s.as_bytes()))
}

/// The component of `name` that names the model: the last one that is not a
/// cache directory or a hash, and of a cache component
/// (`models--ORG--NAME`), the part after the last separator.
///
/// ```
/// use qlora_scale::detect::model_segment;
/// let p = b"/hf/hub/models--Qwen--Qwen2.5-0.5B/snapshots/7ae557604adf67be50417f59c2c2f167def9a775/";
/// assert_eq!(model_segment(p), b"Qwen2.5-0.5B");
/// assert_eq!(model_segment(b"meta-llama/Llama-2-7b-hf"), b"Llama-2-7b-hf");
/// ```
pub fn model_segment(name: &[u8]) -> &[u8] {
    let mut rest = name;
    let mut segment = last_segment(rest);
    loop {
        if segment.is_empty() || !is_skipped(segment) {
            break;
        }
        // Drop this component (and the separators after it) and look again.
        let before = segment.as_ptr() as usize - rest.as_ptr() as usize;
        rest = &rest[..before];
        let next = last_segment(rest);
        if next.is_empty() {
            break;
        }
        segment = next;
    }
    if !segment.starts_with(CACHE_PREFIX.as_bytes()) {
        return segment;
    }
    let sep = CACHE_SEPARATOR.as_bytes();
    match segment.windows(sep.len()).rposition(|w| w == sep) {
        Some(i) if i + sep.len() < segment.len() => &segment[i + sep.len()..],
        _ => segment,
    }
}

/// Reads ASCII digits from `bytes[i..]`: (value, digits read, 10^n for the
/// n digits kept). Keeps at most 18 digits (the rest only count as read), so
/// neither value nor scale overflows.
fn digits(bytes: &[u8], mut i: usize) -> (u64, usize, u64) {
    let (mut value, mut scale, start) = (0u64, 1u64, i);
    while let Some(d) = bytes.get(i).filter(|b| b.is_ascii_digit()) {
        if scale < 1_000_000_000_000_000_000 {
            value = value * 10 + u64::from(d - b'0');
            scale *= 10;
        }
        i += 1;
    }
    (value, i - start, scale)
}

/// Reads the parameter count written at `bytes[start..]`, where the size DFA
/// matched: ASCII digits, an optional fraction (`.5`, `_6`), optional
/// `-`/`_`, a unit letter, and optional digits after the unit as the fraction
/// (`7b1` is 7.1B) when no letter follows them. Saturates on overflow.
fn parse_size(bytes: &[u8], start: usize) -> Option<u64> {
    let mut i = start;
    let mut int: u64 = 0;
    while let Some(d) = bytes.get(i).filter(|b| b.is_ascii_digit()) {
        int = int.saturating_mul(10).saturating_add(u64::from(d - b'0'));
        i += 1;
    }
    if i == start {
        return None;
    }
    let (mut frac, mut scale) = (0u64, 1u64);
    if matches!(bytes.get(i), Some(b'.' | b'_')) && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
    {
        let (f, n, s) = digits(bytes, i + 1);
        (frac, scale) = (f, s);
        i += 1 + n;
    }
    while matches!(bytes.get(i), Some(b'-' | b'_')) {
        i += 1;
    }
    let letter = bytes.get(i)?.to_ascii_lowercase();
    if !letter.is_ascii_lowercase() {
        return None;
    }
    let unit = UNIT_PARAMS[usize::from(letter - b'a')];
    if unit == 0 {
        return None;
    }
    if scale == 1 {
        let (f, n, s) = digits(bytes, i + 1);
        if n > 0 && !bytes.get(i + 1 + n).is_some_and(u8::is_ascii_alphabetic) {
            (frac, scale) = (f, s);
        }
    }
    let whole = int.saturating_mul(unit);
    if frac == 0 {
        return Some(whole);
    }
    // frac < scale, so the fraction of a unit is below `unit` and fits u64.
    let part = u128::from(frac) * u128::from(unit) / u128::from(scale);
    Some(whole.saturating_add(part as u64))
}

/// Reads a mixture of experts at `bytes[start..]` (`8x7B`): the total from
/// the known layouts, else experts x expert size (an estimate).
fn parse_moe(bytes: &[u8], start: usize) -> Option<(u64, SizeSource)> {
    let (experts, n, _) = digits(bytes, start);
    if n == 0
        || !bytes
            .get(start + n)
            .is_some_and(|b| b.eq_ignore_ascii_case(&b'x'))
    {
        return None;
    }
    let expert = parse_size(bytes, start + n + 1)?;
    for layout in &MOE_LAYOUTS {
        if u64::from(layout.experts) == experts && layout.expert_params == expert {
            return Some((layout.total_params, SizeSource::Name));
        }
    }
    Some((experts.saturating_mul(expert), SizeSource::NameEstimate))
}

/// The leftmost-first match of the size DFA anchored at `start`: (end,
/// pattern id), or `None`.
fn match_at(m: &Matchers, hay: &[u8], start: usize) -> Option<(usize, usize)> {
    let dfa = &m.size;
    let mut state = m.size_start;
    let mut last = None;
    let mut i = start;
    while i < hay.len() {
        state = dfa.next_state(state, hay[i]);
        if dfa.is_special_state(state) {
            if dfa.is_match_state(state) {
                // Matches are reported one byte late: this one ends at `i`.
                last = Some((i, dfa.match_pattern(state, 0).as_usize()));
            } else if dfa.is_dead_state(state) || dfa.is_quit_state(state) {
                return last;
            }
        }
        i += 1;
    }
    state = dfa.next_eoi_state(state);
    if dfa.is_match_state(state) {
        last = Some((hay.len(), dfa.match_pattern(state, 0).as_usize()));
    }
    last
}

/// The first size written in `segment`, skipping tokens the tables mark as
/// not sizes.
///
/// Every size pattern starts with a digit, and `[0-9]+` absorbs any digits
/// before a later start in the same run, so the leftmost match always starts
/// where a run of digits starts: the DFA is run, anchored, only from there.
/// Each run is scanned at most twice (from its own start and, across a
/// decimal point, from the run before), so the search is linear.
fn size_from_name(m: &Matchers, segment: &[u8]) -> Option<(u64, SizeSource, usize)> {
    let n = segment.len();
    let mut pos = 0;
    // Whether the byte before `pos` is a digit (a digit there means `pos`
    // is inside a run, where no match starts).
    let mut after_digit = false;
    while pos < n {
        let b = segment[pos];
        if !b.is_ascii_digit() {
            after_digit = false;
            pos += 1;
            continue;
        }
        if after_digit {
            pos += 1;
            continue;
        }
        match match_at(m, segment, pos) {
            Some((end, pattern)) => {
                let found = match PATTERN_KINDS[pattern] {
                    PatternKind::Size => parse_size(segment, pos).map(|p| (p, SizeSource::Name)),
                    PatternKind::Moe => parse_moe(segment, pos),
                    PatternKind::Ignore => None,
                };
                if let Some((params, source)) = found.filter(|&(p, _)| p > 0) {
                    return Some((params, source, pos));
                }
                // Go on after this token.
                let next = end.max(pos + 1);
                after_digit = segment[next - 1].is_ascii_digit();
                pos = next;
            }
            None => {
                after_digit = true;
                pos += 1;
            }
        }
    }
    None
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
    let segment = model_segment(name.name_bytes());
    let Some(m) = matchers() else {
        return ModelSize::from_params(0, SizeSource::Unknown);
    };
    // Names that write a size: an overriding family beats the written size.
    // (The generator checks that every overriding family writes a size and
    // that no exact model name does, so each name needs one family pass.)
    if let Some((params, source, at)) = size_from_name(m, segment) {
        return match overriding_family(m, segment, at) {
            Some(params) => ModelSize::from_params(params, SizeSource::Family),
            None => ModelSize::from_params(params, source),
        };
    }
    let (shortest, longest) = KNOWN_MODEL_NAME_LENS;
    let known = (shortest..=longest)
        .contains(&segment.len())
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
