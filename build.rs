//! Compiles `tables/*.toml` into Rust and DFAs. The work lives in `build/`.

#[path = "build/mod.rs"]
mod generator;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"));
    let tables = root.join("tables");

    println!("cargo:rerun-if-changed=tables");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=build");
    for name in generator::model::FILES {
        println!("cargo:rerun-if-changed=tables/{name}");
    }
    println!("cargo:rerun-if-env-changed=CARGO_CFG_TARGET_ENDIAN");

    let endian_value = std::env::var("CARGO_CFG_TARGET_ENDIAN").unwrap_or_default();
    let Some(endian) = generator::Endian::from_cargo(&endian_value) else {
        println!("cargo::error=unknown target endianness \"{endian_value}\"");
        return ExitCode::FAILURE;
    };

    match generator::generate(&tables, endian) {
        Ok(output) => {
            for input in &output.inputs {
                println!("cargo:rerun-if-changed={}", input.display());
            }
            let mut failed = false;
            let mut write = |name: &str, bytes: &[u8]| {
                if let Err(e) = std::fs::write(out.join(name), bytes) {
                    println!(
                        "cargo::error=cannot write {}: {e}",
                        out.join(name).display()
                    );
                    failed = true;
                }
            };
            write("tables.rs", output.rust.as_bytes());
            for (name, bytes) in &output.dfas {
                write(name, bytes);
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(errors) => {
            for e in &errors {
                println!("cargo::error={e}");
                eprintln!("{e}");
            }
            println!(
                "cargo::error={} problem(s) in tables/; nothing was generated",
                errors.len()
            );
            ExitCode::FAILURE
        }
    }
}
