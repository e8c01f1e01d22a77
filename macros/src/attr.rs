//! `#[profile(...)]`: parsing, rejecting unknown, duplicate and conflicting
//! options. Every mistake is recorded; parsing goes on where it can.

use proc_macro2::Span;
use syn::{Attribute, Ident, LitStr, Token};

use crate::ast::Errors;
use crate::suggest::did_you_mean;

/// The options a field's `#[profile(...)]` attributes set.
#[derive(Default)]
pub struct FieldAttrs {
    /// `key = "name"`: the profile key this field holds.
    pub key: Option<LitStr>,
    /// `tier`: the field holds the tier key.
    pub tier: Option<Ident>,
    /// `skip`: not a profile key even if the name is one; carried unchanged.
    pub skip: Option<Ident>,
}

const OPTIONS: [&str; 3] = ["key", "tier", "skip"];

fn path_name(path: &syn::Path) -> String {
    path.segments
        .iter()
        .map(|s| s.ident.to_string())
        .collect::<Vec<_>>()
        .join("::")
}

/// Parses every `#[profile(...)]` of a field.
pub fn field_attrs(attrs: &[Attribute], errors: &mut Errors) -> FieldAttrs {
    let mut out = FieldAttrs::default();
    for attr in attrs.iter().filter(|a| a.path().is_ident("profile")) {
        let result = attr.parse_nested_meta(|meta| {
            let name = path_name(&meta.path);
            match name.as_str() {
                "key" => {
                    let value: LitStr = meta
                        .value()
                        .and_then(|v| v.parse())
                        .map_err(|_| meta.error("expected `key = \"KEY_NAME\"`"))?;
                    if out.key.is_some() {
                        errors.push(syn::Error::new(
                            value.span(),
                            "duplicate `key` option: a field holds one profile key",
                        ));
                    } else {
                        out.key = Some(value);
                    }
                }
                "tier" | "skip" => {
                    if meta.input.peek(Token![=]) || meta.input.peek(syn::token::Paren) {
                        return Err(meta.error(format!(
                            "`{name}` takes no value: write `#[profile({name})]`"
                        )));
                    }
                    let ident = meta.path.get_ident().cloned().expect("one segment");
                    let slot = if name == "tier" {
                        &mut out.tier
                    } else {
                        &mut out.skip
                    };
                    if slot.is_some() {
                        errors.push(syn::Error::new(
                            ident.span(),
                            format!("duplicate `{name}` option"),
                        ));
                    } else {
                        *slot = Some(ident);
                    }
                }
                _ => {
                    errors.push(syn::Error::new_spanned(
                        &meta.path,
                        format!(
                            "unknown profile option `{name}`{} (options: `key = \"...\"`, `tier`, `skip`)",
                            did_you_mean(&name, OPTIONS)
                        ),
                    ));
                    // Skip its value so the options after it are still read.
                    if meta.input.peek(Token![=]) {
                        let _: syn::Expr = meta.value()?.parse()?;
                    } else if meta.input.peek(syn::token::Paren) {
                        meta.parse_nested_meta(|inner| {
                            if inner.input.peek(Token![=]) {
                                let _: syn::Expr = inner.value()?.parse()?;
                            }
                            Ok(())
                        })?;
                    }
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            errors.push(e);
        }
    }
    // Options that contradict each other: one error, at the later one.
    let chosen: Vec<(&str, Span)> = [
        out.key.as_ref().map(|k| ("key", k.span())),
        out.tier.as_ref().map(|t| ("tier", t.span())),
        out.skip.as_ref().map(|s| ("skip", s.span())),
    ]
    .into_iter()
    .flatten()
    .collect();
    if chosen.len() > 1 {
        let (first, _) = chosen[0];
        let (second, span) = chosen[1];
        errors.push(syn::Error::new(
            span,
            format!("`{second}` conflicts with `{first}` on the same field; use one"),
        ));
    }
    out
}

/// Rejects `#[profile(...)]` on the struct itself: it takes no options.
pub fn container_attrs(attrs: &[Attribute], errors: &mut Errors) {
    for attr in attrs.iter().filter(|a| a.path().is_ident("profile")) {
        errors.push(syn::Error::new_spanned(
            attr,
            "`#[profile(...)]` goes on fields; the struct itself takes no options",
        ));
    }
}
