//! Llama-family decoder (Llama 2/3, Mistral, Qwen2 shapes) built from
//! differentiable ops, with frozen weights and LoRA adapters.
//!
//! GQA, RoPE with `rope_theta` and `rope_scaling` (`linear`, `llama3`),
//! RMSNorm, SwiGLU, tied or untied embeddings, q/k/v biases (Qwen2), causal
//! attention with a padding mask. Candle's own fused ops that drop gradients
//! (`softmax_last_dim`, `rms_norm`, `rope`) are not used; attention, RMSNorm,
//! the MLP gate, RoPE and the adapted linears go through this crate's ops
//! with their own backward (`attention.rs`, `fused.rs`, `lora_op.rs`), which
//! fall back to compositions of Candle ops off the CPU or in 16-bit dtypes.
//!
//! ```
//! use std::collections::HashMap;
//! use candle_core::{DType, Device, Tensor};
//! use qlora_scale::qlora::{LlamaConfig, LlamaModel, ModelOptions};
//! let cfg = LlamaConfig::tiny(2, 64, 128, 32);
//! let weights = cfg.random_weights(7, DType::F32, &Device::Cpu).unwrap();
//! let model = LlamaModel::new(&cfg, &weights, &ModelOptions::default()).unwrap();
//! let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
//! let logits = model.forward(&ids, None, None).unwrap();
//! assert_eq!(logits.dims(), &[1, 4, 32]);
//! ```

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{D, DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::Deserialize;

use super::attention::{Attention, attention};
use super::bf16_gemm::CpuMatmul;
use super::frozen::{FrozenLinear, FrozenStorage, FrozenWeight};
use super::fused;
use super::load::{LoadError, WeightSource};
use super::lora::{
    FUSED_PROJECTIONS, LoraAdapter, LoraConfig, LoraLinear, LoraTarget, Projection,
    SEPARATE_PROJECTIONS, dropout_mask, peft_key,
};
use super::recompute::CheckpointOp;

/// `rope_scaling` of an HF `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct RopeScaling {
    /// `rope_type` (newer configs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// `type` (older configs).
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// Scaling factor.
    #[serde(default = "one")]
    pub factor: f64,
    /// Llama 3: `low_freq_factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// Llama 3: `high_freq_factor`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// Llama 3: `original_max_position_embeddings`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
}

impl RopeScaling {
    /// The kind: `rope_type`, else `type`, else `default`.
    pub fn kind(&self) -> &str {
        self.rope_type
            .as_deref()
            .or(self.kind.as_deref())
            .unwrap_or("default")
    }
}

fn one() -> f64 {
    1.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_theta() -> f64 {
    10_000.0
}
fn default_max_pos() -> usize {
    4096
}

/// The fields of an HF `config.json` that the Llama family needs.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct LlamaConfig {
    /// Model width.
    pub hidden_size: usize,
    /// SwiGLU width.
    pub intermediate_size: usize,
    /// Number of decoder blocks.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); defaults to the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base.
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    /// RoPE scaling.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Biases on q/k/v (Qwen2 has them; defaults to true for `qwen2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// `model_type` (`llama`, `mistral`, `qwen2`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_type: Option<String>,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: usize,
    /// `rope_parameters` (transformers 5): the RoPE base and scaling in one
    /// map, read into `rope_theta` and `rope_scaling` by
    /// [`read_config`](super::read_config) and written back as read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// Keys a query attends to, itself included, in sliding-window layers
    /// (Mistral; Qwen2 with `use_sliding_window`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether `sliding_window` is used at all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Per layer, `full_attention` or `sliding_attention` (transformers 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer_types: Option<Vec<String>>,
    /// The MLP's activation; only `silu` is built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Biases on the MLP's projections; not built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Gemma: the MLP's activation (Gemma reads this key, not `hidden_act`);
    /// only `gelu_pytorch_tanh` is built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_activation: Option<String>,
    /// Gemma: attention scores are scaled by `query_pre_attn_scalar^-0.5`
    /// instead of `head_dim^-0.5`. Kept as written: transformers wants an
    /// integer back in a merged `config.json`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query_pre_attn_scalar: Option<serde_json::Number>,
    /// Gemma: attention scores become `tanh(x / c) * c` before the mask.
    /// Outer `None`: the key is absent; `Some(None)`: it is `null` (off).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub attn_logit_softcapping: Option<Option<f64>>,
    /// Gemma: logits become `tanh(x / c) * c`; absent and `null` as above.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub final_logit_softcapping: Option<Option<f64>>,
    /// Gemma 3 (configs before `rope_parameters`): the RoPE base of the
    /// sliding-window layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_local_base_freq: Option<f64>,
    /// Gemma 3 (configs without `layer_types`): every `n`-th layer is full
    /// attention, the others slide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window_pattern: Option<usize>,
    /// The share of each head's width that RoPE rotates (Phi-3; transformers
    /// 5 writes it inside `rope_parameters`, where
    /// [`read_config`](super::read_config) reads it from); 1 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Gemma: attention without the causal mask; not built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_bidirectional_attention: Option<bool>,
}

/// One RoPE of `rope_parameters` (the whole map, or one layer type's
/// entry): its base when given, its scaling unless `default`.
pub(crate) fn rope_entry(
    v: &serde_json::Value,
) -> Result<(Option<f64>, Option<RopeScaling>), serde_json::Error> {
    #[derive(Deserialize)]
    struct Flat {
        rope_theta: Option<f64>,
        #[serde(flatten)]
        scaling: RopeScaling,
    }
    let flat: Flat = serde_json::from_value(v.clone())?;
    let scaling = (flat.scaling.kind() != "default").then_some(flat.scaling);
    Ok((flat.rope_theta, scaling))
}

/// Deserializes a key that may be `null` into `Some(None)`, so that with
/// `#[serde(default)]` an absent key (`None`) differs from a `null` one.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<f64>>, D::Error> {
    Option::<f64>::deserialize(d).map(Some)
}

/// The norms of a Llama block, in [`Block`] order: before attention,
/// before the MLP.
const LLAMA_NORMS: [&str; 2] = ["input_layernorm", "post_attention_layernorm"];

