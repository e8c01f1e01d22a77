//! Output buffers zero-filled on rayon's threads.
//!
//! `vec![0.0; n]` asks the allocator for zeroed memory. Below the `mmap`
//! threshold `train` gives glibc (`trainer.malloc_mmap_threshold_bytes`, 32
//! MiB) a buffer comes from the heap, and `calloc` clears it with one `memset` on the calling thread while the
//! other threads wait for the op's parallel part: in a profile of a
//! checkpointed training step that serial `memset` was 4% of all samples,
//! on one thread. [`zeroed`] clears such buffers in parallel chunks instead.
//! Larger ones come from fresh `mmap` pages, already zero, and are left to
//! the allocator.

use candle_core::WithDType;
use rayon::prelude::*;

/// Buffers at least this large come from `mmap`: zero pages, no `memset`.
const FRESH_PAGES_BYTES: usize = crate::tables::trainer::MALLOC_MMAP_THRESHOLD_BYTES as usize;

/// Buffers below this many bytes are cleared on the calling thread.
const PAR_MIN_BYTES: usize = crate::tables::trainer::PARALLEL_ZERO_MIN_BYTES as usize;

/// Bytes each parallel task clears.
const TASK_BYTES: usize = crate::tables::trainer::PARALLEL_ZERO_TASK_BYTES as usize;

/// `n` zeros, cleared on rayon's threads when the buffer is large enough
/// for that to pay and small enough to come from the heap.
pub fn zeroed<T: WithDType>(n: usize) -> Vec<T> {
    filled(n, T::zero())
}

/// `n` copies of `zero` (the type's zero: for a larger buffer the
/// allocator's fresh pages are taken as they are, through `vec!`), written
/// on rayon's threads as [`zeroed`] says.
pub fn filled<T: Copy + Send + Sync>(n: usize, zero: T) -> Vec<T> {
    let bytes = n.saturating_mul(std::mem::size_of::<T>());
    if !(PAR_MIN_BYTES..FRESH_PAGES_BYTES).contains(&bytes) || rayon::current_num_threads() < 2 {
        return vec![zero; n];
    }
    let mut v = Vec::with_capacity(n);
    let per_task = (TASK_BYTES / std::mem::size_of::<T>().max(1)).max(1);
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(per_task)
        .for_each(|chunk| {
            for x in chunk {
                x.write(zero);
            }
        });
    // SAFETY: the capacity is at least `n`, and every one of the first `n`
    // elements was written above.
    unsafe { v.set_len(n) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_is_all_zeros() {
        for n in [0, 1, 1000, 65_536, 65_537, 1 << 20, 3 << 20] {
            let v = zeroed::<f32>(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x == 0.0), "n = {n}");
        }
        // Reused heap memory comes back cleared too.
        drop(vec![1.5f64; 100_000]);
        assert!(zeroed::<f64>(100_000).iter().all(|&x| x == 0.0));
        assert!(filled(200_000, 0u16).iter().all(|&x| x == 0));
    }
}
