//! `train` on model directories a stranger made: an index or a symlink that
//! points outside the directory, and `config.json` values no model can be
//! built with. Each run ends within seconds with exit status 1 (never a
//! panic's 101 or a signal) and a message naming the file and what is wrong.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use assert_cmd::Command;
use serde_json::{Value, json};

mod train_common;

/// `train --model MODEL` for two steps in `dir` (a dry run with `dry`).
fn run(dir: &Path, model: &Path, dry: bool) -> Output {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(
        data.join("train.jsonl"),
        "{\"text\": \"the river runs .\"}\n",
    )
    .unwrap();
    let mut cmd = Command::from_std(train_common::train_without_profile(dir));
    cmd.arg("--model")
        .arg(model)
        .arg("--data-dir")
        .arg(&data)
        .args(["--max-steps", "2", "--output-dir", "out"])
        .timeout(Duration::from_secs(60));
    if dry {
        cmd.arg("--dry-run");
    }
    cmd.output().expect("train runs")
}

/// The run failed cleanly, in time, naming every one of `needles`.
fn refused(out: &Output, started: Instant, needles: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "exit status (101 is a panic): {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30), "took too long");
    for n in needles {
        assert!(err.contains(n), "{n:?} not in: {err}");
    }
    assert!(!err.contains("panicked"), "{err}");
}

fn model_dir(root: &Path) -> std::path::PathBuf {
    let m = root.join("model");
    train_common::write_local_model(&m);
    m
}

#[test]
fn an_index_naming_a_shard_outside_the_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir(dir.path());
    // A valid safetensors file outside the model directory.
    let outside = dir.path().join("elsewhere.safetensors");
    std::fs::rename(m.join("model.safetensors"), &outside).unwrap();
    for shard in [
        outside.to_str().unwrap().to_string(),
        "../elsewhere.safetensors".to_string(),
        "/etc/passwd".to_string(),
    ] {
        let index = json!({"weight_map": {"model.embed_tokens.weight": shard}});
        std::fs::write(m.join("model.safetensors.index.json"), index.to_string()).unwrap();
        let t = Instant::now();
        let out = run(dir.path(), &m, false);
        refused(
            &out,
            t,
            &[
                "model.safetensors.index.json",
                "outside the index's directory",
            ],
        );
    }
}

#[cfg(unix)]
#[test]
fn a_weights_symlink_leading_outside_the_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir(dir.path());
    let outside = dir.path().join("elsewhere.safetensors");
    std::fs::rename(m.join("model.safetensors"), &outside).unwrap();
    std::os::unix::fs::symlink(&outside, m.join("model.safetensors")).unwrap();
    let t = Instant::now();
    let out = run(dir.path(), &m, false);
    refused(
        &out,
        t,
        &["model.safetensors", "outside the model directory"],
    );

    // A Hugging Face cache snapshot's symlinks into its own blobs/ load.
    let repo = dir.path().join("hub/models--org--tiny");
    let snap = repo.join("snapshots/abc123");
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(m.join(f), snap.join(f)).unwrap();
    }
    std::fs::rename(&outside, repo.join("blobs/0123abcd")).unwrap();
    std::os::unix::fs::symlink("../../blobs/0123abcd", snap.join("model.safetensors")).unwrap();
    let out = run(dir.path(), &snap, false);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn config_values_no_model_can_be_built_with_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let m = model_dir(dir.path());
    let good: Value =
        serde_json::from_slice(&std::fs::read(m.join("config.json")).unwrap()).unwrap();
    let cases: [(&str, Value, &str); 12] = [
        (
            "model_type",
            json!("gpt_neox"),
            "which train does not build",
        ),
        ("hidden_act", json!("gelu"), "only silu is built"),
        ("mlp_bias", json!(true), "MLP biases are not built"),
        (
            "layer_types",
            json!(["full_attention"]),
            "has 1 entries for 2 layers",
        ),
        (
            "rope_parameters",
            json!({"rope_theta": 10000.0, "rope_type": "yarn", "factor": 4.0}),
            "yarn",
        ),
        ("num_key_value_heads", json!(0), "must be at least 1"),
        (
            "num_key_value_heads",
            json!(3),
            "divide num_attention_heads",
        ),
        ("num_attention_heads", json!(0), "must be at least 1"),
        ("head_dim", json!(1u64 << 62), "overflows"),
        (
            "num_hidden_layers",
            json!(1u64 << 40),
            "the weights hold 2 blocks",
        ),
        ("num_hidden_layers", json!(0), "must be at least 1"),
        ("vocab_size", json!(0), "must be at least 1"),
    ];
    for (key, value, why) in cases {
        let mut cfg = good.clone();
        cfg[key] = value.clone();
        std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
        // A real run, and a dry run (whose memory estimate reads the same
        // config), both refuse it.
        for dry in [false, true] {
            if dry && key == "num_hidden_layers" && value != json!(0) {
                continue; // the block count is known only from the weights
            }
            let t = Instant::now();
            let out = run(dir.path(), &m, dry);
            refused(&out, t, &["config.json", key, why]);
        }
    }
}

