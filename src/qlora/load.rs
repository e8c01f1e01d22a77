//! Weight sources: in-memory tensors or a local Hugging Face directory of
//! safetensors (single file or sharded with `model.safetensors.index.json`),
//! memory-mapped and read one tensor at a time. After a tensor is copied
//! out, its pages of the mapping are released (`MADV_DONTNEED`), so the
//! resident size while a model loads is the quantized model plus one tensor,
//! not the whole file: the memory model (`tables/memory.toml`) relies on it.
//!
//! Pickled PyTorch checkpoints (`*.bin`, `*.pt`, `*.pth`) are refused: they
//! can run code when loaded.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load as _;
use candle_core::{Device, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;
use safetensors::tensor::{Metadata, TensorView};

use super::frozen::FrozenError;
use super::llama::{LlamaConfig, RopeScaling, rope_entry};

/// Errors loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A small file could not be read, or is not a regular file, or is too
    /// large.
    #[error(transparent)]
    Read(#[from] crate::safe_io::ReadError),
    /// A JSON file is malformed.
    #[error("cannot parse {path}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The error.
        source: serde_json::Error,
    },
    /// Only pickled weights were found.
    #[error(
        "{0}: pickled PyTorch checkpoints can run code when loaded and are refused; convert the model to safetensors"
    )]
    PickleRefused(PathBuf),
    /// No weights at all.
    #[error("{0}: no model.safetensors, model.safetensors.index.json or *.safetensors found")]
    NoWeights(PathBuf),
    /// A safetensors file is invalid.
    #[error("{path}: invalid safetensors")]
    Safetensors {
        /// The file or files.
        path: PathBuf,
        /// The error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A tensor of a safetensors file cannot be read.
    #[error("{path}: tensor {name}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// What is wrong.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A tensor the model needs is absent.
    #[error("tensor {name} not found in {source_name}")]
    MissingTensor {
        /// The tensor.
        name: String,
        /// Where it was looked for.
        source_name: String,
    },
    /// A tensor has the wrong shape.
    #[error("tensor {name}: expected shape {expected:?}, found {found:?}")]
    Shape {
        /// The tensor.
        name: String,
        /// Shape the config implies.
        expected: Vec<usize>,
        /// Shape found.
        found: Vec<usize>,
    },
    /// A frozen weight could not be stored.
    #[error("tensor {name}")]
    Frozen {
        /// The tensor.
        name: String,
        /// The error.
        source: FrozenError,
    },
    /// The shard index is malformed or names a file outside the model
    /// directory (the same rule as size detection's).
    #[error(transparent)]
    Index(#[from] crate::files::FilesError),
    /// A weights file resolves (through symlinks) outside the model
    /// directory.
    #[error(
        "{path} resolves to {target}, outside the model directory {dir}: refused (a model's files must stay inside its directory)"
    )]
    OutsideDir {
        /// The file as named.
        path: PathBuf,
        /// Where it leads.
        target: PathBuf,
        /// The model directory.
        dir: PathBuf,
    },
    /// A `config.json` value the model cannot be built with.
    #[error("{path}: {key} {problem}")]
    BadConfig {
        /// The file.
        path: PathBuf,
        /// The key.
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The config asks for a RoPE scaling this crate does not implement.
    #[error("unsupported rope_scaling type {0:?} (supported: default, linear, llama3)")]
    UnsupportedRopeScaling(String),
    /// The adapter map's lock was poisoned by a panic elsewhere.
    #[error("adapter map lock poisoned")]
    Poisoned,
    /// A Candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Where frozen weights come from, by HF name (`model.layers.0.mlp.up_proj.weight`).
pub trait WeightSource {
    /// The tensor `name`, in its stored dtype.
    fn tensor(&self, name: &str) -> Result<Tensor, LoadError>;

    /// The stored dtype of tensor `name` (by default by reading it; sources
    /// that know it without reading say so).
    fn stored_dtype(&self, name: &str) -> Result<candle_core::DType, LoadError> {
        Ok(self.tensor(name)?.dtype())
    }
}

impl WeightSource for HashMap<String, Tensor> {
    fn tensor(&self, name: &str) -> Result<Tensor, LoadError> {
        self.get(name)
            .cloned()
            .ok_or_else(|| LoadError::MissingTensor {
                name: name.to_string(),
                source_name: "in-memory weights".into(),
            })
    }
}

/// One mapped safetensors file and its parsed header.
struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Where tensor data starts (8-byte length + JSON header).
    data_start: usize,
    metadata: Metadata,
}

