//! Builds the detection DFAs and serialises them for the target.

use regex_automata::dfa::{StartKind, dense};
use regex_automata::util::syntax;
use regex_automata::{MatchKind, nfa::thompson};

use super::diag::Diagnostic;
use super::validate::Tables;
use super::{Endian, model};

/// File names of the serialised DFAs in `OUT_DIR`.
pub const SIZE: &str = "size.dfa";
pub const FAMILY: &str = "family.dfa";

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

/// Builds the size DFA (leftmost-first, anchored: searched from the start of
/// each digit run, since every size pattern begins with a digit) and the
/// family DFA (all matches, unanchored, overlapping search).
pub fn build(t: &Tables, endian: Endian) -> Result<Vec<(&'static str, Vec<u8>)>, Vec<Diagnostic>> {
    let patterns: Vec<&str> = t.patterns.iter().map(|(_, p)| p.as_str()).collect();
    if t.families.is_empty() {
        return Err(failure(
            "family",
            "tables/known_models.toml defines no [[family]]",
        ));
    }
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

    let families: Vec<String> = t
        .families
        .iter()
        .map(|f| regex_syntax::escape(&f.substring))
        .collect();
    let family = dense::Builder::new()
        .syntax(syntax_config())
        .thompson(thompson::Config::new().utf8(false))
        .configure(
            dense::Config::new()
                .minimize(true)
                .start_kind(StartKind::Unanchored)
                .match_kind(MatchKind::All),
        )
        .build_many(&families)
        .map_err(|e| failure("family", e))?;

    Ok(vec![
        (SIZE, serialise(&size, endian)),
        (FAMILY, serialise(&family, endian)),
    ])
}
