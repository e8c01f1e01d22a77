//! Procedural macros for `qlora-scale`: `#[derive(ScaledProfile)]` and
//! `hardware_profile!`.
//!
//! Use them through the `qlora_scale` crate, which re-exports both and holds
//! the documentation with runnable examples. Everything these macros know
//! (profile keys and their kinds, tiers, hardware rows) comes from
//! `tables/*.toml` through the main crate's generator, run by this crate's
//! build script.
//!
//! The shape follows thiserror-impl: `ast` models the input and keeps its
//! nodes for spans, `attr` parses `#[profile(...)]`, `valid` holds the
//! cross-field rules, `expand` emits the impl, `hardware` is the function-like
//! macro, `schema` is the generated table data.

mod ast;
mod attr;
mod expand;
mod hardware;
mod schema;
mod suggest;
mod valid;

use proc_macro::TokenStream;
use syn::{DeriveInput, parse_macro_input};

/// Derives `qlora_scale::ScaledProfile`; see the trait's documentation.
#[proc_macro_derive(ScaledProfile, attributes(profile))]
pub fn derive_scaled_profile(input: TokenStream) -> TokenStream {
    let input = parse_macro_input!(input as DeriveInput);
    expand::derive(&input).into()
}

/// A `const` profile for a row of `tables/hardware.toml`; see
/// `qlora_scale::hardware_profile!`.
#[proc_macro]
pub fn hardware_profile(input: TokenStream) -> TokenStream {
    hardware::expand(input.into()).into()
}