/// Memory-mapped safetensors of a local HF model directory.
pub struct SafetensorsDir {
    dir: PathBuf,
    shards: Vec<Shard>,
    /// Tensor name -> index into `shards`.
    routing: HashMap<String, usize>,
    device: Device,
}

impl std::fmt::Debug for SafetensorsDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsDir")
            .field("dir", &self.dir)
            .finish()
    }
}

/// Where a model directory's weights may resolve to, through symlinks: the
/// directory itself, and for a Hugging Face hub cache snapshot
/// (`models--org--name/snapshots/REV`), that repository's `blobs/`, where
/// the snapshot's symlinks point.
struct AllowedRoots {
    dir: PathBuf,
    roots: Vec<PathBuf>,
}

impl AllowedRoots {
    fn of(dir: &Path) -> Result<Self, LoadError> {
        let real = dir.canonicalize().map_err(|source| LoadError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut roots = vec![real.clone()];
        if let Some(snapshots) = real.parent()
            && snapshots.file_name().is_some_and(|n| n == "snapshots")
            && let Some(repo) = snapshots.parent()
            && repo
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("models--"))
        {
            roots.push(repo.join("blobs"));
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            roots,
        })
    }

    /// An error unless `file` resolves inside one of the roots.
    fn check(&self, file: &Path) -> Result<(), LoadError> {
        let target = file.canonicalize().map_err(|source| LoadError::Io {
            path: file.to_path_buf(),
            source,
        })?;
        if self.roots.iter().any(|r| target.starts_with(r)) {
            return Ok(());
        }
        Err(LoadError::OutsideDir {
            path: file.to_path_buf(),
            target,
            dir: self.dir.clone(),
        })
    }
}

fn is_pickle(p: &Path) -> bool {
    matches!(
        p.extension().and_then(|e| e.to_str()),
        Some("bin" | "pt" | "pth" | "ckpt")
    )
}

