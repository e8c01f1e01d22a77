//! The all-reduce alone: how long `Collective::all_reduce_sum` takes for a
//! buffer of N floats when every rank arrives at once (a barrier before each
//! call), over MPI. `scripts/mpi_bench.sh` runs it with the size of the
//! benchmark model's gradient buffer; the trainer's `allreduce_ms` adds the
//! wait for the slowest rank to this.
//!
//! ```text
//! cargo build --release --features mpi --example allreduce_time
//! mpirun -np 2 target/release/examples/allreduce_time 868354 50
//! ```

use std::time::{Duration, Instant};

use anyhow::Context as _;
use qlora_scale::train::collective::Collective;
use qlora_scale::train::collective::mpi::MpiCollective;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let len: usize = args
        .next()
        .context("usage: allreduce_time FLOATS [REPEATS]")?
        .parse()
        .context("FLOATS")?;
    let repeats: usize = args
        .next()
        .map_or(Ok(50), |r| r.parse())
        .context("REPEATS")?;
    let coll = MpiCollective::init(Duration::from_secs(60))?;
    let mut buf = vec![1f32; len];
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        coll.barrier()?;
        let t = Instant::now();
        coll.all_reduce_sum(&mut buf)?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
        buf.fill(1.0);
    }
    times.sort_by(f64::total_cmp);
    if coll.rank() == 0 {
        println!(
            "{} ranks, {len} floats ({:.1} MB): all-reduce median {:.2} ms, min {:.2} ms",
            coll.world_size(),
            len as f64 * 4.0 / 1e6,
            times[times.len() / 2],
            times[0]
        );
    }
    Ok(())
}