/// The norms of a Gemma block, in [`Block`] order: before attention, before
/// the MLP, after attention, after the MLP (Gemma's
/// `post_attention_layernorm` follows attention, unlike Llama's).
const GEMMA_NORMS: [&str; 4] = [
    "input_layernorm",
    "pre_feedforward_layernorm",
    "post_attention_layernorm",
    "post_feedforward_layernorm",
];

/// The MLP's activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (Llama, Mistral, Qwen, Phi-3).
    Silu,
    /// GELU, tanh approximation (`gelu_pytorch_tanh`, Gemma).
    GeluTanh,
}

impl LlamaConfig {
    /// A tiny Llama-shaped config for tests and examples: `layers` blocks,
    /// width `hidden` (4 heads, 2 KV heads), SwiGLU width `inter`, `vocab`
    /// tokens, untied embeddings.
    pub fn tiny(layers: usize, hidden: usize, inter: usize, vocab: usize) -> Self {
        Self {
            hidden_size: hidden,
            intermediate_size: inter,
            num_hidden_layers: layers,
            num_attention_heads: 4,
            num_key_value_heads: Some(2),
            vocab_size: vocab,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: false,
            head_dim: None,
            attention_bias: None,
            model_type: Some("llama".into()),
            max_position_embeddings: 2048,
            rope_parameters: None,
            sliding_window: None,
            use_sliding_window: None,
            layer_types: None,
            hidden_act: None,
            mlp_bias: None,
            hidden_activation: None,
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            rope_local_base_freq: None,
            sliding_window_pattern: None,
            use_bidirectional_attention: None,
            partial_rotary_factor: None,
        }
    }

    /// Whether this is a Gemma (`gemma2`, `gemma3_text`): scaled embeddings,
    /// `(1 + w)` norms, four norms per block, GELU.
    pub fn is_gemma(&self) -> bool {
        matches!(self.model_type.as_deref(), Some("gemma2" | "gemma3_text"))
    }

    /// The norm weights of a block under their HF names, in [`Block`]
    /// order.
    pub fn block_norm_names(&self) -> &'static [&'static str] {
        if self.is_gemma() {
            &GEMMA_NORMS
        } else {
            &LLAMA_NORMS
        }
    }

    /// The MLP's activation.
    pub fn activation(&self) -> Activation {
        if self.is_gemma() {
            Activation::GeluTanh
        } else {
            Activation::Silu
        }
    }

    /// The factor of attention scores: `query_pre_attn_scalar^-0.5` when
    /// given (Gemma), else `head_dim^-0.5`.
    pub fn attention_scale(&self) -> f64 {
        let d = self
            .query_pre_attn_scalar
            .as_ref()
            .and_then(serde_json::Number::as_f64)
            .unwrap_or(self.head_width() as f64);
        1.0 / d.sqrt()
    }

    /// The factor of the embeddings: `sqrt(hidden_size)` for Gemma.
    pub fn embed_scale(&self) -> Option<f64> {
        self.is_gemma().then(|| (self.hidden_size as f64).sqrt())
    }

    /// The sliding window of block `layer`, `None` for full attention:
    /// `layer_types` when given, else every block for a `sliding_window`
    /// (Qwen2 only with `use_sliding_window`).
    pub fn layer_window(&self, layer: usize) -> Option<usize> {
        let window = self.sliding_window?;
        match &self.layer_types {
            Some(types) => (types.get(layer).map(String::as_str) == Some("sliding_attention"))
                .then_some(window),
            None if matches!(self.model_type.as_deref(), Some("qwen2" | "qwen3")) => {
                (self.use_sliding_window == Some(true)).then_some(window)
            }
            None => Some(window),
        }
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head width.
    pub fn head_width(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v carry biases.
    pub fn has_qkv_bias(&self) -> bool {
        self.attention_bias
            .unwrap_or_else(|| self.model_type.as_deref() == Some("qwen2"))
    }

    /// Whether each head's queries and keys go through an RMSNorm of the
    /// head width before RoPE (Qwen3's `q_norm` and `k_norm`).
    pub fn has_qk_norm(&self) -> bool {
        matches!(self.model_type.as_deref(), Some("qwen3" | "gemma3_text"))
    }

    /// The linear layers of a block as the checkpoint stores them: fused
    /// q/k/v and gate/up for `phi3`, else one per target.
    pub fn projections(&self) -> &'static [Projection] {
        if self.model_type.as_deref() == Some("phi3") {
            &FUSED_PROJECTIONS
        } else {
            &SEPARATE_PROJECTIONS
        }
    }

    /// `(out, in)` of a projection: its targets' outputs added up.
    pub fn projection_dims(&self, p: &Projection) -> (usize, usize) {
        let out = p.targets.iter().map(|&t| self.linear_dims(t).0).sum();
        (out, self.linear_dims(p.targets[0]).1)
    }

    /// Whether `p` carries a bias: q/k/v (or fused qkv) with q/k/v biases.
    fn has_bias(&self, p: &Projection) -> bool {
        self.has_qkv_bias()
            && p.targets
                .iter()
                .all(|t| matches!(t, LoraTarget::Q | LoraTarget::K | LoraTarget::V))
    }

    /// The width RoPE rotates in each head: `head_dim` times
    /// `partial_rotary_factor`, rounded down as transformers does.
    pub fn rotary_dim(&self) -> usize {
        let d = self.head_width();
        match self.partial_rotary_factor {
            Some(f) => (d as f64 * f) as usize,
            None => d,
        }
    }

    /// `(out, in)` of a block's linear layer.
    pub fn linear_dims(&self, t: LoraTarget) -> (usize, usize) {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_width();
        let kv = self.kv_heads() * self.head_width();
        match t {
            LoraTarget::Q => (q, h),
            LoraTarget::K | LoraTarget::V => (kv, h),
            LoraTarget::O => (h, q),
            LoraTarget::Gate | LoraTarget::Up => (i, h),
            LoraTarget::Down => (h, i),
        }
    }

    /// Every tensor name of the HF checkpoint and its shape.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let mut v = vec![
            (
                "model.embed_tokens.weight".to_string(),
                vec![self.vocab_size, self.hidden_size],
            ),
            ("model.norm.weight".to_string(), vec![self.hidden_size]),
        ];
        if !self.tie_word_embeddings {
            v.push((
                "lm_head.weight".into(),
                vec![self.vocab_size, self.hidden_size],
            ));
        }
        for l in 0..self.num_hidden_layers {
            let p = format!("model.layers.{l}");
            for n in self.block_norm_names() {
                v.push((format!("{p}.{n}.weight"), vec![self.hidden_size]));
            }
            if self.has_qk_norm() {
                for n in QK_NORMS {
                    v.push((format!("{p}.{n}.weight"), vec![self.head_width()]));
                }
            }
            for proj in self.projections() {
                let (o, i) = self.projection_dims(proj);
                v.push((format!("{p}.{}.weight", proj.path), vec![o, i]));
                if self.has_bias(proj) {
                    v.push((format!("{p}.{}.bias", proj.path), vec![o]));
                }
            }
        }
        v
    }

    /// Random weights under HF names (seeded; see [`RandomWeights`]), all
    /// in memory, for tests and examples.
    pub fn random_weights(
        &self,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<HashMap<String, Tensor>> {
        let src = RandomWeights::new(self, seed, device);
        self.tensor_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let t = src.generate(&shape, &name)?.to_dtype(dtype)?;
                Ok((name, t))
            })
            .collect()
    }

    /// The kind of `rope_scaling` (`rope_type`, else `type`), when there
    /// is one.
    pub fn rope_scaling_kind(&self) -> Option<&str> {
        self.rope_scaling.as_ref().map(RopeScaling::kind)
    }

    /// RoPE inverse frequencies, with `rope_scaling` applied.
    pub fn rope_inv_freq(&self) -> Result<Vec<f64>, LoadError> {
        inv_freq(
            self.rotary_dim(),
            self.rope_theta,
            self.rope_scaling.as_ref(),
        )
    }

    /// The RoPE base and scaling of the sliding-window layers when they have
    /// their own (`gemma3_text`): `rope_parameters`' `sliding_attention`
    /// entry, else `rope_local_base_freq` (older configs). Derived from the
    /// config as read, so that it is saved and compared with it.
    pub fn sliding_rope(&self) -> Option<(f64, Option<RopeScaling>)> {
        if self.model_type.as_deref() != Some("gemma3_text") {
            return None;
        }
        let entry = self
            .rope_parameters
            .as_ref()
            .and_then(|p| p.get("sliding_attention"));
        match entry {
            Some(v) => match rope_entry(v).ok()? {
                (Some(theta), scaling) => Some((theta, scaling)),
                (None, _) => None,
            },
            None => self.rope_local_base_freq.map(|theta| (theta, None)),
        }
    }

    /// RoPE inverse frequencies of the sliding-window layers when they have
    /// their own RoPE (Gemma 3).
    pub fn sliding_rope_inv_freq(&self) -> Result<Option<Vec<f64>>, LoadError> {
        self.sliding_rope()
            .as_ref()
            .map(|(theta, s)| inv_freq(self.rotary_dim(), *theta, s.as_ref()))
            .transpose()
    }
}

