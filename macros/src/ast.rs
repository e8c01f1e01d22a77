//! The derive's input as a small model that keeps the original syn nodes, so
//! every error can point at the user's tokens.

use proc_macro2::TokenStream;
use syn::{Data, DeriveInput, Fields, Generics, Ident, Member, Type};

use crate::attr::{self, FieldAttrs};

/// Errors collected across the whole input, reported together.
#[derive(Default)]
pub struct Errors(Vec<syn::Error>);

impl Errors {
    pub fn push(&mut self, e: syn::Error) {
        self.0.push(e);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// One `compile_error!` per error, in the order found.
    pub fn to_compile_errors(&self) -> TokenStream {
        self.0.iter().map(syn::Error::to_compile_error).collect()
    }
}

/// A struct deriving `ScaledProfile`.
pub struct Input<'a> {
    pub ident: &'a Ident,
    pub generics: &'a Generics,
    pub fields: Vec<Field<'a>>,
}

/// One field, named or positional.
pub struct Field<'a> {
    pub original: &'a syn::Field,
    pub member: Member,
    pub ty: &'a Type,
    pub attrs: FieldAttrs,
}

impl<'a> Input<'a> {
    /// The model of a struct; `None` (with an error) for an enum or union.
    pub fn from_syn(node: &'a DeriveInput, errors: &mut Errors) -> Option<Input<'a>> {
        attr::container_attrs(&node.attrs, errors);
        let fields = match &node.data {
            Data::Struct(s) => &s.fields,
            Data::Enum(e) => {
                errors.push(syn::Error::new(
                    e.enum_token.span,
                    "#[derive(ScaledProfile)] needs a struct whose fields hold the profile keys; an enum has no fixed fields",
                ));
                return None;
            }
            Data::Union(u) => {
                errors.push(syn::Error::new(
                    u.union_token.span,
                    "#[derive(ScaledProfile)] needs a struct whose fields hold the profile keys; a union holds one field at a time",
                ));
                return None;
            }
        };
        let fields = match fields {
            Fields::Named(f) => f.named.iter().collect::<Vec<_>>(),
            Fields::Unnamed(f) => f.unnamed.iter().collect(),
            Fields::Unit => Vec::new(),
        };
        let fields = fields
            .into_iter()
            .enumerate()
            .map(|(i, f)| Field {
                original: f,
                member: match &f.ident {
                    Some(id) => Member::Named(id.clone()),
                    None => Member::Unnamed(i.into()),
                },
                ty: &f.ty,
                attrs: attr::field_attrs(&f.attrs, errors),
            })
            .collect();
        Some(Input {
            ident: &node.ident,
            generics: &node.generics,
            fields,
        })
    }
}
