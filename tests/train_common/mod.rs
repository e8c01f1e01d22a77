//! Running the built `train` binary from tests, sandboxed: its working
//! directory and home in the test's own directory, no profile path from the
//! environment, no colour, no machine detection (so no test depends on the
//! machine it runs on).
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use qlora_scale::saved_profile::PROFILE_PATH_ENV;

/// The `train` binary Cargo built for these tests.
pub const TRAIN: &str = env!("CARGO_BIN_EXE_train");

/// Puts `cmd` (`train`, or `mpirun` starting it) in the sandbox `dir`.
pub fn sandbox<'a>(cmd: &'a mut Command, dir: &Path) -> &'a mut Command {
    cmd.current_dir(dir)
        .env("HOME", dir)
        .env_remove(PROFILE_PATH_ENV)
        .env("NO_COLOR", "1")
        .env("QLORA_SCALE_DETECT", "off")
}

/// `train` in the sandbox `dir`, without arguments.
pub fn train_in(dir: &Path) -> Command {
    let mut cmd = Command::new(TRAIN);
    sandbox(&mut cmd, dir);
    cmd
}

/// `train --profile-path DIR/no-profile.json` in the sandbox: a profile
/// path where no profile is saved.
pub fn train_without_profile(dir: &Path) -> Command {
    let mut cmd = train_in(dir);
    cmd.arg("--profile-path").arg(dir.join("no-profile.json"));
    cmd
}

/// A tiny local Hugging Face directory: config.json, model.safetensors and
/// a word-level tokenizer.json.
pub fn write_local_model(dir: &Path) {
    write_local_model_as(dir, candle_core::DType::F32);
}

/// [`write_local_model`] with its weights stored as `dtype` (published
/// checkpoints are mostly bf16).
pub fn write_local_model_as(dir: &Path, dtype: candle_core::DType) {
    std::fs::create_dir_all(dir).unwrap();
    let cfg = qlora_scale::qlora::LlamaConfig::tiny(2, 64, 128, 64);
    std::fs::write(dir.join("config.json"), serde_json::to_vec(&cfg).unwrap()).unwrap();
    let w = cfg
        .random_weights(3, dtype, &candle_core::Device::Cpu)
        .unwrap();
    candle_core::safetensors::save(&w, dir.join("model.safetensors")).unwrap();
    let words = [
        "<unk>", "<s>", "</s>", "the", "river", "runs", "past", "mill", "wheel", "turns", ".",
    ];
    let vocab: serde_json::Map<String, serde_json::Value> = words
        .iter()
        .enumerate()
        .map(|(i, w)| (w.to_string(), serde_json::Value::from(i)))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": {"content": "</s>"}}"#,
    )
    .unwrap();
}
