//! The inference path: logits from the KV cache (a prompt, then one token at
//! a time) equal the full-sequence forward's, with grouped-query and plain
//! multi-head attention, Qwen2's biases and RoPE scaling, Gemma; no graph is
//! recorded; the base alone differs from base + adapter.

mod qlora_common;

use candle_core::{DType, Device, IndexOp, Tensor};
use qlora_common::*;
use qlora_scale::qlora::{FrozenStorage, KvCache, LlamaConfig, LlamaModel};

const IDS: [u32; 9] = [1, 5, 7, 2, 30, 11, 4, 36, 9];

fn model(cfg: &LlamaConfig) -> LlamaModel {
    let w = cfg.random_weights(9, DType::F32, &Device::Cpu).unwrap();
    build(cfg, &w, FrozenStorage::Nf4, DType::F32, false, lora(0.0))
}

/// The largest absolute difference between two `(t, vocab)` logit tables.
fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// The prompt (the first `prefill` tokens) at once, then one token per call.
fn incremental(m: &LlamaModel, prefill: usize, adapters: bool) -> Tensor {
    let mut cache = KvCache::new(m.config());
    let mut rows = vec![
        m.forward_cached(&IDS[..prefill], &mut cache, adapters)
            .unwrap()
            .i(0)
            .unwrap(),
    ];
    for &id in &IDS[prefill..] {
        rows.push(
            m.forward_cached(&[id], &mut cache, adapters)
                .unwrap()
                .i(0)
                .unwrap(),
        );
    }
    assert_eq!(cache.len(), IDS.len());
    Tensor::cat(&rows, 0).unwrap()
}

fn check(cfg: &LlamaConfig) {
    let m = model(cfg);
    let ids = Tensor::new(&[IDS], &Device::Cpu).unwrap();
    for adapters in [true, false] {
        let full = m
            .forward_no_grad(&ids, None, adapters)
            .unwrap()
            .i(0)
            .unwrap();
        for prefill in [1, 4, IDS.len()] {
            let d = max_diff(&incremental(&m, prefill, adapters), &full);
            assert!(d < 1e-4, "prefill {prefill}, adapters {adapters}: {d}");
        }
    }
    // The training forward agrees with the graph-free one.
    let train = m.forward(&ids, None, None).unwrap().i(0).unwrap();
    let full = m.forward_no_grad(&ids, None, true).unwrap().i(0).unwrap();
    assert!(max_diff(&train, &full) < 1e-5);
    // The adapters (B non-zero) change the logits.
    let base = m.forward_no_grad(&ids, None, false).unwrap().i(0).unwrap();
    assert!(max_diff(&base, &full) > 1e-3);
}

#[test]
fn cached_logits_equal_the_full_forward_with_gqa() {
    let cfg = tiny_cfg(2);
    assert_eq!((cfg.num_attention_heads, cfg.kv_heads()), (4, 2));
    check(&cfg);
}

#[test]
fn cached_logits_equal_the_full_forward_with_multi_head_attention() {
    let mut cfg = tiny_cfg(2);
    cfg.num_key_value_heads = Some(4);
    check(&cfg);
}

#[test]
fn cached_logits_equal_the_full_forward_with_a_sliding_window_and_qk_norms() {
    // Mistral's window, shorter than the sequence, on the second block only.
    let mut cfg = tiny_cfg(2);
    cfg.model_type = Some("mistral".into());
    cfg.sliding_window = Some(3);
    cfg.layer_types = Some(vec!["full_attention".into(), "sliding_attention".into()]);
    check(&cfg);
    // Qwen3's per-head norms of queries and keys.
    let mut cfg = tiny_cfg(2);
    cfg.model_type = Some("qwen3".into());
    check(&cfg);
}

/// The config of a parity fixture (`tests/fixtures/parity/NAME`), read as
/// `train` reads it.
fn fixture_config(name: &str) -> LlamaConfig {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name);
    qlora_scale::qlora::read_config(&dir).unwrap()
}

#[test]
fn cached_logits_equal_the_full_forward_for_gemma2() {
    // Soft caps, (1 + w) norms, scaled embeddings; window 6 of 9 tokens on
    // the first block.
    let cfg = fixture_config("gemma2");
    assert_eq!(cfg.layer_window(0), Some(6));
    check(&cfg);
}

#[test]
fn cached_logits_equal_the_full_forward_for_gemma3() {
    // Query and key norms; the sliding block's RoPE is not the full one's.
    let cfg = fixture_config("gemma3");
    let (local, global) = (
        cfg.sliding_rope_inv_freq().unwrap().unwrap(),
        cfg.rope_inv_freq().unwrap(),
    );
    assert_ne!(local, global);
    check(&cfg);
}

#[test]
fn cached_logits_equal_the_full_forward_for_phi3() {
    let cfg = fixture_config("phi3");
    assert_eq!(cfg.projections().len(), 4);
    check(&cfg);
    // RoPE on half of each head (4 of 8), the rest unrotated.
    let mut cfg = cfg;
    cfg.partial_rotary_factor = Some(0.5);
    assert_eq!(cfg.rotary_dim(), 4);
    check(&cfg);
}

#[test]
fn cached_logits_equal_the_full_forward_with_biases_and_rope_scaling() {
    let mut cfg = tiny_cfg(1);
    cfg.num_key_value_heads = Some(1);
    cfg.model_type = Some("qwen2".into());
    cfg.rope_scaling = Some(qlora_scale::qlora::llama::RopeScaling {
        rope_type: Some("linear".into()),
        kind: None,
        factor: 2.0,
        low_freq_factor: None,
        high_freq_factor: None,
        original_max_position_embeddings: None,
    });
    check(&cfg);
}

#[test]
fn the_inference_path_records_no_graph() {
    let m = model(&tiny_cfg(2));
    let mut cache = KvCache::new(m.config());
    let logits = m.forward_cached(&IDS, &mut cache, true).unwrap();
    let ids = Tensor::new(&[IDS], &Device::Cpu).unwrap();
    let eval = m.forward_no_grad(&ids, None, true).unwrap();
    for out in [logits, eval] {
        let grads = out.sum_all().unwrap().backward().unwrap();
        for (name, var) in m.trainable_vars() {
            assert!(
                grads.get(var.as_tensor()).is_none(),
                "{name} has a gradient"
            );
        }
    }
    // The training forward does record one: the check above can fail.
    let grads = m
        .forward(&ids, None, None)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let (_, var) = &m.trainable_vars()[0];
    assert!(grads.get(var.as_tensor()).is_some());
}

#[test]
fn the_cache_grows_past_its_first_chunk() {
    let chunk = qlora_scale::tables::trainer::KV_CACHE_CHUNK as usize;
    let m = model(&tiny_cfg(1));
    let ids: Vec<u32> = (0..chunk + 20).map(|i| (i * 7 % 37) as u32).collect();
    let prefill = chunk - 10;
    let mut cache = KvCache::new(m.config());
    let mut rows = vec![
        m.forward_cached(&ids[..prefill], &mut cache, true)
            .unwrap()
            .i(0)
            .unwrap(),
    ];
    for &id in &ids[prefill..] {
        rows.push(
            m.forward_cached(&[id], &mut cache, true)
                .unwrap()
                .i(0)
                .unwrap(),
        );
    }
    let full = Tensor::new(ids.as_slice(), &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = m.forward_no_grad(&full, None, true).unwrap().i(0).unwrap();
    let d = max_diff(&Tensor::cat(&rows, 0).unwrap(), &full);
    assert!(d < 1e-4, "{d}");
}
