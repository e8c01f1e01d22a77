//! Real runs of the `train` binary through `--dry-run --json`: the original
//! project's integration cases for the trainer's scaling (one module per
//! class of cases), the resolution order
//! (docs/reference.md, section 7), `--config`, and the `--help` snapshot.
//!
//! Every run names its profile file with `--profile-path` inside a fresh
//! temporary directory, so the real per-user config is never read.
//! After an intended change of the help text:
//!
//! ```text
//! BLESS=1 cargo test --test cli_train help
//! ```

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use assert_cmd::Command;
use qlora_scale::tables::{DEFAULT_MODEL, FALLBACK_PROFILE};
use qlora_scale::{
    ChipVariant, Generation, HardwareProfile, Profile, optimized_profile, scale_profile_for_model,
};
use serde_json::Value;

mod sandbox;
mod train_common;

const HW: [&str; 6] = ["--generation", "m2", "--chip", "ultra", "--memory", "192"];

struct Sandbox {
    dir: tempfile::TempDir,
}

impl Sandbox {
    fn new() -> Self {
        Self {
            dir: sandbox::digitless_tempdir(),
        }
    }

    fn profile(&self) -> PathBuf {
        self.dir.path().join("hardware_profile.json")
    }

    fn save(&self, hw: &HardwareProfile) {
        std::fs::write(self.profile(), serde_json::to_vec_pretty(hw).unwrap()).unwrap();
    }

    /// `train` in the sandbox, without arguments.
    fn bare(&self) -> Command {
        let mut cmd = Command::from_std(train_common::train_in(self.dir.path()));
        cmd.timeout(Duration::from_secs(120));
        cmd
    }

    /// `train --profile-path <sandbox profile>`.
    fn cmd(&self) -> Command {
        let mut cmd = self.bare();
        cmd.arg("--profile-path").arg(self.profile());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().expect("train runs")
    }

