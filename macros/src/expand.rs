//! Emits the `ScaledProfile` impl: fully qualified paths, no allocation,
//! saturating count conversions; a stub impl when the input has errors, so
//! the user sees those errors and no cascade.

use proc_macro2::TokenStream;
use quote::{ToTokens, format_ident, quote, quote_spanned};
use syn::DeriveInput;
use syn::spanned::Spanned;

use crate::ast::{Errors, Input};
use crate::schema::{self, KeyKind, KeySchema};
use crate::valid;

/// The whole derive: the impl, or every error plus a stub impl.
pub fn derive(node: &DeriveInput) -> TokenStream {
    let mut errors = Errors::default();
    let model = Input::from_syn(node, &mut errors).map(|input| {
        let keys = valid::resolve(&input, &mut errors);
        (input, keys)
    });
    match model {
        Some((input, keys)) if errors.is_empty() => impl_scaled_profile(&input, &keys),
        Some((input, keys)) => {
            let errors = errors.to_compile_errors();
            let stub = stub(node, Some((&input, &keys)));
            quote!(#errors #stub)
        }
        None => {
            let errors = errors.to_compile_errors();
            let stub = stub(node, None);
            quote!(#errors #stub)
        }
    }
}

/// The trait path of a key kind's field conversions.
fn kind_trait(kind: KeyKind) -> TokenStream {
    match kind {
        KeyKind::Count => quote!(::qlora_scale::__private::CountField),
        KeyKind::Flag => quote!(::qlora_scale::__private::FlagField),
        KeyKind::Tier => quote!(::qlora_scale::__private::TierField),
    }
}

fn impl_scaled_profile(input: &Input, keys: &[Option<&'static KeySchema>]) -> TokenStream {
    let ident = input.ident;
    let (impl_generics, ty_generics, where_clause) = input.generics.split_for_impl();

    // Generic field types get the bound they need in the where clause.
    // Concrete ones are checked where they are used, at the field's type, so
    // a wrong type is one error that points there.
    let mut bounds: Vec<TokenStream> = where_clause
        .map(|w| w.predicates.iter().map(|p| quote!(#p)).collect())
        .unwrap_or_default();
    bounds.extend(generic_field_bounds(input, keys));

    // to_profile: each in-profile key from its field, or the absent value.
    let profile_fields = schema::PROFILE_KEYS
        .iter()
        .filter(|k| k.in_profile)
        .map(|k| {
            let name = format_ident!("{}", k.name);
            let holder = input
                .fields
                .iter()
                .zip(keys)
                .find(|(_, key)| key.is_some_and(|key| key.name == k.name));
            let value = match (holder, k.kind) {
                (Some((f, _)), kind) => {
                    let (member, ty) = (&f.member, f.ty);
                    let tr = kind_trait(kind);
                    quote_spanned!(ty.span()=> <#ty as #tr>::to_value(&self.#member))
                }
                (None, KeyKind::Count) => quote!(::qlora_scale::__private::ABSENT_COUNT),
                (None, KeyKind::Flag) => quote!(::qlora_scale::__private::ABSENT_FLAG),
                (None, KeyKind::Tier) => quote!(::qlora_scale::__private::ABSENT_TIER),
            };
            quote!(#name: #value)
        });

    // with_profile: in-profile keys from the profile, everything else as is.
    let out_fields = input.fields.iter().zip(keys).map(|(f, key)| {
        let (member, ty) = (&f.member, f.ty);
        match key {
            Some(k) if k.in_profile => {
                let name = format_ident!("{}", k.name);
                let tr = kind_trait(k.kind);
                quote_spanned!(ty.span()=> #member: <#ty as #tr>::from_value(profile.#name))
            }
            // Key kinds are `Copy`.
            Some(_) => quote!(#member: self.#member),
            None => quote_spanned!(ty.span()=> #member: ::core::clone::Clone::clone(&self.#member)),
        }
    });

    quote! {
        #[automatically_derived]
        impl #impl_generics ::qlora_scale::ScaledProfile for #ident #ty_generics
        where
            #( #bounds, )*
        {
            #[inline]
            fn to_profile(&self) -> ::qlora_scale::Profile {
                ::qlora_scale::Profile { #( #profile_fields, )* }
            }

            #[inline]
            fn with_profile(&self, profile: &::qlora_scale::Profile) -> Self {
                Self { #( #out_fields, )* }
            }
        }
    }
}

/// Whether `ty` names one of the struct's type parameters.
fn mentions_type_param(ty: &syn::Type, generics: &syn::Generics) -> bool {
    fn walk(tokens: TokenStream, params: &[&syn::Ident]) -> bool {
        tokens.into_iter().any(|t| match t {
            proc_macro2::TokenTree::Ident(i) => params.contains(&&i),
            proc_macro2::TokenTree::Group(g) => walk(g.stream(), params),
            _ => false,
        })
    }
    let params: Vec<&syn::Ident> = generics.type_params().map(|p| &p.ident).collect();
    !params.is_empty() && walk(ty.to_token_stream(), &params)
}

/// `T: Kind` (or `T: Clone` for carried fields) for each field whose type
/// names a type parameter, spanned at the field's type.
fn generic_field_bounds<'a>(
    input: &'a Input,
    keys: &'a [Option<&'static KeySchema>],
) -> impl Iterator<Item = TokenStream> + 'a {
    input
        .fields
        .iter()
        .zip(keys)
        .filter(|(f, _)| mentions_type_param(f.ty, input.generics))
        .map(|(f, key)| {
            let ty = f.ty;
            let bound = match key {
                Some(k) => kind_trait(k.kind),
                None => quote!(::core::clone::Clone),
            };
            quote_spanned!(ty.span()=> #ty: #bound)
        })
}

/// An impl with the right signature and no body worth running: emitted with
/// the errors so that uses of the trait do not add errors of their own. It
/// still checks the types of the fields whose key is known, so a wrong type
/// is reported together with the other mistakes.
fn stub(node: &DeriveInput, model: Option<(&Input, &[Option<&'static KeySchema>])>) -> TokenStream {
    let ident = &node.ident;
    let (impl_generics, ty_generics, where_clause) = node.generics.split_for_impl();
    let mut bounds: Vec<TokenStream> = where_clause
        .map(|w| w.predicates.iter().map(|p| quote!(#p)).collect())
        .unwrap_or_default();
    let mut checks = Vec::new();
    if let Some((input, keys)) = model {
        bounds.extend(generic_field_bounds(input, keys));
        for (f, key) in input.fields.iter().zip(keys) {
            if let Some(k) = key {
                let ty = f.ty;
                let tr = kind_trait(k.kind);
                checks.push(quote_spanned!(ty.span()=> let _ = <#ty as #tr>::from_value;));
            }
        }
    }
    quote! {
        #[automatically_derived]
        impl #impl_generics ::qlora_scale::ScaledProfile for #ident #ty_generics
        where
            #( #bounds, )*
        {
            fn to_profile(&self) -> ::qlora_scale::Profile {
                #( #checks )*
                ::core::unreachable!("#[derive(ScaledProfile)] reported errors")
            }
            fn with_profile(&self, _: &::qlora_scale::Profile) -> Self {
                ::core::unreachable!("#[derive(ScaledProfile)] reported errors")
            }
        }
    }
}
