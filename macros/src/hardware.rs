//! `hardware_profile!(VARIANT, MEMORY_GB)` and
//! `hardware_profile!(GENERATION, VARIANT, MEMORY_GB)`: a `const` profile for
//! a row of `tables/hardware.toml`, checked at expansion time.

use proc_macro2::TokenStream;
use quote::quote;
use syn::parse::{Parse, ParseStream, Parser};
use syn::punctuated::Punctuated;
use syn::spanned::Spanned;
use syn::{Ident, LitInt, Token};

use crate::ast::Errors;
use crate::schema;
use crate::suggest::did_you_mean;

/// One argument: a name or a memory size.
enum Arg {
    Name(Ident),
    Memory(LitInt),
}

impl Parse for Arg {
    fn parse(input: ParseStream) -> syn::Result<Arg> {
        if input.peek(LitInt) {
            input.parse().map(Arg::Memory)
        } else if input.peek(Ident) {
            input.parse().map(Arg::Name)
        } else {
            Err(input.error("expected a chip variant, a generation or a memory size in GB"))
        }
    }
}

const USAGE: &str = "expected `hardware_profile!(VARIANT, MEMORY_GB)` or `hardware_profile!(GENERATION, VARIANT, MEMORY_GB)`, e.g. `hardware_profile!(ultra, 96)`";

fn name_index(
    ident: &Ident,
    names: &'static [&'static str],
    what: &str,
    errors: &mut Errors,
) -> Option<usize> {
    let given = ident.to_string();
    let found = names.iter().position(|n| n.eq_ignore_ascii_case(&given));
    if found.is_none() {
        errors.push(syn::Error::new(
            ident.span(),
            format!(
                "unknown {what} `{given}`{} (tables/hardware.toml has {})",
                did_you_mean(&given, names.iter().copied()),
                names.join(", ")
            ),
        ));
    }
    found
}

pub fn expand(input: TokenStream) -> TokenStream {
    let args = match Punctuated::<Arg, Token![,]>::parse_terminated.parse2(input.clone()) {
        Ok(args) => args.into_iter().collect::<Vec<_>>(),
        Err(e) => {
            let e = e.to_compile_error();
            return quote!({ #e; ::qlora_scale::tables::FALLBACK_PROFILE });
        }
    };
    let mut errors = Errors::default();
    let (generation, variant, memory) = match args.as_slice() {
        [Arg::Name(v), Arg::Memory(m)] => (None, v, m),
        [Arg::Name(g), Arg::Name(v), Arg::Memory(m)] => (Some(g), v, m),
        _ => {
            let span = if input.is_empty() {
                proc_macro2::Span::call_site()
            } else {
                input.span()
            };
            let e = syn::Error::new(span, USAGE).to_compile_error();
            return quote!({ #e; ::qlora_scale::tables::FALLBACK_PROFILE });
        }
    };
    let generation_index =
        generation.map(|g| name_index(g, schema::GENERATIONS, "generation", &mut errors));
    let variant_index = name_index(variant, schema::VARIANTS, "chip variant", &mut errors);
    let memory_gb = match memory.base10_parse::<u32>() {
        Ok(m) => Some(m),
        Err(e) => {
            errors.push(syn::Error::new(
                memory.span(),
                format!("memory size in GB: {e}"),
            ));
            None
        }
    };
    if let (Some(v), Some(m)) = (variant_index, memory_gb) {
        let mut sizes: Vec<u32> = schema::HARDWARE_ROWS
            .iter()
            .filter(|(rv, _)| *rv == v)
            .map(|&(_, gb)| gb)
            .collect();
        if !sizes.contains(&m) {
            sizes.sort_unstable();
            let list = sizes
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            errors.push(syn::Error::new(
                memory.span(),
                format!(
                    "no hardware row for `{}` with {m} GB; tables/hardware.toml has `{}` rows for {list} GB",
                    schema::VARIANTS[v],
                    schema::VARIANTS[v]
                ),
            ));
        }
    }

    match (generation_index, variant_index, memory_gb) {
        (None, Some(v), Some(m)) if errors.is_empty() => quote! {
            ::qlora_scale::hardware::base_profile(::qlora_scale::ChipVariant::ALL[#v], #m)
        },
        (Some(Some(g)), Some(v), Some(m)) if errors.is_empty() => quote! {
            ::qlora_scale::optimized_profile(
                ::qlora_scale::Generation::ALL[#g],
                ::qlora_scale::ChipVariant::ALL[#v],
                #m,
            )
        },
        // The errors, and a value of the right type so nothing cascades.
        (None, ..) => {
            let errors = errors.to_compile_errors();
            quote!({ #errors ::qlora_scale::tables::FALLBACK_PROFILE })
        }
        (Some(_), ..) => {
            let errors = errors.to_compile_errors();
            quote!({
                #errors
                ::qlora_scale::optimized_profile(
                    ::qlora_scale::Generation::ALL[0],
                    ::qlora_scale::ChipVariant::ALL[0],
                    0,
                )
            })
        }
    }
}
