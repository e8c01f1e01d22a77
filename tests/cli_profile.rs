//! Real runs of the `profile` binary: every subcommand, its output formats
//! and its errors.
//!
//! Every run gets a fresh temporary directory as `HOME` and config directory,
//! and names the profile file with `--profile-path` or `QLORA_SCALE_PROFILE`,
//! so the real per-user config is never touched.
//!
//! `--help` of `profile` and of each subcommand is compared with the files in
//! `tests/snapshots/`. After an intended change of the help text, rewrite them
//! with
//!
//! ```text
//! BLESS=1 cargo test --test cli_profile help
//! ```
//!
//! and review the diff.

mod sandbox;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use assert_cmd::Command;
use qlora_scale::saved_profile::PROFILE_PATH_ENV;
use serde_json::Value;

const HERMES_7B: &str = "NousResearch/Hermes-2-Pro-Mistral-7B";
#[cfg(target_os = "macos")]
const NOT_DETECTED: &str = "could not detect hardware (no Apple Silicon chip";

/// A sandbox: a temporary home, and a profile path inside it.
struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Sandbox {
        Sandbox {
            dir: sandbox::digitless_tempdir(),
        }
    }

    /// The profile file the tests pass with `--profile-path`.
    fn profile(&self) -> PathBuf {
        self.dir
            .path()
            .join("profiles")
            .join("hardware_profile.json")
    }

    /// `profile` with the sandbox's environment and no profile path.
    fn bare(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_profile"));
        let home = self.dir.path().join("home");
        cmd.env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("APPDATA", home.join("AppData"))
            .env_remove(PROFILE_PATH_ENV)
            .env_remove("CLICOLOR_FORCE")
            .env("NO_COLOR", "1")
            .timeout(Duration::from_secs(60));
        cmd
    }

    /// `profile --profile-path <sandbox profile> ARGS`.
    fn run(&self, args: &[&str]) -> Output {
        self.run_stdin(args, "")
    }

    fn run_stdin(&self, args: &[&str], stdin: impl Into<Vec<u8>>) -> Output {
        self.bare()
            .arg("--profile-path")
            .arg(self.profile())
            .args(args)
            .write_stdin(stdin)
            .output()
            .expect("profile runs")
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).expect("stdout is UTF-8")
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).expect("stderr is UTF-8")
}

/// Asserts success and no stderr; returns stdout.
#[track_caller]
fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        stdout(out),
        stderr(out)
    );
    assert_eq!(stderr(out), "", "nothing on stderr");
    stdout(out)
}

/// Asserts exit status 1, an `error:` line, and nothing on stdout unless
/// `stdout_allowed`; returns stderr.
#[track_caller]
fn fails(out: &Output) -> String {
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout:\n{}\nstderr:\n{}",
        stdout(out),
        stderr(out)
    );
    let err = stderr(out);
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn json(out: &Output) -> Value {
    serde_json::from_str(&ok(out)).expect("stdout is one JSON document")
}

/// Saves a profile with the non-interactive setup.
fn setup_with_flags(sb: &Sandbox, generation: &str, chip: &str, memory: &str) {
    ok(&sb.run(&[
        "setup",
        "--generation",
        generation,
        "--chip",
        chip,
        "--memory",
        memory,
        "--yes",
    ]));
}

// ---------------------------------------------------------------- help

const HELP_CASES: [(&str, &[&str]); 7] = [
    ("help", &["--help"]),
    ("help-detect-model", &["detect-model", "--help"]),
    ("help-hardware", &["hardware", "--help"]),
    ("help-setup", &["setup", "--help"]),
    ("help-recommend", &["recommend", "--help"]),
    ("help-show", &["show", "--help"]),
    ("help-scale", &["scale", "--help"]),
];

fn snapshot_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("snapshots")
        .join(format!("{name}.txt"))
}

#[test]
fn help_matches_snapshots() {
    let sb = Sandbox::new();
    let bless = std::env::var_os("BLESS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for (name, args) in HELP_CASES {
        let actual = ok(&sb.bare().args(args).output().unwrap());
        let path = snapshot_path(name);
        if bless {
            std::fs::write(&path, &actual).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (run with BLESS=1 to create)", path.display()));
        if actual != expected {
            stale.push(format!(
                "`profile {}` differs from {}:\n--- expected\n{expected}\n--- actual\n{actual}",
                args.join(" "),
                path.display()
            ));
        }
    }
    assert!(
        stale.is_empty(),
        "{}\n(if intended: BLESS=1 cargo test --test cli_profile help)",
        stale.join("\n")
    );
}

#[test]
fn no_subcommand_prints_help_and_fails() {
    let sb = Sandbox::new();
    let out = sb.bare().output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("Usage: profile [OPTIONS] <COMMAND>"));
}

// ---------------------------------------------------------------- detect-model

