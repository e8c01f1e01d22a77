//! Gradient correctness of the QLoRA path: NF4 against dense f32, finite
//! differences in f64, a dropped-gradient op is caught, checkpointing.

mod qlora_common;

use candle_core::{DType, Tensor};
use qlora_common::*;
use qlora_scale::qlora::FrozenStorage;

fn nf4_matches_dense(layers: usize, storage: FrozenStorage) {
    quantized_matches_dense(&tiny_cfg(layers), storage);
}

/// The LoRA gradients of a model over `storage` equal those of the dense
/// `f32` model over the same (dequantized) weights.
fn quantized_matches_dense(cfg: &qlora_scale::qlora::LlamaConfig, storage: FrozenStorage) {
    let (cfg, layers) = (cfg.clone(), cfg.num_hidden_layers);
    let w = cfg
        .random_weights(5, DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let q = build(&cfg, &w, storage, DType::F32, false, lora(0.0));
    // The same weights, dense: what the quantized model holds, dequantized.
    let d = build(
        &cfg,
        &q.dequantized_weights().unwrap(),
        FrozenStorage::F32,
        DType::F32,
        false,
        lora(0.0),
    );
    assert_fused(&q, DType::F32);
    let gq = lora_grads(&q, None);
    let gd = lora_grads(&d, None);
    // 7 targets x 2 matrices per block, first block included.
    assert_eq!(gq.len(), 14 * layers);
    assert!(gq[0].0.starts_with("base_model.model.model.layers.0."));
    compare(&gq, &gd, 1e-5).unwrap();
}

#[test]
fn nf4_gradients_equal_dense_f32_two_blocks() {
    nf4_matches_dense(2, FrozenStorage::Nf4);
}

#[test]
fn nf4_gradients_equal_dense_f32_four_blocks() {
    nf4_matches_dense(4, FrozenStorage::Nf4);
}

#[test]
fn tied_sixteen_bit_head_gradients_equal_dense_f32() {
    // The default keeps the tied embedding and head 16-bit: the head's
    // frozen op passes the input gradient through the bf16 weight and keeps
    // no gradient of its own (only adapters are trainable).
    let mut cfg = tiny_cfg(2);
    cfg.tie_word_embeddings = true;
    quantized_matches_dense(&cfg, FrozenStorage::Nf4);
    let w = cfg
        .random_weights(5, DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let m = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, lora(0.0));
    assert!(m.trainable_vars().iter().all(|(n, _)| n.contains("lora_")));
}

#[test]
fn nf4_double_quant_gradients_equal_dense_f32() {
    nf4_matches_dense(2, FrozenStorage::Nf4DoubleQuant);
}

#[test]
fn bf16_and_plain_matmul_gradients_equal_dense_f32() {
    nf4_matches_dense(2, FrozenStorage::Bf16);
    let cfg = tiny_cfg(2);
    let w = prequantized(&cfg, 5, FrozenStorage::F32);
    let p = build(
        &cfg,
        &w,
        FrozenStorage::PlainF32Matmul,
        DType::F32,
        false,
        lora(0.0),
    );
    let d = build(&cfg, &w, FrozenStorage::F32, DType::F32, false, lora(0.0));
    compare(&lora_grads(&p, None), &lora_grads(&d, None), 1e-5).unwrap();
}

#[test]
fn gradients_match_central_finite_differences_in_f64() {
    finite_differences(&tiny_cfg(2));
}

/// A tiny Gemma 2: soft caps small enough to bend the scores and logits,
/// a window shorter than the batch's rows on the first block.
fn tiny_gemma2() -> qlora_scale::qlora::LlamaConfig {
    let mut cfg = tiny_cfg(2);
    cfg.model_type = Some("gemma2".into());
    cfg.query_pre_attn_scalar = Some(6.into());
    cfg.attn_logit_softcapping = Some(Some(0.5));
    cfg.final_logit_softcapping = Some(Some(2.0));
    cfg.sliding_window = Some(3);
    cfg.layer_types = Some(vec!["sliding_attention".into(), "full_attention".into()]);
    cfg
}

#[test]
fn gemma2_gradients_match_central_finite_differences_in_f64() {
    finite_differences(&tiny_gemma2());
}

/// A tiny Gemma 3: query and key norms, a RoPE base per layer type.
fn tiny_gemma3() -> qlora_scale::qlora::LlamaConfig {
    let mut cfg = tiny_gemma2();
    cfg.model_type = Some("gemma3_text".into());
    (cfg.attn_logit_softcapping, cfg.final_logit_softcapping) = (None, None);
    cfg.rope_parameters = Some(serde_json::json!({
        "full_attention": {"rope_theta": 1e6, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 1e4, "rope_type": "default"},
    }));
    cfg.rope_theta = 1e6;
    cfg
}

#[test]
fn gemma3_gradients_match_central_finite_differences_in_f64() {
    let cfg = tiny_gemma3();
    assert!(cfg.has_qk_norm() && cfg.sliding_rope().is_some());
    finite_differences(&cfg);
}

/// A tiny Phi-3: fused projections, RoPE on half of each head.
fn tiny_phi3() -> qlora_scale::qlora::LlamaConfig {
    let mut cfg = tiny_cfg(2);
    cfg.model_type = Some("phi3".into());
    cfg.partial_rotary_factor = Some(0.5);
    cfg
}

#[test]
fn phi3_gradients_match_central_finite_differences_in_f64() {
    let cfg = tiny_phi3();
    assert_eq!((cfg.projections().len(), cfg.rotary_dim()), (4, 4));
    finite_differences(&cfg);
}

/// Any of q/k/v selects Phi-3's `qkv_proj`, any of gate/up its
/// `gate_up_proj`: adapters sit on the fused modules, under their names.
#[test]
fn phi3_targets_select_the_fused_projections() {
    use qlora_scale::qlora::LoraTarget;
    let cfg = tiny_phi3();
    let w = cfg
        .random_weights(1, DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    let mut l = lora(0.0);
    l.targets = vec![LoraTarget::V, LoraTarget::Up];
    let m = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, l);
    let names: Vec<String> = m.trainable_vars().into_iter().map(|(n, _)| n).collect();
    let want: Vec<String> = (0..2)
        .flat_map(|b| {
            ["mlp.gate_up_proj", "self_attn.qkv_proj"]
                .into_iter()
                .flat_map(move |p| {
                    ['A', 'B']
                        .map(|x| format!("base_model.model.model.layers.{b}.{p}.lora_{x}.weight"))
                })
        })
        .collect();
    assert_eq!(names, want);
    // qkv's B spans q, k and v: 4 heads of 8 plus 2 x 2 KV heads of 8.
    assert_eq!(m.trainable_vars()[3].1.dims(), &[64, 4]);
}

#[test]
fn phi3_nf4_and_checkpointed_gradients_equal_dense() {
    let cfg = tiny_phi3();
    let w = prequantized(&cfg, 4, FrozenStorage::Nf4);
    let q = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, lora(0.2));
    let c = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, true, lora(0.2));
    let d = build(&cfg, &w, FrozenStorage::F32, DType::F32, false, lora(0.2));
    let gq = lora_grads(&q, Some(3));
    assert_eq!(gq.len(), 16);
    compare(&gq, &lora_grads(&d, Some(3)), 1e-5).unwrap();
    compare(&gq, &lora_grads(&c, Some(3)), 1e-6).unwrap();
}

