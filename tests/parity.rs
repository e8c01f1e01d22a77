//! Parity with transformers: each folder of `tests/fixtures/parity/` is a tiny
//! random-weight model that transformers built from its own config class,
//! with transformers' logits and loss on fixed token ids and a right-padded
//! attention mask (`scripts/make_parity_fixtures.sh` writes them). Our loader
//! and model, with the frozen weights kept dense (`f32`), must give the same
//! logits (1e-4 relative) on every real token and the same loss (1e-5).
//!
//! Architectures `train` does not build yet have fixtures too; for them the
//! test asserts the loader refuses the folder by its `model_type`, naming it.

mod qlora_common;
mod train_common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qlora_scale::qlora::loss::masked_causal_lm_loss;
use qlora_scale::qlora::{
    FrozenStorage, LlamaModel, LoadError, ModelOptions, SafetensorsDir, read_config,
};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

/// The fixtures of architectures `train` builds.
const BUILT: [&str; 7] = [
    "llama",
    "llama_tied",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
];

/// transformers' inputs and outputs for one fixture.
struct Reference {
    ids: Tensor,
    mask: Tensor,
    logits: Tensor,
    loss: f32,
}

fn reference(dir: &Path) -> Reference {
    let r = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu)
        .expect("reference.safetensors");
    Reference {
        ids: r["input_ids"].to_dtype(DType::U32).unwrap(),
        mask: r["attention_mask"].to_dtype(DType::F32).unwrap(),
        logits: r["logits"].clone(),
        loss: r["loss"].to_vec1::<f32>().unwrap()[0],
    }
}

fn dense_model(dir: &Path) -> Result<LlamaModel, LoadError> {
    let config = read_config(dir)?;
    let weights = SafetensorsDir::open(dir, &Device::Cpu)?;
    let options = ModelOptions {
        storage: FrozenStorage::F32,
        ..ModelOptions::default()
    };
    LlamaModel::new(&config, &weights, &options)
}

/// Largest |ours - theirs| over real tokens, relative to the largest
/// |theirs| there.
fn max_rel_diff(ours: &Tensor, theirs: &Tensor, mask: &Tensor) -> f32 {
    let m = mask
        .unsqueeze(2)
        .unwrap()
        .broadcast_as(ours.shape())
        .unwrap();
    let diff = ((ours - theirs).unwrap().abs().unwrap() * &m).unwrap();
    let scale = (theirs.abs().unwrap() * &m).unwrap();
    let max = |t: Tensor| {
        t.flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    max(diff) / max(scale)
}

/// Our logits and loss on the fixture's inputs equal transformers'.
fn assert_parity(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let model = dense_model(&dir).unwrap_or_else(|e| panic!("{name}: {e}"));
    let logits = model.forward(&r.ids, Some(&r.mask), None).unwrap();
    let rel = max_rel_diff(&logits, &r.logits, &r.mask);
    assert!(rel < 1e-4, "{name}: logits differ by {rel:e} (relative)");
    // Position t predicts t + 1; a target counts where the mask is 1, as
    // transformers' labels of -100 on padding do.
    let loss = masked_causal_lm_loss(&logits, &r.ids, &r.mask)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(
        (loss - r.loss).abs() < 1e-5,
        "{name}: loss {loss} against transformers' {}",
        r.loss
    );
}

/// Every LoRA gradient of the fixture's loss through NF4 equals the one
/// through dense `f32` weights that hold what NF4 holds, on the fixture's
/// 16-token rows (longer than Mistral's window).
fn assert_nf4_gradients_match_dense(name: &str) {
    let dir = fixture(name);
    let r = reference(&dir);
    let config = read_config(&dir).unwrap();
    let weights: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .unwrap()
            .into_iter()
            .map(|(k, v)| (k, v.to_dtype(DType::F32).unwrap()))
            .collect();
    let lora = qlora_common::lora(0.0);
    let q = qlora_common::build(
        &config,
        &weights,
        FrozenStorage::Nf4,
        DType::F32,
        false,
        lora.clone(),
    );
    let dense = q.dequantized_weights().unwrap();
    let d = qlora_common::build(&config, &dense, FrozenStorage::F32, DType::F32, false, lora);
    let grads = |m: &LlamaModel| -> Vec<(String, Vec<f64>)> {
        let logits = m.forward(&r.ids, Some(&r.mask), None).unwrap();
        let g = masked_causal_lm_loss(&logits, &r.ids, &r.mask)
            .unwrap()
            .backward()
            .unwrap();
        m.trainable_vars()
            .into_iter()
            .map(|(n, v)| {
                let t = g
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {n}"));
                (
                    n,
                    t.to_dtype(DType::F64)
                        .unwrap()
                        .flatten_all()
                        .unwrap()
                        .to_vec1()
                        .unwrap(),
                )
            })
            .collect()
    };
    let (gq, gd) = (grads(&q), grads(&d));
    assert_eq!(gq.len(), 14 * config.num_hidden_layers, "{name}");
    qlora_common::compare(&gq, &gd, 1e-5).unwrap_or_else(|e| panic!("{name}: {e}"));
}

#[test]
fn parity_llama() {
    assert_parity("llama");
}

#[test]
fn parity_nf4_gradients_equal_dense_for_every_built_architecture() {
    for name in BUILT {
        assert_nf4_gradients_match_dense(name);
    }
}

#[test]
fn parity_llama_with_tied_embeddings() {
    assert_parity("llama_tied");
}

#[test]
fn parity_mistral_with_a_sliding_window_shorter_than_the_sequence() {
    assert_parity("mistral");
}

#[test]
fn parity_qwen2() {
    assert_parity("qwen2");
}

#[test]
fn parity_qwen3_with_per_head_query_and_key_norms() {
    assert_parity("qwen3");
}

/// Gemma 2: scaled embeddings, `(1 + w)` norms, four norms per block, GELU,
/// `query_pre_attn_scalar`, attention and final logit soft-capping, sliding
/// window on alternate layers, tied head.
#[test]
fn parity_gemma2() {
    assert_parity("gemma2");
}

/// Gemma 3 (text): Gemma 2 without soft caps, with per-head `(1 + w)` norms
/// of queries and keys and one RoPE per layer type (base 10^4 on sliding
/// layers, 10^6 on full ones).
#[test]
fn parity_gemma3_with_a_rope_per_layer_type() {
    assert_parity("gemma3");
}

/// Fixtures of architectures `train` cannot build yet are refused by name
/// before any weight is read.
#[test]
fn parity_fixtures_of_unbuilt_architectures_are_refused_by_model_type() {
    let err = dense_model(&fixture("phi3")).expect_err("phi3").to_string();
    assert!(err.contains("phi3") && err.contains("config.json"), "{err}");
}

/// `train --model FIXTURE` trains three steps of every built architecture
/// and writes its adapter.
#[test]
fn parity_fixtures_train_three_steps_end_to_end() {
    for name in BUILT {
        let dir = tempfile::tempdir().unwrap();
        let out = train_common::train_without_profile(dir.path())
            .arg("--model")
            .arg(fixture(name))
            .args(["--max-steps", "3", "--output-dir", "out"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{name}: {err}");
        assert!(err.contains("step 3/3"), "{name}: {err}");
        assert!(
            dir.path().join("out/adapter_model.safetensors").is_file(),
            "{name}: no adapter"
        );
    }
}
