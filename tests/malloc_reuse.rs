//! `keep_freed_memory` (called first thing in `train`'s `main`) makes glibc
//! serve blocks under the table's threshold from the heap and keep freed
//! pages, so that a training step reuses the pages the last one freed
//! instead of faulting in fresh zeroed ones.
//!
//! One test in its own binary: it changes malloc for the whole process and
//! counts the process's page faults.

#![cfg(all(target_os = "linux", target_env = "gnu"))]

use qlora_scale::alloc_guard::{MALLOC_ENV_VARS, keep_freed_memory};
use qlora_scale::tables::trainer::MALLOC_MMAP_THRESHOLD_BYTES;

/// Minor page faults of this process so far.
fn minor_faults() -> i64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is a valid, writable `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage");
    // SAFETY: getrusage filled it.
    unsafe { usage.assume_init() }.ru_minflt
}

/// Bytes glibc holds in blocks it mapped on their own.
fn mmapped_bytes() -> usize {
    // SAFETY: mallinfo2 only reads malloc's own statistics.
    unsafe { libc::mallinfo2() }.hblkhd
}

#[test]
fn blocks_under_the_threshold_come_from_the_heap_and_freed_pages_are_reused() {
    if MALLOC_ENV_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some())
    {
        eprintln!("skipped: the environment tunes malloc ({MALLOC_ENV_VARS:?})");
        return;
    }
    assert!(keep_freed_memory());
    // Half the threshold: glibc's default (128 KiB, rising to at most
    // 32 MiB as blocks are freed) maps a block this size on its own.
    let size = usize::try_from(MALLOC_MMAP_THRESHOLD_BYTES / 2).expect("fits usize");
    let pages = i64::try_from(size / 4096).expect("fits i64");
    let mapped = mmapped_bytes();
    let block = vec![1u8; size];
    assert!(
        mmapped_bytes() < mapped + size,
        "a {size}-byte block was mapped on its own, not taken from the heap"
    );
    drop(block);
    let faults = minor_faults();
    let block = vec![2u8; size];
    let refaulted = minor_faults() - faults;
    assert!(
        refaulted < pages / 4,
        "{refaulted} page faults writing a {size}-byte block just freed ({pages} pages): \
         its pages went back to the kernel"
    );
    assert_eq!(block[size - 1], 2);
}
