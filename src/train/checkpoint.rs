//! Training checkpoints: adapters, AdamW moments, step, data position and
//! configuration in one file, written atomically and checked on load.
//!
//! A file is [`MAGIC`], the CRC-32 of the rest (little endian), then a
//! safetensors buffer: tensors `adapter/NAME`, `m/NAME`, `v/NAME` (NAME the
//! PEFT key) and the [`CheckpointState`] as JSON under the metadata key
//! `state`. Files are `checkpoints/step-NNNNNNNN.ckpt` in the output
//! directory; the newest `keep` are kept.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::optim::AdamWState;
use super::spec::RunSpec;
use crate::safe_io::write_atomic;

/// First bytes of a checkpoint file.
pub const MAGIC: &[u8; 8] = b"QLSCKPT1";

/// Errors of writing or reading checkpoints. Each names the file.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// Reading or writing failed.
    #[error("checkpoint {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The checkpoint could not be encoded.
    #[error("cannot encode checkpoint {path}")]
    Encode {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Its contents do not parse.
    #[error("checkpoint {path} is corrupt")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// The parser's error.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The file is damaged: bad magic, checksum mismatch, or unreadable
    /// contents.
    #[error("checkpoint {path} is corrupt: {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// The non-tensor state of a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps taken.
    pub step: u64,
    /// AdamW's step count.
    pub optimizer_t: u64,
    /// Data position: epoch of the shuffled order...
    pub epoch: u64,
    /// ...and the next example within it. The order of an epoch is a
    /// function of the seed and the epoch, so this is the whole RNG state
    /// of the data; dropout masks derive from the seed and the step.
    pub cursor: u64,
    /// Target tokens trained on so far.
    pub tokens_seen: u64,
    /// What the run trains.
    pub spec: RunSpec,
    /// The ranks that wrote it (a resume with another number of ranks must
    /// keep the global batch).
    pub world_size: usize,
    /// Seconds the run had been going when the checkpoint was written
    /// (0 in checkpoints written before it was recorded).
    #[serde(default)]
    pub elapsed_s: f64,
}

/// A loaded checkpoint.
#[derive(Debug)]
pub struct Checkpoint {
    /// The state.
    pub state: CheckpointState,
    /// Adapter values by PEFT name.
    pub adapters: HashMap<String, Tensor>,
    /// First moments by PEFT name.
    pub m: HashMap<String, Tensor>,
    /// Second moments by PEFT name.
    pub v: HashMap<String, Tensor>,
}

/// The file of the checkpoint at `step` in `dir`.
pub fn checkpoint_path(dir: &Path, step: u64) -> PathBuf {
    dir.join(format!("step-{step:08}.ckpt"))
}

impl Checkpoint {
    /// The optimizer's state it holds.
    pub fn optimizer(&self) -> AdamWState {
        AdamWState {
            t: self.state.optimizer_t,
            m: self.m.clone(),
            v: self.v.clone(),
        }
    }
}

/// Writes a checkpoint atomically to `path`: `state`, the adapters and the
/// optimizer's moments (its step count is `state.optimizer_t`).
pub fn save(
    path: &Path,
    state: &CheckpointState,
    adapters: &[(String, Tensor)],
    optimizer: &AdamWState,
) -> Result<(), CheckpointError> {
    let (m, v) = (&optimizer.m, &optimizer.v);
    let corrupt = |why: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    let encode = |source: Box<dyn std::error::Error + Send + Sync>| CheckpointError::Encode {
        path: path.to_path_buf(),
        source,
    };
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in adapters {
        tensors.push((format!("adapter/{name}"), t.clone()));
        let (Some(mt), Some(vt)) = (m.get(name), v.get(name)) else {
            return Err(corrupt(format!("no optimizer moments for {name}")));
        };
        tensors.push((format!("m/{name}"), mt.clone()));
        tensors.push((format!("v/{name}"), vt.clone()));
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let meta = HashMap::from([(
        "state".to_string(),
        serde_json::to_string(state).map_err(|e| encode(e.into()))?,
    )]);
    let payload = safetensors::serialize(tensors.iter().map(|(n, t)| (n.as_str(), t)), Some(meta))
        .map_err(|e| encode(e.into()))?;
    let mut bytes = Vec::with_capacity(payload.len() + 12);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    bytes.extend_from_slice(&payload);
    write_atomic(path, &bytes).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads and verifies the checkpoint at `path`.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &bytes)
}

/// Verifies and reads the bytes of a checkpoint file (`path` names it in
/// errors): how the ranks of a data-parallel run read the checkpoint rank 0
/// found and sent them.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
    let corrupt = |why: String| CheckpointError::Corrupt {
        path: path.to_path_buf(),
        why,
    };
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(corrupt("not a qlora-scale checkpoint (bad header)".into()));
    }
    let stored = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    let payload = &bytes[12..];
    let actual = crc32fast::hash(payload);
    if stored != actual {
        return Err(corrupt(format!(
            "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
        )));
    }
    let unreadable =
        |source: Box<dyn std::error::Error + Send + Sync>| CheckpointError::Unreadable {
            path: path.to_path_buf(),
            source,
        };
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(payload).map_err(|e| unreadable(e.into()))?;
    let state_json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("state"))
        .ok_or_else(|| corrupt("no state".into()))?;
    let state: CheckpointState =
        serde_json::from_str(state_json).map_err(|e| unreadable(e.into()))?;
    let tensors = candle_core::safetensors::load_buffer(payload, &Device::Cpu)
        .map_err(|e| unreadable(e.into()))?;
    let mut ck = Checkpoint {
        state,
        adapters: HashMap::new(),
        m: HashMap::new(),
        v: HashMap::new(),
    };
    for (key, t) in tensors {
        let (kind, name) = key
            .split_once('/')
            .ok_or_else(|| corrupt(format!("unexpected tensor {key}")))?;
        let map = match kind {
            "adapter" => &mut ck.adapters,
            "m" => &mut ck.m,
            "v" => &mut ck.v,
            _ => return Err(corrupt(format!("unexpected tensor {key}"))),
        };
        map.insert(name.to_string(), t);
    }
    Ok(ck)
}

/// Checkpoint files in `dir`, oldest first, by step.
pub fn list(dir: &Path) -> Vec<(u64, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<(u64, PathBuf)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let step = name
                .strip_prefix("step-")?
                .strip_suffix(".ckpt")?
                .parse()
                .ok()?;
            Some((step, e.path()))
        })
        .collect();
    out.sort();
    out
}

/// Deletes all but the newest `keep` checkpoints in `dir`.
pub fn prune(dir: &Path, keep: usize) -> Result<(), CheckpointError> {
    let all = list(dir);
    let n = all.len().saturating_sub(keep);
    for (_, path) in all.into_iter().take(n) {
        std::fs::remove_file(&path).map_err(|source| CheckpointError::Io { path, source })?;
    }
    Ok(())
}