impl SafetensorsDir {
    /// Opens `dir`: `model.safetensors.index.json` (sharded), else
    /// `model.safetensors`, else every `*.safetensors`. Refuses a directory
    /// whose only weights are pickled.
    pub fn open(dir: &Path, device: &Device) -> Result<Self, LoadError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Io { path, source }
        };
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            // One rule with size detection: shard names are plain file
            // names in the index's own directory.
            let idx = crate::files::read_safetensors_index(&index)?;
            let shards: BTreeSet<&String> = idx.shards.iter().collect();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if dir.join("model.safetensors").is_file() {
            vec![dir.join("model.safetensors")]
        } else {
            let mut st = Vec::new();
            let mut pickles = Vec::new();
            for e in std::fs::read_dir(dir).map_err(io(dir))? {
                let p = e.map_err(io(dir))?.path();
                if p.extension().and_then(|e| e.to_str()) == Some("safetensors") {
                    st.push(p);
                } else if is_pickle(&p) {
                    pickles.push(p);
                }
            }
            st.sort();
            pickles.sort();
            if st.is_empty() {
                return Err(match pickles.into_iter().next() {
                    Some(p) => LoadError::PickleRefused(p),
                    None => LoadError::NoWeights(dir.to_path_buf()),
                });
            }
            st
        };
        if let Some(p) = files.iter().find(|p| is_pickle(p)) {
            return Err(LoadError::PickleRefused(p.clone()));
        }
        for f in &files {
            if !f.is_file() {
                return Err(LoadError::Io {
                    path: f.clone(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "shard listed but missing",
                    ),
                });
            }
        }
        let inside = AllowedRoots::of(dir)?;
        for f in &files {
            inside.check(f)?;
        }
        let mut shards = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for f in &files {
            let file = std::fs::File::open(f).map_err(io(f))?;
            // SAFETY: mapped read-only; like every mmap-based loader we
            // assume nobody truncates the file while the model is built.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(f))?;
            // Size detection's checks first: they refuse what the
            // `safetensors` crate lets through (a duplicate key, whose last
            // entry it keeps) with an error naming the key or tensor.
            crate::files::read_safetensors_header(&mmap[..], mmap.len() as u64).map_err(|e| {
                LoadError::Safetensors {
                    path: f.clone(),
                    source: e.into(),
                }
            })?;
            let (n, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::Safetensors {
                    path: f.clone(),
                    source: e.into(),
                })?;
            // Check every tensor's bounds now, so a truncated file is an
            // error that names it, before anything is built.
            SafeTensors::deserialize(&mmap).map_err(|e| LoadError::Safetensors {
                path: f.clone(),
                source: e.into(),
            })?;
            for name in metadata.tensors().into_keys() {
                routing.insert(name, shards.len());
            }
            shards.push(Shard {
                path: f.clone(),
                mmap,
                data_start: 8 + n,
                metadata,
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shards,
            routing,
            device: device.clone(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Decoder blocks the files hold weights for: one more than the highest
    /// `N` of a `model.layers.N.` tensor name (0 when there is none).
    pub fn block_count(&self) -> usize {
        self.routing
            .keys()
            .filter_map(|name| {
                name.strip_prefix("model.layers.")?
                    .split('.')
                    .next()?
                    .parse::<usize>()
                    .ok()
            })
            .max()
            .map_or(0, |n| n.saturating_add(1))
    }
}

impl SafetensorsDir {
    /// Every tensor name of the files, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.routing.keys().cloned().collect();
        v.sort();
        v
    }

    /// The stored dtype and shape of tensor `name`, from its header.
    pub fn tensor_info(&self, name: &str) -> Option<(safetensors::Dtype, Vec<usize>)> {
        let shard = &self.shards[*self.routing.get(name)?];
        let info = shard.metadata.info(name)?;
        Some((info.dtype, info.shape.clone()))
    }

    /// The stored bytes of tensor `name`, copied out (any dtype): what a
    /// copy that must stay bit for bit the same takes.
    pub fn raw_bytes(&self, name: &str) -> Result<Vec<u8>, LoadError> {
        self.with_bytes(name, |_, bytes, _| Ok(bytes.to_vec()))
    }

    /// Runs `f` on tensor `name`'s header entry and mapped bytes, then
    /// hands the mapped pages back, so the file never becomes resident as
    /// a whole.
    fn with_bytes<R>(
        &self,
        name: &str,
        f: impl FnOnce(&safetensors::tensor::TensorInfo, &[u8], &Shard) -> Result<R, LoadError>,
    ) -> Result<R, LoadError> {
        let shard = self
            .routing
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| LoadError::MissingTensor {
                name: name.to_string(),
                source_name: self.dir.display().to_string(),
            })?;
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| bad_tensor(shard, name, "not in the header".into()))?;
        let (start, end) = info.data_offsets;
        let (start, end) = (shard.data_start + start, shard.data_start + end);
        let bytes = shard
            .mmap
            .get(start..end)
            .ok_or_else(|| bad_tensor(shard, name, "data lies outside the file".into()))?;
        let out = f(info, bytes, shard);
        // The caller owns a copy now: hand the mapped pages back.
        // SAFETY: the mapping is private and read-only, so MADV_DONTNEED only
        // drops clean page-cache pages; a later read faults them back in from
        // the file with the same contents. No reference into the range is
        // alive (`bytes` was only lent to `f`, which has returned).
        #[cfg(unix)]
        unsafe {
            let _ = shard.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                end - start,
            );
        }
        out
    }
}

