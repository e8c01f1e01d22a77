//! `cargo bench --bench qlora`: one QLoRA training step per frozen-weight
//! configuration, and NF4 dequantization throughput. Peak memory is measured
//! per configuration in its own process by `scripts/qlora_peak.sh`.

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use qlora_scale::qlora::nf4::Nf4Tensor;

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

criterion_group!(benches, dequant, step);
criterion_main!(benches);
