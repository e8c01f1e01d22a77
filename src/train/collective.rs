//! Data parallelism: what the ranks of a run say to each other.
//!
//! Every rank holds the frozen base and the adapters, and trains on its own
//! shard of each global micro-batch ([`shard_range`]); after backward the
//! adapter gradients, the summed token losses and the token counts of all
//! ranks are added up with one all-reduce per optimizer step, so every rank
//! takes the same step. A [`Collective`] is the little that needs:
//!
//! - [`SingleProcess`]: one process, no communication (the default);
//! - `mpi::MpiCollective` (cargo feature `mpi`): processes started by
//!   `mpirun`, over the system's MPI;
//! - `nccl::NcclCollective` (cargo feature `nccl`): one process per GPU
//!   over NCCL, the communicator's id shared through a file.
//!
//! A rank that stops answering must not leave the others waiting forever:
//! the MPI and NCCL collectives arm a [`Watchdog`] around every call, which
//! ends the process with a message naming its rank when the call has not
//! returned within the timeout (`collective_timeout_s`).
//!
//! ```
//! use qlora_scale::train::collective::{Collective, SingleProcess, shard_range};
//! let one = SingleProcess;
//! let mut buf = [1.0f32, 2.0];
//! one.all_reduce_sum(&mut buf).unwrap();
//! assert_eq!((one.rank(), one.world_size(), buf), (0, 1, [1.0, 2.0]));
//! // Rank 1 of 2 takes the second half of a global batch of 8.
//! assert_eq!(shard_range(8, 1, 2), 4..8);
//! ```

use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;

/// Errors of setting up or using a collective.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The processes could not be connected.
    #[error("cannot connect the ranks ({backend}): {why}")]
    Connect {
        /// `mpi` or `nccl`.
        backend: &'static str,
        /// Why.
        why: String,
    },
    /// `mpirun` (or another launcher) started several processes, but this
    /// binary cannot talk to them.
    #[error(
        "started by an MPI launcher as rank {rank} of {world}, but this train was built \
         without the `mpi` feature, so every process would train alone and write the same \
         files; build it with `cargo build --release --features mpi`"
    )]
    NotBuiltWithMpi {
        /// The launcher's rank.
        rank: usize,
        /// The launcher's process count.
        world: usize,
    },
    /// A collective call failed.
    #[error("rank {rank}: {op} failed ({backend}): {why}")]
    Call {
        /// This rank.
        rank: usize,
        /// `mpi` or `nccl`.
        backend: &'static str,
        /// What was being done (`all-reduce`).
        op: &'static str,
        /// Why.
        why: String,
    },
    /// The ranks disagree about something they must share.
    #[error("rank {rank} disagrees with rank 0: {what}")]
    Mismatch {
        /// The rank that noticed.
        rank: usize,
        /// What differs.
        what: String,
    },
}

/// What data-parallel training needs from the processes that run it. Every
/// call is collective: all ranks make the same calls in the same order.
pub trait Collective {
    /// This process's rank, `0..world_size()`.
    fn rank(&self) -> usize;
    /// How many processes train together.
    fn world_size(&self) -> usize;
    /// `single`, `mpi` or `nccl` (printed by `--dry-run --json`).
    fn backend(&self) -> &'static str;
    /// Replaces `buf` on every rank by the element-wise sum of everyone's
    /// `buf`. All ranks pass buffers of the same length.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Gives every rank `root`'s `bytes` (other ranks' buffers are resized).
    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), CollectiveError>;
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<(), CollectiveError>;
    /// Ends every rank of the run with exit status `code` (MPI: `MPI_Abort`;
    /// elsewhere this process, and the others notice through their
    /// watchdog). Called after a rank reported an error, so the others do
    /// not wait in their next collective.
    fn abort(&self, code: i32) -> !;
}

/// One process: every collective is the identity, at no cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn backend(&self) -> &'static str {
        "single"
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn broadcast(&self, _root: usize, _bytes: &mut Vec<u8>) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn barrier(&self) -> Result<(), CollectiveError> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The examples of a global batch of `len` that rank `rank` of `world`
/// trains on: contiguous, balanced slices in rank order (rank 0 the first
/// `len / world`, ...). Over the ranks they cover `0..len` exactly once;
/// with `len = world * b` every rank gets exactly `b`.
///
/// ```
/// use qlora_scale::train::collective::shard_range;
/// assert_eq!(shard_range(6, 0, 2), 0..3);
/// assert_eq!(shard_range(5, 1, 2), 2..5);
/// ```
pub fn shard_range(len: usize, rank: usize, world: usize) -> Range<usize> {
    let world = world.max(1);
    let rank = rank.min(world - 1);
    // `len * rank` cannot overflow for any real batch; saturate anyway.
    let start = len.saturating_mul(rank) / world;
    let end = len.saturating_mul(rank + 1) / world;
    start..end
}

