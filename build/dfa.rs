//! Builds the detection DFAs and serialises them for the target.

use regex_automata::dfa::{Automaton, StartKind, dense};
use regex_automata::util::syntax;
use regex_automata::{Anchored, Input, MatchKind, nfa::thompson};

use super::diag::{Diagnostic, Source};
use super::validate::{FamilyRule, PatternKind, Tables};
use super::{Endian, model};

/// File names of the serialised DFAs in `OUT_DIR`.
pub const SIZE: &str = "size.dfa";

/// The library re-lays the size DFA into a flat table of `u16` state ids,
/// `states x stride` entries (the stride is the number of byte classes,
/// end of input included, rounded up to a power of two), with at most this
/// many entries (16 KiB: the table is laid out on the stack of the first
/// detection's thread before it moves into its static)...
pub const SIZE_TABLE_CAPACITY: usize = 1 << 13;
/// ... and at most this many states (their numbers and pattern ids are
/// bytes).
pub const SIZE_MAX_STATES: usize = 256;

/// The states of `dfa` reachable from its anchored start (the dead state
/// included) and its stride: what the library's table of the size DFA
/// needs.
pub fn size_table_shape(dfa: &dense::DFA<Vec<u32>>) -> (usize, usize) {
    let classes = dfa.byte_classes();
    let stride = classes.alphabet_len().next_power_of_two();
    let Some(start) = dfa.universal_start_state(Anchored::Yes) else {
        return (0, stride);
    };
    let dead = regex_automata::util::primitives::StateID::ZERO;
    let mut seen = vec![dead];
    if start != dead {
        seen.push(start);
    }
    let mut i = 0;
    while i < seen.len() {
        let id = seen[i];
        i += 1;
        if dfa.is_dead_state(id) || dfa.is_quit_state(id) {
            continue;
        }
        for unit in classes.representatives(..) {
            let next = match unit.as_u8() {
                Some(b) => dfa.next_state(id, b),
                None => dfa.next_eoi_state(id),
            };
            if !seen.contains(&next) {
                seen.push(next);
            }
        }
    }
    (seen.len(), stride)
}
pub const FALLBACK: &str = "fallback.dfa";

fn syntax_config() -> syntax::Config {
    // Bytes, ASCII-only classes and case folding: the DFA works on any byte
    // string (invalid UTF-8 included) and has no quit bytes.
    syntax::Config::new()
        .unicode(false)
        .utf8(false)
        .case_insensitive(true)
}

fn serialise(dfa: &dense::DFA<Vec<u32>>, endian: Endian) -> Vec<u8> {
    let (bytes, pad) = match endian {
        Endian::Little => dfa.to_bytes_little_endian(),
        Endian::Big => dfa.to_bytes_big_endian(),
    };
    bytes[pad..].to_vec()
}

fn failure(what: &str, e: impl std::fmt::Display) -> Vec<Diagnostic> {
    vec![Diagnostic::file(
        format!("tables/{}", model::FILES[model::DETECT]),
        format!("cannot build the {what} DFA: {e}"),
    )]
}

/// Where the size DFA finds the first written size in `name`, searching as
/// `src/detect/written_size.rs` does: anchored at each digit run's start,
/// skipping `ignore` tokens.
pub fn written_size_at(size: &dense::DFA<Vec<u32>>, t: &Tables, name: &[u8]) -> Option<usize> {
    let mut pos = 0;
    while pos < name.len() {
        let run_start = name[pos].is_ascii_digit() && (pos == 0 || !name[pos - 1].is_ascii_digit());
        if run_start {
            let input = Input::new(name).range(pos..).anchored(Anchored::Yes);
            if let Ok(Some(m)) = size.try_search_fwd(&input) {
                if t.patterns[m.pattern().as_usize()].0 != PatternKind::Ignore {
                    return Some(pos);
                }
                pos = m.offset().max(pos + 1);
                continue;
            }
        }
        pos += 1;
    }
    None
}

/// An all-matches DFA of literal strings.
fn literal_dfa(
    literals: &[&str],
    start: StartKind,
    what: &str,
) -> Result<dense::DFA<Vec<u32>>, Vec<Diagnostic>> {
    let patterns: Vec<String> = literals.iter().map(|l| regex_syntax::escape(l)).collect();
    dense::Builder::new()
        .syntax(syntax_config())
        .thompson(thompson::Config::new().utf8(false))
        .configure(
            dense::Config::new()
                .minimize(true)
                .start_kind(start)
                .match_kind(MatchKind::All),
        )
        .build_many(&patterns)
        .map_err(|e| failure(what, e))
}

