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
use regex_automata::util::primitives::StateID;
use unicase::Ascii;

use self::compact_dfa::CompactDfa;
pub use self::segment::{last_segment, model_segment};
use self::swar::{WORD, word_at};
use self::written_size::size_from_name;
use crate::tables::{
    FALLBACK_DFA, FALLBACK_FAMILIES, Family, KNOWN_MODEL_NAMES, KNOWN_MODEL_PARAMS,
    OVERRIDE_FAMILIES, SIZE_DFA, SizeCategory,
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

/// Which overriding families can match where a name's size starts, from
/// the [`FILTER_WINDOW`] bytes around it (half before the size, half from
/// its start): for each offset and byte value, a bitmask of the families
/// (bit `i`: [`OVERRIDE_FAMILIES`]`[i]`; families from the 64th on share bit
/// 63) that allow that byte there. A family allows every byte where its
/// prefix or rest does not reach.
///
/// Derived from [`OVERRIDE_FAMILIES`] at compile time. The masks are a
/// necessary condition only: a candidate is then compared in full.
struct OverrideFilter {
    /// By offset in the window, then byte. Where the name starts or ends
    /// inside the window, [`window_at`] reads zeros, which the families that
    /// do not reach there allow like any byte.
    by_byte: [[u64; 256]; FILTER_WINDOW],
}

/// Bytes [`OverrideFilter`] reads around a size's start.
const FILTER_WINDOW: usize = 8;
/// Of those, the bytes before the size's start.
const FILTER_BEFORE: usize = FILTER_WINDOW / 2;

impl OverrideFilter {
    const fn new(families: &[crate::tables::OverrideFamily]) -> OverrideFilter {
        let mut filter = OverrideFilter {
            by_byte: [[0; 256]; FILTER_WINDOW],
        };
        let mut i = 0;
        while i < families.len() {
            let bit = 1u64 << if i < 63 { i } else { 63 };
            let (prefix, rest) = (families[i].prefix.as_bytes(), families[i].rest.as_bytes());
            let mut k = 0;
            while k < FILTER_WINDOW {
                let byte = if k < FILTER_BEFORE {
                    let back = FILTER_BEFORE - k;
                    if back <= prefix.len() {
                        Some(prefix[prefix.len() - back])
                    } else {
                        None
                    }
                } else if k - FILTER_BEFORE < rest.len() {
                    Some(rest[k - FILTER_BEFORE])
                } else {
                    None
                };
                match byte {
                    Some(c) => {
                        filter.by_byte[k][c.to_ascii_lowercase() as usize] |= bit;
                        filter.by_byte[k][c.to_ascii_uppercase() as usize] |= bit;
                    }
                    None => {
                        let mut v = 0;
                        while v < 256 {
                            filter.by_byte[k][v] |= bit;
                            v += 1;
                        }
                    }
                }
                k += 1;
            }
            i += 1;
        }
        filter
    }

    /// The families that may match in `segment` with their size at `at`.
    #[inline]
    fn candidates(&self, segment: &[u8], at: usize) -> u64 {
        let window = window_at(segment, at);
        let mut mask = u64::MAX;
        for (k, masks) in self.by_byte.iter().enumerate() {
            mask &= masks[((window >> (8 * k)) & 0xff) as usize];
        }
        mask
    }
}

/// The [`FILTER_WINDOW`] bytes of `bytes` from `at - FILTER_BEFORE`, as a
/// little-endian word with zeros outside `bytes`: one word read where it
/// fits, shifted into place.
#[inline]
fn window_at(bytes: &[u8], at: usize) -> u64 {
    let from = at
        .saturating_sub(FILTER_BEFORE)
        .min(bytes.len().saturating_sub(WORD));
    let word = word_at(bytes, from);
    // The window starts `at - FILTER_BEFORE - from` bytes after the word.
    let shift = |bytes: usize| u32::try_from(8 * bytes).unwrap_or(u32::MAX);
    if at >= FILTER_BEFORE + from {
        word.checked_shr(shift(at - FILTER_BEFORE - from))
            .unwrap_or(0)
    } else {
        word.checked_shl(shift(FILTER_BEFORE + from - at))
            .unwrap_or(0)
    }
}

static OVERRIDE_FILTER: OverrideFilter = OverrideFilter::new(&OVERRIDE_FAMILIES);

/// The overriding family whose written size is the name's size at `at`:
/// its prefix ends at `at` and its rest starts there (ASCII
/// case-insensitive). The first listed wins.
#[inline]
fn overriding_family(segment: &[u8], at: usize) -> Option<u64> {
    match OVERRIDE_FILTER.candidates(segment, at) {
        0 => None,
        candidates => first_overriding(segment, at, candidates),
    }
}

/// The first of the `candidates` ([`OverrideFilter`]'s bits) that matches
/// in full.
#[inline(never)]
fn first_overriding(segment: &[u8], at: usize, mut candidates: u64) -> Option<u64> {
    let (before, after) = segment.split_at_checked(at)?;
    while candidates != 0 {
        let bit = candidates.trailing_zeros() as usize;
        candidates &= candidates - 1;
        // Bit 63 stands for every family from the 64th on.
        let group = if bit < 63 {
            bit..bit + 1
        } else {
            bit..OVERRIDE_FAMILIES.len()
        };
        for f in OVERRIDE_FAMILIES.get(group).unwrap_or_default() {
            let (prefix, rest) = (f.prefix.as_bytes(), f.rest.as_bytes());
            let prefix_ok = before
                .len()
                .checked_sub(prefix.len())
                .is_some_and(|i| before[i..].eq_ignore_ascii_case(prefix));
            if prefix_ok
                && after
                    .get(..rest.len())
                    .is_some_and(|r| r.eq_ignore_ascii_case(rest))
            {
                return Some(f.params);
            }
        }
    }
    None
}

/// Whether a component may be a known model's name ([`KNOWN_MODEL_NAMES`],
/// ASCII case-insensitive): its length and its first and last bytes must be
/// those of some name. Derived at compile time; the map lookup, which hashes
/// the whole component, follows only when this passes.
struct KnownNameFilter {
    shortest: usize,
    longest: usize,
    first: [bool; 256],
    last: [bool; 256],
}

impl KnownNameFilter {
    const fn new(names: &[&str]) -> KnownNameFilter {
        let mut filter = KnownNameFilter {
            shortest: usize::MAX,
            longest: 0,
            first: [false; 256],
            last: [false; 256],
        };
        let mut i = 0;
        while i < names.len() {
            let name = names[i].as_bytes();
            if let ([first, ..], [.., last]) = (name, name) {
                if name.len() < filter.shortest {
                    filter.shortest = name.len();
                }
                if name.len() > filter.longest {
                    filter.longest = name.len();
                }
                filter.first[first.to_ascii_lowercase() as usize] = true;
                filter.first[first.to_ascii_uppercase() as usize] = true;
                filter.last[last.to_ascii_lowercase() as usize] = true;
                filter.last[last.to_ascii_uppercase() as usize] = true;
            }
            i += 1;
        }
        filter
    }

    #[inline]
    fn admits(&self, component: &[u8]) -> bool {
        match component {
            [first, .., last] | [first @ last] => {
                (self.shortest..=self.longest).contains(&component.len())
                    && self.first[usize::from(*first)]
                    && self.last[usize::from(*last)]
            }
            [] => false,
        }
    }
}

static KNOWN_NAME_FILTER: KnownNameFilter = KnownNameFilter::new(&KNOWN_MODEL_NAMES);

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
