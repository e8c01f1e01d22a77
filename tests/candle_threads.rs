//! `limit_candle_threads` keeps Candle from starting the spinning workers of
//! its element-wise pool, which compete with the frozen matmuls' rayon
//! threads for the cores (`train` calls it first thing in `main`).
//!
//! One test in its own binary: it sets an environment variable, which must
//! happen before any other thread reads the environment.

#![cfg(target_os = "linux")]

use candle_core::{Device, Tensor};
use qlora_scale::qlora::kernel::limit_candle_threads;

/// Threads of this process that Candle's element-wise pool started.
fn candle_workers() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with("candle-bp-"))
        .count()
}

#[test]
fn large_elementwise_ops_run_without_candle_workers() {
    // SAFETY: the only test of this binary, run before it starts any
    // thread of its own; the harness's main thread only waits for it.
    let threads = unsafe { limit_candle_threads() };
    // Large enough (1M values) for Candle to split it over its pool.
    let x = Tensor::ones(1 << 20, candle_core::DType::F32, &Device::Cpu).unwrap();
    let y = (&x + &x).unwrap().exp().unwrap();
    let mean = y.mean_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(
        (mean - 2f32.exp()).abs() < 1e-2,
        "mean of exp(1 + 1): {mean}"
    );
    let expected = threads.parse::<usize>().unwrap_or(1).saturating_sub(1);
    assert_eq!(candle_workers(), expected, "CANDLE_NUM_THREADS={threads}");
}
