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
use super::llama::LlamaConfig;

/// Errors loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A JSON file is malformed.
    #[error("{path}: {source}")]
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
    #[error("{path}: {source}")]
    Safetensors {
        /// The file or files.
        path: PathBuf,
        /// The error.
        source: candle_core::Error,
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
    #[error("tensor {name}: {source}")]
    Frozen {
        /// The tensor.
        name: String,
        /// The error.
        source: FrozenError,
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

#[derive(serde::Deserialize)]
struct Index {
    weight_map: HashMap<String, String>,
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
            let text = std::fs::read_to_string(&index).map_err(io(&index))?;
            let idx: Index = serde_json::from_str(&text).map_err(|source| LoadError::Json {
                path: index.clone(),
                source,
            })?;
            let shards: BTreeSet<&String> = idx.weight_map.values().collect();
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
        let mut shards = Vec::with_capacity(files.len());
        let mut routing = HashMap::new();
        for f in &files {
            let file = std::fs::File::open(f).map_err(io(f))?;
            // SAFETY: mapped read-only; like every mmap-based loader we
            // assume nobody truncates the file while the model is built.
            let mmap = unsafe { Mmap::map(&file) }.map_err(io(f))?;
            let (n, metadata) =
                SafeTensors::read_metadata(&mmap).map_err(|e| LoadError::Safetensors {
                    path: f.clone(),
                    source: candle_core::Error::Msg(e.to_string()),
                })?;
            // Check every tensor's bounds now, so a truncated file is an
            // error that names it, before anything is built.
            SafeTensors::deserialize(&mmap).map_err(|e| LoadError::Safetensors {
                path: f.clone(),
                source: candle_core::Error::Msg(e.to_string()),
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
}

impl WeightSource for SafetensorsDir {
    fn tensor(&self, name: &str) -> Result<Tensor, LoadError> {
        let shard = self
            .routing
            .get(name)
            .map(|&i| &self.shards[i])
            .ok_or_else(|| LoadError::MissingTensor {
                name: name.to_string(),
                source_name: self.dir.display().to_string(),
            })?;
        let bad = |message: String| LoadError::Safetensors {
            path: shard.path.clone(),
            source: candle_core::Error::Msg(format!("tensor {name}: {message}")),
        };
        let info = shard
            .metadata
            .info(name)
            .ok_or_else(|| bad("not in the header".into()))?;
        let (start, end) = info.data_offsets;
        let (start, end) = (shard.data_start + start, shard.data_start + end);
        let bytes = shard
            .mmap
            .get(start..end)
            .ok_or_else(|| bad("data lies outside the file".into()))?;
        let view = TensorView::new(info.dtype, info.shape.clone(), bytes)
            .map_err(|e| bad(e.to_string()))?;
        let tensor = view
            .load(&self.device)
            .map_err(|source| LoadError::Safetensors {
                path: shard.path.clone(),
                source,
            })?;
        drop(view);
        // The tensor owns a copy now: hand the mapped pages back, so the
        // file never becomes resident as a whole.
        // SAFETY: the mapping is private and read-only, so MADV_DONTNEED only
        // drops clean page-cache pages; a later read faults them back in from
        // the file with the same contents. No reference into the range is
        // alive (`view` borrowed it and is gone).
        #[cfg(unix)]
        unsafe {
            let _ = shard.mmap.unchecked_advise_range(
                memmap2::UncheckedAdvice::DontNeed,
                start,
                end - start,
            );
        }
        Ok(tensor)
    }
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<LlamaConfig, LoadError> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| LoadError::Io {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json { path, source })
}