/// Small files that are not regular files, or endless: a FIFO (opening it
/// for reading would wait for a writer forever), `/dev/zero` (reading it
/// never ends), a directory where a file should be.
#[cfg(unix)]
#[test]
fn special_files_are_refused_by_name_without_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = |p: &Path| {
        let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    };
    // config.json as a FIFO: the dry run and a real run.
    let m = model_dir(dir.path());
    std::fs::remove_file(m.join("config.json")).unwrap();
    fifo(&m.join("config.json"));
    for dry in [true, false] {
        let t = Instant::now();
        let out = run(dir.path(), &m, dry);
        refused(&out, t, &["config.json", "not a regular file"]);
    }
    // tokenizer_config.json as /dev/zero, then as a directory: present but
    // unreadable is an error, not "no chat template".
    let m = dir.path().join("model2");
    train_common::write_local_model(&m);
    let tc = m.join("tokenizer_config.json");
    std::fs::remove_file(&tc).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &tc).unwrap();
    let t = Instant::now();
    let out = run(dir.path(), &m, false);
    refused(&out, t, &["tokenizer_config.json", "not a regular file"]);
    std::fs::remove_file(&tc).unwrap();
    std::fs::create_dir(&tc).unwrap();
    let t = Instant::now();
    let out = run(dir.path(), &m, false);
    refused(&out, t, &["tokenizer_config.json", "a directory"]);
    // A regular file whose read fails (the sessions run as root, so a
    // permission bit cannot make one; /proc/self/mem at offset 0 gives EIO).
    std::fs::remove_dir(&tc).unwrap();
    std::os::unix::fs::symlink("/proc/self/mem", &tc).unwrap();
    let t = Instant::now();
    let out = run(dir.path(), &m, false);
    refused(&out, t, &["tokenizer_config.json", "cannot read"]);
    // A --config file that is a FIFO, and a saved profile that is /dev/zero.
    let cfg = dir.path().join("run.toml");
    fifo(&cfg);
    let t = Instant::now();
    let out = Command::from_std(train_common::train_without_profile(dir.path()))
        .args(["--dry-run", "--config"])
        .arg(&cfg)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    refused(&out, t, &["run.toml", "not a regular file"]);
    let profile = dir.path().join("zero-profile.json");
    std::os::unix::fs::symlink("/dev/zero", &profile).unwrap();
    let t = Instant::now();
    let out = Command::from_std(train_common::train_in(dir.path()))
        .args(["--dry-run", "--profile-path"])
        .arg(&profile)
        .timeout(Duration::from_secs(60))
        .output()
        .unwrap();
    refused(&out, t, &["zero-profile.json", "not a regular file"]);
}