fn bad_tensor(
    shard: &Shard,
    name: &str,
    source: Box<dyn std::error::Error + Send + Sync>,
) -> LoadError {
    LoadError::BadTensor {
        path: shard.path.clone(),
        name: name.to_string(),
        source,
    }
}

impl WeightSource for SafetensorsDir {
    fn stored_dtype(&self, name: &str) -> Result<candle_core::DType, LoadError> {
        match self.tensor_info(name) {
            Some((d, _)) => Ok(candle_core::DType::try_from(d)?),
            None => Err(LoadError::MissingTensor {
                name: name.to_string(),
                source_name: self.dir.display().to_string(),
            }),
        }
    }

    fn tensor(&self, name: &str) -> Result<Tensor, LoadError> {
        self.with_bytes(name, |info, bytes, shard| {
            let bad = |source| bad_tensor(shard, name, source);
            // Weights are float: an integer tensor (an I64 buffer, a packed
            // quantized weight) converted to float would load as garbage.
            if !matches!(
                info.dtype,
                safetensors::Dtype::F16
                    | safetensors::Dtype::BF16
                    | safetensors::Dtype::F32
                    | safetensors::Dtype::F64
            ) {
                return Err(bad(format!(
                    "dtype {:?} is not a float type (F16, BF16, F32 or F64): refused as a weight",
                    info.dtype
                )
                .into()));
            }
            let view = TensorView::new(info.dtype, info.shape.clone(), bytes)
                .map_err(|e| bad(e.into()))?;
            view.load(&self.device).map_err(|e| bad(e.into()))
        })
    }
}

/// Reads and validates `dir/config.json` ([`validate_config`]).
pub fn read_config(dir: &Path) -> Result<LlamaConfig, LoadError> {
    let (path, value) = read_config_json(dir)?;
    config_from_json(&value, &path)
}

/// `dir/config.json`, read with the bounded reader and parsed as JSON (not
/// yet checked): one read serves both the model's architecture
/// ([`config_from_json`]) and size detection.
pub fn read_config_json(dir: &Path) -> Result<(PathBuf, serde_json::Value), LoadError> {
    let path = dir.join("config.json");
    let text = crate::safe_io::read_small(&path)?;
    let value = serde_json::from_slice(&text).map_err(|source| LoadError::Json {
        path: path.clone(),
        source,
    })?;
    Ok((path, value))
}

/// The architecture a `config.json` (read from `path`, which errors name)
/// describes, validated ([`validate_config`]).
pub fn config_from_json(value: &serde_json::Value, path: &Path) -> Result<LlamaConfig, LoadError> {
    let mut config: LlamaConfig =
        serde_json::from_value(value.clone()).map_err(|source| LoadError::Json {
            path: path.to_path_buf(),
            source,
        })?;
    // What is not built is named before anything else is read into it.
    check_architecture(&config, path)?;
    if config.is_gemma() {
        apply_gemma_config(&mut config, value, path)?;
    }
    apply_rope_parameters(&mut config, path)?;
    validate_config(&config, path)?;
    Ok(config)
}

/// The `model_type`s whose folders `train` builds.
pub const MODEL_TYPES: [&str; 7] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3_text",
    "phi3",
];

