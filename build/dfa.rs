//! Builds the detection DFAs and serialises them for the target.

use regex_automata::dfa::{dense, regex::Regex};
use regex_automata::util::syntax;
use regex_automata::{MatchKind, nfa::thompson};

use super::diag::Diagnostic;
use super::validate::Tables;
use super::{Endian, model};

/// File names of the serialised DFAs in `OUT_DIR`.
pub const SIZE_FWD: &str = "size_fwd.dfa";
pub const SIZE_REV: &str = "size_rev.dfa";
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

/// Builds the size regex (forward and reverse DFAs, leftmost-first, one
/// pattern per `[[pattern]]`) and the family DFA (all matches, overlapping).
pub fn build(t: &Tables, endian: Endian) -> Result<Vec<(&'static str, Vec<u8>)>, Vec<Diagnostic>> {
    let patterns: Vec<&str> = t.patterns.iter().map(|(_, p)| p.as_str()).collect();
    let dense_config = dense::Config::new().minimize(true);
    let size = Regex::builder()
        .syntax(syntax_config())
        .thompson(thompson::Config::new().utf8(false))
        .dense(dense_config.clone())
        .build_many(&patterns)
        .map_err(|e| failure("size", e))?;

    let families: Vec<String> = t
        .families
        .iter()
        .map(|(s, _)| regex_syntax::escape(s))
        .collect();
    let family = dense::Builder::new()
        .syntax(syntax_config())
        .thompson(thompson::Config::new().utf8(false))
        .configure(dense_config.match_kind(MatchKind::All))
        .build_many(&families)
        .map_err(|e| failure("family", e))?;

    Ok(vec![
        (SIZE_FWD, serialise(size.forward(), endian)),
        (SIZE_REV, serialise(size.reverse(), endian)),
        (FAMILY, serialise(&family, endian)),
    ])
}