#[test]
fn detect_model_arguments_print_tab_separated_lines() {
    let sb = Sandbox::new();
    let out = ok(&sb.run(&[
        "detect-model",
        HERMES_7B,
        "huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2",
        "Org/Model-32B-Chat",
        "NousResearch/Hermes-3-Llama-3.1-70B",
        "mistralai/Mistral-v0.1",
        "Qwen/Qwen2.5-0.5B",
        "HuggingFaceTB/SmolLM2-135M",
    ]));
    assert_eq!(
        out,
        "NousResearch/Hermes-2-Pro-Mistral-7B\tsmall\t7\n\
         huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2\tmedium\t14\n\
         Org/Model-32B-Chat\tlarge\t32\n\
         NousResearch/Hermes-3-Llama-3.1-70B\txlarge\t70\n\
         mistralai/Mistral-v0.1\tsmall\t7\n\
         Qwen/Qwen2.5-0.5B\tsmall\t0.5\n\
         HuggingFaceTB/SmolLM2-135M\tsmall\t0.135\n"
    );
}

#[test]
fn detect_model_unknown_prints_a_dash() {
    let sb = Sandbox::new();
    let out = ok(&sb.run(&["detect-model", "some-org/unknown-model", "org/bert-base"]));
    assert_eq!(
        out,
        "some-org/unknown-model\tsmall\t-\norg/bert-base\tsmall\t-\n"
    );
}

#[test]
fn detect_model_on_a_missing_path_is_an_error_naming_it() {
    let sb = Sandbox::new();
    let missing = sb.dir.path().join("no-such-model");
    let missing = missing.to_str().unwrap();
    // The other names still print; the command fails.
    let out = sb.run(&["detect-model", "Qwen/Qwen2.5-0.5B", missing, "./gone-7b"]);
    let err = fails(&out);
    assert_eq!(stdout(&out), "Qwen/Qwen2.5-0.5B\tsmall\t0.5\n");
    assert!(
        err.contains(&format!("error: {missing}: no such file or directory\n")),
        "{err}"
    );
    // Looks like a path: not sized from its name, though it writes 7B.
    assert!(
        err.contains("error: ./gone-7b: no such file or directory\n"),
        "{err}"
    );
    assert!(
        err.ends_with("error: 2 of 3 names could not be sized (see above)\n"),
        "{err}"
    );
    // From stdin, the same.
    let out = sb.run_stdin(&["detect-model", "--json"], format!("{missing}\n"));
    assert!(fails(&out).contains("no such file or directory"));
    assert_eq!(stdout(&out), "");
}

#[test]
fn detect_model_on_a_folder_without_a_size_is_an_error_naming_it() {
    let sb = Sandbox::new();
    let empty = sb.dir.path().join("empty-model");
    std::fs::create_dir(&empty).unwrap();
    let empty = empty.to_str().unwrap();
    let err = fails(&sb.run(&["detect-model", empty]));
    assert!(
        err.starts_with(&format!(
            "error: {empty}: no readable model file gives a size"
        )),
        "{err}"
    );
    // An unreadable config.json is named as the cause.
    let broken = sb.dir.path().join("broken-model");
    std::fs::create_dir(&broken).unwrap();
    std::fs::write(broken.join("config.json"), "{ not json").unwrap();
    let err = fails(&sb.run(&["detect-model", broken.to_str().unwrap()]));
    assert!(err.contains("no readable model file gives a size"), "{err}");
    assert!(err.contains("config.json"), "{err}");
    // A folder whose name writes a size keeps the name's, with a warning.
    let named = sb.dir.path().join("Qwen2.5-7B");
    std::fs::create_dir(&named).unwrap();
    let out = sb.run(&["detect-model", named.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).ends_with("Qwen2.5-7B\tsmall\t7\n"),
        "{}",
        stdout(&out)
    );
}

#[test]
fn detect_model_reads_stdin_skipping_empty_lines() {
    let sb = Sandbox::new();
    let out = ok(&sb.run_stdin(
        &["detect-model"],
        "meta-llama/Llama-2-13b-chat-hf\r\n\n   \nmodels/mistral-7b\norg/model-51b",
    ));
    assert_eq!(
        out,
        "meta-llama/Llama-2-13b-chat-hf\tmedium\t13\n\
         models/mistral-7b\tsmall\t7\n\
         org/model-51b\txlarge\t51\n"
    );
}

#[test]
fn detect_model_empty_stdin_prints_nothing() {
    let sb = Sandbox::new();
    assert_eq!(ok(&sb.run_stdin(&["detect-model"], "")), "");
}

#[test]
fn detect_model_json_lines() {
    let sb = Sandbox::new();
    let out = ok(&sb.run(&[
        "detect-model",
        "--json",
        HERMES_7B,
        "microsoft/phi-2",
        "org/bert-base",
        "Qwen/Qwen2.5-0.5B",
    ]));
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(
        lines,
        [
            serde_json::json!({"name": HERMES_7B, "category": "small", "params_b": 7, "source": "name"}),
            serde_json::json!({"name": "microsoft/phi-2", "category": "small", "params_b": 3, "source": "family"}),
            serde_json::json!({"name": "org/bert-base", "category": "small", "params_b": null, "source": "unknown"}),
            serde_json::json!({"name": "Qwen/Qwen2.5-0.5B", "category": "small", "params_b": 0.5, "source": "name"}),
        ]
    );
    // Integral counts print as integers, like the text output.
    assert!(out.starts_with(&format!(
        "{{\"name\":\"{HERMES_7B}\",\"category\":\"small\",\"params_b\":7,"
    )));
}