/// RoPE inverse frequencies of a head width `d`, base `theta`, with
/// `scaling` applied.
fn inv_freq(d: usize, theta: f64, scaling: Option<&RopeScaling>) -> Result<Vec<f64>, LoadError> {
    let mut inv: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    if let Some(s) = scaling {
        match s.kind() {
            "default" => {}
            "linear" => inv.iter_mut().for_each(|f| *f /= s.factor),
            "llama3" => {
                let low = s.low_freq_factor.unwrap_or(1.0);
                let high = s.high_freq_factor.unwrap_or(4.0);
                let old = s.original_max_position_embeddings.unwrap_or(8192) as f64;
                let (low_wl, high_wl) = (old / low, old / high);
                for f in inv.iter_mut() {
                    let wl = 2.0 * std::f64::consts::PI / *f;
                    if wl > low_wl {
                        *f /= s.factor;
                    } else if wl >= high_wl {
                        let smooth = (old / wl - low) / (high - low);
                        *f = (1.0 - smooth) * *f / s.factor + smooth * *f;
                    }
                }
            }
            other => return Err(LoadError::UnsupportedRopeScaling(other.to_string())),
        }
    }
    Ok(inv)
}

/// A [`WeightSource`] that generates seeded random weights on demand, one
/// tensor at a time (normal-ish with std 0.02; norms near 1): benchmarks
/// measure memory without a whole f32 model held anywhere.
#[derive(Debug, Clone)]
pub struct RandomWeights {
    shapes: HashMap<String, Vec<usize>>,
    seed: u64,
    device: Device,
}

impl RandomWeights {
    /// Random weights for `config`.
    pub fn new(config: &LlamaConfig, seed: u64, device: &Device) -> Self {
        Self {
            shapes: config.tensor_shapes().into_iter().collect(),
            seed,
            device: device.clone(),
        }
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shapes.keys().cloned().collect();
        v.sort();
        v
    }

    /// The shape of tensor `name`.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.shapes.get(name).map(Vec::as_slice)
    }

    fn generate(&self, shape: &[usize], name: &str) -> candle_core::Result<Tensor> {
        use rand::Rng;
        // FNV-1a of the name: each tensor has its own stream.
        let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
        });
        let mut rng = StdRng::seed_from_u64(self.seed ^ h);
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        let data: Vec<f32> = (0..n)
            .map(|_| {
                // Sum of uniforms: cheap, roughly normal.
                let z: f32 = (0..4).map(|_| rng.random::<f32>() - 0.5).sum::<f32>() * 1.73;
                if norm { 1.0 + 0.1 * z } else { 0.02 * z }
            })
            .collect();
        Tensor::from_vec(data, shape, &self.device)
    }
}

impl WeightSource for RandomWeights {
    fn stored_dtype(&self, _name: &str) -> Result<DType, LoadError> {
        Ok(DType::F32)
    }

    fn tensor(&self, name: &str) -> Result<Tensor, LoadError> {
        match self.shapes.get(name) {
            Some(shape) => Ok(self.generate(shape, name)?),
            None => Err(LoadError::MissingTensor {
                name: name.to_string(),
                source_name: "random weights".into(),
            }),
        }
    }
}

