//! The 16-bit compute path, what a GPU runs (`--device cuda`): `bf16`
//! activations with `f32` LoRA master weights, through the Candle-op
//! compositions the fused CPU ops fall back to, and NF4 codes held as device
//! tensors ([`Nf4OnDevice`]). Run here on the CPU, these check everything of
//! the GPU's path but its kernels (tests/gpu.rs checks those on a GPU).
//!
//! And the CPU's own `bf16` products (`--cpu-matmul bf16`): `f32`
//! activations, the frozen products' operands rounded to `bf16`, on AMX
//! where this CPU has it, emulated elsewhere.

mod qlora_common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use qlora_common::*;
use qlora_scale::qlora::bf16_gemm::{self, CpuMatmul};
use qlora_scale::qlora::nf4_device::Nf4OnDevice;
use qlora_scale::qlora::{
    FrozenLinear, FrozenStorage, FrozenWeight, LlamaConfig, LlamaModel, ModelOptions, Nf4Tensor,
};
use qlora_scale::train::collective::SingleProcess;
use qlora_scale::train::device::Compute;
use qlora_scale::train::settings::Settings;
use qlora_scale::train::spec::plan;
use qlora_scale::train::trainer::{Start, TracingObserver, train};

fn bf16_tracks_f32(checkpointing: bool) -> f64 {
    let cfg = tiny_cfg(2);
    let w = cfg.random_weights(5, DType::F32, &Device::Cpu).unwrap();
    let q32 = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, lora(0.0));
    let q16 = build(
        &cfg,
        &w,
        FrozenStorage::Nf4,
        DType::BF16,
        checkpointing,
        lora(0.0),
    );
    for (_, v) in q16.trainable_vars() {
        assert_eq!(v.dtype(), DType::F32, "adapters train in f32 under bf16");
    }
    let g16 = lora_grads(&q16, None);
    compare(&g16, &lora_grads(&q32, None), 3e-2).unwrap()
}

#[test]
fn bf16_compute_gradients_track_f32() {
    // bf16 keeps 8 bits of mantissa: a relative error of about 2% over two
    // blocks (measured 1.75%), where f32 paths agree to 1e-5.
    let e = bf16_tracks_f32(false);
    assert!(e > 1e-4, "bf16 must actually run in bf16 (error {e})");
}

#[test]
fn bf16_compute_with_checkpointing_gives_the_same_gradients() {
    assert_eq!(bf16_tracks_f32(true), bf16_tracks_f32(false));
}

#[test]
fn nf4_on_device_dequantizes_as_the_host_codec() {
    // 3 x 100: 300 values, 5 blocks, the last one short and an odd total.
    for (k, double) in [(100, false), (100, true), (64 * 300, true)] {
        let data = weights(3, k);
        let q = Nf4Tensor::quantize(&data, &[3, k], double).unwrap();
        let d = Nf4OnDevice::upload(&q, &Device::Cpu).unwrap();
        assert_eq!(d.shape(), &[3, k]);
        assert_eq!(d.size_bytes(), q.size_bytes());
        let host = q.dequantize();
        let f32s: Vec<f32> = d
            .dequantize(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(f32s, host, "k {k}, double quant {double}");
        let want = Tensor::from_vec(host, (3, k), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap();
        let got = d.dequantize(DType::BF16).unwrap();
        assert_eq!(got.dims(), &[3, k]);
        let diff = (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(diff, 0.0, "bf16 is the f32 value rounded once");
    }
}

#[test]
fn a_frozen_layer_over_device_codes_computes_what_the_host_codes_do() {
    let (n, k) = (24, 128);
    let w = Tensor::from_vec(weights(n, k), (n, k), &Device::Cpu).unwrap();
    let host = FrozenLinear::new(&w, FrozenStorage::Nf4DoubleQuant).unwrap();
    let FrozenWeight::Nf4(q) = &**host.weight() else {
        panic!("NF4 storage holds NF4 codes")
    };
    let dev = FrozenLinear::from_weight(
        Arc::new(FrozenWeight::Nf4OnDevice(
            Nf4OnDevice::upload(q, &Device::Cpu).unwrap(),
        )),
        FrozenStorage::Nf4DoubleQuant,
    );
    let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, k), &Device::Cpu).unwrap()).unwrap();
    let run = |lin: &FrozenLinear| {
        let y = lin.forward(x.as_tensor()).unwrap();
        let g = (y.sqr().unwrap().sum_all().unwrap()).backward().unwrap();
        let gx = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        (y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), gx)
    };
    let ((y1, g1), (y2, g2)) = (run(&host), run(&dev));
    assert_eq!(y1.len(), 2 * 3 * n);
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-4 * (1.0 + y.abs()))
    };
    assert!(close(&y1, &y2) && close(&g1, &g2));
}

