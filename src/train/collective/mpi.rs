//! The MPI collective (cargo feature `mpi`): `mpirun -np N train ...`, one
//! process per rank, over the system's MPI (rsmpi).
//!
//! MPI's default error handler (`MPI_ERRORS_ARE_FATAL`) stays: a failed
//! call ends the whole job and the launcher names the rank. A rank that
//! dies is noticed by `mpirun`, which ends the others and names it; a rank
//! that hangs is caught by the [`Watchdog`] of the others.

use std::time::Duration;

use ::mpi::Threading;
use ::mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use ::mpi::environment::Universe;
use ::mpi::topology::{Communicator, SimpleCommunicator};

use super::{Collective, CollectiveError, Watchdog};

/// Elements per MPI call: counts are C `int`s, so large buffers go in
/// pieces.
const CHUNK: usize = 1 << 30;

/// The ranks of `MPI_COMM_WORLD`.
pub struct MpiCollective {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    watchdog: Watchdog,
    // Finalizes MPI when dropped: declared last, dropped last.
    _universe: Universe,
}

impl std::fmt::Debug for MpiCollective {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MpiCollective")
            .field("rank", &self.rank)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl MpiCollective {
    /// Initialises MPI (only the main thread calls it: `Funneled`) and
    /// joins `MPI_COMM_WORLD`; every call may take `timeout` at most.
    pub fn init(timeout: Duration) -> Result<Self, CollectiveError> {
        let connect = |why: &str| CollectiveError::Connect {
            backend: "mpi",
            why: why.to_string(),
        };
        let (universe, threading) = ::mpi::initialize_with_threading(Threading::Funneled)
            .ok_or_else(|| connect("MPI is already initialised in this process"))?;
        if threading == Threading::Single {
            return Err(connect(
                "this MPI cannot serve a multi-threaded process (MPI_THREAD_FUNNELED)",
            ));
        }
        let world = universe.world();
        let rank = usize::try_from(world.rank()).map_err(|_| connect("negative rank"))?;
        let size = usize::try_from(world.size()).map_err(|_| connect("negative size"))?;
        Ok(Self {
            world,
            rank,
            size,
            watchdog: Watchdog::new(rank, size, timeout),
            _universe: universe,
        })
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.size
    }

    fn backend(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let _armed = self.watchdog.guard("all-reduce");
        let mut send = Vec::with_capacity(buf.len().min(CHUNK));
        for piece in buf.chunks_mut(CHUNK) {
            send.clear();
            send.extend_from_slice(piece);
            self.world
                .all_reduce_into(&send[..], piece, SystemOperation::sum());
        }
        Ok(())
    }

    fn broadcast(&self, root: usize, bytes: &mut Vec<u8>) -> Result<(), CollectiveError> {
        let _armed = self.watchdog.guard("broadcast");
        let root_rank = i32::try_from(root).map_err(|_| CollectiveError::Call {
            rank: self.rank,
            backend: "mpi",
            op: "broadcast",
            why: format!("no rank {root}"),
        })?;
        let process = self.world.process_at_rank(root_rank);
        let mut len = bytes.len() as u64;
        process.broadcast_into(&mut len);
        if self.rank != root {
            bytes.clear();
            bytes.resize(len as usize, 0);
        }
        for piece in bytes.chunks_mut(CHUNK) {
            process.broadcast_into(piece);
        }
        Ok(())
    }

    fn barrier(&self) -> Result<(), CollectiveError> {
        let _armed = self.watchdog.guard("barrier");
        self.world.barrier();
        Ok(())
    }

    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}