/// Gemma's keys whose transformers defaults this crate does not assume: a
/// config must give them (the released ones all do). `gemma2` also needs
/// both soft caps (transformers defaults them to 50 and 30 there, to off in
/// `gemma3_text`).
fn apply_gemma_config(
    c: &mut LlamaConfig,
    raw: &serde_json::Value,
    path: &Path,
) -> Result<(), LoadError> {
    let bad = |key: &'static str, problem: String| LoadError::BadConfig {
        path: path.to_path_buf(),
        key,
        problem,
    };
    let t = c.model_type.clone().unwrap_or_default();
    let mut required = vec![
        "query_pre_attn_scalar",
        "sliding_window",
        "hidden_activation",
    ];
    if t == "gemma2" {
        required.extend(["attn_logit_softcapping", "final_logit_softcapping"]);
    }
    if t == "gemma3_text" && raw.get("rope_parameters").is_none() {
        // Configs before transformers 5 give both bases flat.
        required.extend(["rope_theta", "rope_local_base_freq"]);
    }
    if let Some(key) = required.into_iter().find(|k| raw.get(k).is_none()) {
        return Err(bad(
            key,
            format!("is absent: a {t} config must give it (transformers' default is not assumed)"),
        ));
    }
    let scalar = c.query_pre_attn_scalar.as_ref().and_then(|n| n.as_f64());
    if !scalar.is_some_and(|s| s > 0.0 && s.is_finite()) {
        return Err(bad(
            "query_pre_attn_scalar",
            format!("is {scalar:?}: must be a positive number"),
        ));
    }
    if c.layer_types.is_none() {
        c.layer_types = Some(gemma_layer_types(c, &t, path)?);
    }
    Ok(())
}

/// Gemma's `layer_types` when the config has none: Gemma 2 alternates
/// sliding and full attention; Gemma 3 makes every `sliding_window_pattern`-th
/// layer full attention.
fn gemma_layer_types(c: &LlamaConfig, t: &str, path: &Path) -> Result<Vec<String>, LoadError> {
    let every = if t == "gemma2" {
        2
    } else {
        c.sliding_window_pattern
            .filter(|&n| n > 0)
            .ok_or_else(|| LoadError::BadConfig {
                path: path.to_path_buf(),
                key: "layer_types",
                problem:
                    "is absent and no sliding_window_pattern (at least 1) says which layers slide"
                        .into(),
            })?
    };
    Ok((0..c.num_hidden_layers)
        .map(|i| {
            if (i + 1) % every == 0 {
                "full_attention".to_string()
            } else {
                "sliding_attention".to_string()
            }
        })
        .collect())
}

/// transformers 5 writes the RoPE base and scaling as one `rope_parameters`
/// map (`rope_theta`, `rope_type` and the scaling's factors) in place of
/// `rope_theta` and `rope_scaling`; when present it is what counts.
fn apply_rope_parameters(c: &mut LlamaConfig, path: &Path) -> Result<(), LoadError> {
    let Some(value) = &c.rope_parameters else {
        return Ok(());
    };
    let bad = |problem: String| LoadError::BadConfig {
        path: path.to_path_buf(),
        key: "rope_parameters",
        problem,
    };
    let parse =
        |v: &serde_json::Value, what: &str| rope_entry(v).map_err(|e| bad(format!("{what}{e}")));
    let per_layer_type = value
        .as_object()
        .is_some_and(|m| m.values().any(serde_json::Value::is_object));
    let gemma3 = c.model_type.as_deref() == Some("gemma3_text");
    if !per_layer_type && gemma3 {
        return Err(bad(
            "holds one RoPE for all layers: gemma3_text needs full_attention and sliding_attention entries".into(),
        ));
    }
    if let Some(f) = value.get("partial_rotary_factor") {
        c.partial_rotary_factor = Some(
            f.as_f64()
                .ok_or_else(|| bad(format!("partial_rotary_factor is {f}: must be a number")))?,
        );
    }
    if !per_layer_type {
        let (theta, scaling) = parse(value, "")?;
        c.rope_theta = theta.unwrap_or(c.rope_theta);
        c.rope_scaling = scaling;
        return Ok(());
    }
    if !gemma3 {
        return Err(bad(
            "holds one RoPE per layer type, which only gemma3_text models are built with".into(),
        ));
    }
    // Gemma 3: full-attention layers take the model's RoPE, sliding ones
    // their own; both entries and their bases must be given.
    let entry = |layer_type: &str| {
        let v = value
            .get(layer_type)
            .ok_or_else(|| bad(format!("has no \"{layer_type}\" entry")))?;
        match parse(v, &format!("\"{layer_type}\": "))? {
            (Some(theta), scaling) => Ok((theta, scaling)),
            (None, _) => Err(bad(format!("\"{layer_type}\" has no rope_theta"))),
        }
    };
    (c.rope_theta, c.rope_scaling) = entry("full_attention")?;
    entry("sliding_attention")?;
    Ok(())
}

