//! End-to-end `train generate` and `train eval` on a run of the embedded
//! model trained for a few steps on one repeated sentence: sampling is
//! deterministic for a seed, greedy decoding without one, the adapter
//! changes the text and lowers the loss on its training file, a model
//! directory works without a run, and bad input is named with exit status 2.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::Duration;

use assert_cmd::Command;
use serde_json::Value;

mod train_common;

const SENTENCE: &str = "the river runs past the mill and the wheel turns.";

/// A directory holding `data/train.jsonl` and the run `run/` trained on it,
/// made once for all tests of this file.
fn trained() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("data")).unwrap();
        let line = format!("{{\"text\": \"{SENTENCE}\"}}\n");
        std::fs::write(dir.path().join("data/train.jsonl"), line.repeat(16)).unwrap();
        let out = run(
            dir.path(),
            &[
                "--data-dir",
                "data",
                "--seq-len",
                "64",
                "--batch-size",
                "2",
                "--grad-accum-steps",
                "1",
                "--warmup-steps",
                "1",
                "--max-steps",
                "10",
                "--learning-rate",
                "1e-2",
                "--lora-rank",
                "4",
                "--eval-every",
                "100",
                "--checkpoint-every",
                "10",
                "--output-dir",
                "run",
            ],
        );
        ok(&out);
        dir
    })
    .path()
}

/// `train ARGS` in `dir`; a training run gets a profile path where none is
/// saved (subcommands take no such flag).
fn run(dir: &Path, args: &[&str]) -> Output {
    let cmd = if args.first().is_some_and(|a| a.starts_with('-')) {
        train_common::train_without_profile(dir)
    } else {
        train_common::train_in(dir)
    };
    Command::from_std(cmd)
        .args(args)
        .timeout(Duration::from_secs(300))
        .output()
        .expect("train runs")
}

fn ok(out: &Output) -> String {
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "train failed: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `train generate --run-dir run --prompt "the river" ARGS`: its stdout.
fn generate(args: &[&str]) -> String {
    let mut all = vec!["generate", "--run-dir", "run", "--prompt", "the river"];
    all.extend_from_slice(args);
    ok(&run(trained(), &all))
}

#[test]
fn sampling_is_deterministic_for_a_seed() {
    let args = [
        "--temperature",
        "1",
        "--top-p",
        "0.95",
        "--max-new-tokens",
        "24",
    ];
    let seeded = |seed: &str| {
        let mut a = args.to_vec();
        a.extend(["--seed", seed]);
        generate(&a)
    };
    let first = seeded("5");
    assert!(
        first.trim_end_matches('\n').chars().count() > 0,
        "{first:?}"
    );
    assert_eq!(first, seeded("5"));
    assert_ne!(first, seeded("6"));
}

#[test]
fn greedy_is_deterministic_and_the_adapter_changes_the_text() {
    let greedy = ["--temperature", "0", "--max-new-tokens", "24"];
    let adapted = generate(&greedy);
    assert_eq!(adapted, generate(&greedy));
    let mut base = greedy.to_vec();
    base.push("--base-only");
    assert_ne!(adapted, generate(&base));
}

#[test]
fn generation_reports_tokens_and_speed_on_stderr() {
    let out = run(
        trained(),
        &[
            "generate",
            "--run-dir",
            "run",
            "--prompt",
            "the river",
            "--max-new-tokens",
            "5",
            "--temperature",
            "0",
        ],
    );
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr);
    // BOS + 9 bytes of prompt.
    assert!(err.contains("prompt: 10 tokens"), "{err}");
    assert!(
        err.contains("generated: 5 tokens") || err.contains("at EOS"),
        "{err}"
    );
    assert!(err.contains("tokens/s"), "{err}");
}

/// `generate --run-dir run EXTRA`.
fn with<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    [&["generate", "--run-dir", "run"][..], extra].concat()
}

