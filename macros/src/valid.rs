//! Cross-field rules: which key each field holds, unknown and duplicate keys,
//! and required keys no field holds.

use proc_macro2::Span;
use quote::ToTokens;
use syn::spanned::Spanned;

use crate::ast::{Errors, Field, Input};
use crate::schema::{self, KeySchema};
use crate::suggest::did_you_mean;

/// The field that holds a key, for "already holds it" messages.
struct Claim {
    field: String,
}

fn field_name(f: &Field) -> String {
    f.member.to_token_stream().to_string()
}

/// The key each field holds (`None`: carried unchanged), in field order.
pub fn resolve(input: &Input, errors: &mut Errors) -> Vec<Option<&'static KeySchema>> {
    let mut claims: Vec<Option<Claim>> = schema::PROFILE_KEYS.iter().map(|_| None).collect();
    let mut resolved = Vec::with_capacity(input.fields.len());
    for f in &input.fields {
        let named = match &f.member {
            syn::Member::Named(id) => Some(id),
            syn::Member::Unnamed(_) => None,
        };
        let (key, span) = if f.attrs.skip.is_some() {
            (None, Span::call_site())
        } else if let Some(lit) = &f.attrs.key {
            let name = lit.value();
            match schema::key(&name) {
                Some(k) => (Some(k), lit.span()),
                None => {
                    errors.push(syn::Error::new(
                        lit.span(),
                        format!(
                            "unknown profile key `{name}`{} (keys in tables/profile.toml: {})",
                            did_you_mean(&name, schema::PROFILE_KEYS.iter().map(|k| k.name)),
                            known_keys()
                        ),
                    ));
                    (None, lit.span())
                }
            }
        } else if let Some(t) = &f.attrs.tier {
            (Some(schema::tier_key()), t.span())
        } else {
            // A field named like a key holds it; any other field is carried.
            let key = named.and_then(|id| schema::key(&id.to_string()));
            (key, named.map_or_else(|| f.original.span(), |id| id.span()))
        };
        if let Some(k) = key {
            let slot = schema::PROFILE_KEYS
                .iter()
                .position(|p| p.name == k.name)
                .expect("key from the schema");
            match &claims[slot] {
                Some(first) => errors.push(syn::Error::new(
                    span,
                    format!(
                        "duplicate profile key `{}`: field `{}` already holds it",
                        k.name, first.field
                    ),
                )),
                None => {
                    claims[slot] = Some(Claim {
                        field: field_name(f),
                    })
                }
            }
        }
        resolved.push(key);
    }
    for (k, claim) in schema::PROFILE_KEYS.iter().zip(&claims) {
        if k.required && claim.is_none() {
            let how = if k.kind == schema::KeyKind::Tier {
                format!(
                    "a field named `{}` or one marked `#[profile(tier)]`",
                    k.name
                )
            } else {
                format!(
                    "a field named `{0}` or one marked `#[profile(key = \"{0}\")]`",
                    k.name
                )
            };
            errors.push(syn::Error::new(
                input.ident.span(),
                format!(
                    "missing required profile key `{}` (a {}): add {how}",
                    k.name,
                    k.kind.describe()
                ),
            ));
        }
    }
    resolved
}

fn known_keys() -> String {
    schema::PROFILE_KEYS
        .iter()
        .map(|k| format!("`{}`", k.name))
        .collect::<Vec<_>>()
        .join(", ")
}
