//! The table generator: reads `tables/*.toml`, validates every rule, and emits
//! the Rust source and DFA bytes the library embeds.
//!
//! `build.rs` is a thin wrapper over [`generate`]; tests include this module
//! with `#[path]` to check error messages and the generated source.

#![allow(dead_code)]

pub mod dfa;
pub mod diag;
pub mod emit;
pub mod model;
pub mod validate;

use std::path::{Path, PathBuf};

pub use diag::Diagnostic;

/// Byte order of the target the DFAs are serialised for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endian {
    Little,
    Big,
}

impl Endian {
    /// Reads Cargo's `CARGO_CFG_TARGET_ENDIAN` value.
    pub fn from_cargo(value: &str) -> Option<Endian> {
        match value {
            "little" => Some(Endian::Little),
            "big" => Some(Endian::Big),
            _ => None,
        }
    }
}

/// Everything the build writes into `OUT_DIR`.
pub struct Output {
    /// Formatted Rust source, `include!`d by `src/tables.rs`.
    pub rust: String,
    /// DFA files: (file name in `OUT_DIR`, bytes).
    pub dfas: Vec<(&'static str, Vec<u8>)>,
    /// Every file read, for `cargo:rerun-if-changed`.
    pub inputs: Vec<PathBuf>,
}

/// What `qlora-scale-macros`' build script writes into its `OUT_DIR`.
pub struct MacroSchema {
    /// Formatted Rust source, `include!`d by `macros/src/schema.rs`.
    pub rust: String,
    /// Every file read, for `cargo:rerun-if-changed`.
    pub inputs: Vec<PathBuf>,
}

/// Reads and validates the tables in `dir` (the same rules as [`generate`])
/// and emits the schema the proc-macro crate compiles in.
pub fn macro_schema(dir: &Path) -> Result<MacroSchema, Vec<Diagnostic>> {
    let loaded = model::load(dir)?;
    let tables = validate::validate(&loaded)?;
    Ok(MacroSchema {
        rust: emit::emit_macro_schema(&tables, &loaded.sources),
        inputs: loaded.sources.iter().map(|s| s.path.clone()).collect(),
    })
}

/// Reads and validates the tables in `dir` and generates the code.
///
/// All problems are returned at once, each naming `tables/FILE.toml:LINE:COL`.
pub fn generate(dir: &Path, endian: Endian) -> Result<Output, Vec<Diagnostic>> {
    let loaded = model::load(dir)?;
    let tables = validate::validate(&loaded)?;
    let built = dfa::build(&tables, &loaded.sources, endian)?;
    let rust = emit::emit(&tables, &built.override_splits, &loaded.sources);
    Ok(Output {
        rust,
        dfas: built.files,
        inputs: loaded.sources.iter().map(|s| s.path.clone()).collect(),
    })
}
