//! Parity with transformers: each folder of `tests/fixtures/parity/` is a tiny
//! random-weight model that transformers built from its own config class,
//! with transformers' logits and loss on fixed token ids and a right-padded
//! attention mask (`scripts/make_parity_fixtures.sh` writes them). Our loader
//! and model, with the frozen weights kept dense (`f32`), must give the same
//! logits (1e-4 relative) on every real token and the same loss (1e-5).
//!
//! Every fixture's architecture is built (`every_parity_fixture_is_built`).

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
const BUILT: [&str; 10] = [
    "llama",
    "llama_tied",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "gemma3_scaled",
    "phi3",
    "phi3_partial",
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
    let per_block = 2 * config.projections().len();
    assert_eq!(gq.len(), per_block * config.num_hidden_layers, "{name}");
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

/// Gemma 3 as its 4B and larger models: linear RoPE scaling on the
/// full-attention layers only, `query_pre_attn_scalar` (24) not the head
/// width (16).
#[test]
fn parity_gemma3_with_scaled_global_rope_and_its_own_attention_scale() {
    assert_parity("gemma3_scaled");
}

/// Phi-3: fused `qkv_proj` and `gate_up_proj`, adapted under those names.
#[test]
fn parity_phi3_with_fused_projections() {
    assert_parity("phi3");
    let m = dense_model(&fixture("phi3")).unwrap();
    let names: Vec<String> = m.trainable_vars().into_iter().map(|(n, _)| n).collect();
    assert_eq!(names.len(), 2 * 4 * 2, "{names:?}");
    assert!(
        names.contains(&"base_model.model.model.layers.1.self_attn.qkv_proj.lora_A.weight".into())
            && names
                .contains(&"base_model.model.model.layers.0.mlp.gate_up_proj.lora_B.weight".into()),
        "{names:?}"
    );
}

/// Phi-3 with RoPE on half of each head and a sliding window on every
/// layer.
#[test]
fn parity_phi3_with_partial_rotary_and_a_sliding_window() {
    assert_parity("phi3_partial");
}

/// Every fixture folder is one of the built architectures, so none is
/// left untested.
#[test]
fn every_parity_fixture_is_built() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    for e in std::fs::read_dir(dir).unwrap() {
        let name = e.unwrap().file_name().to_string_lossy().into_owned();
        assert!(BUILT.contains(&name.as_str()), "{name} is not in BUILT");
    }
}

/// `train --model FIXTURE` trains three steps of every built architecture
/// and writes its adapter under the architecture's module names; `train
/// merge` writes back every tensor of the fixture under its own name, the
/// norms as stored (Gemma's `w`, not `1 + w`).
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
        let adapter: serde_json::Value = serde_json::from_slice(
            &std::fs::read(dir.path().join("out/adapter_config.json")).unwrap(),
        )
        .unwrap();
        let modules: &[&str] = if name.starts_with("phi3") {
            &["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
        } else {
            &[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
        };
        assert_eq!(
            adapter["target_modules"],
            serde_json::json!(modules),
            "{name}"
        );
        assert_merge_writes_the_fixture_names(name, dir.path());
    }
}

/// `train merge` of the run in `dir/out`: the merged config keeps the
/// fixture's values, the merged tensors are the fixture's, by name and
/// shape, and its norms are the stored values.
fn assert_merge_writes_the_fixture_names(name: &str, dir: &Path) {
    let out = train_common::train_in(dir)
        .args(["merge", "--run-dir", "out", "--out", "merged"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Every key both configs hold has the fixture's value and JSON type
    // (transformers refuses `query_pre_attn_scalar: 16.0` for an integer).
    let json = |p: PathBuf| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
    };
    let (cfg, merged_cfg) = (
        json(fixture(name).join("config.json")),
        json(dir.join("merged/config.json")),
    );
    for (k, v) in merged_cfg.as_object().unwrap() {
        if let Some(want) = cfg.get(k) {
            assert_eq!(v, want, "{name}: config.json {k}");
        }
    }
    let load = |p: PathBuf| candle_core::safetensors::load(p, &Device::Cpu).unwrap();
    let theirs = load(fixture(name).join("model.safetensors"));
    let ours = load(dir.join("merged/model.safetensors"));
    let mut names: Vec<&String> = ours.keys().collect();
    let mut want: Vec<&String> = theirs.keys().collect();
    names.sort();
    want.sort();
    assert_eq!(names, want, "{name}");
    for (n, t) in &theirs {
        assert_eq!(ours[n].dims(), t.dims(), "{name}: {n}");
        assert_eq!(
            ours[n].dtype(),
            t.dtype(),
            "{name}: {n} keeps the base's dtype"
        );
        if n.contains("norm") {
            let (t, o) = (
                t.to_dtype(DType::F32).unwrap(),
                ours[n].to_dtype(DType::F32).unwrap(),
            );
            let diff = (&o - &t).unwrap().abs().unwrap().max_all().unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{name}: {n}");
        }
    }
}
