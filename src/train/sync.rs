//! What the ranks of a data-parallel run exchange, beside the collective's
//! own calls: the check that they train the same run, the checkpoint a
//! resume starts from, and each step's gradient sums.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor, Var};
use serde_json::json;

use super::checkpoint::{self, Checkpoint, CheckpointError};
use super::collective::{Collective, CollectiveError};
use super::spec::RunSpec;
use super::trainer::{Observer, TrainError};

/// Checks that every rank trains the same spec on the same data as rank 0:
/// rank 0 sends its spec and `fingerprint` of its training data, and each
/// rank compares them with its own (the spec as JSON, so that a difference
/// is named by its key).
pub fn check_same_run(
    coll: &dyn Collective,
    spec: &RunSpec,
    fingerprint: &str,
) -> Result<(), TrainError> {
    let mut mine = serde_json::to_value(spec).unwrap_or_default();
    if let Some(map) = mine.as_object_mut() {
        map.insert("training data".into(), json!(fingerprint));
    }
    let text = mine.to_string();
    let mut theirs = text.clone().into_bytes();
    coll.broadcast(0, &mut theirs)?;
    if theirs == text.as_bytes() {
        return Ok(());
    }
    let theirs: serde_json::Value = serde_json::from_slice(&theirs).unwrap_or_default();
    let differ: Vec<String> = mine
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(k, v)| theirs.get(k.as_str()) != Some(*v))
        .map(|(k, v)| {
            format!(
                "{k} is {} on rank 0 but {v} here",
                theirs.get(k.as_str()).unwrap_or(&serde_json::Value::Null)
            )
        })
        .collect();
    Err(CollectiveError::Mismatch {
        rank: coll.rank(),
        what: if differ.is_empty() {
            "the configurations differ".to_string()
        } else {
            differ.join("; ")
        },
    }
    .into())
}

/// The newest checkpoint in `dir` that loads and verifies, with its bytes;
/// corrupt ones are reported through `obs` and skipped.
fn newest_good_checkpoint(
    dir: &Path,
    obs: &mut dyn Observer,
) -> Option<(PathBuf, Vec<u8>, Checkpoint)> {
    for (_, path) in checkpoint::list(dir).into_iter().rev() {
        match std::fs::read(&path)
            .map_err(|source| CheckpointError::Io {
                path: path.clone(),
                source,
            })
            .and_then(|bytes| checkpoint::parse(&path, &bytes).map(|ck| (bytes, ck)))
        {
            Ok((bytes, ck)) => return Some((path, bytes, ck)),
            Err(e) => obs.warn(&format!(
                "{}; trying the previous checkpoint",
                crate::report::chain_message(&e)
            )),
        }
    }
    None
}

/// The checkpoint to resume from: rank 0 picks the newest good one in
/// `dir` and sends it to the other ranks, which need no access to `dir`.
pub fn checkpoint_to_resume(
    coll: &dyn Collective,
    dir: &Path,
    obs: &mut dyn Observer,
) -> Result<(PathBuf, Checkpoint), TrainError> {
    let found = if coll.rank() == 0 {
        newest_good_checkpoint(dir, obs)
    } else {
        None
    };
    let none = || TrainError::Resume(format!("no usable checkpoint in {}", dir.display()));
    if coll.world_size() == 1 {
        return found.map(|(p, _, ck)| (p, ck)).ok_or_else(none);
    }
    let (mut name, mut bytes, ck) = match found {
        Some((p, bytes, ck)) => (
            p.to_string_lossy().into_owned().into_bytes(),
            bytes,
            Some(ck),
        ),
        None => (Vec::new(), Vec::new(), None),
    };
    coll.broadcast(0, &mut name)?;
    if name.is_empty() {
        return Err(none());
    }
    coll.broadcast(0, &mut bytes)?;
    let path = PathBuf::from(String::from_utf8_lossy(&name).into_owned());
    match ck {
        Some(ck) => Ok((path, ck)),
        None => {
            let ck = checkpoint::parse(&path, &bytes)?;
            Ok((path, ck))
        }
    }
}

/// Sums every rank's step in one all-reduce: the gradients of `vars` (as
/// one flat `f32` buffer), the loss sums, the token counts and whether the
/// rank was asked to stop. Returns the gradients divided by the step's
/// total token count, the total loss sum, the total tokens, and whether any
/// rank was asked to stop.
pub fn all_reduce_step(
    coll: &dyn Collective,
    vars: &[(String, Var)],
    grads: HashMap<String, Tensor>,
    loss_sum: f64,
    tokens: u64,
    stop: bool,
) -> Result<(HashMap<String, Tensor>, f64, u64, bool), TrainError> {
    let grad_len: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut flat = Vec::with_capacity(grad_len + 2);
    flatten_grads(vars, &grads, &mut flat)?;
    drop(grads);
    // Token counts are exact in f32 up to 2^24 per step.
    flat.extend([loss_sum as f32, tokens as f32, f32::from(u8::from(stop))]);
    coll.all_reduce_sum(&mut flat)?;
    let tokens = flat[grad_len + 1].round() as u64;
    let stop = flat[grad_len + 2] > 0.0;
    let grads = unflatten_grads(vars, &flat, tokens.max(1) as f64)?;
    Ok((grads, f64::from(flat[grad_len]), tokens, stop))
}

/// Appends the gradients of `vars` to `flat` in order, as `f32`, zeros for
/// a variable that has none.
fn flatten_grads(
    vars: &[(String, Var)],
    grads: &HashMap<String, Tensor>,
    flat: &mut Vec<f32>,
) -> candle_core::Result<()> {
    for (name, var) in vars {
        match grads.get(name) {
            Some(g) => flat.extend(g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => flat.extend(std::iter::repeat_n(0f32, var.elem_count())),
        }
    }
    Ok(())
}

/// The gradients of `vars` from the front of `flat` (the inverse of
/// [`flatten_grads`]), each divided by `divisor`.
fn unflatten_grads(
    vars: &[(String, Var)],
    flat: &[f32],
    divisor: f64,
) -> candle_core::Result<HashMap<String, Tensor>> {
    let mut grads = HashMap::with_capacity(vars.len());
    let mut at = 0;
    for (name, var) in vars {
        let n = var.elem_count();
        let Some(piece) = flat.get(at..at + n) else {
            candle_core::bail!("gradient buffer too short for {name}");
        };
        let g = (Tensor::from_slice(piece, var.shape(), var.device())?.to_dtype(var.dtype())?
            / divisor)?;
        grads.insert(name.clone(), g);
        at += n;
    }
    Ok(grads)
}