#[test]
fn gemma2_nf4_and_checkpointed_gradients_equal_dense() {
    let cfg = tiny_gemma2();
    let w = prequantized(&cfg, 4, FrozenStorage::Nf4);
    let q = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, lora(0.2));
    let c = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, true, lora(0.2));
    let d = build(&cfg, &w, FrozenStorage::F32, DType::F32, false, lora(0.2));
    let gq = lora_grads(&q, Some(3));
    assert_eq!(gq.len(), 28);
    compare(&gq, &lora_grads(&d, Some(3)), 1e-5).unwrap();
    compare(&gq, &lora_grads(&c, Some(3)), 1e-6).unwrap();
}

/// Every adapted linear of `model` runs as the fused LoRA op in `dtype`, so
/// the gradient checks test its backward.
fn assert_fused(model: &qlora_scale::qlora::LlamaModel, dtype: DType) {
    let mut adapted = 0;
    for l in model.blocks().iter().flat_map(|b| b.linears()) {
        let Some(ad) = l.adapter() else { continue };
        let k = l.base().weight().dims().1;
        let x = Tensor::zeros((1, 3, k), dtype, &candle_core::Device::Cpu).unwrap();
        let ab = Some((ad.a.as_tensor(), ad.b.as_tensor()));
        assert!(l.uses_fused_op(&x, ab, None));
        adapted += 1;
    }
    assert!(adapted > 0);
}

/// The first and last element of every `A` and `B` of `cfg`'s two blocks:
/// the analytic gradient equals a central finite difference (f64).
fn finite_differences(cfg: &qlora_scale::qlora::LlamaConfig) {
    let w = prequantized(cfg, 9, FrozenStorage::Nf4);
    let model = build(cfg, &w, FrozenStorage::Nf4, DType::F64, false, lora(0.0));
    assert_fused(&model, DType::F64);
    let grads = lora_grads(&model, None);
    let vars = model.trainable_vars();
    let eps = 1e-6;
    let mut checked = 0;
    for ((name, var), (_, g)) in vars.iter().zip(&grads) {
        // First and last element of every A and B in both blocks.
        let n = var.as_tensor().elem_count();
        for idx in [0, n - 1] {
            let orig = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let at = |delta: f64| {
                let mut v = orig.clone();
                v[idx] += delta;
                var.set(&Tensor::from_vec(v, var.as_tensor().shape(), var.device()).unwrap())
                    .unwrap();
                loss(&model, None).to_scalar::<f64>().unwrap()
            };
            let fd = (at(eps) - at(-eps)) / (2.0 * eps);
            at(0.0);
            // The floor is the central difference's own noise: the loss (about
            // 5) is a sum of many f64 terms, rounded to ~1e-14 relative,
            // divided by 2 eps.
            let tol = 1e-6 * fd.abs().max(g[idx].abs()) + 1e-8;
            assert!(
                (fd - g[idx]).abs() <= tol.max(1e-5 * g[idx].abs()),
                "{name}[{idx}]: analytic {} vs fd {fd}",
                g[idx]
            );
            checked += 1;
        }
    }
    // Two elements of A and B of each projection of both blocks.
    assert_eq!(checked, 2 * 2 * 2 * cfg.projections().len());
}

