//! `cargo bench --bench qlora`: one QLoRA training step per frozen-weight
//! configuration, NF4 dequantization throughput, and the frozen matmul
//! kernels with `f32` and `bf16` products (`--cpu-matmul`; AMX where the
//! CPU has it), the AMX kernel alone on packed operands, and LoRA's narrow
//! product `x · Aᵀ` on its own kernel against the `gemm` crate. Peak memory is measured
//! per configuration in its own process by `scripts/qlora_peak.sh`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qlora_scale::qlora::bf16_gemm::{CpuMatmul, engine};
use qlora_scale::qlora::kernel::{WeightRef, matmul_w, matmul_wt};
use qlora_scale::qlora::nf4::Nf4Tensor;
use qlora_scale::qlora::skinny;

#[path = "qlora_support/mod.rs"]
mod support;

fn step(c: &mut Criterion) {
    let mut g = c.benchmark_group("qlora_step_100m_4x64_r8");
    g.sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(12));
    for (name, storage, ckpt) in support::CONFIGS {
        let mut w = support::Workload::new(storage, ckpt);
        g.bench_function(name, |b| b.iter(|| black_box(w.step())));
    }
    g.finish();
}

fn dequant(c: &mut Criterion) {
    let (rows, cols) = (2048usize, 768usize);
    let w: Vec<f32> = (0..rows * cols)
        .map(|i| ((i as f32) * 0.001).sin())
        .collect();
    let mut g = c.benchmark_group("nf4_dequantize_2048x768");
    // Throughput counted in bytes of f32 output.
    g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    for dq in [false, true] {
        let q = Nf4Tensor::quantize(&w, &[rows, cols], dq).expect("quantize");
        let mut out = vec![0f32; rows * cols];
        g.bench_function(if dq { "nf4-dq" } else { "nf4" }, |b| {
            b.iter(|| {
                q.dequantize_into(&mut out);
                black_box(out[0])
            })
        });
    }
    g.finish();
}

/// `y = x · Wᵀ` and `dx = dy · W` for an NF4 `W` of 2048 x 768 (a gate or
/// up projection of the ~100M model) and 512 rows (batch 4 x 128), on
/// rayon's threads. Throughput in multiply-adds times two (FLOP).
fn frozen_matmul(c: &mut Criterion) {
    let (m, n, k) = (512usize, 2048usize, 768usize);
    let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.001).sin()).collect();
    let q = Nf4Tensor::quantize(&w, &[n, k], false).expect("quantize");
    let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.01).cos()).collect();
    let dy: Vec<f32> = (0..m * n).map(|i| ((i as f32) * 0.02).cos()).collect();
    let mut g = c.benchmark_group("frozen_matmul_nf4_512x768x2048");
    g.throughput(Throughput::Elements((2 * m * n * k) as u64));
    eprintln!("bf16 engine: {:?}", engine());
    for (prec, name) in [(CpuMatmul::F32, "f32"), (CpuMatmul::Bf16, "bf16")] {
        g.bench_function(format!("forward-{name}"), |b| {
            b.iter(|| black_box(matmul_wt(&x, m, WeightRef::Nf4(&q), n, k, prec)))
        });
        g.bench_function(format!("backward-{name}"), |b| {
            b.iter(|| black_box(matmul_w(&dy, m, WeightRef::Nf4(&q), n, k, prec)))
        });
    }
    g.finish();
}

/// `u = x · Aᵀ` for LoRA's `A` of rank 8 on 512 rows of 768 (the q
/// projection's adapter at batch 4 x 128): the `skinny` kernel against the
/// `gemm` crate as `lora_op` called it before, both on rayon's threads.
fn lora_skinny(c: &mut Criterion) {
    let (m, k, r) = (512usize, 768usize, 8usize);
    let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.01).cos()).collect();
    let a: Vec<f32> = (0..r * k).map(|i| ((i as f32) * 0.003).sin()).collect();
    let mut out = vec![0f32; m * r];
    let mut g = c.benchmark_group("lora_x_at_512x768_r8");
    g.throughput(Throughput::Elements((2 * m * k * r) as u64));
    g.bench_function("skinny", |b| {
        b.iter(|| {
            assert!(
                skinny::rows_dot(&x, k, &a, r, &mut out),
                "no AVX2 + FMA here"
            );
            black_box(out[0])
        })
    });
    let threads = rayon::current_num_threads();
    g.bench_function("gemm-crate", |b| {
        b.iter(|| {
            // SAFETY: `out` is `m x r` row-major; `x` (`m x k`, row-major)
            // and `a` read as `k x r` (`a`'s rows as columns) lie inside
            // their slices.
            unsafe {
                gemm::gemm(
                    m,
                    r,
                    k,
                    out.as_mut_ptr(),
                    1,
                    r as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    a.as_ptr(),
                    k as isize,
                    1,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(threads),
                )
            };
            black_box(out[0])
        })
    });
    g.finish();
}

/// The AMX kernel alone on one thread, both operands packed beforehand: a
/// 512 x 768 `A` against a 160-column `B` (one weight chunk of the forward
/// product), written into an output 160 or 2048 columns wide (the second
/// is where a chunk's columns sit in the forward product's output).
fn amx_kernel(c: &mut Criterion) {
    use qlora_scale::qlora::bf16_gemm::{Engine, Out, PackedA, PackedB, gemm};
    if engine() != Engine::Amx {
        eprintln!("amx_kernel: no AMX on this CPU, skipped");
        return;
    }
    let (m, k, n) = (512usize, 768usize, 160usize);
    let x: Vec<f32> = (0..m * k).map(|i| ((i as f32) * 0.01).cos()).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i as f32) * 0.001).sin()).collect();
    let mut a = PackedA::default();
    a.pack(&x, m, k, k, false);
    let mut b = PackedB::default();
    b.pack_transposed(&w, n, k);
    let mut g = c.benchmark_group("amx_kernel_512x768x160");
    g.throughput(Throughput::Elements((2 * m * n * k) as u64));
    for ld in [n, 2048] {
        let mut out = vec![0f32; m * ld];
        g.bench_function(format!("ld{ld}"), |bch| {
            bch.iter(|| {
                let o = Out {
                    ptr: out.as_mut_ptr(),
                    rows: m,
                    cols: n,
                    ld,
                };
                // SAFETY: `out` holds `m` rows of `ld >= n` values, written
                // before they are read; no other thread touches it.
                unsafe { gemm(&a, 0, &b, o, false) };
                black_box(out[0])
            })
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    dequant,
    frozen_matmul,
    lora_skinny,
    amx_kernel,
    step
);
criterion_main!(benches);