/// Builds the size DFA (leftmost-first, anchored: searched from the start of
/// each digit run, since every size pattern begins with a digit) and the
/// other families' DFA, and splits the overriding families.
///
/// An overriding family is consulted only where a name writes a size: it is
/// split at its own written size into a prefix and the rest, which the
/// library compares before and after where the name's size starts. The other
/// families are consulted only for names that write no size (all matches,
/// unanchored). The generator checks what this relies on: an overriding
/// family writes a size, and an exact model name does not.
pub fn build(t: &Tables, sources: &[Source], endian: Endian) -> Result<Built, Vec<Diagnostic>> {
    let patterns: Vec<&str> = t.patterns.iter().map(|(_, p)| p.as_str()).collect();
    let size = dense::Builder::new()
        .syntax(syntax_config())
        .thompson(thompson::Config::new().utf8(false))
        .configure(
            dense::Config::new()
                .minimize(true)
                .start_kind(StartKind::Anchored)
                .match_kind(MatchKind::LeftmostFirst),
        )
        .build_many(&patterns)
        .map_err(|e| failure("size", e))?;

    let (states, stride) = size_table_shape(&size);
    if states > SIZE_MAX_STATES
        || states * stride > SIZE_TABLE_CAPACITY
        || t.patterns.len() > usize::from(u8::MAX) + 1
    {
        return Err(failure(
            "size",
            format!(
                "the patterns compile to {states} states of {stride} byte classes; the detector's table holds at most {SIZE_MAX_STATES} states and {SIZE_TABLE_CAPACITY} entries (states x classes rounded up to a power of two), and 256 patterns"
            ),
        ));
    }

    let known = &sources[model::KNOWN];
    let mut errors = Vec::new();
    for f in &t.families {
        if f.overrides && written_size_at(&size, t, f.substring.as_bytes()).is_none() {
            errors.push(known.error(
                f.span.clone(),
                format!(
                    "overriding family \"{}\" writes no size, so it would never be consulted; drop `override`",
                    f.substring
                ),
            ));
        }
    }
    for (name, _, span) in &t.known_models {
        if written_size_at(&size, t, name.as_bytes()).is_some() {
            errors.push(known.error(
                span.clone(),
                format!(
                    "model \"{name}\" writes a size, so an exact match would never be consulted; make it an overriding [[family]]"
                ),
            ));
        }
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    let splits = override_splits(&size, t);
    let fallback: Vec<&str> = t
        .families
        .iter()
        .filter(|f| !f.overrides)
        .map(|f| f.substring.as_str())
        .collect();
    let fallback_dfa = literal_dfa(&fallback, StartKind::Unanchored, "family")?;

    Ok(Built {
        files: vec![
            (SIZE, serialise(&size, endian)),
            (FALLBACK, serialise(&fallback_dfa, endian)),
        ],
        override_splits: splits
            .iter()
            .map(|(f, prefix, rest)| OverrideSplit {
                prefix: prefix.to_string(),
                rest: rest.to_string(),
                params: f.params,
            })
            .collect(),
    })
}

/// An overriding family split at its written size.
pub struct OverrideSplit {
    /// What comes before the size (`gpt-oss-`).
    pub prefix: String,
    /// The size and what follows (`20b`).
    pub rest: String,
    /// The family's parameter count.
    pub params: u64,
}

/// What the DFA stage produces.
pub struct Built {
    /// (file name in `OUT_DIR`, serialised DFA).
    pub files: Vec<(&'static str, Vec<u8>)>,
    /// The overriding families, in priority order.
    pub override_splits: Vec<OverrideSplit>,
}

/// The overriding families split at their written size: (family, prefix,
/// rest). Families without a written size are left out (an error elsewhere).
pub fn override_splits<'a>(
    size: &dense::DFA<Vec<u32>>,
    t: &'a Tables,
) -> Vec<(&'a FamilyRule, &'a str, &'a str)> {
    t.families
        .iter()
        .filter(|f| f.overrides)
        .filter_map(|f| {
            let at = written_size_at(size, t, f.substring.as_bytes())?;
            Some((f, &f.substring[..at], &f.substring[at..]))
        })
        .collect()
}
