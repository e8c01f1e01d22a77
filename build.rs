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

    if std::env::var_os("CARGO_FEATURE_CUDA").is_some()
        && let Err(e) = cuda_kernels(&root, &out)
    {
        println!("cargo::error={e}");
        return ExitCode::FAILURE;
    }

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

/// Feature `cuda`: compiles `src/qlora/kernels/qlora.cu` to PTX
/// (`$OUT_DIR/qlora.ptx`) with the toolkit's `nvcc` (`$CUDA_PATH/bin`, else
/// `PATH`; `scripts/cuda_env.sh` sets both), for the virtual architecture
/// `compute_$CUDA_COMPUTE_CAP` (default 80: the driver compiles the PTX for
/// the GPU it runs on, any of compute capability 8.0 or newer).
fn cuda_kernels(root: &std::path::Path, out: &std::path::Path) -> Result<(), String> {
    let src = root.join("src/qlora/kernels/qlora.cu");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CUDA_PATH");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let nvcc = match std::env::var_os("CUDA_PATH") {
        Some(p) if PathBuf::from(&p).join("bin/nvcc").exists() => PathBuf::from(p).join("bin/nvcc"),
        _ => PathBuf::from("nvcc"),
    };
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_string());
    if cap.is_empty() || !cap.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "CUDA_COMPUTE_CAP={cap:?} is not a compute capability like 90"
        ));
    }
    let ptx = out.join("qlora.ptx");
    let status = std::process::Command::new(&nvcc)
        .arg("--ptx")
        .arg(format!("-arch=compute_{cap}"))
        .args(["-O3", "-std=c++17", "-o"])
        .arg(&ptx)
        .arg(&src)
        .status()
        .map_err(|e| {
            format!(
                "cannot run {} ({e}): the `cuda` feature needs the CUDA compiler; \
                 `source scripts/cuda_env.sh` installs it",
                nvcc.display()
            )
        })?;
    if !status.success() {
        return Err(format!(
            "{} failed on {} ({status})",
            nvcc.display(),
            src.display()
        ));
    }
    Ok(())
}
