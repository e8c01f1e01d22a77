//! Building the model a run trains: the embedded one or a local Hugging Face
//! directory; exporting and reloading its adapter (merging it is
//! [`super::merge`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::device::Compute;
use super::spec::{RunSpec, Weights};
use super::tokenizer::{Tokenizer, TokenizerError};
use crate::qlora::load::validate_config;
use crate::qlora::lora::LoraConfig;
use crate::qlora::{
    FrozenStorage, LlamaConfig, LlamaModel, LoadError, ModelOptions, RandomWeights, SafetensorsDir,
    WeightSource, read_config,
};
use crate::safe_io::write_atomic;
use crate::tables::embedded;

/// The adapter's weights in a run's output directory (PEFT's name).
pub const ADAPTER_WEIGHTS: &str = "adapter_model.safetensors";
/// The adapter's configuration in a run's output directory (PEFT's name).
pub const ADAPTER_CONFIG: &str = "adapter_config.json";

/// What `base_model_name_or_path` says for the embedded model.
pub const EMBEDDED_BASE_NAME: &str = "qlora-scale/embedded";

/// Errors building or exporting a model. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Loading the weights or config failed.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The tokenizer failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// The model is a name, not a local directory.
    #[error(
        "model {0} is not a local directory: the trainer never downloads; pass --model with a local Hugging Face directory (config.json, *.safetensors, tokenizer.json), or no --model for the embedded model"
    )]
    NotLocal(String),
    /// Files disagree.
    #[error("{path}: {message}")]
    Inconsistent {
        /// The file.
        path: PathBuf,
        /// What disagrees.
        message: String,
    },
    /// An adapter does not fit the model.
    #[error("{path}: {message}")]
    Adapter {
        /// The file.
        path: PathBuf,
        /// What does not fit.
        message: String,
    },
    /// A file could not be written (or encoded).
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A file could not be read (or decoded).
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A run directory without a checkpoint (which names the base).
    #[error(
        "no checkpoint in {}: --run-dir must be a train --output-dir that trained at least one checkpoint",
        .0.display()
    )]
    NoCheckpoint(PathBuf),
    /// The newest checkpoint cannot be read.
    #[error(transparent)]
    Checkpoint(#[from] super::checkpoint::CheckpointError),
    /// One tensor of a merge could not be made.
    #[error("merging tensor {name}")]
    MergeTensor {
        /// The tensor.
        name: String,
        /// Why.
        source: Box<ModelError>,
    },
    /// A Candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The spec of the run in `run_dir`, from its newest checkpoint, which
/// holds it: what `train merge`, `generate` and `eval` rebuild the base from.
pub fn run_spec(run_dir: &Path) -> Result<RunSpec, ModelError> {
    let dir = run_dir.join(super::trainer::CHECKPOINT_DIR);
    let list = super::checkpoint::list(&dir);
    let mut newest_error = None;
    // The newest checkpoint that loads: a corrupt newest one (a crash while
    // it was written) does not hide the run.
    for (_, path) in list.iter().rev() {
        match super::checkpoint::load(path) {
            Ok(ck) => return Ok(ck.state.spec),
            Err(e) => {
                newest_error.get_or_insert(e);
            }
        }
    }
    Err(match newest_error {
        Some(e) => e.into(),
        None => ModelError::NoCheckpoint(dir),
    })
}

/// The embedded model's config (`tables/defaults.toml`, `[embedded]`).
pub fn embedded_config() -> LlamaConfig {
    let mut c = LlamaConfig::tiny(
        embedded::NUM_LAYERS as usize,
        embedded::HIDDEN_SIZE as usize,
        embedded::INTERMEDIATE_SIZE as usize,
        embedded::VOCAB_SIZE as usize,
    );
    c.num_attention_heads = embedded::NUM_ATTENTION_HEADS as usize;
    c.num_key_value_heads = Some(embedded::NUM_KEY_VALUE_HEADS as usize);
    c.max_position_embeddings = embedded::SEQ_LEN.max(2048) as usize;
    c
}

/// The LoRA settings of a run for a model of `num_layers` blocks.
pub fn lora_config(spec: &RunSpec, num_layers: usize) -> LoraConfig {
    LoraConfig {
        rank: spec.settings.lora_rank as usize,
        alpha: spec.settings.lora_alpha,
        dropout: spec.settings.lora_dropout as f32,
        targets: spec.settings.lora_targets.0.clone(),
        last_layers: Some((spec.settings.lora_layers as usize).min(num_layers)),
        use_rslora: false,
        seed: spec.settings.seed,
    }
}

/// Builds the model (NF4 frozen base, LoRA adapters) and its tokenizer.
pub fn build(spec: &RunSpec) -> Result<(LlamaModel, Tokenizer), ModelError> {
    build_with(spec, FrozenStorage::Nf4)
}

/// [`build`] with another frozen storage.
pub fn build_with(
    spec: &RunSpec,
    storage: FrozenStorage,
) -> Result<(LlamaModel, Tokenizer), ModelError> {
    build_on(spec, &Compute::cpu(), storage)
}

/// [`build_with`] on a device and compute dtype (`f32` adapters under a
/// 16-bit one): frozen weights are read and quantized on the host one at a
/// time and moved to the device as they are done.
pub fn build_on(
    spec: &RunSpec,
    compute: &Compute,
    storage: FrozenStorage,
) -> Result<(LlamaModel, Tokenizer), ModelError> {
    let (c, base) = open_base(spec)?;
    let tok = match &base {
        BaseWeights::Random(_) => Tokenizer::Bytes,
        BaseWeights::Files(w) => {
            let tok = Tokenizer::from_dir(w.dir())?;
            if tok.vocab_size() > c.vocab_size {
                return Err(ModelError::Inconsistent {
                    path: w.dir().join("tokenizer.json"),
                    message: format!(
                        "{} tokens, but config.json's vocab_size is {}",
                        tok.vocab_size(),
                        c.vocab_size
                    ),
                });
            }
            tok
        }
    };
    let opts = options(spec, &c, storage, compute);
    Ok((LlamaModel::new(&c, &base, &opts)?, tok))
}

/// The base weights a run trains on, as stored, before any quantization:
/// the embedded model's seeded `f32` weights, or a local directory's
/// safetensors.
#[derive(Debug)]
pub enum BaseWeights {
    /// The embedded model's seeded weights (`f32`).
    Random(RandomWeights),
    /// A local Hugging Face directory's safetensors.
    Files(SafetensorsDir),
}

impl WeightSource for BaseWeights {
    fn tensor(&self, name: &str) -> Result<Tensor, LoadError> {
        match self {
            BaseWeights::Random(w) => w.tensor(name),
            BaseWeights::Files(w) => w.tensor(name),
        }
    }

    fn stored_dtype(&self, name: &str) -> Result<DType, LoadError> {
        match self {
            BaseWeights::Random(w) => w.stored_dtype(name),
            BaseWeights::Files(w) => w.stored_dtype(name),
        }
    }
}

/// The architecture of `spec` (validated) and its base weights, opened
/// (a local directory's files are mapped, not read).
pub fn open_base(spec: &RunSpec) -> Result<(LlamaConfig, BaseWeights), ModelError> {
    let dev = Device::Cpu;
    match spec.weights {
        Weights::Embedded => {
            let c = spec.architecture.clone().unwrap_or_else(embedded_config);
            validate_config(&c, Path::new("the embedded model's config"))?;
            let w = RandomWeights::new(&c, embedded::WEIGHT_SEED, &dev);
            Ok((c, BaseWeights::Random(w)))
        }
        Weights::NameOnly => Err(ModelError::NotLocal(spec.model.clone())),
        Weights::LocalDir => {
            let dir = Path::new(&spec.model);
            // The spec's architecture (from plan, or from a checkpoint),
            // checked again: a checkpoint is a file like any other.
            let c = match &spec.architecture {
                Some(c) => {
                    validate_config(c, &dir.join("config.json"))?;
                    c.clone()
                }
                None => read_config(dir)?,
            };
            let w = SafetensorsDir::open(dir, &dev)?;
            if c.num_hidden_layers > w.block_count() {
                return Err(LoadError::BadConfig {
                    path: dir.join("config.json"),
                    key: "num_hidden_layers",
                    problem: format!(
                        "is {}, but the weights hold {} blocks",
                        c.num_hidden_layers,
                        w.block_count()
                    ),
                }
                .into());
            }
            Ok((c, BaseWeights::Files(w)))
        }
    }
}

fn options(
    spec: &RunSpec,
    c: &LlamaConfig,
    storage: FrozenStorage,
    compute: &Compute,
) -> ModelOptions {
    ModelOptions {
        storage,
        lora: lora_config(spec, c.num_hidden_layers),
        dtype: compute.dtype,
        device: compute.device.clone(),
        checkpointing: spec.settings.grad_checkpoint,
        quantize_embeddings: spec.settings.quantize_embeddings,
        cpu_matmul: spec.settings.cpu_matmul,
    }
}

/// The base model's name as PEFT records it.
pub fn base_name(spec: &RunSpec) -> String {
    match spec.weights {
        Weights::Embedded => EMBEDDED_BASE_NAME.to_string(),
        _ => spec.model.clone(),
    }
}

/// Writes `adapter_model.safetensors` (PEFT key names) and
/// `adapter_config.json` to `dir`, atomically.
pub fn export_adapter(model: &LlamaModel, spec: &RunSpec, dir: &Path) -> Result<(), ModelError> {
    let st = dir.join(ADAPTER_WEIGHTS);
    let vars = model.trainable_vars();
    let tensors: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let bytes = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), None)
        .map_err(|e| ModelError::Write {
            path: st.clone(),
            source: e.into(),
        })?;
    write_atomic(&st, &bytes).map_err(|e| ModelError::Write {
        path: st.clone(),
        source: e.into(),
    })?;
    let n = model.config().num_hidden_layers;
    let lora = lora_config(spec, n);
    let layers: Vec<usize> = (0..n).filter(|&l| lora.adapts_layer(l, n)).collect();
    // PEFT names the modules the adapters sit on: Phi-3's fused `qkv_proj`
    // and `gate_up_proj` for any of q/k/v and gate/up.
    let targets: Vec<&str> = model
        .config()
        .projections()
        .iter()
        .filter(|p| lora.targets_projection(p))
        .map(|p| p.module_name())
        .collect();
    let config = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name(spec),
        "r": spec.settings.lora_rank,
        "lora_alpha": spec.settings.lora_alpha,
        "lora_dropout": spec.settings.lora_dropout,
        "target_modules": targets,
        "bias": "none",
        "layers_to_transform": layers,
        "use_rslora": false,
        "fan_in_fan_out": false,
        "inference_mode": true,
    });
    write_json(&dir.join(ADAPTER_CONFIG), &config)
}

