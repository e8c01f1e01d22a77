//! `tables/profile.toml`: the keys of a training profile.

use std::ops::Range;

use super::super::model::ProfileFile;
use super::checker::{FileChecker, Seen};
use super::{KeyKind, ProfileKey};

/// `[[key]]`: names are identifiers and unique, kinds known, docs one
/// non-empty line, and exactly one key of kind "tier".
pub(super) fn keys(f: &mut FileChecker, t: &ProfileFile) -> Vec<ProfileKey> {
    let mut keys = Vec::new();
    let mut seen = Seen::new("profile key");
    let mut tier_key: Option<Range<usize>> = None;
    if t.key.is_empty() {
        f.err(0..0, "no [[key]] is defined");
    }
    for k in &t.key {
        let r = k.get_ref();
        f.unique_identifier(&mut seen, &r.name, "profile key");
        let kind = match r.kind.get_ref().as_str() {
            "count" => KeyKind::Count,
            "flag" => KeyKind::Flag,
            "tier" => KeyKind::Tier,
            other => {
                f.err(
                    r.kind.span(),
                    format!("unknown key kind \"{other}\" (known: count, flag, tier)"),
                );
                KeyKind::Count
            }
        };
        if kind == KeyKind::Tier {
            match &tier_key {
                Some(first) => {
                    let at = f.at(first);
                    f.err(
                        r.kind.span(),
                        format!(
                            "key \"{}\" is a second key of kind \"tier\" (first at {at}); #[profile(tier)] must name one key",
                            r.name.get_ref()
                        ),
                    );
                }
                None => tier_key = Some(r.kind.span()),
            }
            if !*r.in_profile.get_ref() {
                f.err(
                    r.in_profile.span(),
                    format!(
                        "the tier key \"{}\" must have in_profile = true: scaling reads it",
                        r.name.get_ref()
                    ),
                );
            }
        }
        let doc = r.doc.get_ref().trim();
        if doc.is_empty() || doc.contains('\n') {
            f.err(
                r.doc.span(),
                format!(
                    "doc of key \"{}\" must be one non-empty line",
                    r.name.get_ref()
                ),
            );
        }
        keys.push(ProfileKey {
            name: r.name.get_ref().clone(),
            kind,
            required: *r.required.get_ref(),
            in_profile: *r.in_profile.get_ref(),
            doc: doc.to_string(),
        });
    }
    if tier_key.is_none() && !t.key.is_empty() {
        f.err(
            0..0,
            "no [[key]] of kind \"tier\": scaling needs the profile's tier",
        );
    }
    keys
}