/// The rank and process count an MPI launcher (`mpirun`/`mpiexec` of Open
/// MPI, MPICH or Intel MPI, or Slurm's PMI) gave this process, read from the
/// variables it sets; `None` when no launcher started it.
pub fn mpi_launcher_rank() -> Option<(usize, usize)> {
    let get = |name: &str| std::env::var(name).ok()?.trim().parse::<usize>().ok();
    [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("PMI_RANK", "PMI_SIZE"),
        ("PMIX_RANK", "PMIX_SIZE"),
    ]
    .into_iter()
    .find_map(|(rank, size)| Some((get(rank)?, get(size)?)))
}

/// The collective of a process that is not part of a multi-GPU NCCL run:
/// MPI when an MPI launcher started it (and the `mpi` feature is built),
/// else a single process. An MPI launch with several processes in a build
/// without `mpi` is an error: the processes would overwrite each other's
/// files.
pub fn connect(timeout: Duration) -> Result<Box<dyn Collective>, CollectiveError> {
    let launched = mpi_launcher_rank();
    #[cfg(feature = "mpi")]
    if launched.is_some() {
        return Ok(Box::new(mpi::MpiCollective::init(timeout)?));
    }
    #[cfg(not(feature = "mpi"))]
    {
        let _ = timeout;
        if let Some((rank, world)) = launched
            && world > 1
        {
            return Err(CollectiveError::NotBuiltWithMpi { rank, world });
        }
    }
    Ok(Box::new(SingleProcess))
}

/// What the watchdog thread watches.
#[derive(Debug, Default)]
struct WatchState {
    /// The call in progress and when it must have returned.
    armed: Option<(&'static str, Instant)>,
    /// The owner is gone.
    stop: bool,
}

type Shared = Arc<(Mutex<WatchState>, Condvar)>;

fn lock(shared: &Shared) -> MutexGuard<'_, WatchState> {
    shared.0.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Ends this process when a collective call has not returned in time: a
/// rank that died or hangs would otherwise keep the others waiting forever.
/// The message names this rank and the call; the launcher (`mpirun`) names
/// the rank that died.
#[derive(Debug)]
pub struct Watchdog {
    shared: Shared,
    timeout: Duration,
    thread: Option<JoinHandle<()>>,
}

/// Exit status of a rank its watchdog ended.
pub const WATCHDOG_EXIT_CODE: i32 = 3;

impl Watchdog {
    /// A watchdog for rank `rank` of `world`, allowing each call `timeout`.
    pub fn new(rank: usize, world: usize, timeout: Duration) -> Self {
        let shared: Shared = Arc::default();
        let watched = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("collective-watchdog".into())
            .spawn(move || watch(&watched, rank, world, timeout))
            .ok();
        Self {
            shared,
            timeout,
            thread,
        }
    }

    /// Arms the watchdog for `op` until the guard is dropped.
    pub fn guard(&self, op: &'static str) -> WatchGuard<'_> {
        lock(&self.shared).armed = Some((op, Instant::now() + self.timeout));
        self.shared.1.notify_all();
        WatchGuard { dog: self }
    }
}

fn watch(shared: &Shared, rank: usize, world: usize, timeout: Duration) {
    let mut state = lock(shared);
    loop {
        if state.stop {
            return;
        }
        state = match state.armed {
            None => shared.1.wait(state).unwrap_or_else(PoisonError::into_inner),
            Some((op, deadline)) => {
                let now = Instant::now();
                if now >= deadline {
                    eprintln!(
                        "error: rank {rank} of {world}: the {op} got no answer from the other \
                         ranks within {} s: a rank died or hangs; stopping this rank (the \
                         launcher's messages name the rank that failed; checkpoints already \
                         written are intact)",
                        timeout.as_secs()
                    );
                    std::process::exit(WATCHDOG_EXIT_CODE);
                }
                shared
                    .1
                    .wait_timeout(state, deadline - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0
            }
        };
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        lock(&self.shared).stop = true;
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Disarms the watchdog when dropped.
#[derive(Debug)]
pub struct WatchGuard<'a> {
    dog: &'a Watchdog,
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        lock(&self.dog.shared).armed = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_every_example_once() {
        for world in 1..=5 {
            for len in 0..=23 {
                let mut seen = vec![0u32; len];
                let mut prev_end = 0;
                for rank in 0..world {
                    let r = shard_range(len, rank, world);
                    assert_eq!(r.start, prev_end, "contiguous, in rank order");
                    prev_end = r.end;
                    for i in r {
                        seen[i] += 1;
                    }
                }
                assert_eq!(prev_end, len);
                assert!(seen.iter().all(|&c| c == 1), "len {len} world {world}");
            }
        }
        assert_eq!(shard_range(12, 2, 3), 8..12);
    }

    #[test]
    fn guard_disarms() {
        let dog = Watchdog::new(0, 1, Duration::from_millis(50));
        for _ in 0..3 {
            let _g = dog.guard("test call");
        }
        std::thread::sleep(Duration::from_millis(120));
        // Still alive: the guard disarmed the deadline.
    }
}