/// The choices of `c` this model does not build, refused by key: another
/// `model_type`, another activation, MLP biases, unknown layer types.
fn check_architecture(c: &LlamaConfig, path: &Path) -> Result<(), LoadError> {
    let bad = |key: &'static str, problem: String| LoadError::BadConfig {
        path: path.to_path_buf(),
        key,
        problem,
    };
    if let Some(t) = c.model_type.as_deref()
        && !MODEL_TYPES.contains(&t)
    {
        return Err(bad(
            "model_type",
            format!(
                "is \"{t}\", which train does not build (it builds {})",
                MODEL_TYPES.join(", ")
            ),
        ));
    }
    if c.is_gemma() {
        if let Some(act) = c.hidden_activation.as_deref()
            && act != "gelu_pytorch_tanh"
        {
            return Err(bad(
                "hidden_activation",
                format!("is \"{act}\": only gelu_pytorch_tanh is built for Gemma"),
            ));
        }
        if c.use_bidirectional_attention == Some(true) {
            return Err(bad(
                "use_bidirectional_attention",
                "is true: only causal attention is built".into(),
            ));
        }
    } else if let Some(act) = c.hidden_act.as_deref()
        && act != "silu"
    {
        return Err(bad(
            "hidden_act",
            format!("is \"{act}\": only silu is built"),
        ));
    }
    if c.mlp_bias == Some(true) {
        return Err(bad("mlp_bias", "is true: MLP biases are not built".into()));
    }
    if c.sliding_window == Some(0) {
        return Err(bad("sliding_window", "is 0: must be at least 1".into()));
    }
    if let Some(types) = &c.layer_types {
        if types.len() != c.num_hidden_layers {
            return Err(bad(
                "layer_types",
                format!(
                    "has {} entries for {} layers (num_hidden_layers)",
                    types.len(),
                    c.num_hidden_layers
                ),
            ));
        }
        if let Some(t) = types
            .iter()
            .find(|t| !matches!(t.as_str(), "full_attention" | "sliding_attention"))
        {
            return Err(bad(
                "layer_types",
                format!("holds \"{t}\": only full_attention and sliding_attention are built"),
            ));
        }
        if c.sliding_window.is_none() && types.iter().any(|t| t == "sliding_attention") {
            return Err(bad(
                "layer_types",
                "has sliding_attention layers but no sliding_window is given".into(),
            ));
        }
    } else if matches!(c.model_type.as_deref(), Some("qwen2" | "qwen3"))
        && c.use_sliding_window == Some(true)
    {
        return Err(bad(
            "use_sliding_window",
            "is true without layer_types (which layers slide): not supported".into(),
        ));
    }
    Ok(())
}

