//! The NCCL collective (cargo feature `nccl`, which needs CUDA to build):
//! one process per GPU, started by hand or by any launcher with
//! `--nccl-rank R --nccl-world-size N --nccl-id-file FILE`. Rank 0 creates
//! the communicator's unique id and writes it to the file atomically; the
//! others wait for the file (at most the collective timeout) and read it, as
//! candle's `llama_multiprocess` example does. The file must be fresh for
//! each run (rank 0 replaces it; the others must not read an old one, so
//! delete it between runs).
//!
//! The trainer computes on the CPU today; this collective copies the flat
//! gradient buffer to the rank's GPU (ordinal = rank), reduces it there with
//! `ncclAllReduce` and copies it back.
//!
//! This module is written against cudarc 0.19.10 (candle 0.11's). The
//! project's machines have no CUDA, so it has never been built with candle's
//! `nccl` feature nor run; it was only type-checked (and linted) against
//! cudarc alone, with its `nccl` and dynamic-loading features.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::cuda_backend::cudarc;
use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::safe::{Comm, Id, ReduceOp};

use super::{Collective, CollectiveError, Watchdog};
use crate::safe_io::write_atomic;

/// Bytes of an NCCL unique id.
const ID_BYTES: usize = 128;

/// One rank of a multi-GPU run.
pub struct NcclCollective {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
}

impl std::fmt::Debug for NcclCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NcclCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

fn connect_err(why: impl std::fmt::Display) -> CollectiveError {
    CollectiveError::Connect {
        backend: "nccl",
        why: why.to_string(),
    }
}

/// Rank 0: a new id, written to `path`. Others: the id read from `path`,
/// waiting for it up to `timeout`.
fn share_id(rank: usize, path: &Path, timeout: Duration) -> Result<Id, CollectiveError> {
    if rank == 0 {
        let id = Id::new().map_err(|e| connect_err(format!("ncclGetUniqueId: {:?}", e.0)))?;
        let bytes: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        write_atomic(path, &bytes)
            .map_err(|e| connect_err(format!("cannot write {}: {e}", path.display())))?;
        return Ok(id);
    }
    let start = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() == ID_BYTES => {
                let mut internal = [0 as ::core::ffi::c_char; ID_BYTES];
                for (dst, &b) in internal.iter_mut().zip(&bytes) {
                    *dst = b as ::core::ffi::c_char;
                }
                return Ok(Id::uninit(internal));
            }
            Ok(bytes) => {
                return Err(connect_err(format!(
                    "{} holds {} bytes, not an NCCL id ({ID_BYTES} bytes)",
                    path.display(),
                    bytes.len()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if start.elapsed() > timeout {
                    return Err(connect_err(format!(
                        "rank 0 wrote no id to {} within {} s",
                        path.display(),
                        timeout.as_secs()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => {
                return Err(connect_err(format!("cannot read {}: {e}", path.display())));
            }
        }
    }
}

impl NcclCollective {
    /// Joins the run as rank `rank` of `world` on GPU `rank`, the id shared
    /// through `id_file`; every call may take `timeout` at most.
    pub fn connect(
        rank: usize,
        world: usize,
        id_file: &Path,
        timeout: Duration,
    ) -> Result<Self, CollectiveError> {
        if world == 0 || rank >= world {
            return Err(connect_err(format!("rank {rank} of {world} ranks")));
        }
        let id = share_id(rank, id_file, timeout)?;
        let ctx = CudaContext::new(rank)
            .map_err(|e| connect_err(format!("cannot open GPU {rank}: {e}")))?;
        let stream = ctx.default_stream();
        let watchdog = Watchdog::new(rank, world, timeout);
        let comm = {
            let _armed = watchdog.guard("NCCL communicator set-up");
            Comm::from_rank(Arc::clone(&stream), rank, world, id)
                .map_err(|e| connect_err(format!("ncclCommInitRank: {:?}", e.0)))?
        };
        Ok(Self {
            comm,
            stream,
            rank,
            size: world,
            watchdog,
        })
    }

    fn call_err(&self, op: &'static str, why: impl std::fmt::Debug) -> CollectiveError {
        CollectiveError::Call {
            rank: self.rank,
            backend: "nccl",
            op,
            why: format!("{why:?}"),
        }
    }
}

/// The default id file of a run: `nccl_id` in its output directory.
pub fn default_id_file(output_dir: &Path) -> PathBuf {
    output_dir.join("nccl_id")
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        let _armed = self.watchdog.guard("all-reduce");
        let op = "all-reduce";
        let mut dev = self
            .stream
            .clone_htod(&*buf)
            .map_err(|e| self.call_err(op, e))?;
        self.comm
            .all_reduce_in_place(&mut dev, &ReduceOp::Sum)
            .map_err(|e| self.call_err(op, e.0))?;
        self.stream
            .memcpy_dtoh(&dev, buf)
            .map_err(|e| self.call_err(op, e))?;
        self.stream.synchronize().map_err(|e| self.call_err(op, e))
    }

    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), CollectiveError> {
        let _armed = self.watchdog.guard("broadcast");
        let op = "broadcast";
        let root_rank = i32::try_from(root).map_err(|_| self.call_err(op, "no such rank"))?;
        let len = [bytes.len() as u64];
        let mut dev_len = self
            .stream
            .clone_htod(&len[..])
            .map_err(|e| self.call_err(op, e))?;
        self.comm
            .broadcast_in_place(&mut dev_len, root_rank)
            .map_err(|e| self.call_err(op, e.0))?;
        let len = self
            .stream
            .clone_dtoh(&dev_len)
            .map_err(|e| self.call_err(op, e))?;
        let n = len.first().copied().unwrap_or(0) as usize;
        if self.rank != root {
            bytes.clear();
            bytes.resize(n, 0);
        }
        if n == 0 {
            return Ok(());
        }
        let mut dev = self
            .stream
            .clone_htod(&bytes[..])
            .map_err(|e| self.call_err(op, e))?;
        self.comm
            .broadcast_in_place(&mut dev, root_rank)
            .map_err(|e| self.call_err(op, e.0))?;
        self.stream
            .memcpy_dtoh(&dev, &mut bytes[..])
            .map_err(|e| self.call_err(op, e))?;
        self.stream.synchronize().map_err(|e| self.call_err(op, e))
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        // NCCL has no barrier: an all-reduce of one number is one.
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }

    fn abort(&self, code: i32) -> ! {
        // Dropping the communicator would abort it; exiting is enough: the
        // other ranks' watchdogs end them.
        std::process::exit(code)
    }
}