#[test]
fn a_gradient_dropping_frozen_op_is_caught() {
    // Q8_0 weights: through our custom op the gradients match the dense
    // computation (up to candle's int8 activation rounding); through
    // candle's own QMatMul, which has no backward, the same check fails.
    let cfg = LlamaConfigExt::q8();
    let w = prequantized(&cfg, 5, FrozenStorage::Q8_0);
    let dense = lora_grads(
        &build(&cfg, &w, FrozenStorage::F32, DType::F32, false, lora(0.0)),
        None,
    );
    let ours = lora_grads(
        &build(&cfg, &w, FrozenStorage::Q8_0, DType::F32, false, lora(0.0)),
        None,
    );
    let err = compare(&ours, &dense, 2e-2).expect("custom op with Q8_0 should pass");
    let swapped = lora_grads(
        &build(
            &cfg,
            &w,
            FrozenStorage::CandleQMatMulNoGrad,
            DType::F32,
            false,
            lora(0.0),
        ),
        None,
    );
    let caught = compare(&swapped, &dense, 2e-2);
    assert!(
        caught.is_err(),
        "QMatMul swap not caught (ours {err:e}, swapped {caught:?})"
    );
    // The first block's adapters are wrong too, not only missing terms late.
    let first = |g: &[(String, Vec<f64>)]| -> Vec<(String, Vec<f64>)> {
        g.iter()
            .filter(|(n, _)| n.contains("layers.0."))
            .cloned()
            .collect()
    };
    assert!(compare(&first(&swapped), &first(&dense), 2e-2).is_err());
}

/// Q8_0 needs widths that are multiples of 32.
struct LlamaConfigExt;
impl LlamaConfigExt {
    fn q8() -> qlora_scale::qlora::LlamaConfig {
        qlora_scale::qlora::LlamaConfig::tiny(2, 64, 96, 37)
    }
}

#[test]
fn checkpointing_gives_the_same_gradients() {
    let cfg = tiny_cfg(3);
    let w = prequantized(&cfg, 21, FrozenStorage::Nf4);
    // Dropout on: the recomputation must reuse the same masks.
    let on = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, true, lora(0.2));
    let off = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, lora(0.2));
    let l_on = loss(&on, Some(4)).to_scalar::<f32>().unwrap();
    let l_off = loss(&off, Some(4)).to_scalar::<f32>().unwrap();
    assert_eq!(l_on, l_off);
    compare(&lora_grads(&on, Some(4)), &lora_grads(&off, Some(4)), 1e-6).unwrap();
    // Dropout really is on: another seed changes the gradients.
    assert!(compare(&lora_grads(&off, Some(5)), &lora_grads(&off, Some(4)), 1e-3).is_err());
}

#[test]
fn last_n_layers_and_target_selection() {
    use qlora_scale::qlora::LoraTarget;
    let cfg = tiny_cfg(4);
    let w = prequantized(&cfg, 5, FrozenStorage::Nf4);
    let mut l = lora(0.0);
    l.last_layers = Some(2);
    l.targets = vec![LoraTarget::Q, LoraTarget::V];
    for ckpt in [false, true] {
        let m = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, ckpt, l.clone());
        let names: Vec<String> = m.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 8);
        assert!(
            names
                .iter()
                .all(|n| n.contains("layers.2.") || n.contains("layers.3."))
        );
        assert!(
            names
                .iter()
                .all(|n| n.contains("q_proj") || n.contains("v_proj"))
        );
        assert!(names.contains(
            &"base_model.model.model.layers.3.self_attn.v_proj.lora_B.weight".to_string()
        ));
        let g = lora_grads(&m, None);
        assert!(g.iter().all(|(_, v)| v.iter().any(|x| *x != 0.0)));
    }
}

#[test]
fn merge_and_unmerge_keep_the_logits() {
    let cfg = tiny_cfg(2);
    let w = prequantized(&cfg, 5, FrozenStorage::Nf4);
    let mut m = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, lora(0.0));
    let (ids, am, _) = batch();
    let before = m.forward(&ids, Some(&am), None).unwrap();
    m.merge_adapters().unwrap();
    let merged = m.forward(&ids, Some(&am), None).unwrap();
    m.unmerge_adapters().unwrap();
    let after = m.forward(&ids, Some(&am), None).unwrap();
    let diff = |a: &Tensor, b: &Tensor| {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!(diff(&before, &merged) < 1e-4, "{}", diff(&before, &merged));
    assert!(diff(&before, &after) < 1e-4);
    // The adapters matter: without them the logits differ.
    let plain = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, {
        let mut l = lora(0.0);
        l.rank = 0;
        l
    });
    assert!(diff(&before, &plain.forward(&ids, Some(&am), None).unwrap()) > 1e-3);
}
