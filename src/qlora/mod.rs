//! The QLoRA core on Candle: NF4 frozen weights, a gradient-correct frozen
//! linear op, LoRA adapters (fused into one op with the frozen matmul), Llama-family blocks, gradient checkpointing and
//! the masked causal-LM loss.
//!
//! Build a model from a config and a weights source, train the `Var`s of
//! [`LlamaModel::varmap`] (PEFT names), nothing else:
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use qlora_scale::qlora::{LlamaConfig, LlamaModel, ModelOptions, loss};
//! let cfg = LlamaConfig::tiny(2, 64, 128, 32);
//! let w = cfg.random_weights(1, DType::F32, &Device::Cpu).unwrap();
//! let model = LlamaModel::new(&cfg, &w, &ModelOptions::default()).unwrap();
//! let ids = Tensor::new(&[[1u32, 5, 7, 2]], &Device::Cpu).unwrap();
//! let mask = loss::loss_mask(&[vec![1, 1, 1, 1]], None).unwrap();
//! let l = loss::masked_causal_lm_loss(&model.forward(&ids, None, None).unwrap(), &ids, &mask).unwrap();
//! let grads = l.backward().unwrap();
//! let (name, var) = &model.trainable_vars()[0];
//! assert!(name.starts_with("base_model.model.model.layers.0."));
//! assert!(grads.get(var.as_tensor()).is_some());
//! ```

pub mod attention;
pub mod bf16_gemm;
pub mod buf;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub mod frozen;
pub mod fused;
#[cfg(feature = "cuda")]
mod gpu_ops;
pub mod kernel;
pub mod llama;
pub mod load;
pub mod lora;
pub mod lora_op;
pub mod loss;
pub mod nf4;
pub mod nf4_device;
pub mod recompute;
pub mod skinny;
pub mod softmax;
pub mod vmath;

pub use frozen::{FrozenLinear, FrozenStorage, FrozenWeight};
pub use llama::{KvCache, LlamaConfig, LlamaModel, ModelOptions, RandomWeights};
pub use load::{
    LoadError, SafetensorsDir, WeightSource, config_from_json, read_config, read_config_json,
};
pub use lora::{LoraConfig, LoraTarget};
pub use nf4::Nf4Tensor;
