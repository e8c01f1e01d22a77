//! Helpers shared by the QLoRA integration tests: tiny models, batches and
//! gradient extraction.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use qlora_scale::qlora::loss::{loss_mask, masked_causal_lm_loss};
use qlora_scale::qlora::{
    FrozenStorage, FrozenWeight, LlamaConfig, LlamaModel, LoraConfig, ModelOptions,
};

/// A tiny Llama: width 32 (4 heads of 8, 2 KV heads), SwiGLU 48, vocab 37
/// (37 x 32 is not a multiple of the NF4 block: padding is exercised).
pub fn tiny_cfg(layers: usize) -> LlamaConfig {
    LlamaConfig::tiny(layers, 32, 48, 37)
}

/// Random weights whose 2-D matrices are replaced by `dequantize(quantize(W))`
/// under `storage`, so a dense model over them computes what the quantized
/// model computes.
pub fn prequantized(
    cfg: &LlamaConfig,
    seed: u64,
    storage: FrozenStorage,
) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let mut w = cfg.random_weights(seed, DType::F32, &dev).unwrap();
    // The embedding and the head as the model stores them (16-bit by
    // default), the linears in `storage`.
    let opts = ModelOptions {
        storage,
        ..ModelOptions::default()
    };
    for (name, t) in w.iter_mut() {
        if t.rank() == 2 {
            let s = if name.contains("embed_tokens") || name.starts_with("lm_head") {
                opts.embedding_storage(DType::F32)
            } else {
                storage
            };
            let q = FrozenWeight::new(t, s).unwrap();
            *t = q.dequantize(DType::F32, &dev).unwrap();
        }
    }
    w
}

/// LoRA on all linears, rank 4, deterministic.
pub fn lora(dropout: f32) -> LoraConfig {
    LoraConfig {
        rank: 4,
        alpha: 8.0,
        dropout,
        seed: 11,
        ..LoraConfig::default()
    }
}

/// Builds a model and gives every `B` deterministic non-zero values (with
/// `B = 0` the gradients of `A` would vanish and prove nothing).
pub fn build(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    storage: FrozenStorage,
    dtype: DType,
    checkpointing: bool,
    lora: LoraConfig,
) -> LlamaModel {
    build_on(
        cfg,
        weights,
        storage,
        dtype,
        checkpointing,
        lora,
        &Device::Cpu,
    )
}

/// [`build`] on `device`.
pub fn build_on(
    cfg: &LlamaConfig,
    weights: &HashMap<String, Tensor>,
    storage: FrozenStorage,
    dtype: DType,
    checkpointing: bool,
    lora: LoraConfig,
    device: &Device,
) -> LlamaModel {
    let opts = ModelOptions {
        storage,
        lora,
        dtype,
        device: device.clone(),
        checkpointing,
        ..ModelOptions::default()
    };
    let model = LlamaModel::new(cfg, weights, &opts).unwrap();
    nonzero_lora_b(&model, device);
    model
}

/// Gives every LoRA `B` fixed non-zero values (it starts at zero, which
/// would leave `A` without gradient).
pub fn nonzero_lora_b(model: &LlamaModel, device: &Device) {
    for (i, (name, var)) in model.trainable_vars().into_iter().enumerate() {
        if name.contains("lora_B") {
            let n = var.as_tensor().elem_count();
            let v: Vec<f64> = (0..n)
                .map(|j| (((i * 131 + j * 17) % 23) as f64 - 11.0) * 0.01)
                .collect();
            let t = Tensor::from_vec(v, var.as_tensor().shape(), device).unwrap();
            var.set(&t.to_dtype(var.dtype()).unwrap()).unwrap();
        }
    }
}

/// Two rows of 6 tokens; the second row is right-padded by 2 and its first
/// 2 tokens are prompt (not targets).
pub fn batch() -> (Tensor, Tensor, Tensor) {
    let dev = Device::Cpu;
    let ids = Tensor::new(&[[1u32, 5, 9, 36, 2, 7], [3, 4, 8, 30, 0, 0]], &dev).unwrap();
    let attn = vec![vec![1u8, 1, 1, 1, 1, 1], vec![1, 1, 1, 1, 0, 0]];
    let am = Tensor::new(&[[1u8, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]], &dev).unwrap();
    let lm = loss_mask(&attn, Some(&[0, 2])).unwrap();
    (ids, am, lm)
}

/// Loss of the standard batch.
pub fn loss(model: &LlamaModel, dropout_seed: Option<u64>) -> Tensor {
    let (ids, am, lm) = batch();
    let dev = model.device();
    let (ids, am, lm) = (
        ids.to_device(dev).unwrap(),
        am.to_device(dev).unwrap(),
        lm.to_device(dev).unwrap(),
    );
    let logits = model.forward(&ids, Some(&am), dropout_seed).unwrap();
    masked_causal_lm_loss(&logits, &ids, &lm.to_dtype(logits.dtype()).unwrap()).unwrap()
}

/// Every LoRA gradient of the standard batch's loss, by PEFT name (sorted).
pub fn lora_grads(model: &LlamaModel, dropout_seed: Option<u64>) -> Vec<(String, Vec<f64>)> {
    let grads = loss(model, dropout_seed).backward().unwrap();
    model
        .trainable_vars()
        .into_iter()
        .map(|(name, var)| {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient for {name}"))
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            (name, g)
        })
        .collect()
}

/// `|a - b| / |b|` in the 2-norm.
pub fn rel_err(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).powi(2))
        .sum::<f64>()
        .sqrt();
    let den: f64 = b.iter().map(|y| y * y).sum::<f64>().sqrt();
    num / den.max(1e-30)
}

/// Compares two gradient sets; `Err` names the worst parameter.
pub fn compare(
    got: &[(String, Vec<f64>)],
    want: &[(String, Vec<f64>)],
    tol: f64,
) -> Result<f64, String> {
    assert_eq!(got.len(), want.len());
    let mut worst = (0.0, String::new());
    for ((n1, g), (n2, w)) in got.iter().zip(want) {
        assert_eq!(n1, n2);
        let norm: f64 = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        assert!(norm > 0.0, "reference gradient of {n2} is zero");
        let e = rel_err(g, w);
        if e > worst.0 || e.is_nan() {
            worst = (e, n1.clone());
        }
    }
    if worst.0 <= tol {
        Ok(worst.0)
    } else {
        Err(format!(
            "{}: relative error {:e} > {tol:e}",
            worst.1, worst.0
        ))
    }
}

/// `n * k` deterministic values in [-1, 1): a weight matrix's, row-major.
pub fn weights(n: usize, k: usize) -> Vec<f32> {
    (0..n * k)
        .map(|i| ((i * 7919) % 1013) as f32 / 500.0 - 1.0)
        .collect()
}