/// Runs `train` with `args` and checks it fails with `code`, naming
/// `needle` on stderr.
fn refused(args: &[&str], code: i32, needle: &str) {
    let out = run(trained(), args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
    assert!(err.contains(needle), "{args:?}: {err}");
}

#[test]
fn bad_input_is_named() {
    let dir = trained();
    std::fs::write(
        dir.join("role.json"),
        r#"[{"role": "wizard", "content": "x"}]"#,
    )
    .unwrap();
    std::fs::write(dir.join("broken.json"), r#"[{"role": "user""#).unwrap();
    std::fs::write(dir.join("empty.json"), "[]").unwrap();
    refused(&with(&["--prompt", ""]), 2, "--prompt is empty");
    refused(
        &with(&["--messages", "role.json"]),
        2,
        "role.json: message 1 has role \"wizard\"",
    );
    refused(
        &with(&["--messages", "broken.json"]),
        2,
        "--messages broken.json: expected a JSON array",
    );
    refused(
        &with(&["--messages", "empty.json"]),
        2,
        "empty.json: the conversation holds no message",
    );
    refused(
        &with(&["--messages", "missing.json"]),
        2,
        "--messages missing.json: cannot read",
    );
    let long = "a".repeat(2100);
    refused(
        &with(&["--prompt", &long]),
        2,
        "the model's context is 2048",
    );
    refused(&with(&["--prompt", "x", "--top-p", "0"]), 2, "--top-p");
    refused(
        &with(&["--prompt", "x", "--temperature", "-1"]),
        2,
        "not a temperature",
    );
    refused(
        &["generate", "--run-dir", "nowhere", "--prompt", "x"],
        1,
        "no checkpoint in nowhere",
    );
    refused(
        &["eval", "--run-dir", "run", "--data", "missing.jsonl"],
        1,
        "missing.jsonl",
    );
}

#[test]
fn eval_prints_both_losses_and_training_lowered_the_adapters() {
    let table = ok(&run(
        trained(),
        &["eval", "--run-dir", "run", "--data", "data/train.jsonl"],
    ));
    assert!(table.contains("\nbase "), "{table}");
    assert!(table.contains("\nbase + adapter "), "{table}");
    let out = ok(&run(
        trained(),
        &[
            "eval",
            "--run-dir",
            "run",
            "--data",
            "data/train.jsonl",
            "--json",
        ],
    ));
    let v: Value = serde_json::from_str(&out).unwrap();
    let (base, adapter) = (
        v["base"]["loss"].as_f64().unwrap(),
        v["adapter"]["loss"].as_f64().unwrap(),
    );
    assert!(adapter < base - 0.5, "adapter {adapter}, base {base}");
    assert_eq!(v["examples"], 16);
    assert!(v["tokens"].as_u64().unwrap() >= 16 * SENTENCE.len() as u64);
    assert!((v["adapter"]["perplexity"].as_f64().unwrap() - adapter.exp()).abs() < 1e-6);
    let capped = ok(&run(
        trained(),
        &[
            "eval",
            "--run-dir",
            "run",
            "--data",
            "data/train.jsonl",
            "--json",
            "--max-batches",
            "1",
        ],
    ));
    let v: Value = serde_json::from_str(&capped).unwrap();
    assert_eq!(
        (v["batches"].as_u64(), v["examples"].as_u64()),
        (Some(1), Some(2))
    );
}

#[test]
fn a_model_directory_generates_and_evaluates_without_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let model: PathBuf = dir.path().join("model");
    train_common::write_local_model(&model);
    // A chat template: --prompt goes through it, --raw does not.
    std::fs::write(
        model.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>",
            "chat_template": "{% for m in messages %}{{ m.content }} . {% endfor %}{% if add_generation_prompt %}the {% endif %}"}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("m.json"),
        r#"[{"role": "user", "content": "river runs"}]"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("held.jsonl"),
        "{\"text\": \"the mill wheel turns .\"}\n",
    )
    .unwrap();
    let g = [
        "generate",
        "--model",
        "model",
        "--temperature",
        "0",
        "--max-new-tokens",
        "4",
    ];
    // Prompt tokens: BOS + "the river . the" (the template's rendering);
    // BOS + "the river" (raw); BOS + "river runs . the".
    let cases: [(&[&str], &str); 3] = [
        (&["--prompt", "the river"], "prompt: 5 tokens"),
        (&["--prompt", "the river", "--raw"], "prompt: 3 tokens"),
        (&["--messages", "m.json"], "prompt: 5 tokens"),
    ];
    for (input, want) in cases {
        let out = run(dir.path(), &[&g[..], input].concat());
        ok(&out);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{input:?}: {err}");
    }
    let out = ok(&run(
        dir.path(),
        &["eval", "--model", "model", "--data", "held.jsonl", "--json"],
    ));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(v["base"]["loss"].as_f64().unwrap() > 0.0);
    assert_eq!(v["adapter"], Value::Null);
    refused_in(
        dir.path(),
        &[
            "generate",
            "--model",
            "model",
            "--base-only",
            "--prompt",
            "x",
        ],
    );
}

fn refused_in(dir: &Path, args: &[&str]) {
    let out = run(dir, args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
