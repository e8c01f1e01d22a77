//! Procedural macros for `qlora-scale`.
//!
//! `#[derive(ScaledProfile)]` is built on the tables the main crate compiles;
//! see the `qlora_scale` crate documentation.