/// The embedded run's losses over `steps` steps on `compute`, frozen
/// products as `matmul` says.
fn losses(compute: &Compute, out: &Path, steps: u64, matmul: CpuMatmul) -> Vec<f64> {
    let settings = Settings {
        max_steps: Some(steps),
        eval_every: Some(1000),
        output_dir: Some(out.to_path_buf()),
        cpu_matmul: Some(matmul),
        ..Settings::default()
    };
    let run = plan(&settings, Path::new("/nonexistent/p.json"), || None).unwrap();
    let summary = train(
        &run.spec,
        compute,
        out,
        Start::Fresh,
        &mut TracingObserver,
        &SingleProcess,
    )
    .unwrap();
    summary.steps.iter().map(|s| s.loss).collect()
}

#[test]
fn bf16_training_tracks_f32_training() {
    // What scripts/gpu_check.sh compares between a GPU and the CPU: the
    // same seed, 20 steps, losses within 2%.
    let dir = tempfile::tempdir().unwrap();
    let f32s = losses(&Compute::cpu(), &dir.path().join("f32"), 20, CpuMatmul::F32);
    let bf16 = Compute {
        device: Device::Cpu,
        dtype: DType::BF16,
    };
    let bf16s = losses(&bf16, &dir.path().join("bf16"), 20, CpuMatmul::F32);
    tracks(&bf16s, &f32s);
}

/// `got` within 2% of `want` step by step, and training.
fn tracks(got: &[f64], want: &[f64]) {
    assert_eq!((got.len(), want.len()), (20, 20));
    let worst = want
        .iter()
        .zip(got)
        .map(|(a, b)| ((a - b) / a).abs())
        .fold(0f64, f64::max);
    assert!(worst < 0.02, "{got:?} against f32 {want:?}: {worst}");
    assert!(got[19] < got[0] - 0.5, "trains: {got:?}");
}

/// LoRA gradients of a two-block model whose widths are whole NF4 blocks
/// (so the frozen products take the chunked kernels, and with them the
/// `bf16` products), frozen products as `matmul` says.
fn cpu_matmul_grads(matmul: CpuMatmul, checkpointing: bool) -> Vec<(String, Vec<f64>)> {
    let cfg = LlamaConfig::tiny(2, 64, 128, 96);
    let w = cfg.random_weights(5, DType::F32, &Device::Cpu).unwrap();
    let opts = ModelOptions {
        storage: FrozenStorage::Nf4,
        lora: lora(0.0),
        checkpointing,
        cpu_matmul: matmul,
        ..ModelOptions::default()
    };
    let model = LlamaModel::new(&cfg, &w, &opts).unwrap();
    nonzero_lora_b(&model, &Device::Cpu);
    lora_grads(&model, None)
}

#[test]
fn bf16_products_on_the_cpu_give_gradients_near_f32() {
    eprintln!("bf16 engine here: {:?}", bf16_gemm::engine());
    let f32s = cpu_matmul_grads(CpuMatmul::F32, false);
    let bf16 = cpu_matmul_grads(CpuMatmul::Bf16, false);
    let e = compare(&bf16, &f32s, 3e-2).unwrap();
    eprintln!("largest relative gradient error of bf16 products: {e:.2e}");
    assert!(e > 1e-5, "the products must actually be bf16 (error {e})");
    // Recomputation multiplies the same rounded operands.
    assert_eq!(cpu_matmul_grads(CpuMatmul::Bf16, true), bf16);
}

#[test]
fn bf16_products_on_the_cpu_train_like_f32() {
    let dir = tempfile::tempdir().unwrap();
    let cpu = Compute::cpu();
    let f32s = losses(&cpu, &dir.path().join("f32"), 20, CpuMatmul::F32);
    let bf16s = losses(&cpu, &dir.path().join("bf16"), 20, CpuMatmul::Bf16);
    assert_ne!(f32s, bf16s, "bf16 products change the sums");
    tracks(&bf16s, &f32s);
}