/// Checks that a model can be built from `c` (read from `path`, which
/// errors name): every count at least 1, heads that divide the width and
/// the key/value heads, an even head width (RoPE rotates pairs), and every
/// product of the shapes (a projection's width, the parameter total)
/// representable, so that nothing downstream divides by zero, wraps or
/// asks for an impossible allocation.
pub fn validate_config(c: &LlamaConfig, path: &Path) -> Result<(), LoadError> {
    let bad = |key: &'static str, problem: String| LoadError::BadConfig {
        path: path.to_path_buf(),
        key,
        problem,
    };
    for (key, v) in [
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("num_attention_heads", c.num_attention_heads),
        ("vocab_size", c.vocab_size),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        if v == 0 {
            return Err(bad(key, "is 0: must be at least 1".into()));
        }
    }
    let heads = c.num_attention_heads;
    let kv = c.kv_heads();
    if kv == 0 || !heads.is_multiple_of(kv) {
        return Err(bad(
            "num_key_value_heads",
            format!("is {kv}: must be at least 1 and divide num_attention_heads ({heads})"),
        ));
    }
    if c.head_dim.is_none() && !c.hidden_size.is_multiple_of(heads) {
        return Err(bad(
            "num_attention_heads",
            format!(
                "is {heads}, which does not divide hidden_size ({}) and no head_dim is given",
                c.hidden_size
            ),
        ));
    }
    let head = c.head_width();
    if head == 0 || !head.is_multiple_of(2) {
        return Err(bad(
            "head_dim",
            format!("is {head}: must be even and at least 2 (RoPE rotates pairs)"),
        ));
    }
    if let Some(f) = c.partial_rotary_factor {
        let rot = c.rotary_dim();
        if !(f > 0.0 && f <= 1.0) || rot < 2 || !rot.is_multiple_of(2) {
            return Err(bad(
                "partial_rotary_factor",
                format!(
                    "is {f}: must be in (0, 1] and turn the head width {head} into an even width of at least 2 (it gives {rot})"
                ),
            ));
        }
    }
    if !(c.rms_norm_eps.is_finite() && c.rms_norm_eps > 0.0) {
        return Err(bad(
            "rms_norm_eps",
            format!("is {}: must be positive", c.rms_norm_eps),
        ));
    }
    if !(c.rope_theta.is_finite() && c.rope_theta > 0.0) {
        return Err(bad(
            "rope_theta",
            format!("is {}: must be positive", c.rope_theta),
        ));
    }
    check_architecture(c, path)?;
    let sliding = c.sliding_rope();
    let sliding_kind = sliding.as_ref().and_then(|(_, s)| s.as_ref());
    if let Some(kind) = c
        .rope_scaling_kind()
        .or(sliding_kind.map(RopeScaling::kind))
        && !matches!(kind, "default" | "linear" | "llama3")
    {
        let key = if c.rope_parameters.is_some() {
            "rope_parameters"
        } else {
            "rope_scaling"
        };
        return Err(bad(
            key,
            format!("asks for RoPE scaling \"{kind}\": only default, linear and llama3 are built"),
        ));
    }
    parameter_count(c).map_err(|key| {
        bad(
            key,
            "is too large: with the other widths the parameter count overflows".into(),
        )
    })?;
    Ok(())
}

/// The parameter count of the linear layers, norms and embeddings of `c`;
/// when it overflows, the key whose product overflowed.
fn parameter_count(c: &LlamaConfig) -> Result<u64, &'static str> {
    let n = |x: usize| u64::try_from(x).unwrap_or(u64::MAX);
    let (h, i, v) = (n(c.hidden_size), n(c.intermediate_size), n(c.vocab_size));
    let head = n(c.head_width());
    let head_key = if c.head_dim.is_some() {
        "head_dim"
    } else {
        "num_attention_heads"
    };
    let q = n(c.num_attention_heads).checked_mul(head).ok_or(head_key)?;
    let kv = n(c.kv_heads())
        .checked_mul(head)
        .ok_or("num_key_value_heads")?;
    let attention = q
        .checked_mul(2)
        .and_then(|x| x.checked_add(kv.checked_mul(2)?))
        .and_then(|x| x.checked_mul(h))
        .and_then(|x| x.checked_add(q)?.checked_add(kv.checked_mul(2)?))
        .ok_or(head_key)?;
    let mlp = h
        .checked_mul(i)
        .and_then(|x| x.checked_mul(3))
        .ok_or("intermediate_size")?;
    let block = attention
        .checked_add(mlp)
        .and_then(|x| x.checked_add(h.checked_mul(2)?))
        .ok_or("hidden_size")?;
    let embeddings = v
        .checked_mul(h)
        .and_then(|x| x.checked_mul(2))
        .ok_or("vocab_size")?;
    n(c.num_hidden_layers)
        .checked_mul(block)
        .and_then(|x| x.checked_add(embeddings)?.checked_add(h))
        .ok_or("num_hidden_layers")
}
