//! `tables/detect.toml`: size patterns, units, mixture-of-experts layouts,
//! and the rules for reading a name from a path.

use super::super::model::{DetectFile, PathRules, Pattern};
use super::checker::{FileChecker, Seen};
use super::{MoeLayout, PatternKind};

/// What `detect.toml` contributes to [`super::Tables`].
pub(super) struct Detect {
    pub patterns: Vec<(PatternKind, String)>,
    pub units: [u64; 26],
    pub moe: Vec<MoeLayout>,
    pub skip_segments: Vec<String>,
    pub hash_min_len: u32,
    pub cache_separator: String,
    pub cache_prefix: String,
    pub disagreement_fraction: f64,
    pub max_safetensors_header_bytes: u32,
}

pub(super) fn check(f: &mut FileChecker, t: &DetectFile) -> Detect {
    let patterns = patterns(f, t);
    let units = units(f, t);
    let moe = moe(f, t);
    let path = t.path.get_ref();
    let skip_segments: Vec<String> = path
        .skip_segments
        .iter()
        .map(|s| s.get_ref().clone())
        .collect();
    for s in &path.skip_segments {
        if s.get_ref().is_empty() || s.get_ref().contains(['/', '\\']) {
            f.err(
                s.span(),
                "skip_segments entries must be non-empty and contain no separator",
            );
        }
    }
    let hash_min_len = f.int(&path.hash_min_len, "hash_min_len", 4, 1 << 16);
    let (cache_prefix, cache_separator) = cache(f, path);
    let disagreement = &t.files.get_ref().disagreement_fraction;
    let disagreement_fraction = *disagreement.get_ref();
    if !(disagreement_fraction > 0.0 && disagreement_fraction < 1.0) {
        f.err(
            disagreement.span(),
            format!("disagreement_fraction is {disagreement_fraction}, must be in (0, 1)"),
        );
    }
    let max_safetensors_header_bytes = f.int(
        &t.files.get_ref().max_safetensors_header_bytes,
        "max_safetensors_header_bytes",
        1 << 20,
        1 << 30,
    );
    Detect {
        patterns,
        units,
        moe,
        skip_segments,
        hash_min_len,
        cache_separator,
        cache_prefix,
        disagreement_fraction,
        max_safetensors_header_bytes,
    }
}

/// `[[pattern]]`: known kinds, at least one that detects a size, each regex
/// valid for the DFA (see [`pattern_regex`]).
fn patterns(f: &mut FileChecker, t: &DetectFile) -> Vec<(PatternKind, String)> {
    let mut patterns = Vec::new();
    let mut any_size = false;
    for p in &t.pattern {
        let r = p.get_ref();
        let kind = match r.kind.get_ref().as_str() {
            "size" => {
                any_size = true;
                PatternKind::Size
            }
            "ignore" => PatternKind::Ignore,
            "moe" => {
                any_size = true;
                PatternKind::Moe
            }
            other => {
                f.err(
                    r.kind.span(),
                    format!("unknown pattern kind \"{other}\" (known: size, ignore, moe)"),
                );
                PatternKind::Ignore
            }
        };
        pattern_regex(f, r);
        patterns.push((kind, r.regex.get_ref().clone()));
    }
    if !any_size {
        f.err(
            0..0,
            "no [[pattern]] of kind \"size\": nothing could ever be detected",
        );
    }
    patterns
}

/// A pattern's regex: it parses, cannot match the empty string, looks
/// around only with `$`, and starts with an ASCII digit.
fn pattern_regex(f: &mut FileChecker, r: &Pattern) {
    let parsed = regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .case_insensitive(true)
        .build()
        .parse(r.regex.get_ref());
    match parsed {
        Ok(hir) => {
            if hir.properties().minimum_len() == Some(0) {
                f.err(r.regex.span(), "pattern can match the empty string");
            } else if !hir
                .properties()
                .look_set()
                .remove(regex_syntax::hir::Look::End)
                .is_empty()
            {
                f.err(
                    r.regex.span(),
                    "pattern may use no look-around but `$` (the end of the name)",
                );
            } else if !starts_with_digit(&hir) {
                f.err(
                    r.regex.span(),
                    "pattern must start with an ASCII digit (the DFA is run from the start of each digit run)",
                );
            }
        }
        Err(e) => {
            let first = e.to_string();
            let last = first.lines().last().unwrap_or("").trim();
            let msg = last.strip_prefix("error: ").unwrap_or(last).to_string();
            f.err(r.regex.span(), format!("invalid regex: {msg}"));
        }
    }
}

