//! The QLoRA benchmark workload, shared by `benches/qlora.rs` and
//! `examples/qlora_peak.rs`: a ~95M-parameter Llama-shaped model, a batch of
//! 4 x 64 tokens, LoRA r=8 on all seven linears, one AdamW step.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use candle_nn::{AdamW, Optimizer, ParamsAdamW};
use qlora_scale::qlora::loss::{loss_mask, masked_causal_lm_loss};
use qlora_scale::qlora::{
    FrozenStorage, LlamaConfig, LlamaModel, LoraConfig, ModelOptions, RandomWeights,
};

/// Batch size and sequence length of the benchmark.
pub const BATCH: usize = 4;
/// Tokens per row.
pub const SEQ: usize = 64;

/// The configurations the issue lists: (name, storage, checkpointing).
pub const CONFIGS: [(&str, FrozenStorage, bool); 10] = [
    ("f32-plain-matmul", FrozenStorage::PlainF32Matmul, false),
    ("f32-plain-matmul+ckpt", FrozenStorage::PlainF32Matmul, true),
    ("f32-custom-op", FrozenStorage::F32, false),
    ("f32-custom-op+ckpt", FrozenStorage::F32, true),
    ("nf4", FrozenStorage::Nf4, false),
    ("nf4+ckpt", FrozenStorage::Nf4, true),
    ("nf4-dq", FrozenStorage::Nf4DoubleQuant, false),
    ("nf4-dq+ckpt", FrozenStorage::Nf4DoubleQuant, true),
    ("q4k", FrozenStorage::Q4K, false),
    ("q4k+ckpt", FrozenStorage::Q4K, true),
];

/// ~95M parameters: width 768, 12 blocks, 12 heads (4 KV heads), SwiGLU
/// 2048, vocabulary 32000, tied embeddings.
pub fn config_100m() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(12, 768, 2048, 32_000);
    c.num_attention_heads = 12;
    c.num_key_value_heads = Some(4);
    c.tie_word_embeddings = true;
    c
}

/// A model, its optimizer and a fixed batch.
pub struct Workload {
    /// The model.
    pub model: LlamaModel,
    opt: AdamW,
    ids: Tensor,
    mask: Tensor,
    loss_mask: Tensor,
}

impl Workload {
    /// Builds the benchmark model with `storage` frozen weights.
    pub fn new(storage: FrozenStorage, checkpointing: bool) -> Self {
        let dev = Device::Cpu;
        let cfg = config_100m();
        let opts = ModelOptions {
            storage,
            lora: LoraConfig {
                rank: 8,
                alpha: 16.0,
                ..LoraConfig::default()
            },
            dtype: DType::F32,
            device: dev.clone(),
            checkpointing,
            // The storage comparison of BENCHMARKS.md: every frozen matrix,
            // embedding and head included, in `storage`.
            quantize_embeddings: true,
            ..Default::default()
        };
        let model =
            LlamaModel::new(&cfg, &RandomWeights::new(&cfg, 1, &dev), &opts).expect("model");
        let vars = model.trainable_vars().into_iter().map(|(_, v)| v).collect();
        let opt = AdamW::new(
            vars,
            ParamsAdamW {
                lr: 2e-4,
                ..ParamsAdamW::default()
            },
        )
        .expect("optimizer");
        let ids: Vec<u32> = (0..BATCH * SEQ)
            .map(|i| ((i * 7919) % 32_000) as u32)
            .collect();
        let ids = Tensor::from_vec(ids, (BATCH, SEQ), &dev).expect("ids");
        let attn = vec![vec![1u8; SEQ]; BATCH];
        let mask = Tensor::ones((BATCH, SEQ), DType::U8, &dev).expect("mask");
        let loss_mask = loss_mask(&attn, None).expect("loss mask");
        Self {
            model,
            opt,
            ids,
            mask,
            loss_mask,
        }
    }

    /// One training step (forward, loss, backward, AdamW); returns the loss.
    pub fn step(&mut self) -> f32 {
        let logits = self
            .model
            .forward(&self.ids, Some(&self.mask), Some(0))
            .expect("forward");
        let loss = masked_causal_lm_loss(&logits, &self.ids, &self.loss_mask).expect("loss");
        self.opt.backward_step(&loss).expect("backward");
        loss.to_scalar::<f32>().expect("scalar")
    }
}

/// `VmHWM` (peak resident set) of this process in KiB, from `/proc/self/status`.
pub fn vm_hwm_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}
