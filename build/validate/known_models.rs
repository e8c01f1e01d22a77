//! `tables/known_models.toml`: models known by exact name, and families
//! known by a substring of the name.

use std::ops::Range;

use super::super::model::KnownFile;
use super::FamilyRule;
use super::checker::{FileChecker, Seen};

/// What `known_models.toml` contributes to [`super::Tables`].
pub(super) struct Known {
    /// (name, parameters, span of the name).
    pub models: Vec<(String, u64, Range<usize>)>,
    pub families: Vec<FamilyRule>,
}

pub(super) fn check(f: &mut FileChecker, t: &KnownFile) -> Known {
    Known {
        models: models(f, t),
        families: families(f, t),
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