#[test]
fn detect_model_json_from_stdin() {
    let sb = Sandbox::new();
    let out = ok(&sb.run_stdin(&["detect-model", "--json"], "org/MODEL-70B-INSTRUCT\n"));
    assert_eq!(
        out,
        "{\"name\":\"org/MODEL-70B-INSTRUCT\",\"category\":\"xlarge\",\"params_b\":70,\"source\":\"name\"}\n"
    );
}

#[test]
fn detect_model_survives_invalid_utf8_on_stdin() {
    let sb = Sandbox::new();
    let out = ok(&sb.run_stdin(&["detect-model"], &b"org/\xff\xfe-model-14b\n\xc3\n"[..]));
    assert_eq!(
        out,
        "org/\u{fffd}\u{fffd}-model-14b\tmedium\t14\n\u{fffd}\tsmall\t-\n"
    );
}

#[cfg(unix)]
#[test]
fn detect_model_survives_invalid_utf8_arguments() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let sb = Sandbox::new();
    // Not there and not path-like (`./`, `/`, `~`): sized from the name.
    let out = sb
        .bare()
        .arg("detect-model")
        .arg(OsStr::from_bytes(b"models/\x80llama-70b"))
        .output()
        .unwrap();
    assert_eq!(ok(&out), "models/\u{fffd}llama-70b\txlarge\t70\n");
}

#[test]
fn detect_model_into_a_closed_pipe_exits_quietly() {
    // `profile detect-model < names | head -n 1`: the reader leaves early.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_profile"))
        .arg("detect-model")
        .env_remove(PROFILE_PATH_ENV)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        for _ in 0..200_000 {
            // The child stops reading once its stdout is gone; stop then too.
            if stdin.write_all(b"org/model-14b-chat\n").is_err() {
                break;
            }
        }
    });
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first, "org/model-14b-chat\tmedium\t14\n");
    // Dropping the reader closed the pipe.
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    assert!(out.status.success(), "status {:?}", out.status);
    assert_eq!(String::from_utf8_lossy(&out.stderr), "");
}

// ---------------------------------------------------------------- hardware

#[cfg(target_os = "linux")]
#[test]
fn hardware_on_linux_shows_what_it_found_and_the_row() {
    let sb = Sandbox::new();
    let text = ok(&sb.run(&["hardware"]));
    assert!(text.starts_with("Found:\n"), "{text}");
    assert!(text.contains("\n  CPU memory         "), "{text}");
    assert!(text.contains("\n  NVIDIA GPUs        "), "{text}");
    assert!(text.contains("\nChosen row: ["), "{text}");
    assert!(text.contains("\n  training budget    "), "{text}");

    let v = json(&sb.run(&["hardware", "--json"]));
    let memory = v["detected"]["linux_cpu"]["memory_gb"].as_u64().unwrap();
    assert!(memory > 0, "{v}");
    let table = if v["detected"]["gpus"].as_array().unwrap().is_empty() {
        assert_eq!(v["profile"]["memory_gb"].as_u64(), Some(memory), "{v}");
        "cpu"
    } else {
        "gpu"
    };
    assert_eq!(v["chosen"]["table"], table, "{v}");
    assert_eq!(v["profile"]["device"], table, "{v}");
    assert_eq!(v["chosen"]["row_memory_gb"], v["profile"]["row_memory_gb"]);
    assert!(v["profile"]["lora_rank"].is_u64(), "{v}");
}

#[cfg(target_os = "macos")]
#[test]
fn hardware_on_a_mac_shows_a_profile_or_says_why_not() {
    let sb = Sandbox::new();
    let out = sb.run(&["hardware", "--json"]);
    if out.status.success() {
        let v = json(&out);
        assert!(v["profile"]["lora_rank"].is_u64());
    } else {
        assert!(fails(&out).contains(NOT_DETECTED));
    }
}