/// How to build a [`LlamaModel`].
#[derive(Debug, Clone)]
pub struct ModelOptions {
    /// Storage of the frozen linear weights.
    pub storage: FrozenStorage,
    /// LoRA settings.
    pub lora: LoraConfig,
    /// Compute dtype of activations and adapters (`F32`; `F64` for checks).
    pub dtype: DType,
    /// Device.
    pub device: Device,
    /// Gradient checkpointing per block.
    pub checkpointing: bool,
    /// Store the embedding and the output head in `storage` too when it is
    /// a quantized one. Off (QLoRA's way, as bitsandbytes does it), they
    /// stay 16-bit: `f16` for a base stored as `f16`, else `bf16`.
    pub quantize_embeddings: bool,
    /// How the frozen matmuls (blocks and head) multiply `f32` activations
    /// on the CPU: `f32`, or `bf16` products with `f32` sums (AMX where the
    /// CPU has it; [`super::bf16_gemm`]).
    pub cpu_matmul: CpuMatmul,
}

impl Default for ModelOptions {
    /// NF4 frozen weights with 16-bit embedding and head,
    /// [`LoraConfig::default`], `f32`, CPU, no checkpointing.
    fn default() -> Self {
        Self {
            storage: FrozenStorage::Nf4,
            lora: LoraConfig::default(),
            dtype: DType::F32,
            device: Device::Cpu,
            checkpointing: false,
            quantize_embeddings: false,
            cpu_matmul: CpuMatmul::F32,
        }
    }
}

impl ModelOptions {
    /// The dtype of the adapters' trained values: the compute dtype, or
    /// `f32` under 16-bit compute (`f32` master weights; the forward casts
    /// them, and their gradients arrive in `f32`).
    pub fn master_dtype(&self) -> DType {
        match self.dtype {
            DType::BF16 | DType::F16 => DType::F32,
            dt => dt,
        }
    }

    /// The storage of the embedding and the output head, for a base whose
    /// embedding is stored as `stored`.
    pub fn embedding_storage(&self, stored: DType) -> FrozenStorage {
        match self.storage {
            // Dense storages: as the linears.
            FrozenStorage::F32 | FrozenStorage::PlainF32Matmul => self.storage,
            FrozenStorage::Bf16 | FrozenStorage::F16 => self.storage,
            // Candle's QMatMul would drop the head's input gradient.
            FrozenStorage::CandleQMatMulNoGrad if self.quantize_embeddings => FrozenStorage::F32,
            q if self.quantize_embeddings => q,
            _ if stored == DType::F16 => FrozenStorage::F16,
            _ => FrozenStorage::Bf16,
        }
    }
}

/// Per-forward constants a block needs (shared by the recomputation).
#[derive(Debug, Clone)]
pub(crate) struct BlockCtx {
    pub cos: Tensor,
    pub sin: Tensor,
    /// Additive mask `(b, 1, t, t)`.
    pub mask: Tensor,
    /// The same for sliding-window blocks, when the model has any.
    pub window_mask: Option<Tensor>,
    /// RoPE's `(cos, sin)` of sliding-window blocks when they have their own
    /// (Gemma 3).
    pub sliding_rope: Option<(Tensor, Tensor)>,
    /// `(p, seed)` of the LoRA dropout, in training.
    pub dropout: Option<(f32, u64)>,
}

/// The per-head norms of queries and keys (Qwen3, Gemma 3), under `self_attn`.
const QK_NORMS: [&str; 2] = ["self_attn.q_norm", "self_attn.k_norm"];

/// The additive mask's value for a key a query may not see. Large and
/// finite: a fully masked row (a left-padding query) stays NaN-free; the
/// loss ignores it.
const MASKED: f32 = -1e9;

/// One block's keys and values of the tokens seen so far, `(b, kv_heads,
/// len, head_dim)`, keys after RoPE: Candle's own cache, which writes each
/// new position in place into storage grown a chunk at a time.
#[derive(Debug, Clone)]
pub struct LayerCache(candle_nn::kv_cache::KvCache);

impl LayerCache {
    /// Appends `k` and `v` (the new tokens') and returns all keys and values.
    fn append(&mut self, k: Tensor, v: Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        self.0.append(&k.contiguous()?, &v.contiguous()?)
    }
}

/// The keys and values of every block for the tokens a sequence has seen
/// ([`LlamaModel::forward_cached`]): a prompt is read once, then each new
/// token costs one position instead of the whole sequence again.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
}

