//! A memory budget for work whose size a stranger controls: a program given
//! by a downloaded file (a model's Jinja chat template) can build values
//! that nothing else bounds, such as a string concatenated with itself again
//! and again, which doubles per instruction and passes any instruction
//! budget long before memory runs out.
//!
//! [`GuardedAlloc`] is a global allocator over the system one that counts,
//! per thread, the bytes a [`limit`] scope holds beyond what it started
//! with. Past the scope's budget it writes the scope's message to standard
//! error and ends the process with exit status 1: an allocator cannot fail
//! an allocation without aborting (a signal), and cannot unwind, so a clean
//! exit with a message naming the culprit is the one clean way out. The
//! `train` binary installs it; it does nothing in a program that does not
//! (`limit` then only runs its closure).
//!
//! Outside a scope the cost is one thread-local read per allocation.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, counting the bytes of [`limit`] scopes.
#[derive(Debug, Clone, Copy, Default)]
pub struct GuardedAlloc;

/// The open scope of this thread.
#[derive(Clone, Copy)]
struct Scope {
    /// Bytes allocated minus bytes freed since the scope opened.
    held: isize,
    budget: isize,
    /// The message written when the budget is passed; it lives in
    /// [`limit`]'s caller for the whole scope.
    message: *const u8,
    message_len: usize,
}

thread_local! {
    static SCOPE: Cell<Option<Scope>> = const { Cell::new(None) };
}

/// Runs `f` with `budget` bytes of memory for this thread beyond what it
/// already holds, when [`GuardedAlloc`] is the global allocator. Past the
/// budget the process writes `message` (one line, newline added) to
/// standard error and exits with status 1. Scopes do not nest: an inner one
/// replaces the outer one until it ends.
pub fn limit<T>(budget: u64, message: &str, f: impl FnOnce() -> T) -> T {
    struct Restore(Option<Scope>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = SCOPE.try_with(|s| s.set(self.0));
        }
    }
    let scope = Scope {
        held: 0,
        budget: isize::try_from(budget).unwrap_or(isize::MAX),
        message: message.as_ptr(),
        message_len: message.len(),
    };
    let _restore = Restore(SCOPE.with(|s| s.replace(Some(scope))));
    f()
}

/// Counts `delta` bytes against this thread's scope, if one is open.
fn charge(delta: isize) {
    let _ = SCOPE.try_with(|cell| {
        let Some(mut scope) = cell.get() else {
            return;
        };
        scope.held = scope.held.saturating_add(delta);
        if delta > 0 && scope.held > scope.budget {
            // Neither call allocates: this runs inside the allocator.
            // SAFETY: `message` points to `message_len` bytes of a `&str`
            // that outlives the scope (`limit` borrows it for the scope's
            // whole life, and the scope is closed when `limit` returns).
            unsafe {
                libc::write(2, scope.message.cast(), scope.message_len);
                libc::write(2, b"\n".as_ptr().cast(), 1);
                libc::_exit(1);
            }
        }
        cell.set(Some(scope));
    });
}

fn size(n: usize) -> isize {
    isize::try_from(n).unwrap_or(isize::MAX)
}

// SAFETY: every call is passed on unchanged to `System`, which upholds the
// contract; the counting around it neither allocates nor unwinds.
unsafe impl GlobalAlloc for GuardedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        charge(size(layout.size()));
        // SAFETY: the caller's guarantees on `layout` are passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        charge(size(layout.size()));
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System` with `layout` (every allocation
        // here goes to `System`).
        unsafe { System.dealloc(ptr, layout) };
        charge(-size(layout.size()));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        charge(size(new_size) - size(layout.size()));
        // SAFETY: as for `dealloc`, and the caller's guarantees on
        // `new_size` are passed on.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Environment variables by which a user tunes glibc's malloc: when one is
/// set, [`keep_freed_memory`] leaves malloc as the user set it.
pub const MALLOC_ENV_VARS: [&str; 3] = [
    "GLIBC_TUNABLES",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TRIM_THRESHOLD_",
];

/// Makes glibc's malloc keep freed memory for reuse instead of handing it
/// back to the kernel, with the thresholds of `tables/defaults.toml`
/// (`trainer.malloc_mmap_threshold_bytes`, `trainer.malloc_trim_threshold_bytes`).
///
/// A training step allocates and frees the same large tensors every step.
/// By default glibc serves each block over 128 KiB (rising with use, up to
/// 32 MiB) from its own `mmap` and unmaps it when freed, and returns freed
/// memory at the top of the heap past 128 KiB: the next step then takes a
/// page fault and a kernel zero-fill for every 4 KiB page again, which was
/// a quarter of the benchmark's CPU samples (`docs/design-notes.md`, "Where
/// a step's time goes"). Served from the heap and kept, the pages are
/// reused. The peak resident memory stays what the peak allocation needs, as
/// long as one heap serves every thread: the step runs on rayon's threads
/// (`train::trainer`), and a heap per thread would each keep their own
/// freed memory (peak RSS then varied from 0.66 to 1.08 GB between runs of
/// the benchmark model), so `trainer.malloc_arena_max` is 1.
///
/// Returns whether the settings were passed to glibc: `false` off glibc,
/// when one of [`MALLOC_ENV_VARS`] is set, or when glibc refuses a value
/// (glibc 2.36 reports an mmap threshold over its 32 MiB limit as taken, and
/// ignores it; `tests/malloc_reuse.rs` checks the effect itself).
pub fn keep_freed_memory() -> bool {
    if MALLOC_ENV_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        return false;
    }
    set_malloc_thresholds(
        crate::tables::trainer::MALLOC_MMAP_THRESHOLD_BYTES,
        crate::tables::trainer::MALLOC_TRIM_THRESHOLD_BYTES,
        crate::tables::trainer::MALLOC_ARENA_MAX,
    )
}

/// `mallopt` of `M_MMAP_THRESHOLD`, `M_TRIM_THRESHOLD` and `M_ARENA_MAX`;
/// whether glibc took all three.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set_malloc_thresholds(mmap: u64, trim: u64, arenas: u64) -> bool {
    let int = |v: u64| libc::c_int::try_from(v).ok();
    let (Some(mmap), Some(trim), Some(arenas)) = (int(mmap), int(trim), int(arenas)) else {
        return false;
    };
    // SAFETY: `mallopt` takes any values and reports the ones it refuses;
    // it takes malloc's own lock, so other threads may allocate meanwhile.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, mmap) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, trim) == 1
            && libc::mallopt(libc::M_ARENA_MAX, arenas) == 1
    }
}

/// Not glibc: nothing to set.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_malloc_thresholds(_mmap: u64, _trim: u64, _arenas: u64) -> bool {
    false
}
