//! `tables/known_models.toml`: models known by exact name, and families
//! known by a substring of the name.

use std::ops::Range;

use toml::Spanned;

use super::super::model::{KnownArchitecture, KnownFile};
use super::checker::{FileChecker, Seen};
use super::{FamilyRule, KnownShape};

/// What `known_models.toml` contributes to [`super::Tables`].
pub(super) struct Known {
    /// (name, parameters, span of the name).
    pub models: Vec<(String, u64, Range<usize>)>,
    pub families: Vec<FamilyRule>,
    /// `[shape_match] suffixes`, lower case.
    pub shape_suffixes: Vec<String>,
    /// `[[architecture]]`, in table order.
    pub shapes: Vec<KnownShape>,
}

pub(super) fn check(f: &mut FileChecker, t: &KnownFile) -> Known {
    Known {
        models: models(f, t),
        families: families(f, t),
        shape_suffixes: suffixes(f, t),
        shapes: architectures(f, t),
    }
}

/// A word of a name: non-empty lower-case ASCII letters, digits and `.`,
/// with `-` or `_` only between such runs when `joined`.
fn is_name_word(s: &str, joined: bool) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b == b'.'
                || (joined && (b == b'-' || b == b'_'))
        })
        && !s.starts_with(['-', '_'])
        && !s.ends_with(['-', '_'])
}

/// `[shape_match] suffixes`: lower-case words without separators, unique.
fn suffixes(f: &mut FileChecker, t: &KnownFile) -> Vec<String> {
    let mut seen = Seen::new("suffix");
    let mut out = Vec::new();
    for s in &t.shape_match.get_ref().suffixes {
        if !is_name_word(s.get_ref(), false) {
            f.err(
                s.span(),
                format!(
                    "suffix \"{}\" must be one word of lower-case ASCII letters, digits and '.'",
                    s.get_ref()
                ),
            );
            continue;
        }
        f.unique(&mut seen, s.get_ref().clone(), s.span());
        out.push(s.get_ref().clone());
    }
    out
}

/// `[[architecture]]`: ids and names unique (names across all rows), every
/// size positive, heads dividing the width unless `head_dim` is written,
/// KV heads dividing the heads, an even head width.
fn architectures(f: &mut FileChecker, t: &KnownFile) -> Vec<KnownShape> {
    let mut ids = Seen::new("architecture id");
    let mut names = Seen::new("architecture name");
    let mut out = Vec::new();
    for a in &t.architecture {
        let r = a.get_ref();
        let id = r.id.get_ref();
        if id.trim().is_empty() || !id.contains('/') {
            f.err(
                r.id.span(),
                format!("id \"{id}\" must be the ORG/NAME of the repository whose config.json gives the numbers"),
            );
        }
        f.unique(&mut ids, id.to_ascii_lowercase(), r.id.span());
        if r.names.is_empty() {
            f.err(
                a.span(),
                format!("architecture \"{id}\" has no names to match"),
            );
        }
        for n in &r.names {
            if !is_name_word(n.get_ref(), true) {
                f.err(
                    n.span(),
                    format!(
                        "name \"{}\" must be lower-case ASCII letters, digits, '.', '-' and '_', not starting or ending with a separator",
                        n.get_ref()
                    ),
                );
            }
            f.unique(&mut names, n.get_ref().clone(), n.span());
        }
        out.push(shape(f, a));
    }
    out
}

/// One row's sizes, checked.
fn shape(f: &mut FileChecker, a: &Spanned<KnownArchitecture>) -> KnownShape {
    let r = a.get_ref();
    let mut dim = |v: &Spanned<i64>, what: &str| u64::from(f.int(v, what, 1, 1 << 24));
    let (layers, hidden, intermediate) = (
        dim(&r.layers, "layers"),
        dim(&r.hidden, "hidden"),
        dim(&r.intermediate, "intermediate"),
    );
    let (heads, kv_heads, vocab) = (
        dim(&r.heads, "heads"),
        dim(&r.kv_heads, "kv_heads"),
        dim(&r.vocab, "vocab"),
    );
    let head_dim = r.head_dim.as_ref().map(|h| dim(h, "head_dim"));
    if head_dim.is_none() && heads > 0 && !hidden.is_multiple_of(heads) {
        f.err(
            r.heads.span(),
            format!("heads {heads} does not divide hidden {hidden}: write head_dim"),
        );
    }
    if kv_heads > 0 && !heads.is_multiple_of(kv_heads) {
        f.err(
            r.kv_heads.span(),
            format!("kv_heads {kv_heads} does not divide heads {heads}"),
        );
    }
    let head_dim = head_dim.unwrap_or(hidden / heads.max(1));
    if !head_dim.is_multiple_of(2) {
        f.err(
            a.span(),
            format!("the head width {head_dim} must be even (rotary embeddings)"),
        );
    }
    KnownShape {
        id: r.id.get_ref().clone(),
        names: r.names.iter().map(|n| n.get_ref().clone()).collect(),
        layers,
        hidden,
        intermediate,
        heads,
        kv_heads,
        head_dim,
        vocab,
        tied: *r.tied.get_ref(),
        qkv_bias: r.qkv_bias.as_ref().is_some_and(|b| *b.get_ref()),
    }
}

/// `[[model]]`: ASCII names without separators, unique ignoring case.
fn models(f: &mut FileChecker, t: &KnownFile) -> Vec<(String, u64, Range<usize>)> {
    let mut known_models = Vec::new();
    let mut seen = Seen::new("model name");
    for m in &t.model {
        let r = m.get_ref();
        let name = r.name.get_ref();
        if name.is_empty() || !name.is_ascii() || name.contains(['/', '\\']) {
            f.err(
                r.name.span(),
                format!(
                    "model name \"{name}\" must be a non-empty ASCII name without path separators"
                ),
            );
            continue;
        }
        f.unique(&mut seen, name.to_ascii_lowercase(), r.name.span());
        let params = f.billions(&r.params_b, "params_b");
        known_models.push((name.clone(), params, r.name.span()));
    }
    known_models
}

/// `[[family]]`: non-empty ASCII substrings, none shadowed by an earlier one.
fn families(f: &mut FileChecker, t: &KnownFile) -> Vec<FamilyRule> {
    let mut families: Vec<FamilyRule> = Vec::new();
    let mut family_spans: Vec<Range<usize>> = Vec::new();
    for fam in &t.family {
        let r = fam.get_ref();
        let s = r.substring.get_ref();
        let overrides = r.overrides.as_ref().is_some_and(|o| *o.get_ref());
        if s.is_empty() || !s.is_ascii() {
            f.err(
                r.substring.span(),
                format!("family substring \"{s}\" must be non-empty ASCII"),
            );
            continue;
        }
        let lower = s.to_ascii_lowercase();
        // An earlier family shadows this one when every name containing this
        // one contains it too, and it is consulted no later.
        if let Some((i, earlier)) = families
            .iter()
            .enumerate()
            .find(|(_, e)| lower.contains(e.substring.as_str()) && (e.overrides || !overrides))
        {
            let at = f.at(&family_spans[i]);
            let msg = if earlier.substring == lower {
                format!("duplicate family \"{s}\" (first at {at})")
            } else {
                format!(
                    "family \"{s}\" can never match: every name containing it also contains \"{}\" (at {at}), which comes first",
                    earlier.substring
                )
            };
            f.err(r.substring.span(), msg);
            continue;
        }
        let params = f.billions(&r.params_b, "params_b");
        families.push(FamilyRule {
            substring: lower,
            params,
            overrides,
            span: r.substring.span(),
        });
        family_spans.push(r.substring.span());
    }
    families
}