/// Writes `value` as pretty JSON with a final newline to `path`, atomically.
pub(crate) fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<(), ModelError> {
    let write_error = |e: Box<dyn std::error::Error + Send + Sync>| ModelError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let mut text = serde_json::to_vec_pretty(value).map_err(|e| write_error(e.into()))?;
    text.push(b'\n');
    write_atomic(path, &text).map_err(|e| write_error(e.into()))
}

/// Reads `dir/adapter_model.safetensors`: the adapter's tensors under
/// PEFT's names, and the file's path.
pub fn read_adapter(dir: &Path) -> Result<(HashMap<String, Tensor>, PathBuf), ModelError> {
    let path = dir.join(ADAPTER_WEIGHTS);
    let bytes = std::fs::read(&path).map_err(|e| ModelError::Read {
        path: path.clone(),
        source: e.into(),
    })?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).map_err(|e| {
        ModelError::Read {
            path: path.clone(),
            source: e.into(),
        }
    })?;
    Ok((tensors, path))
}

/// Loads `dir/adapter_model.safetensors` into `model`'s adapters. Every
/// adapter of the model must be in the file with its shape.
pub fn load_adapter(model: &LlamaModel, dir: &Path) -> Result<(), ModelError> {
    let (tensors, path) = read_adapter(dir)?;
    for (name, var) in model.trainable_vars() {
        let t = tensors.get(&name).ok_or_else(|| ModelError::Adapter {
            path: path.clone(),
            message: format!("no tensor {name}"),
        })?;
        if t.dims() != var.dims() {
            return Err(ModelError::Adapter {
                path: path.clone(),
                message: format!(
                    "{name}: shape {:?}, the model needs {:?}",
                    t.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&t.to_device(var.device())?.to_dtype(var.dtype())?)?;
    }
    Ok(())
}
