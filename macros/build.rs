//! Runs the main crate's table generator on `../tables` and writes the schema
//! the macros compile in (`OUT_DIR/schema.rs`): the same loading and
//! validation as the library's build, so the derive never knows a key, tier or
//! hardware row the tables do not define.

#[path = "../build/mod.rs"]
mod generator;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let tables = root.join("../tables");

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=../tables");
    println!("cargo:rerun-if-changed=../build");
    for name in generator::model::FILES {
        println!("cargo:rerun-if-changed=../tables/{name}");
    }

    match generator::macro_schema(&tables) {
        Ok(schema) => {
            for input in &schema.inputs {
                println!("cargo:rerun-if-changed={}", input.display());
            }
            let path = out.join("schema.rs");
            if let Err(e) = std::fs::write(&path, schema.rust) {
                println!("cargo::error=cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                println!("cargo::error={e}");
            }
            println!(
                "cargo::error={} problem(s) in tables/; the macros were not built",
                errors.len()
            );
            ExitCode::FAILURE
        }
    }
}