/// `[[unit]]`: one ASCII letter each, unique ignoring case, positive params.
/// Parameters per unit, indexed by `letter - b'a'`.
fn units(f: &mut FileChecker, t: &DetectFile) -> [u64; 26] {
    let mut units = [0u64; 26];
    let mut seen = Seen::new("unit");
    for u in &t.unit {
        let r = u.get_ref();
        let letter = r.letter.get_ref();
        let b = letter.as_bytes();
        if b.len() != 1 || !b[0].is_ascii_alphabetic() {
            f.err(
                r.letter.span(),
                format!("unit letter \"{letter}\" must be one ASCII letter"),
            );
            continue;
        }
        let lower = b[0].to_ascii_lowercase();
        f.unique(&mut seen, (lower as char).to_string(), r.letter.span());
        let params = *r.params.get_ref();
        if params <= 0 {
            f.err(
                r.params.span(),
                format!("unit params is {params}, must be positive"),
            );
            continue;
        }
        units[usize::from(lower - b'a')] = params as u64;
    }
    units
}

/// `[[moe]]`: unique layouts, each total at most experts x expert size.
fn moe(f: &mut FileChecker, t: &DetectFile) -> Vec<MoeLayout> {
    let mut moe = Vec::new();
    let mut seen = Seen::new("moe layout");
    for m in &t.moe {
        let r = m.get_ref();
        let experts = f.int(&r.experts, "experts", 2, 1 << 16);
        let expert_params = f.billions(&r.expert_params_b, "expert_params_b");
        let total_params = f.billions(&r.total_params_b, "total_params_b");
        f.unique(
            &mut seen,
            format!("{experts}x{}", r.expert_params_b.get_ref()),
            m.span(),
        );
        if total_params > expert_params.saturating_mul(u64::from(experts)) {
            f.err(
                r.total_params_b.span(),
                format!(
                    "total_params_b {} is above experts x expert_params_b; experts share weights, so the total is at most the product",
                    r.total_params_b.get_ref()
                ),
            );
        }
        moe.push(MoeLayout {
            experts,
            expert_params,
            total_params,
        });
    }
    moe
}

/// `[path]`'s cache rules: a non-empty separator that ends the prefix.
/// Returns (prefix, separator).
fn cache(f: &mut FileChecker, path: &PathRules) -> (String, String) {
    let cache_separator = path.cache_separator.get_ref().clone();
    if cache_separator.is_empty() {
        f.err(path.cache_separator.span(), "cache_separator is empty");
    }
    let cache_prefix = path.cache_prefix.get_ref().clone();
    if !cache_prefix.ends_with(&cache_separator) {
        f.err(
            path.cache_prefix.span(),
            format!("cache_prefix \"{cache_prefix}\" must end with cache_separator \"{cache_separator}\""),
        );
    }
    (cache_prefix, cache_separator)
}

/// Whether every match of `hir` starts with an ASCII digit.
fn starts_with_digit(hir: &regex_syntax::hir::Hir) -> bool {
    use regex_syntax::hir::{Class, HirKind};
    match hir.kind() {
        HirKind::Literal(lit) => lit.0.first().is_some_and(u8::is_ascii_digit),
        HirKind::Class(Class::Bytes(c)) => c
            .ranges()
            .iter()
            .all(|r| r.start().is_ascii_digit() && r.end().is_ascii_digit()),
        HirKind::Class(Class::Unicode(c)) => c
            .ranges()
            .iter()
            .all(|r| r.start().is_ascii_digit() && r.end().is_ascii_digit()),
        HirKind::Repetition(rep) => rep.min >= 1 && starts_with_digit(&rep.sub),
        HirKind::Capture(cap) => starts_with_digit(&cap.sub),
        HirKind::Concat(parts) => parts.first().is_some_and(starts_with_digit),
        HirKind::Alternation(alts) => alts.iter().all(starts_with_digit),
        HirKind::Empty | HirKind::Look(_) => false,
    }
}