impl KvCache {
    /// An empty cache for `config`'s blocks. Its storage grows
    /// `trainer.kv_cache_chunk` positions at a time (`tables/defaults.toml`).
    pub fn new(config: &LlamaConfig) -> Self {
        let chunk = crate::tables::trainer::KV_CACHE_CHUNK as usize;
        Self {
            layers: (0..config.num_hidden_layers)
                .map(|_| LayerCache(candle_nn::kv_cache::KvCache::new(2, chunk)))
                .collect(),
            len: 0,
        }
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no token is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An RMSNorm weight as stored, and the factor it applies: the weight
/// itself, or `1 + w` for Gemma (whose checkpoints store `w` near 0).
#[derive(Debug, Clone)]
struct Norm {
    stored: Tensor,
    factor: Tensor,
}

impl Norm {
    fn new(stored: Tensor, plus_one: bool) -> candle_core::Result<Self> {
        let factor = if plus_one {
            (&stored + 1.0)?
        } else {
            stored.clone()
        };
        Ok(Self { stored, factor })
    }

    fn forward(&self, x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        // One fused graph node in f32/f64 on the CPU (src/qlora/fused.rs).
        fused::rms_norm(x, &self.factor, eps)
    }
}

/// `tanh(x / cap) * cap` (Gemma's soft-capping), or `x` without a cap.
fn soft_cap(x: Tensor, cap: Option<f64>) -> candle_core::Result<Tensor> {
    match cap {
        Some(c) => (x / c)?.tanh()? * c,
        None => Ok(x),
    }
}

/// One decoder block.
#[derive(Debug, Clone)]
pub struct Block {
    index: usize,
    /// In [`LlamaConfig::block_norm_names`] order: before attention, before
    /// the MLP, then (Gemma) after attention and after the MLP.
    norms: Vec<Norm>,
    /// In [`LlamaConfig::projections`] order.
    linears: Vec<LoraLinear>,
    /// Phi-3: `linears` are `qkv_proj`, `o_proj`, `gate_up_proj`,
    /// `down_proj` ([`FUSED_PROJECTIONS`]).
    fused: bool,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    /// Attends through [`BlockCtx::window_mask`] (a sliding-window block).
    sliding: bool,
    /// Qwen3, Gemma 3: RMSNorm weights `(head_dim)` of queries and keys
    /// per head.
    qk_norm: Option<[Norm; 2]>,
    act: Activation,
    /// Factor of the attention scores.
    scale: f64,
    /// Gemma 2: soft cap of the attention scores.
    softcap: Option<f64>,
}

impl Block {
    /// Index of the block in the model.
    pub fn index(&self) -> usize {
        self.index
    }

    /// The block's linear layers in [`LlamaConfig::projections`] order.
    pub fn linears(&self) -> &[LoraLinear] {
        &self.linears
    }

    /// The adapters' `Var`s as tensors, `[A, B]` per adapted target.
    pub(crate) fn adapter_tensors(&self) -> Vec<Tensor> {
        self.linears
            .iter()
            .filter_map(|l| l.adapter())
            .flat_map(|a| [a.a.as_tensor().clone(), a.b.as_tensor().clone()])
            .collect()
    }

    /// Forward with explicit adapter tensors (as [`Self::adapter_tensors`];
    /// none: the frozen base alone). With `cache`, the block's keys and
    /// values extend the cached ones and queries attend to both (`ctx`'s
    /// RoPE tables and mask then start at the cache's length).
    pub(crate) fn forward_with(
        &self,
        x: &Tensor,
        params: &[Tensor],
        ctx: &BlockCtx,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let mut params = params.chunks(2);
        let mut lin = |i: usize, h: &Tensor| -> candle_core::Result<Tensor> {
            let ab = if self.linears[i].adapter().is_some() {
                params.next().map(|p| (&p[0], &p[1]))
            } else {
                None
            };
            self.linear(i, h, ab, ctx)
        };
        let h = self.norms[0].forward(x, self.eps)?;
        let (q, k, v) = if self.fused {
            let qkv = lin(0, &h)?;
            let (nq, nkv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
            (
                qkv.narrow(D::Minus1, 0, nq)?,
                qkv.narrow(D::Minus1, nq, nkv)?,
                qkv.narrow(D::Minus1, nq + nkv, nkv)?,
            )
        } else {
            (lin(0, &h)?, lin(1, &h)?, lin(2, &h)?)
        };
        let heads = |y: Tensor, n: usize| {
            y.reshape((b, t, n, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (
            heads(q, self.heads)?,
            heads(k, self.kv_heads)?,
            heads(v, self.kv_heads)?,
        );
        let o = self.attend(q, k, v, ctx, cache)?;
        // o, then the MLP: separate (3; 4, 5; 6) or fused (1; 2; 3).
        let o_at = if self.fused { 1 } else { 3 };
        let x = (x + self.post_norm(0, lin(o_at, &o)?)?)?;
        let h = self.norms[1].forward(&x, self.eps)?;
        let (gate, up) = if self.fused {
            let gu = lin(2, &h)?;
            let i = gu.dim(D::Minus1)? / 2;
            (gu.narrow(D::Minus1, 0, i)?, gu.narrow(D::Minus1, i, i)?)
        } else {
            (lin(4, &h)?, lin(5, &h)?)
        };
        let down = lin(self.linears.len() - 1, &fused::gated(&gate, &up, self.act)?)?;
        x + self.post_norm(1, down)?
    }

    /// The `i`-th linear of `h` with adapter tensors `ab` and, in training,
    /// a LoRA dropout mask seeded by the block, the linear and `ctx`.
    fn linear(
        &self,
        i: usize,
        h: &Tensor,
        ab: Option<(&Tensor, &Tensor)>,
        ctx: &BlockCtx,
    ) -> candle_core::Result<Tensor> {
        let mask = match ctx.dropout {
            Some((p, seed)) if p > 0.0 && ab.is_some() => {
                let seed = seed
                    ^ ((self.index as u64) << 8 | i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                Some(dropout_mask(h.dims(), p, seed, h.dtype(), h.device())?)
            }
            _ => None,
        };
        self.linears[i].forward_with(h, ab, mask.as_ref())
    }

    /// Attention of queries `q` and keys and values `k`, `v` `(b, heads,
    /// t, head_dim)` before the q/k norms and RoPE, over the cached keys and
    /// values too (which `k`, `v` extend): `(b, t, heads * head_dim)`.
    fn attend(
        &self,
        mut q: Tensor,
        mut k: Tensor,
        v: Tensor,
        ctx: &BlockCtx,
        cache: Option<&mut LayerCache>,
    ) -> candle_core::Result<Tensor> {
        let (b, _, t, _) = q.dims4()?;
        if let Some([qn, kn]) = &self.qk_norm {
            q = qn.forward(&q, self.eps)?;
            k = kn.forward(&k, self.eps)?;
        }
        let (cos, sin) = match (&ctx.sliding_rope, self.sliding) {
            (Some((c, s)), true) => (c, s),
            _ => (&ctx.cos, &ctx.sin),
        };
        let (q, k) = (fused::rope(&q, cos, sin)?, fused::rope(&k, cos, sin)?);
        let (k, v) = match cache {
            Some(c) => c.append(k, v)?,
            None => (k, v),
        };
        let mask = match (&ctx.window_mask, self.sliding) {
            (Some(w), true) => w,
            _ => &ctx.mask,
        };
        let a = Attention {
            scale: self.scale,
            softcap: self.softcap,
        };
        attention(&q, &k, &v, mask, a)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b, t, self.heads * self.head_dim))
    }

    /// `y` through the block's `i`-th norm after a sublayer (Gemma's
    /// post-attention and post-MLP norms), or `y` when it has none.
    fn post_norm(&self, i: usize, y: Tensor) -> candle_core::Result<Tensor> {
        match self.norms.get(2 + i) {
            Some(n) => n.forward(&y, self.eps),
            None => Ok(y),
        }
    }
}

/// A Llama-family causal LM with frozen weights and LoRA adapters.
pub struct LlamaModel {
    config: LlamaConfig,
    options: ModelOptions,
    embed: Arc<FrozenWeight>,
    blocks: Vec<Arc<Block>>,
    norm: Norm,
    lm_head: FrozenLinear,
    varmap: VarMap,
    inv_freq: Vec<f64>,
    /// RoPE of the sliding-window blocks when they have their own (Gemma 3).
    sliding_inv_freq: Option<Vec<f64>>,
}

impl std::fmt::Debug for LlamaModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlamaModel")
            .field("config", &self.config)
            .field("options", &self.options)
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

/// Reads a model's weights by HF name, checking each shape against the
/// config's, into frozen weights, norms and blocks.
struct Loader<'a> {
    config: &'a LlamaConfig,
    weights: &'a dyn WeightSource,
    options: &'a ModelOptions,
    expected: HashMap<String, Vec<usize>>,
}

impl Loader<'_> {
    /// The tensor `name`, dense (`f64` for an `f64` model, else `f32`: the
    /// quantized storages take `f32`), on the model's device.
    fn get(&self, name: &str) -> Result<Tensor, LoadError> {
        Ok(self.get_on_host(name)?.to_device(&self.options.device)?)
    }

    /// [`Self::get`] on the CPU: one tensor at a time is read, widened and
    /// quantized on the host, then moved.
    fn get_on_host(&self, name: &str) -> Result<Tensor, LoadError> {
        let t = self.weights.tensor(name)?;
        if let Some(shape) = self.expected.get(name)
            && t.dims() != shape.as_slice()
        {
            return Err(LoadError::Shape {
                name: name.to_string(),
                expected: shape.clone(),
                found: t.dims().to_vec(),
            });
        }
        let dt = match self.options.dtype {
            DType::F64 => DType::F64,
            _ => DType::F32,
        };
        Ok(t.to_dtype(dt)?)
    }

    /// The frozen weight `name` in storage `s`, quantized on the host and
    /// then moved to the model's device (NF4 moves as codes and scales).
    fn frozen(&self, name: &str, s: FrozenStorage) -> Result<FrozenWeight, LoadError> {
        let t = self.get_on_host(name)?;
        FrozenWeight::new(&t, s)
            .and_then(|w| w.to_device(&self.options.device))
            .map_err(|source| LoadError::Frozen {
                name: name.to_string(),
                source,
            })
    }

    /// A norm weight in the compute dtype (Gemma's applying `1 + w`).
    fn norm(&self, name: &str) -> Result<Norm, LoadError> {
        let w = self.get(name)?.to_dtype(self.options.dtype)?;
        Ok(Norm::new(w, self.config.is_gemma())?)
    }

    /// Block `l`: its projections (with adapters, registered in `varmap`
    /// under PEFT's names), norms and attention settings.
    fn block(&self, l: usize, rng: &mut StdRng, varmap: &VarMap) -> Result<Block, LoadError> {
        let (config, p) = (self.config, format!("model.layers.{l}"));
        let linears = config
            .projections()
            .iter()
            .map(|proj| self.projection(l, proj, rng, varmap))
            .collect::<Result<_, _>>()?;
        let qk_norm = if config.has_qk_norm() {
            let norm = |n: &str| self.norm(&format!("{p}.{n}.weight"));
            Some([norm(QK_NORMS[0])?, norm(QK_NORMS[1])?])
        } else {
            None
        };
        Ok(Block {
            index: l,
            norms: config
                .block_norm_names()
                .iter()
                .map(|n| self.norm(&format!("{p}.{n}.weight")))
                .collect::<Result<_, _>>()?,
            linears,
            fused: config.projections().len() == FUSED_PROJECTIONS.len(),
            heads: config.num_attention_heads,
            kv_heads: config.kv_heads(),
            head_dim: config.head_width(),
            eps: config.rms_norm_eps,
            sliding: config.layer_window(l).is_some(),
            qk_norm,
            act: config.activation(),
            scale: config.attention_scale(),
            softcap: config.attn_logit_softcapping.flatten(),
        })
    }

    /// The projection `proj` of block `l`: frozen weight, bias, adapter.
    fn projection(
        &self,
        l: usize,
        proj: &Projection,
        rng: &mut StdRng,
        varmap: &VarMap,
    ) -> Result<LoraLinear, LoadError> {
        let (config, opts, lora) = (self.config, self.options, &self.options.lora);
        let name = |what: &str| format!("model.layers.{l}.{}.{what}", proj.path);
        let weight = self.frozen(&name("weight"), opts.storage)?;
        let base = FrozenLinear::from_weight(Arc::new(weight), opts.storage)
            .with_cpu_matmul(opts.cpu_matmul);
        let bias = if config.has_bias(proj) {
            Some(self.get(&name("bias"))?.to_dtype(opts.dtype)?)
        } else {
            None
        };
        let n = config.num_hidden_layers;
        let adapter = if lora.targets_projection(proj) && lora.adapts_layer(l, n) && lora.rank > 0 {
            let (o, i) = config.projection_dims(proj);
            let ad = LoraAdapter::init(lora.rank, i, o, opts.master_dtype(), &opts.device, rng)?;
            let mut data = varmap.data().lock().map_err(|_| LoadError::Poisoned)?;
            data.insert(peft_key(l, proj.path, 'A'), ad.a.clone());
            data.insert(peft_key(l, proj.path, 'B'), ad.b.clone());
            Some(ad)
        } else {
            None
        };
        Ok(LoraLinear::new(base, bias, adapter, lora.scale()))
    }
}

impl LlamaModel {
    /// Builds the model from `config` and a weights source (in-memory map or
    /// a local HF directory), quantizing each frozen weight as it is read.
    pub fn new(
        config: &LlamaConfig,
        weights: &dyn WeightSource,
        options: &ModelOptions,
    ) -> Result<Self, LoadError> {
        let ld = Loader {
            config,
            weights,
            options,
            expected: config.tensor_shapes().into_iter().collect(),
        };
        let hs = options.embedding_storage(weights.stored_dtype("model.embed_tokens.weight")?);
        let embed = Arc::new(ld.frozen("model.embed_tokens.weight", hs)?);
        let lm_head = if config.tie_word_embeddings {
            FrozenLinear::from_weight(embed.clone(), hs)
        } else {
            FrozenLinear::from_weight(Arc::new(ld.frozen("lm_head.weight", hs)?), hs)
        }
        .with_cpu_matmul(options.cpu_matmul);
        let norm = ld.norm("model.norm.weight")?;
        let mut rng = StdRng::seed_from_u64(options.lora.seed);
        let varmap = VarMap::new();
        let blocks = (0..config.num_hidden_layers)
            .map(|l| Ok(Arc::new(ld.block(l, &mut rng, &varmap)?)))
            .collect::<Result<_, LoadError>>()?;
        Ok(Self {
            config: config.clone(),
            options: options.clone(),
            embed,
            blocks,
            norm,
            lm_head,
            varmap,
            inv_freq: config.rope_inv_freq()?,
            sliding_inv_freq: config.sliding_rope_inv_freq()?,
        })
    }

    /// The device of activations and adapters.
    pub fn device(&self) -> &Device {
        &self.options.device
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// The blocks.
    pub fn blocks(&self) -> &[Arc<Block>] {
        &self.blocks
    }

    /// The trainable adapters, under PEFT names
    /// (`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`).
    pub fn varmap(&self) -> &VarMap {
        &self.varmap
    }

    /// The trainable `Var`s, sorted by PEFT name.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        let data = self.varmap.data().lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<(String, Var)> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Switches gradient checkpointing per block.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.options.checkpointing = on;
    }

    /// Whether gradient checkpointing is on.
    pub fn checkpointing(&self) -> bool {
        self.options.checkpointing
    }

    /// Bytes of frozen weight storage (linears, embeddings, head).
    pub fn frozen_bytes(&self) -> usize {
        let head = if self.config.tie_word_embeddings {
            0
        } else {
            self.lm_head.weight().size_bytes()
        };
        self.embed.size_bytes()
            + head
            + self
                .blocks
                .iter()
                .flat_map(|b| b.linears.iter())
                .map(|l| l.base().weight().size_bytes())
                .sum::<usize>()
    }

    /// Every frozen weight, dequantized to dense `f32`, under its HF name (a
    /// merged adapter is included in its base). Building a model with
    /// [`FrozenStorage::F32`] from these reproduces this model's forward.
    pub fn dequantized_weights(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        self.config
            .tensor_shapes()
            .into_iter()
            .map(|(name, _)| Ok((name.clone(), self.frozen_tensor(&name, false)?)))
            .collect()
    }

    /// One frozen tensor (HF name, as in [`LlamaConfig::tensor_shapes`])
    /// as dense `f32`, with its adapter merged in when it has one: `W + s ·
    /// B A` over the stored (for NF4, dequantized) `W`. Only this tensor is
    /// made dense, so a merge can write a model tensor by tensor.
    pub fn merged_tensor(&self, name: &str) -> candle_core::Result<Tensor> {
        self.frozen_tensor(name, true)
    }

    /// [`Self::merged_tensor`]; without `with_adapter`, the stored weight
    /// alone (which holds the adapter after [`Self::merge_adapters`]).
    fn frozen_tensor(&self, name: &str, with_adapter: bool) -> candle_core::Result<Tensor> {
        let dev = &self.options.device;
        let f32 = |t: &Tensor| t.to_dtype(DType::F32);
        match name {
            "model.embed_tokens.weight" => return self.embed.dequantize(DType::F32, dev),
            "lm_head.weight" if !self.config.tie_word_embeddings => {
                return self.lm_head.weight().dequantize(DType::F32, dev);
            }
            // Norms as stored (Gemma's `w`, not `1 + w`).
            "model.norm.weight" => return f32(&self.norm.stored),
            _ => {}
        }
        let block = name
            .strip_prefix("model.layers.")
            .and_then(|r| r.split_once('.'))
            .and_then(|(l, rest)| Some((self.blocks.get(l.parse::<usize>().ok()?)?, rest)));
        let Some((b, rest)) = block else {
            candle_core::bail!("the model has no frozen tensor {name}");
        };
        let norms = self.config.block_norm_names().iter().zip(&b.norms);
        let qk_norms = b.qk_norm.iter().flat_map(|n| QK_NORMS.iter().zip(n));
        for (n, w) in norms.chain(qk_norms) {
            if rest.strip_suffix(".weight") == Some(n) {
                return f32(&w.stored);
            }
        }
        for (proj, l) in self.config.projections().iter().zip(&b.linears) {
            let Some(tail) = rest.strip_prefix(proj.path) else {
                continue;
            };
            match (tail, l.bias()) {
                (".weight", _) if with_adapter => return l.merged_weight(),
                (".weight", _) => return l.base().weight().dequantize(DType::F32, dev),
                (".bias", Some(bias)) => return f32(bias),
                _ => {}
            }
        }
        candle_core::bail!("the model has no frozen tensor {name}")
    }

    /// Merges every adapter into a dequantized `f32` base (inference).
    pub fn merge_adapters(&mut self) -> candle_core::Result<()> {
        for b in &mut self.blocks {
            for l in &mut Arc::make_mut(b).linears {
                l.merge()?;
            }
        }
        Ok(())
    }

    /// Undoes [`Self::merge_adapters`].
    pub fn unmerge_adapters(&mut self) -> candle_core::Result<()> {
        for b in &mut self.blocks {
            for l in &mut Arc::make_mut(b).linears {
                l.unmerge()?;
            }
        }
        Ok(())
    }

    /// RoPE's cos and sin `(t, head_dim / 2)` of inverse frequencies
    /// `inv_freq` for positions `start..start + t`.
    fn rope_tables(
        &self,
        inv_freq: &[f64],
        start: usize,
        t: usize,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(t * half);
        let mut sin = Vec::with_capacity(t * half);
        for p in start..start + t {
            for f in inv_freq {
                let a = p as f64 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        let dev = &self.options.device;
        let dt = self.options.dtype;
        Ok((
            Tensor::from_vec(cos, (t, half), dev)?.to_dtype(dt)?,
            Tensor::from_vec(sin, (t, half), dev)?.to_dtype(dt)?,
        ))
    }

    /// The sliding window of the model's sliding-window blocks, when it has
    /// any and the window is shorter than `t` tokens (else it changes nothing).
    fn sliding_window(&self, t: usize) -> Option<usize> {
        let w = self.config.sliding_window?;
        let any = self.blocks.iter().any(|b| b.sliding);
        (any && w < t).then_some(w)
    }

    /// Additive causal + padding mask `(b, 1, t, past + t)` for `t` new
    /// tokens after `past` cached ones, from an optional `(b, past + t)`
    /// attention mask (1 = token, 0 = padding); with a `window`, a query sees
    /// only the `window` latest keys, itself included.
    fn additive_mask(
        &self,
        b: usize,
        (past, t): (usize, usize),
        attention_mask: Option<&Tensor>,
        window: Option<usize>,
    ) -> candle_core::Result<Tensor> {
        let keys = past + t;
        let pad: Vec<Vec<f32>> = match attention_mask {
            Some(m) => m.to_dtype(DType::F32)?.to_vec2()?,
            None => vec![vec![1.0; keys]; b],
        };
        if pad.len() != b || pad.iter().any(|r| r.len() != keys) {
            candle_core::bail!("attention mask must have shape ({b}, {keys})");
        }
        let mut m = Vec::with_capacity(b * t * keys);
        for row in &pad {
            for i in past..keys {
                for (j, &keep) in row.iter().enumerate() {
                    let seen = j <= i && window.is_none_or(|w| i - j < w);
                    m.push(if seen && keep > 0.5 { 0.0 } else { MASKED });
                }
            }
        }
        Tensor::from_vec(m, (b, 1, t, keys), &self.options.device)?.to_dtype(self.options.dtype)
    }

    /// What every block needs for `t` new tokens after `past` cached ones:
    /// RoPE tables from position `past`, the masks, the dropout.
    fn block_ctx(
        &self,
        b: usize,
        (past, t): (usize, usize),
        attention_mask: Option<&Tensor>,
        dropout: Option<(f32, u64)>,
    ) -> candle_core::Result<BlockCtx> {
        let (cos, sin) = self.rope_tables(&self.inv_freq, past, t)?;
        let sliding_rope = match &self.sliding_inv_freq {
            Some(inv) => Some(self.rope_tables(inv, past, t)?),
            None => None,
        };
        let window_mask = match self.sliding_window(past + t) {
            Some(w) => Some(self.additive_mask(b, (past, t), attention_mask, Some(w))?),
            None => None,
        };
        Ok(BlockCtx {
            cos,
            sin,
            mask: self.additive_mask(b, (past, t), attention_mask, None)?,
            window_mask,
            sliding_rope,
            dropout,
        })
    }

    /// The embeddings `(b, t, hidden)` of `ids`.
    /// Gemma scales them by `sqrt(hidden_size)`.
    fn embed_ids(&self, ids: &[u32], (b, t): (usize, usize)) -> candle_core::Result<Tensor> {
        let x = self
            .embed
            .rows(ids, self.options.dtype, &self.options.device)?
            .reshape((b, t, self.config.hidden_size))?;
        match self.config.embed_scale() {
            Some(s) => x * s,
            None => Ok(x),
        }
    }

    /// The final norm and the head: logits of the last hidden states
    /// (soft-capped for Gemma 2).
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.norm.forward(x, self.config.rms_norm_eps)?;
        soft_cap(
            self.lm_head.forward(&x)?,
            self.config.final_logit_softcapping.flatten(),
        )
    }

    /// Logits `(b, t, vocab)` for `input_ids` `(b, t)` (`u32`).
    /// `attention_mask` `(b, t)` marks real tokens (1) and padding (0).
    /// `dropout_seed` turns LoRA dropout on (training) with masks derived
    /// from that seed; `None` is evaluation.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        dropout_seed: Option<u64>,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids: Vec<u32> = input_ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        let mut x = self.embed_ids(&ids, (b, t))?;
        let dropout = dropout_seed.map(|s| (self.options.lora.dropout, s));
        let ctx = self.block_ctx(b, (0, t), attention_mask, dropout)?;
        for block in &self.blocks {
            x = if self.options.checkpointing {
                CheckpointOp::apply(block.clone(), ctx.clone(), &x)?
            } else {
                block.forward_with(&x, &block.adapter_tensors(), &ctx, None)?
            };
        }
        self.head(&x)
    }

    /// Logits `(b, t, vocab)` as [`Self::forward`] in evaluation, without
    /// recording a graph (the adapters enter as detached tensors) and with
    /// the adapters only when `adapters` (else the frozen base alone).
    pub fn forward_no_grad(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        adapters: bool,
    ) -> candle_core::Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let ids: Vec<u32> = input_ids.to_dtype(DType::U32)?.flatten_all()?.to_vec1()?;
        let ctx = self.block_ctx(b, (0, t), attention_mask, None)?;
        self.run_no_grad(&ids, (b, t), &ctx, adapters, None)
    }

    /// Logits `(1, t, vocab)` of `ids`, one sequence continuing the tokens
    /// in `cache` (positions `cache.len()..`), which it extends: a prompt
    /// once, then one token per call. Equal to the logits of the same
    /// positions in [`Self::forward_no_grad`] of the whole sequence. No
    /// graph is recorded; `adapters` as there.
    pub fn forward_cached(
        &self,
        ids: &[u32],
        cache: &mut KvCache,
        adapters: bool,
    ) -> candle_core::Result<Tensor> {
        if cache.layers.len() != self.blocks.len() {
            candle_core::bail!(
                "KV cache of {} blocks for a model of {}",
                cache.layers.len(),
                self.blocks.len()
            );
        }
        let (past, t) = (cache.len, ids.len());
        let ctx = self.block_ctx(1, (past, t), None, None)?;
        let logits = self.run_no_grad(ids, (1, t), &ctx, adapters, Some(&mut cache.layers))?;
        cache.len += t;
        Ok(logits)
    }

    /// Embedding, blocks, norm and head of `ids` `(b, t)`, with detached
    /// adapter tensors (none without `adapters`) and optional block caches.
    fn run_no_grad(
        &self,
        ids: &[u32],
        (b, t): (usize, usize),
        ctx: &BlockCtx,
        adapters: bool,
        mut caches: Option<&mut [LayerCache]>,
    ) -> candle_core::Result<Tensor> {
        let mut x = self.embed_ids(ids, (b, t))?;
        for (i, block) in self.blocks.iter().enumerate() {
            let params: Vec<Tensor> = if adapters {
                block.adapter_tensors().iter().map(Tensor::detach).collect()
            } else {
                Vec::new()
            };
            let cache = caches.as_deref_mut().map(|c| &mut c[i]);
            x = block.forward_with(&x, &params, ctx, cache)?;
        }
        self.head(&x)
    }
}