/// `profile ARGS` with a fake `nvidia-smi` first on `PATH`: a shell script
/// that prints `output` and exits with `status`.
#[cfg(target_os = "linux")]
fn run_with_fake_nvidia_smi(sb: &Sandbox, output: &str, status: i32, args: &[&str]) -> Output {
    use std::os::unix::fs::PermissionsExt;
    let bin = sb.dir.path().join("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let data = bin.join("output.txt");
    std::fs::write(&data, output).unwrap();
    let script = bin.join("nvidia-smi");
    std::fs::write(
        &script,
        format!("#!/bin/sh\ncat '{}'\nexit {status}\n", data.display()),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::join_paths(std::iter::once(bin).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .unwrap();
    sb.bare()
        .env("PATH", path)
        .arg("--profile-path")
        .arg(sb.profile())
        .args(args)
        .output()
        .expect("profile runs")
}

#[cfg(target_os = "linux")]
#[test]
fn hardware_with_nvidia_gpus_chooses_the_largest_gpu_row() {
    let sb = Sandbox::new();
    let smi = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/hardware/nvidia-smi-mixed.csv"
    ))
    .unwrap();
    let text = ok(&run_with_fake_nvidia_smi(&sb, &smi, 0, &["hardware"]));
    assert!(text.contains("\n  NVIDIA GPUs        2\n"), "{text}");
    assert!(
        text.contains("\nChosen row: [gpu] 24 GB, the nearest to 23 GB (GPU 1, the largest)\n"),
        "{text}"
    );
    assert!(
        text.contains("\nProfile for an NVIDIA GPU, 23 GB:\n"),
        "{text}"
    );
    let v = json(&run_with_fake_nvidia_smi(
        &sb,
        &smi,
        0,
        &["scale", "--model", HERMES_7B],
    ));
    assert_eq!(v["device"], "gpu");
    assert_eq!(v["row_memory_gb"], 24);
    assert_eq!(v["hardware_source"], "detected");
}

#[cfg(target_os = "linux")]
#[test]
fn hardware_with_nvidia_smi_finding_no_gpu_falls_back_to_the_cpu() {
    let sb = Sandbox::new();
    for (output, status) in [
        ("No devices were found\n", 6),
        (
            "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n",
            9,
        ),
        ("garbage\n", 0),
    ] {
        let v = json(&run_with_fake_nvidia_smi(
            &sb,
            output,
            status,
            &["hardware", "--json"],
        ));
        assert_eq!(v["chosen"]["table"], "cpu", "{output}: {v}");
        let note = v["detected"]["gpu_note"].as_str().unwrap();
        assert!(note.starts_with("nvidia-smi "), "{note}");
    }
}

// ---------------------------------------------------------------- scale

#[test]
fn scale_with_flags_scales_the_m2_ultra_for_a_7b_model() {
    let sb = Sandbox::new();
    let v = json(&sb.run(&[
        "scale",
        "--model",
        HERMES_7B,
        "--generation",
        "m2",
        "--chip",
        "ultra",
        "--memory",
        "192",
    ]));
    assert_eq!(v["model"], HERMES_7B);
    assert_eq!(
        v["model_size"],
        serde_json::json!({"category": "small", "params_b": 7, "source": "name"})
    );
    assert_eq!(v["generation"], "m2");
    assert_eq!(v["variant"], "ultra");
    assert_eq!(v["memory_gb"], 192);
    assert_eq!(v["gpu_cores"], 76);
    assert_eq!(v["training_budget_gb"], 153);
    assert_eq!(v["batch_size"], 8);
    assert_eq!(v["lora_rank"], 32);
    assert_eq!(v["lora_num_layers"], 8);
    assert_eq!(v["grad_checkpoint"], false);
    assert_eq!(v["hardware_source"], "flags");
    // Nothing was saved.
    assert!(!sb.profile().exists());
}

#[test]
fn scale_flag_values_are_case_insensitive_and_larger_models_keep_more() {
    let sb = Sandbox::new();
    let v = json(&sb.run(&[
        "scale",
        "--model",
        "huihui-ai/DeepSeek-R1-Distill-Qwen-14B-abliterated-v2",
        "--generation",
        "M2",
        "--chip",
        "Ultra",
        "--memory",
        "192",
    ]));
    assert_eq!(
        (v["lora_rank"].as_u64(), v["lora_num_layers"].as_u64()),
        (Some(48), Some(12))
    );
    let v = json(&sb.run(&[
        "scale",
        "--model",
        "NousResearch/Hermes-3-Llama-3.1-70B",
        "--generation",
        "m2",
        "--chip",
        "ultra",
        "--memory",
        "192",
    ]));
    // An xlarge model keeps the whole profile.
    assert_eq!(
        (
            v["batch_size"].as_u64(),
            v["lora_rank"].as_u64(),
            v["lora_num_layers"].as_u64()
        ),
        (Some(8), Some(256), Some(32))
    );
    assert_eq!(v["model_size"]["category"], "xlarge");
}

#[test]
fn scale_unknown_model_has_null_params() {
    let sb = Sandbox::new();
    let v = json(&sb.run(&[
        "scale",
        "--model",
        "org/bert-base",
        "--generation",
        "m1",
        "--chip",
        "base",
        "--memory",
        "16",
    ]));
    assert_eq!(
        v["model_size"],
        serde_json::json!({"category": "small", "params_b": null, "source": "unknown"})
    );
    // An entry profile is never changed.
    assert_eq!(
        (v["batch_size"].as_u64(), v["lora_rank"].as_u64()),
        (Some(1), Some(32))
    );
}

#[cfg(not(target_os = "macos"))]
#[test]
fn scale_partial_override_without_saved_profile_names_missing_flags() {
    let sb = Sandbox::new();
    let err = fails(&sb.run(&["scale", "--model", HERMES_7B, "--chip", "ultra"]));
    assert!(
        err.starts_with("error: missing --generation, --memory: no saved profile at "),
        "{err}"
    );
    assert!(err.contains(&sb.profile().display().to_string()), "{err}");
    let err = fails(&sb.run(&[
        "scale",
        "--model",
        HERMES_7B,
        "--generation",
        "m2",
        "--memory",
        "64",
    ]));
    assert!(err.starts_with("error: missing --chip:"), "{err}");
}

#[cfg(target_os = "linux")]
#[test]
fn scale_without_a_saved_profile_uses_the_detected_machine() {
    let sb = Sandbox::new();
    let v = json(&sb.run(&["scale", "--model", HERMES_7B]));
    assert_eq!(v["hardware_source"], "detected");
    assert!(v["device"] == "cpu" || v["device"] == "gpu", "{v}");
    assert!(v["row_memory_gb"].is_u64(), "{v}");
    assert_eq!(v["model_size"]["category"], "small");
}

#[test]
fn scale_for_a_gpu_or_cpu_by_memory() {
    let sb = Sandbox::new();
    // An H100 reports 79 GiB: the 80 GB row, scaled down to a 7B model.
    let v = json(&sb.run(&["scale", "--model", HERMES_7B, "--gpu-memory", "79"]));
    assert_eq!(v["hardware_source"], "flags");
    assert_eq!(v["device"], "gpu");
    assert_eq!(
        (v["memory_gb"].as_u64(), v["row_memory_gb"].as_u64()),
        (Some(79), Some(80))
    );
    assert_eq!(v["training_budget_gb"], 71);
    assert_eq!(v["lora_rank"], 32);
    assert!(v.get("generation").is_none(), "{v}");
    let v = json(&sb.run(&["scale", "--model", HERMES_7B, "--cpu-memory", "32"]));
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["training_budget_gb"], 22);
    // A saved Apple profile does not get in the way.
    setup_with_flags(&sb, "m2", "ultra", "192");
    let v = json(&sb.run(&["scale", "--model", HERMES_7B, "--cpu-memory", "32"]));
    assert_eq!(v["device"], "cpu");
    // Apple flags and device flags exclude each other.
    let out = sb.run(&[
        "scale",
        "--model",
        HERMES_7B,
        "--gpu-memory",
        "24",
        "--chip",
        "ultra",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("cannot be used with"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn scale_uses_the_saved_profile_and_partial_overrides() {
    let sb = Sandbox::new();
    setup_with_flags(&sb, "m2", "ultra", "192");
    let v = json(&sb.run(&["scale", "--model", HERMES_7B]));
    assert_eq!(v["hardware_source"], "saved_profile");
    assert_eq!(
        (
            v["memory_gb"].as_u64(),
            v["batch_size"].as_u64(),
            v["lora_rank"].as_u64()
        ),
        (Some(192), Some(8), Some(32))
    );
    // Only the memory overridden: the ultra 64 row (batch 4, rank 128, layers
    // 20), scaled to the 7B model.
    let v = json(&sb.run(&["scale", "--model", HERMES_7B, "--memory", "64"]));
    assert_eq!(v["hardware_source"], "saved_profile+flags");
    assert_eq!(
        (v["generation"].as_str(), v["variant"].as_str()),
        (Some("m2"), Some("ultra"))
    );
    assert_eq!(v["memory_gb"], 64);
    assert_eq!(v["training_budget_gb"], 51);
    assert_eq!(
        (
            v["batch_size"].as_u64(),
            v["lora_rank"].as_u64(),
            v["lora_num_layers"].as_u64()
        ),
        (Some(8), Some(32), Some(8))
    );
}

#[test]
fn scale_rejects_bad_flag_values() {
    let sb = Sandbox::new();
    let out = sb.run(&[
        "scale",
        "--model",
        "x",
        "--generation",
        "m9",
        "--chip",
        "ultra",
        "--memory",
        "64",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("invalid value 'm9' for '--generation <GEN>'"),
        "{err}"
    );
    assert!(err.contains("[possible values: m1, m2, m3, m4]"), "{err}");
    let out = sb.run(&[
        "scale",
        "--model",
        "x",
        "--generation",
        "m2",
        "--chip",
        "ultra",
        "--memory",
        "0",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = sb.run(&["scale", "--generation", "m2"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("--model <NAME>"));
}

// ---------------------------------------------------------------- setup and show

#[test]
fn setup_wizard_reasks_a_bad_answer_saves_and_show_prints_it() {
    let sb = Sandbox::new();
    let out = ok(&sb.run_stdin(&["setup"], "m9\nm2\nultra\n192\ny\n"));
    assert!(out.contains("Chip generation (m1, m2, m3, m4)"), "{out}");
    assert!(
        out.contains("unknown generation \"m9\" (known: m1, m2, m3, m4)"),
        "{out}"
    );
    // Asked twice: once answered m9, once m2.
    assert_eq!(out.matches("Chip generation (").count(), 2, "{out}");
    assert!(
        out.contains("Chip variant (base, pro, max, ultra)"),
        "{out}"
    );
    assert!(
        out.contains("Memory in GB for the M2 Ultra (64, 96, 128, 192)"),
        "{out}"
    );
    assert!(out.contains("Profile for M2 Ultra, 192 GB:"), "{out}");
    assert!(
        out.contains(&format!("Saved to {}.", sb.profile().display())),
        "{out}"
    );

    let saved: Value = serde_json::from_slice(&std::fs::read(sb.profile()).unwrap()).unwrap();
    assert_eq!(saved["generation"], "m2");
    assert_eq!(saved["variant"], "ultra");
    assert_eq!(saved["memory_gb"], 192);
    assert_eq!(saved["training_budget_gb"], 153);
    assert_eq!(saved["lora_rank"], 256);

    let shown = ok(&sb.run(&["show"]));
    assert!(
        shown.starts_with(&format!("Saved profile: {}\n", sb.profile().display())),
        "{shown}"
    );
    assert!(shown.contains("Profile for M2 Ultra, 192 GB:"), "{shown}");
    assert!(shown.contains("  LoRA rank          256\n"), "{shown}");
    assert!(shown.contains("  training budget    153 GB\n"), "{shown}");
    assert_eq!(json(&sb.run(&["show", "--json"])), saved);
}

#[test]
fn setup_memory_must_be_one_the_chip_is_sold_with() {
    let sb = Sandbox::new();
    let out = ok(&sb.run_stdin(&["setup", "--yes"], "m3\npro\n64\n36\n"));
    assert!(
        out.contains(
            "\"64\" is not a memory size of the M3 Pro; choose one of 18, 32, 36, 48 (GB)"
        ),
        "{out}"
    );
    let saved = json(&sb.run(&["show", "--json"]));
    assert_eq!(saved["memory_gb"], 36);
}

#[test]
fn setup_gives_up_after_repeated_bad_answers() {
    let sb = Sandbox::new();
    let out = sb.run_stdin(&["setup"], "x\ny\nz\nm2\n");
    let err = fails(&out);
    assert!(
        err.contains("no valid generation after 3 answers (pass --generation"),
        "{err}"
    );
    assert!(!sb.profile().exists());
}

#[test]
fn setup_at_end_of_input_is_an_error_not_a_hang() {
    let sb = Sandbox::new();
    let err = fails(&sb.run_stdin(&["setup"], ""));
    assert!(
        err.contains("input ended before the generation was given (pass --generation"),
        "{err}"
    );
    let err = fails(&sb.run_stdin(
        &[
            "setup",
            "--generation",
            "m1",
            "--chip",
            "max",
            "--memory",
            "64",
        ],
        "",
    ));
    assert!(
        err.contains("input ended before the confirmation was given (pass --yes"),
        "{err}"
    );
    assert!(!sb.profile().exists());
}

#[test]
fn setup_declined_saves_nothing() {
    let sb = Sandbox::new();
    let out = ok(&sb.run_stdin(
        &[
            "setup",
            "--generation",
            "m1",
            "--chip",
            "max",
            "--memory",
            "64",
        ],
        "n\n",
    ));
    assert!(out.ends_with("Not saved.\n"), "{out}");
    assert!(!sb.profile().exists());
}

#[test]
fn setup_with_all_flags_and_yes_reads_nothing() {
    let sb = Sandbox::new();
    setup_with_flags(&sb, "m1", "base", "16");
    let saved = json(&sb.run(&["show", "--json"]));
    assert_eq!(
        (
            saved["batch_size"].as_u64(),
            saved["grad_checkpoint"].as_bool()
        ),
        (Some(1), Some(true))
    );
    assert_eq!(saved["training_budget_gb"], 12);
}

#[test]
fn show_without_a_profile_says_how_to_create_one() {
    let sb = Sandbox::new();
    let out = ok(&sb.run(&["show"]));
    assert!(
        out.starts_with(&format!(
            "No saved profile at {}.\n",
            sb.profile().display()
        )),
        "{out}"
    );
    assert!(out.contains("profile setup"), "{out}");
    assert_eq!(ok(&sb.run(&["show", "--json"])), "null\n");
}

#[test]
fn corrupt_profile_is_reported_and_left_byte_identical() {
    let sb = Sandbox::new();
    let path = sb.profile();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let garbage = b"{\"generation\": \"m2\", \"variant\": truncated";
    std::fs::write(&path, garbage).unwrap();
    for args in [
        &["show"][..],
        &["show", "--json"],
        &["recommend"],
        &["scale", "--model", HERMES_7B],
        &["scale", "--model", HERMES_7B, "--memory", "64"],
    ] {
        let err = fails(&sb.run(args));
        assert!(
            err.contains(&format!(
                "saved profile {} is not a valid profile",
                path.display()
            )),
            "profile {args:?}: {err}"
        );
        // Said once, not repeated by the error chain.
        assert_eq!(err.matches("is not a valid profile").count(), 1, "{err}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            garbage,
            "profile {args:?} changed the file"
        );
    }
}

#[test]
fn unreadable_profile_is_reported_and_left_byte_identical() {
    let sb = Sandbox::new();
    let path = sb.profile();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let garbage = b"{\"generation\": \xff\xfe}";
    std::fs::write(&path, garbage).unwrap();
    for args in [
        &["show"][..],
        &["recommend"],
        &["scale", "--model", HERMES_7B],
    ] {
        let err = fails(&sb.run(args));
        assert!(
            err.contains(&path.display().to_string()),
            "profile {args:?}: {err}"
        );
        assert_eq!(
            std::fs::read(&path).unwrap(),
            garbage,
            "profile {args:?} changed the file"
        );
    }
}

#[test]
fn setup_replaces_a_corrupt_profile_only_when_confirmed() {
    let sb = Sandbox::new();
    let path = sb.profile();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, "not json").unwrap();
    let args = [
        "setup",
        "--generation",
        "m4",
        "--chip",
        "max",
        "--memory",
        "128",
    ];
    let out = ok(&sb.run_stdin(&args, "n\n"));
    assert!(out.contains("is not a valid profile"), "{out}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "not json");
    ok(&sb.run_stdin(&args, "y\n"));
    assert_eq!(json(&sb.run(&["show", "--json"]))["memory_gb"], 128);
}

#[test]
fn profile_path_flag_beats_the_environment_variable() {
    let sb = Sandbox::new();
    let from_env = sb.dir.path().join("env.json");
    let from_flag = sb.dir.path().join("flag.json");
    let args = [
        "setup",
        "--generation",
        "m2",
        "--chip",
        "pro",
        "--memory",
        "32",
        "--yes",
    ];
    ok(&sb
        .bare()
        .env(PROFILE_PATH_ENV, &from_env)
        .args(args)
        .output()
        .unwrap());
    assert!(from_env.exists());
    ok(&sb
        .bare()
        .env(PROFILE_PATH_ENV, &from_env)
        .arg("--profile-path")
        .arg(&from_flag)
        .args([
            "setup",
            "--generation",
            "m3",
            "--chip",
            "max",
            "--memory",
            "48",
            "--yes",
        ])
        .output()
        .unwrap());
    let shown: Value = serde_json::from_slice(
        &sb.bare()
            .env(PROFILE_PATH_ENV, &from_env)
            .args(["show", "--json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(shown["generation"], "m2");
    // The flag also works after the subcommand.
    let shown: Value = serde_json::from_slice(
        &sb.bare()
            .env(PROFILE_PATH_ENV, &from_env)
            .args(["show", "--json", "--profile-path"])
            .arg(&from_flag)
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    assert_eq!(shown["generation"], "m3");
}

// ---------------------------------------------------------------- recommend

fn recommendations(sb: &Sandbox, memory: &str) -> Value {
    json(&sb.run(&["recommend", "--memory", memory, "--json"]))
}

fn model<'a>(v: &'a Value, id: &str) -> &'a Value {
    v["models"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == id)
        .unwrap_or_else(|| panic!("{id} listed"))
}

const STATUS_ORDER: [&str; 3] = ["FITS", "TIGHT", "DOES_NOT_FIT"];

/// Fits, then tight fits, then misfits; the largest model first where it
/// fits, the smallest peak first where it does not.
#[track_caller]
fn assert_sorted(v: &Value) {
    let models = v["models"].as_array().unwrap();
    let rank = |m: &Value| STATUS_ORDER.iter().position(|s| m["status"] == *s).unwrap();
    for w in models.windows(2) {
        let (a, b) = (rank(&w[0]), rank(&w[1]));
        let f = |m: &Value, k: &str| m[k].as_f64().unwrap();
        assert!(
            a < b
                || (a == b && a < 2 && f(&w[0], "params_b") >= f(&w[1], "params_b"))
                || (a == b
                    && a == 2
                    && f(&w[0], "estimated_peak_gb") <= f(&w[1], "estimated_peak_gb")),
            "{} before {}",
            w[0],
            w[1]
        );
    }
}

#[test]
fn recommend_judges_the_known_model_table_by_the_memory_model() {
    let sb = Sandbox::new();
    let v = recommendations(&sb, "16");
    assert_eq!(v["memory_gb"], 16);
    assert_eq!(v["memory_source"], "flag");
    assert_eq!(v["training_budget_gb"], 12);
    assert_eq!(v["usable_gb"], 10.2);
    // Every model of the table, neutrally: no opinions, no keys or warnings.
    let models = v["models"].as_array().unwrap();
    assert_eq!(models.len(), qlora_scale::tables::KNOWN_ARCHITECTURES.len());
    for m in models {
        for gone in ["warning", "recommended", "key", "tier"] {
            assert!(m.get(gone).is_none(), "{m}");
        }
        let peak = m["estimated_peak_gb"].as_f64().unwrap();
        assert_eq!(m["status"] == "FITS", peak <= 10.2, "{m}");
    }
    assert_sorted(&v);
    // A 7B model fits 16 GB in NF4, a 70B does not; the peak is the memory
    // model's (the original table said 12 GB for a 7B).
    let small = model(&v, "Qwen/Qwen2.5-7B");
    assert_eq!(small["status"], "FITS", "{small}");
    let peak = small["estimated_peak_gb"].as_f64().unwrap();
    assert!(peak > 3.5 && peak < 10.2, "{small}");
    assert_eq!(small["advice"], Value::Null);
    let big = model(&v, "meta-llama/Llama-3.3-70B-Instruct");
    assert_eq!(big["status"], "DOES_NOT_FIT", "{big}");
    assert_eq!(big["params_b"], 70.55);
    assert!(big["advice"].as_str().unwrap().starts_with("needs about "));

    let table = ok(&sb.run(&["recommend", "--memory", "16"]));
    assert!(
        table.starts_with(
            "Memory: 16 GB (from --memory); training budget: 12 GB; a run's estimate may take 85% of it, 10.2 GB\n"
        ),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with("Qwen/Qwen2.5-7B "))
        .unwrap();
    assert!(row.contains(&format!("{peak:.1} GB  FITS")), "{row}");
    assert!(row.contains("7.6B"), "{row}");
    for opinion in ["abliterated", "Chinese", "censorship", "warning"] {
        assert!(!table.contains(opinion), "{table}");
    }
    assert!(
        table.contains("PEAK: the trainer's peak by the memory model"),
        "{table}"
    );
}

#[test]
fn recommend_more_memory_fits_more_and_a_larger_profile_can_be_tight() {
    let sb = Sandbox::new();
    let v = recommendations(&sb, "96");
    assert_eq!(v["training_budget_gb"], 76);
    assert_eq!(
        model(&v, "meta-llama/Llama-3.3-70B-Instruct")["status"],
        "FITS"
    );
    assert_sorted(&v);
    let all = recommendations(&sb, "192");
    assert!(
        all["models"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["status"] == "FITS")
    );
    // The largest model first.
    assert_eq!(all["models"][0]["id"], "Qwen/Qwen2.5-72B");
    // An M2 Ultra's saved profile trains with larger batches: a model that
    // fits only at micro-batch 1 with checkpointing is TIGHT, and its
    // settings say so.
    setup_with_flags(&sb, "m2", "ultra", "64");
    let v = json(&sb.run(&["recommend", "--json"]));
    assert_sorted(&v);
    let tight: Vec<&Value> = v["models"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["status"] == "TIGHT")
        .collect();
    assert!(!tight.is_empty(), "{v}");
    for m in tight {
        assert_eq!(
            (&m["batch_size"], &m["grad_checkpoint"]),
            (&Value::from(1), &Value::from(true))
        );
        assert_eq!(m["advice"], "train with --batch-size 1 --grad-checkpoint");
    }
}

#[test]
fn recommend_uses_the_saved_profiles_memory() {
    let sb = Sandbox::new();
    setup_with_flags(&sb, "m2", "max", "96");
    let v = json(&sb.run(&["recommend", "--json"]));
    assert_eq!(v["memory_gb"], 96);
    assert_eq!(v["memory_source"], "saved_profile");
    let table = ok(&sb.run(&["recommend"]));
    assert!(
        table.starts_with(&format!(
            "Memory: 96 GB (from the saved profile {}); training budget: 76 GB; ",
            sb.profile().display()
        )),
        "{table}"
    );
}

#[cfg(target_os = "linux")]
#[test]
fn recommend_without_memory_uses_the_detected_machine() {
    // On Linux the CPU's usable memory is detected (/proc/meminfo and the
    // cgroup limit), so no --memory is needed.
    let sb = Sandbox::new();
    let v = json(&sb.run(&["recommend", "--json"]));
    assert_eq!(v["memory_source"], "detected");
    assert!(v["memory_gb"].as_u64().unwrap() > 0, "{v}");
}

#[test]
fn a_local_model_directory_is_sized_from_its_files() {
    let sb = Sandbox::new();
    // A directory named like a 7B model whose config.json says 0.5B: the
    // files win, and the JSON says so.
    let dir = sb.dir.path().join("models").join("my-7b-finetune");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/configs/qwen2.5-0.5b.json"
        ),
        dir.join("config.json"),
    )
    .unwrap();
    let path = dir.to_str().unwrap();
    let v = json(&sb.run(&["detect-model", "--json", path]));
    assert_eq!(v["source"], "files");
    assert_eq!(v["category"], "small");
    assert_eq!(v["params_b"], 0.494);
    let v = json(&sb.run(&[
        "scale",
        "--model",
        path,
        "--generation",
        "m2",
        "--chip",
        "ultra",
        "--memory",
        "192",
    ]));
    assert_eq!(v["model_size"]["source"], "files");
    assert_eq!(v["lora_rank"], 32);
    // A broken config.json is reported and the name is used instead.
    std::fs::write(dir.join("config.json"), "{ not json").unwrap();
    let out = sb.run(&["detect-model", path]);
    assert!(out.status.success());
    assert!(stdout(&out).ends_with("\tsmall\t7\n"), "{}", stdout(&out));
    assert!(stderr(&out).contains("config.json"), "{}", stderr(&out));
}