    /// `train --dry-run --json ARGS`, which must succeed.
    fn dry(&self, args: &[&str]) -> Value {
        let out = self.run(&[&["--dry-run", "--json"], args].concat());
        assert!(out.status.success(), "train failed: {}", stderr(&out));
        let text = String::from_utf8(out.stdout).unwrap();
        assert_eq!(
            text.lines().count(),
            1,
            "one JSON object on one line: {text}"
        );
        serde_json::from_str(&text).unwrap()
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ultra_192() -> HardwareProfile {
    optimized_profile(Generation::M2, ChipVariant::Ultra, 192)
}

fn settings(v: &Value) -> (u64, u64, u64) {
    (
        v["batch_size"].as_u64().unwrap(),
        v["lora_rank"].as_u64().unwrap(),
        v["lora_layers"].as_u64().unwrap(),
    )
}

fn expect(p: &Profile) -> (u64, u64, u64) {
    (
        p.batch_size.into(),
        p.lora_rank.into(),
        p.lora_num_layers.into(),
    )
}

mod test_train_qlora_scaling_integration {
    use super::*;

    #[test]
    fn scaling_called_with_correct_model_path() {
        let sb = Sandbox::new();
        sb.save(&ultra_192());
        let model = "huihui-ai/DeepSeek-R1-Distill-Qwen-14B";
        let v = sb.dry(&["--model", model]);
        assert_eq!(v["model"], model);
        assert_eq!(v["model_size"]["category"], "medium");
        assert_eq!(v["profile_source"], "saved");
        let scaled = scale_profile_for_model(&ultra_192().profile, model);
        assert_eq!(settings(&v), expect(&scaled));
        assert_eq!(v["scaled"], true);
    }

    #[test]
    fn default_model_path_used_when_not_specified() {
        let sb = Sandbox::new();
        sb.save(&ultra_192());
        let v = sb.dry(&[]);
        assert_eq!(v["model"], DEFAULT_MODEL);
        assert_eq!(v["weights"], "embedded");
        let scaled = scale_profile_for_model(&ultra_192().profile, DEFAULT_MODEL);
        assert_eq!(settings(&v), expect(&scaled));
    }

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn scaling_skipped_when_no_profile_exists() {
        let sb = Sandbox::new();
        let v = sb.dry(&["--model", "meta-llama/Llama-2-70b-hf"]);
        assert_eq!(v["profile_source"], "defaults");
        assert_eq!(v["scaled"], false);
        assert_eq!(settings(&v), expect(&FALLBACK_PROFILE));
        assert!(v["hardware"].is_null());
        assert!(!sb.profile().exists(), "a dry run writes no profile");
    }
}

/// Without a saved profile or flags, `train` sizes the run for the machine
/// it runs on: Apple Silicon, else the CPU's usable memory (it trains on the
/// CPU); `--cpu-memory` / `--gpu-memory` size it for another machine.
mod hardware_beyond_apple {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn a_linux_machine_is_detected_by_its_usable_memory() {
        let sb = Sandbox::new();
        let out = sb
            .cmd()
            .env_remove("QLORA_SCALE_DETECT")
            .args(["--dry-run", "--json"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["profile_source"], "detected");
        assert_eq!(v["hardware_source"], "detected");
        assert_eq!(v["hardware"]["device"], "cpu");
        let memory = v["hardware"]["memory_gb"].as_u64().unwrap();
        let row = qlora_scale::hardware::memory_row(
            qlora_scale::hardware::DeviceKind::Cpu,
            memory as u32,
        );
        assert_eq!(v["hardware"]["row_memory_gb"], row.memory_gb);
        assert_eq!(v["base_profile"]["lora_rank"], row.profile.lora_rank);
        assert_eq!(v["memory"]["budget_source"], "profile");
    }

    /// A saved Apple Silicon profile (what `profile setup` writes) on this
    /// Linux machine: the detected machine sizes the run, with a WARN; the
    /// saved profile only with --use-saved-profile.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_saved_apple_profile_does_not_size_a_run_on_linux_unless_asked() {
        let sb = Sandbox::new();
        sb.save(&ultra_192());
        let path = sb.profile().display().to_string();
        let dry = |extra: &[&str]| {
            let out = sb
                .cmd()
                .env_remove("QLORA_SCALE_DETECT")
                .args(["--dry-run", "--json"])
                .args(extra)
                .output()
                .unwrap();
            assert!(out.status.success(), "{}", stderr(&out));
            let v: Value = serde_json::from_slice(&out.stdout).unwrap();
            (v, stderr(&out))
        };
        let (v, err) = dry(&[]);
        assert_eq!(v["profile_source"], "detected", "{v}");
        assert_eq!(v["hardware"]["device"], "cpu");
        let skipped = v["saved_profile_skipped"].as_str().unwrap();
        assert!(
            skipped.contains(&path) && skipped.contains("m2 ultra with 192 GB"),
            "{skipped}"
        );
        let reason = v["profile_reason"].as_str().unwrap();
        assert!(
            reason.starts_with("this machine, detected: a cpu with"),
            "{reason}"
        );
        assert_ne!(v["memory"]["budget_gib"], 153.0, "not the Apple budget");
        let warn = err.lines().find(|l| l.contains("WARN")).unwrap_or_default();
        assert!(
            warn.contains(&path) && warn.contains("not Apple Silicon"),
            "{err}"
        );

        let (v, err) = dry(&["--use-saved-profile"]);
        assert_eq!(v["profile_source"], "saved", "{v}");
        assert_eq!(v["hardware"]["device"], "apple");
        assert_eq!(v["hardware"]["memory_gb"], 192);
        assert_eq!(v["saved_profile_skipped"], Value::Null);
        assert!(
            v["profile_reason"]
                .as_str()
                .unwrap()
                .contains("--use-saved-profile")
        );
        assert!(!err.contains("WARN"), "{err}");
    }

    #[test]
    fn detection_off_uses_the_saved_profile_and_says_why() {
        let sb = Sandbox::new();
        sb.save(&ultra_192());
        let v = sb.dry(&[]);
        assert_eq!(v["profile_source"], "saved");
        let reason = v["profile_reason"].as_str().unwrap();
        assert!(
            reason.contains(&sb.profile().display().to_string())
                && reason.contains("no machine detected to compare it with"),
            "{reason}"
        );
    }

    #[test]
    fn detection_off_reads_no_budget_from_the_machine() {
        // No flag, no saved profile, detection off: nothing says what the
        // budget is, so none is assumed (and nothing is checked).
        let v = Sandbox::new().dry(&[]);
        assert_eq!(v["hardware_source"], Value::Null, "{v}");
        assert_eq!(v["memory"]["budget_gib"], Value::Null, "{v}");
        assert_eq!(v["memory"]["budget_source"], Value::Null, "{v}");
        assert_eq!(v["memory"]["fits"], true, "{v}");
    }

    #[test]
    fn cpu_and_gpu_memory_flags_size_the_run() {
        let sb = Sandbox::new();
        let v = sb.dry(&["--cpu-memory", "64", "--model", "mistralai/Mistral-7B-v0.1"]);
        assert_eq!(v["profile_source"], "flags");
        assert_eq!(v["hardware"]["device"], "cpu");
        assert_eq!(v["hardware"]["row_memory_gb"], 64);
        assert!(v["hardware"].get("generation").is_none());
        let row = qlora_scale::hardware::memory_profile(qlora_scale::hardware::DeviceKind::Cpu, 64);
        assert_eq!(v["hardware"]["training_budget_gb"], row.training_budget_gb);
        assert_eq!(
            v["memory"]["budget_gib"].as_f64().unwrap(),
            row.training_budget_gb as f64
        );
        let v = sb.dry(&["--gpu-memory", "80"]);
        assert_eq!(v["hardware"]["device"], "gpu");
        assert_eq!(v["hardware"]["row_memory_gb"], 80);
        let out = sb.run(&["--dry-run", "--gpu-memory", "80", "--cpu-memory", "64"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("cannot be used with"),
            "{}",
            stderr(&out)
        );
    }
}

mod test_scaling_with_different_model_sizes {
    use super::*;

    fn check(model: &str, category: &str) {
        let v = Sandbox::new().dry(&[&["--model", model][..], &HW].concat());
        assert_eq!(v["model_size"]["category"], category, "{model}");
        assert_eq!(v["profile_source"], "flags");
        let scaled = scale_profile_for_model(&ultra_192().profile, model);
        assert_eq!(settings(&v), expect(&scaled), "{model}");
    }

    #[test]
    fn model_7b() {
        check("deepseek-ai/DeepSeek-R1-Distill-Qwen-7B", "small");
    }

    #[test]
    fn model_14b() {
        check("deepseek-ai/DeepSeek-R1-Distill-Qwen-14B", "medium");
    }

    #[test]
    fn model_32b() {
        check("deepseek-ai/DeepSeek-R1-Distill-Qwen-32B", "large");
    }

    #[test]
    fn model_70b() {
        check("deepseek-ai/DeepSeek-R1-Distill-Llama-70B", "xlarge");
    }
}

mod test_config_application_after_scaling {
    use super::*;

    #[test]
    fn scaled_batch_size_applied_to_config() {
        let v = Sandbox::new().dry(&[&["--model", "mistralai/Mistral-7B-v0.1"][..], &HW].concat());
        // Ultra 192 GB is large-tier: scaling a 7B model raises the batch.
        assert_eq!(v["base_profile"]["batch_size"], 8);
        assert_eq!(v["batch_size"], v["scaled_profile"]["batch_size"]);
        assert_eq!(v["value_sources"]["batch_size"], "profile");
    }

    #[test]
    fn scaled_lora_parameters_applied_to_config() {
        let v = Sandbox::new().dry(&[&["--model", "mistralai/Mistral-7B-v0.1"][..], &HW].concat());
        assert_eq!(
            (v["lora_rank"].as_u64(), v["lora_layers"].as_u64()),
            (Some(32), Some(8))
        );
        assert_eq!(v["lora_alpha"], 64.0, "alpha defaults to twice the rank");
        assert_eq!(v["grad_checkpoint"], v["scaled_profile"]["grad_checkpoint"]);
    }
}

mod test_scaling_with_cli_overrides {
    use super::*;

    #[test]
    fn cli_batch_size_overrides_profile() {
        let v = Sandbox::new().dry(&[&["--batch-size", "3"][..], &HW].concat());
        assert_eq!(v["batch_size"], 3);
        assert_eq!(v["value_sources"]["batch_size"], "cli_or_config");
    }

    #[test]
    fn one_process_shows_rank_world_and_batches() {
        let v = Sandbox::new().dry(&["--batch-size", "3", "--grad-accum-steps", "2"]);
        assert_eq!(v["collective"], "single");
        assert_eq!(v["rank"], 0);
        assert_eq!(v["world_size"], 1);
        assert_eq!(v["per_rank_batch_size"], 3);
        assert_eq!(
            v["global_batch_size"], 6,
            "3 per rank x 1 rank x 2 accumulation steps"
        );
        assert_eq!(
            v["collective_timeout_s"],
            qlora_scale::tables::trainer::COLLECTIVE_TIMEOUT_S
        );
    }

    #[test]
    fn cli_lora_rank_overrides_profile() {
        let v =
            Sandbox::new().dry(&[&["--lora-rank", "8", "--no-grad-checkpoint"][..], &HW].concat());
        assert_eq!(
            (v["lora_rank"].as_u64(), v["lora_alpha"].as_f64()),
            (Some(8), Some(16.0))
        );
        assert_eq!(v["grad_checkpoint"], false);
        let v = Sandbox::new().dry(
            &[
                &[
                    "--lora-rank",
                    "8",
                    "--lora-alpha",
                    "4",
                    "--lora-layers",
                    "2",
                    "--grad-checkpoint",
                ][..],
                &HW,
            ]
            .concat(),
        );
        assert_eq!(
            (v["lora_alpha"].as_f64(), v["lora_layers"].as_u64()),
            (Some(4.0), Some(2))
        );
        assert_eq!(v["grad_checkpoint"], true);
    }
}

mod test_scaling_error_handling {
    use super::*;

    #[test]
    fn malformed_profile_handled_gracefully() {
        let sb = Sandbox::new();
        let junk = b"{ this is not a profile";
        std::fs::write(sb.profile(), junk).unwrap();
        let out = sb.run(&["--dry-run", "--json"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains(&sb.profile().display().to_string()), "{err}");
        assert!(err.contains("not a valid profile"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        assert_eq!(std::fs::read(sb.profile()).unwrap(), junk, "file untouched");
    }

    #[test]
    fn invalid_model_path_handled_gracefully() {
        let sb = Sandbox::new();
        let out = sb.run(&["--dry-run", "--json", "--model", "./no/such/model"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains("model path ./no/such/model does not exist"),
            "{err}"
        );
        // A name, not a path: sizing works but training refuses to download.
        let out = sb.run(&["--model", "org/Some-Model-7B", "--max-steps", "1"]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("never downloads"), "{}", stderr(&out));
    }
}

mod test_scaling_performance_implications {
    use super::*;

    #[test]
    fn small_models_get_higher_batch_sizes() {
        // A large-tier machine whose batch is below the cap.
        let hw = ["--generation", "m1", "--chip", "max", "--memory", "96"];
        let small = Sandbox::new().dry(&[&["--model", "Qwen/Qwen2.5-7B"][..], &hw].concat());
        let large = Sandbox::new().dry(&[&["--model", "Qwen/Qwen2.5-72B"][..], &hw].concat());
        assert!(small["batch_size"].as_u64() > large["batch_size"].as_u64());
    }

    #[test]
    fn small_models_get_lower_lora_ranks() {
        let small = Sandbox::new().dry(&[&["--model", "Qwen/Qwen2.5-7B"][..], &HW].concat());
        let large = Sandbox::new().dry(&[&["--model", "Qwen/Qwen2.5-72B"][..], &HW].concat());
        assert!(small["lora_rank"].as_u64() < large["lora_rank"].as_u64());
        assert!(small["lora_layers"].as_u64() < large["lora_layers"].as_u64());
    }

    #[test]
    fn matched_profiles_dont_scale_unnecessarily() {
        let v = Sandbox::new().dry(&[&["--model", "Qwen/Qwen2.5-72B"][..], &HW].concat());
        assert_eq!(v["scaled"], false);
        assert_eq!(settings(&v), expect(&ultra_192().profile));
    }
}

mod resolution {
    use super::*;

    #[cfg(not(target_os = "macos"))]
    #[test]
    fn partial_override_without_base_names_missing_flags() {
        let sb = Sandbox::new();
        let out = sb.run(&["--dry-run", "--json", "--chip", "max"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(err.contains("missing --generation, --memory"), "{err}");
    }

    #[test]
    fn partial_override_on_saved_profile() {
        let sb = Sandbox::new();
        sb.save(&ultra_192());
        let v = sb.dry(&["--memory", "64"]);
        assert_eq!(v["profile_source"], "saved");
        assert_eq!(v["hardware_source"], "saved_profile+flags");
        assert_eq!(v["hardware"]["memory_gb"], 64);
    }

    #[test]
    fn local_dir_sized_from_config_json() {
        let sb = Sandbox::new();
        let dir = sb.dir.path().join("my-model");
        std::fs::create_dir(&dir).unwrap();
        // A Llama shape of about 6.7B parameters, under a name with no size.
        std::fs::write(
            dir.join("config.json"),
            r#"{"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
                "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "tie_word_embeddings": false}"#,
        )
        .unwrap();
        let v = sb.dry(&[&["--model", dir.to_str().unwrap()][..], &HW].concat());
        assert_eq!(v["weights"], "local_dir");
        assert_eq!(v["model_size"]["source"], "files");
        assert_eq!(v["model_size"]["category"], "small");
    }

    /// `--dry-run --json`'s memory object for a model given by name only.
    fn name_only_memory(sb: &Sandbox, model: &str) -> Value {
        let v = sb.dry(&[&["--model", model][..], &HW].concat());
        assert_eq!(v["weights"], "name_only", "{v}");
        v["memory"].clone()
    }

    #[test]
    fn a_name_only_model_is_sized_by_the_known_model_table() {
        let sb = Sandbox::new();
        let m = name_only_memory(&sb, "Qwen/Qwen2.5-14B-Instruct");
        assert_eq!(m["architecture_source"], "known_model_table", "{m}");
        assert_eq!(m["architecture_id"], "Qwen/Qwen2.5-14B");
        let a = &m["architecture"];
        assert_eq!(a["layers"], 48, "{a}");
        assert_eq!(a["kv_heads"], 8, "{a}");
        assert_eq!(a["vocab"], 152064, "{a}");
        assert_eq!(a["qkv_bias"], true, "{a}");
        // Other rows, under org prefixes and suffixes.
        let a = &name_only_memory(&sb, "google/gemma-2-9b-it")["architecture"];
        assert_eq!(
            (&a["layers"], &a["head_dim"], &a["vocab"], &a["tied"]),
            (
                &Value::from(42),
                &Value::from(256),
                &Value::from(256000),
                &Value::from(true)
            )
        );
        let a =
            &name_only_memory(&sb, "unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit")["architecture"];
        assert_eq!(
            (&a["layers"], &a["kv_heads"], &a["vocab"]),
            (&Value::from(32), &Value::from(8), &Value::from(128256))
        );
        let a = &name_only_memory(&sb, "HuggingFaceTB/SmolLM2-135M-Instruct")["architecture"];
        assert_eq!(
            (&a["layers"], &a["heads"], &a["kv_heads"]),
            (&Value::from(30), &Value::from(9), &Value::from(3))
        );
        // A name the table does not know keeps the estimate from its size,
        // and the estimate differs.
        let e = name_only_memory(&sb, "someone/Qwen2.5-14B-my-finetune");
        assert_eq!(e["architecture_source"], "estimated_from_name", "{e}");
        assert_eq!(e["architecture_id"], Value::Null);
        assert_ne!(e["architecture"]["layers"], 48);
        assert_ne!(e["estimate_mib"]["peak"], m["estimate_mib"]["peak"]);
    }

    #[test]
    fn config_file_between_cli_and_profile() {
        let sb = Sandbox::new();
        let file = sb.dir.path().join("run.toml");
        std::fs::write(&file, "lora-rank = 12\nbatch-size = 5\nmax-steps = 7\n").unwrap();
        let f = file.to_str().unwrap();
        let v = sb.dry(&[&["--config", f, "--batch-size", "2"][..], &HW].concat());
        assert_eq!(v["lora_rank"], 12, "file beats profile");
        assert_eq!(v["batch_size"], 2, "command line beats file");
        assert_eq!(v["max_steps"], 7);
        assert_eq!(v["lora_alpha"], 24.0);
    }

    #[test]
    fn lora_targets_flag_and_config_key() {
        let sb = Sandbox::new();
        let v = sb.dry(&[]);
        assert_eq!(
            v["lora_targets"],
            serde_json::json!(["q", "k", "v", "o", "gate", "up", "down"])
        );
        assert_eq!(v["value_sources"]["lora_targets"], "default");
        let v = sb.dry(&["--lora-targets", "v,Q,q_proj"]);
        assert_eq!(v["lora_targets"], serde_json::json!(["q", "v"]));
        assert_eq!(v["value_sources"]["lora_targets"], "cli_or_config");
        let file = sb.dir.path().join("run.toml");
        std::fs::write(&file, "lora-targets = [\"down\", \"up\"]\n").unwrap();
        let v = sb.dry(&["--config", file.to_str().unwrap()]);
        assert_eq!(v["lora_targets"], serde_json::json!(["up", "down"]));
        let out = sb.run(&["--dry-run", "--lora-targets", "q,x"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("\"x\" is not a linear layer"),
            "{}",
            stderr(&out)
        );
    }

    #[test]
    fn a_zeroed_saved_profile_is_named_not_a_flag() {
        let sb = Sandbox::new();
        let mut v = serde_json::to_value(ultra_192()).unwrap();
        for key in ["batch_size", "lora_rank", "lora_num_layers"] {
            v[key] = 0.into();
        }
        std::fs::write(sb.profile(), v.to_string()).unwrap();
        let out = sb.run(&["--dry-run", "--json"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("of the saved hardware profile is 0") && !err.contains("--"),
            "{err}"
        );
        // Given on the command line, the flag is named.
        let out = sb.run(&["--dry-run", "--lora-rank", "0"]);
        assert!(
            stderr(&out).contains("--lora-rank is 0"),
            "{}",
            stderr(&out)
        );
    }

    #[test]
    fn config_file_unknown_key_names_file_and_key() {
        let sb = Sandbox::new();
        let file = sb.dir.path().join("run.toml");
        std::fs::write(&file, "lora-rank = 12\nlora-rnak = 3\n").unwrap();
        let out = sb.run(&["--dry-run", "--config", file.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(&file.display().to_string()) && err.contains("lora-rnak"),
            "{err}"
        );
    }
}

/// What `train` says about a run is what runs (#17, item 6).
mod messages {
    use super::*;

    #[test]
    fn the_dry_run_shows_the_data_directory_read_and_where_it_came_from() {
        let sb = Sandbox::new();
        let v = sb.dry(&[]);
        assert_eq!(v["data_dir"], "data/default", "{v}");
        assert_eq!(v["data_dir_source"], "built_in");
        let v = sb.dry(&["--data-dir", "corpus"]);
        assert_eq!(v["data_dir"], "corpus");
        assert_eq!(v["data_dir_source"], "cli_or_config");
    }

    #[test]
    fn the_dry_run_names_the_built_in_model_and_caps_its_lora_layers() {
        let v = Sandbox::new().dry(&[]);
        assert_eq!(v["lora_layers"], 8, "the setting, as resolved");
        assert_eq!(
            v["lora_layers_applied"], 4,
            "the built-in model has 4 blocks"
        );
        assert_eq!(
            v["model_description"],
            "the built-in model (4 blocks, width 256, seeded NF4 weights)"
        );
    }

    #[test]
    fn a_name_only_model_is_logged_as_a_name_not_local_files() {
        let sb = Sandbox::new();
        let out = sb.run(&["--model", "org/Some-Model-7B", "--max-steps", "1"]);
        assert!(!out.status.success());
        let err = stderr(&out);
        assert!(
            err.contains(
                "model org/Some-Model-7B (name only: no weights to train); small 7B from its name"
            ),
            "{err}"
        );
        assert!(!err.contains("local files"), "{err}");
    }

    #[test]
    fn a_negative_number_names_its_flag() {
        let sb = Sandbox::new();
        for (flag, value) in [
            ("--batch-size", "-1"),
            ("--lora-rank", "-3"),
            ("--max-steps", "-5"),
        ] {
            let out = sb.run(&["--dry-run", flag, value]);
            assert!(!out.status.success(), "{flag} {value} accepted");
            let err = stderr(&out);
            assert!(
                err.contains(&format!("invalid value '{value}' for '{flag} <N>'")),
                "{flag}: {err}"
            );
        }
        // A negative real reaches the check that names it too.
        let out = sb.run(&["--dry-run", "--learning-rate", "-0.1"]);
        assert!(!out.status.success());
        assert!(
            stderr(&out).contains("--learning-rate is -0.1: must be positive"),
            "{}",
            stderr(&out)
        );
    }
}

/// `--device`: the CPU computes in f32; a CUDA device in a build without
/// the feature is refused before anything runs, with how to build it, never
/// trained on the CPU instead.
mod device {
    use super::*;

    #[test]
    fn the_dry_run_says_where_it_computes_and_cuda_needs_the_feature() {
        let sb = Sandbox::new();
        let v = sb.dry(&["--device", "cpu"]);
        assert_eq!(v["device"], "cpu", "{v}");
        assert_eq!(v["compute_dtype"], "f32", "{v}");
        let v = sb.dry(&["--device", "auto"]);
        if !cfg!(feature = "cuda") {
            assert_eq!(v["device"], "cpu", "{v}");
        }
        for device in ["cuda", "cuda:4096"] {
            let out = sb.run(&["--dry-run", "--device", device]);
            let err = stderr(&out);
            let ordinal = if device == "cuda" { "cuda:0" } else { device };
            if cfg!(feature = "cuda") {
                // cuda:4096 exists nowhere; cuda:0 where there is a GPU.
                if device == "cuda:4096" || !out.status.success() {
                    assert_eq!(out.status.code(), Some(2), "{err}");
                    assert!(err.contains("cannot open the GPU"), "{err}");
                }
                continue;
            }
            assert_eq!(out.status.code(), Some(2), "{err}");
            assert!(out.stdout.is_empty(), "nothing resolved or run: {err}");
            assert!(err.contains(&format!("--device {ordinal}:")), "{err}");
            assert!(err.contains("built without CUDA"), "{err}");
            assert!(
                err.contains("cargo build --release --features cuda"),
                "{err}"
            );
        }
    }

    #[test]
    fn generate_and_eval_take_the_device_too() {
        if cfg!(feature = "cuda") {
            return;
        }
        let sb = Sandbox::new();
        for sub in [
            &["generate", "--prompt", "x", "--device", "cuda"][..],
            &["eval", "--data", "d.jsonl", "--device", "cuda:2"][..],
        ] {
            let out = sb.bare().args(sub).output().unwrap();
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(2), "{sub:?}: {err}");
            assert!(err.contains("built without CUDA"), "{sub:?}: {err}");
        }
    }

    #[test]
    fn cpu_matmul_bf16_is_shown_with_its_engine() {
        use qlora_scale::qlora::bf16_gemm::{Engine, engine};
        let sb = Sandbox::new();
        let out = sb.run(&["--dry-run", "--json", "--cpu-matmul", "bf16"]);
        assert!(out.status.success(), "{}", stderr(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["cpu_matmul"], "bf16");
        assert_eq!(v["value_sources"]["cpu_matmul"], "cli_or_config");
        let want = match engine() {
            Engine::Amx => "bf16 (AMX)",
            Engine::Emulated => "bf16 (emulated in f32: no AMX)",
        };
        assert_eq!(v["frozen_products"], want);
        // The default, and a bad value named with the choices.
        let out = sb.run(&["--dry-run", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            (&v["cpu_matmul"], &v["frozen_products"]),
            (&"f32".into(), &"f32".into())
        );
        let out = sb.run(&["--dry-run", "--cpu-matmul", "f16"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("'f16'") && err.contains("f32, bf16"), "{err}");
    }

    #[test]
    fn a_bf16_run_says_its_engine_and_warns_without_amx() {
        use qlora_scale::qlora::bf16_gemm::{Engine, engine};
        let sb = Sandbox::new();
        let out = sb.run(&[
            "--max-steps",
            "1",
            "--cpu-matmul",
            "bf16",
            "--output-dir",
            "r",
        ]);
        let err = stderr(&out);
        assert!(out.status.success(), "{err}");
        let warned = err.contains("--cpu-matmul bf16: this CPU has no Intel AMX");
        match engine() {
            Engine::Amx => {
                assert!(
                    err.contains("frozen products bf16 (AMX)") && !warned,
                    "{err}"
                )
            }
            Engine::Emulated => assert!(
                err.contains("frozen products bf16 (emulated in f32: no AMX)") && warned,
                "{err}"
            ),
        }
    }

    #[test]
    fn an_unknown_device_is_named() {
        let out = Sandbox::new().run(&["--dry-run", "--device", "gpu"]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("'gpu'") && err.contains("--device"), "{err}");
        assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    }
}

fn snapshot(name: &str, actual: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/snapshots")
        .join(name);
    if std::env::var_os("BLESS").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        expected,
        actual,
        "{} differs; review and run with BLESS=1",
        path.display()
    );
}

#[test]
fn help_snapshot() {
    let sb = Sandbox::new();
    let out = sb
        .bare()
        .env("COLUMNS", "100")
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    snapshot("train-help.txt", &String::from_utf8(out.stdout).unwrap());
    let out = sb
        .bare()
        .env("COLUMNS", "100")
        .args(["merge", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    snapshot(
        "train-help-merge.txt",
        &String::from_utf8(out.stdout).unwrap(),
    );
    for sub in ["generate", "eval"] {
        let out = sb
            .bare()
            .env("COLUMNS", "100")
            .args([sub, "--help"])
            .output()
            .unwrap();
        assert!(out.status.success());
        snapshot(
            &format!("train-help-{sub}.txt"),
            &String::from_utf8(out.stdout).unwrap(),
        );
    }
}
