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

mod segment;
mod swar;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex_automata::Anchored;
use regex_automata::dfa::Automaton;
use regex_automata::dfa::dense::DFA;
use regex_automata::util::primitives::StateID;
use unicase::Ascii;

pub use self::segment::{last_segment, model_segment};
use self::swar::{WORD, digit_bytes, word_at};
use crate::tables::{
    FALLBACK_DFA, FALLBACK_FAMILIES, Family, KNOWN_MODEL_NAMES, KNOWN_MODEL_PARAMS, MOE_LAYOUTS,
    OVERRIDE_FAMILIES, PATTERN_KINDS, PatternKind, SIZE_DFA, SIZE_DFA_MAX_STATES,
    SIZE_DFA_TABLE_CAPACITY, SizeCategory, UNIT_PARAMS,
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

/// Reads ASCII digits from `bytes[i..]`: (value, digits read, 10^n for the
/// n digits kept). Keeps at most 18 digits (the rest only count as read), so
/// neither value nor scale overflows.
#[inline]
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
#[inline]
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

/// A small anchored DFA re-laid from regex-automata's dense DFA when it is
/// loaded: byte classes, then one flat table of `u16` state ids
/// premultiplied by the stride, with the special states (dead, matching)
/// first. The inner loop is two table reads and one comparison per byte,
/// with no bounds check (indexes are masked to the table's power-of-two
/// size, which every id fits: the generator checks the size DFA against
/// [`SIZE_DFA_TABLE_CAPACITY`] and [`SIZE_DFA_MAX_STATES`]).
struct CompactDfa {
    /// Byte class of each byte.
    classes: [u8; 256],
    /// Next state id by `state id + class`.
    next: [u16; SIZE_DFA_TABLE_CAPACITY],
    /// The class of the end of input.
    eoi: usize,
    /// For each state number (id >> `stride2`): `None` or the pattern it
    /// matches.
    matches: [Option<u8>; SIZE_DFA_MAX_STATES],
    /// Ids below this are special: dead, quit or matching.
    special: u16,
    /// log2 of the stride.
    stride2: usize,
    /// The start state's id.
    start: u16,
}

/// Index mask of [`CompactDfa::next`].
const TABLE_MASK: usize = SIZE_DFA_TABLE_CAPACITY - 1;

impl CompactDfa {
    /// Re-lays the states of `dfa` reachable from `start`; `None` when they
    /// do not fit (the generator checks that they do).
    fn new(dfa: &StaticDfa, start: StateID) -> Option<CompactDfa> {
        let classes = dfa.byte_classes();
        let stride2 = classes.alphabet_len().next_power_of_two().trailing_zeros() as usize;
        // Every state reachable from the start, dead first.
        let mut found = [StateID::ZERO; SIZE_DFA_MAX_STATES];
        let mut len = 0;
        let mut push = |found: &mut [StateID; SIZE_DFA_MAX_STATES], id: StateID| {
            if !found[..len].contains(&id) {
                *found.get_mut(len)? = id;
                len += 1;
            }
            Some(len)
        };
        push(&mut found, StateID::ZERO)?;
        let mut reached = push(&mut found, start)?;
        let mut i = 0;
        while i < reached {
            let id = found[i];
            i += 1;
            if !(dfa.is_dead_state(id) || dfa.is_quit_state(id)) {
                for unit in classes.representatives(..) {
                    let next = match unit.as_u8() {
                        Some(b) => dfa.next_state(id, b),
                        None => dfa.next_eoi_state(id),
                    };
                    reached = push(&mut found, next)?;
                }
            }
        }
        let found = &found[..reached];
        // Special states get the lowest numbers.
        let special =
            |id: StateID| dfa.is_dead_state(id) || dfa.is_quit_state(id) || dfa.is_match_state(id);
        let mut order = [StateID::ZERO; SIZE_DFA_MAX_STATES];
        let mut k = 0;
        for pass in [true, false] {
            for &id in found.iter().filter(|&&id| special(id) == pass) {
                order[k] = id;
                k += 1;
            }
        }
        let order = &order[..reached];
        if (reached << stride2) > SIZE_DFA_TABLE_CAPACITY {
            return None;
        }
        let id_of = |id: StateID| {
            let number = order.iter().position(|&s| s == id)?;
            u16::try_from(number << stride2).ok()
        };
        let mut compact = CompactDfa {
            classes: [0; 256],
            next: [0; SIZE_DFA_TABLE_CAPACITY],
            eoi: classes.eoi().as_usize(),
            matches: [None; SIZE_DFA_MAX_STATES],
            special: 0,
            stride2,
            start: id_of(start)?,
        };
        for b in 0..=255u8 {
            compact.classes[usize::from(b)] = classes.get(b);
        }
        for (number, &id) in order.iter().enumerate() {
            if special(id) {
                compact.special = id_of(id)? + 1;
                if dfa.is_match_state(id) {
                    let pattern = u8::try_from(dfa.match_pattern(id, 0).as_usize()).ok()?;
                    compact.matches[number] = Some(pattern);
                }
            }
            if dfa.is_dead_state(id) || dfa.is_quit_state(id) {
                // A row of zeros: the dead state, id 0.
                continue;
            }
            let row = number << stride2;
            for unit in classes.representatives(..) {
                let (class, next) = match unit.as_u8() {
                    Some(b) => (usize::from(classes.get(b)), dfa.next_state(id, b)),
                    None => (compact.eoi, dfa.next_eoi_state(id)),
                };
                compact.next[row + class] = id_of(next)?;
            }
        }
        Some(compact)
    }

    /// The state after `state` reads `byte`.
    #[inline]
    fn next(&self, state: u16, byte: u8) -> u16 {
        let class = usize::from(self.classes[usize::from(byte)]);
        self.next[(usize::from(state) + class) & TABLE_MASK]
    }

    /// The state after `state` reads the end of input.
    #[inline]
    fn next_eoi(&self, state: u16) -> u16 {
        self.next[(usize::from(state) + self.eoi) & TABLE_MASK]
    }

    /// For a special state: `None` (dead) or the pattern it matches.
    #[inline]
    fn matched(&self, state: u16) -> Option<u8> {
        self.matches[(usize::from(state) >> self.stride2) % SIZE_DFA_MAX_STATES]
    }
}

/// The leftmost-first match of the size DFA anchored at `start`: (end,
/// pattern id), or `None`.
#[inline]
fn match_at(m: &Matchers, hay: &[u8], start: usize) -> Option<(usize, usize)> {
    let dfa = &m.size;
    let mut state = dfa.start;
    let mut last = None;
    for (i, &b) in hay.iter().enumerate().skip(start) {
        state = dfa.next(state, b);
        if state < dfa.special {
            match dfa.matched(state) {
                // Matches are reported one byte late: this one ends at `i`.
                Some(pattern) => last = Some((i, usize::from(pattern))),
                None => return last,
            }
        }
    }
    state = dfa.next_eoi(state);
    if state < dfa.special
        && let Some(pattern) = dfa.matched(state)
    {
        last = Some((hay.len(), usize::from(pattern)));
    }
    last
}

/// The first size written in `segment`, skipping tokens the tables mark as
/// not sizes.
///
/// Every size pattern starts with a digit, and `[0-9]+` absorbs any digits
/// before a later start in the same run, so the leftmost match always starts
/// where a run of digits starts: the DFA is run, anchored, only from there.
/// After a token that is not a size, the search goes on from the first run
/// that starts at or after the token's end. Each run is scanned at most
/// twice (from its own start and, across a decimal point, from the run
/// before), so the search is linear.
#[inline]
fn size_from_name(m: &Matchers, segment: &[u8]) -> Option<(u64, SizeSource, usize)> {
    // No match starts before `next`.
    let mut next = 0;
    // The digit bit of the byte before the word, moved to byte 0.
    let mut carry = 0u64;
    let mut base = 0;
    while base < segment.len() {
        let digits = digit_bytes(word_at(segment, base));
        // Digits not preceded by a digit.
        let mut starts = digits & !((digits << 8) | carry);
        carry = digits >> (8 * (WORD - 1));
        while starts != 0 {
            let pos = base + (starts.trailing_zeros() / 8) as usize;
            starts &= starts - 1;
            if pos < next {
                continue;
            }
            if let Some((end, pattern)) = match_at(m, segment, pos) {
                let found = match PATTERN_KINDS[pattern] {
                    PatternKind::Size => parse_size(segment, pos).map(|p| (p, SizeSource::Name)),
                    PatternKind::Moe => parse_moe(segment, pos),
                    PatternKind::Ignore => None,
                };
                if let Some((params, source)) = found.filter(|&(p, _)| p > 0) {
                    return Some((params, source, pos));
                }
                // Go on after this token.
                next = end;
            }
        }
        base += WORD;
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
