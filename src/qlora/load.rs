//! Weight sources: in-memory tensors or a local Hugging Face directory of
//! safetensors (single file or sharded with `model.safetensors.index.json`),
//! memory-mapped and read one tensor at a time.
//!
//! Pickled PyTorch checkpoints (`*.bin`, `*.pt`, `*.pth`) are refused: they
//! can run code when loaded.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{Device, Tensor};

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

/// Memory-mapped safetensors of a local HF model directory.
pub struct SafetensorsDir {
    dir: PathBuf,
    files: MmapedSafetensors,
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
        // Validate each shard on its own first, so an error names the file.
        for f in &files {
            // SAFETY: mapped read-only; like every mmap-based loader we
            // assume nobody truncates the files while the model is built.
            unsafe { MmapedSafetensors::new(f) }.map_err(|source| LoadError::Safetensors {
                path: f.clone(),
                source,
            })?;
        }
        // SAFETY: as above.
        let mm = unsafe { MmapedSafetensors::multi(&files) }.map_err(|source| {
            LoadError::Safetensors {
                path: dir.to_path_buf(),
                source,
            }
        })?;
        Ok(Self {
            dir: dir.to_path_buf(),
            files: mm,
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
        if self.files.get(name).is_err() {
            return Err(LoadError::MissingTensor {
                name: name.to_string(),
                source_name: self.dir.display().to_string(),
            });
        }
        self.files
            .load(name, &self.device)
            .map_err(|source| LoadError::Safetensors {
                path: self.dir.join(name),
                source,
            })
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
