//! The GPU path against the CPU (feature `cuda`; each test is skipped, with
//! a message, when no GPU opens). `scripts/gpu_check.sh` runs this binary on
//! a GPU machine: the NF4 kernel equals the CPU codec bit for bit, the
//! frozen op, the loss, the attention softmax, RMSNorm, the gate and RoPE
//! kernels match the CPU ops, every LoRA gradient
//! through NF4 on the GPU matches the CPU's `f32` gradient, and a checkpoint
//! written on the GPU resumes on the CPU and back.
#![cfg(feature = "cuda")]

mod qlora_common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use qlora_common::*;
use qlora_scale::qlora::loss::masked_causal_lm_nll_sum;
use qlora_scale::qlora::nf4_device::Nf4OnDevice;
use qlora_scale::qlora::softmax::masked_softmax;
use qlora_scale::qlora::{FrozenLinear, FrozenStorage, FrozenWeight, Nf4Tensor};
use qlora_scale::train::collective::SingleProcess;
use qlora_scale::train::device::{Compute, DeviceChoice};
use qlora_scale::train::model;
use qlora_scale::train::settings::Settings;
use qlora_scale::train::spec::plan;
use qlora_scale::train::trainer::{RunSummary, Start, TracingObserver, train};

/// GPU 0, or `None` (and a message) when none opens.
fn gpu() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no GPU ({e})");
            None
        }
    }
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Largest `|a - b| / (1 + |b|)`.
fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f32::max)
}

#[test]
fn nf4_kernel_equals_the_cpu_codec_bit_for_bit() {
    let Some(dev) = gpu() else { return };
    // An odd total with a short last block; many blocks of double-quant
    // steps; both scale storages.
    for (n, k, double) in [
        (3, 101, false),
        (3, 101, true),
        (257, 4096, true),
        (64, 64, false),
    ] {
        let q = Nf4Tensor::quantize(&weights(n, k), &[n, k], double).unwrap();
        let on_gpu = Nf4OnDevice::upload(&q, &dev).unwrap();
        let host = q.dequantize();
        let got = on_gpu.dequantize(DType::F32).unwrap();
        assert!(got.device().is_cuda());
        let got: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
        let same = got
            .iter()
            .zip(&host)
            .all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "f32, {n} x {k}, double quant {double}");
        let want = Tensor::from_vec(host, (n, k), &Device::Cpu)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap();
        let got = on_gpu
            .dequantize(DType::BF16)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<half::bf16>()
            .unwrap();
        assert!(
            got.iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits()),
            "bf16, {n} x {k}, double quant {double}"
        );
    }
}

#[test]
fn frozen_op_forward_and_input_gradient_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    let (n, k) = (384, 512);
    let w = Tensor::from_vec(weights(n, k), (n, k), &Device::Cpu).unwrap();
    let cpu = FrozenLinear::new(&w, FrozenStorage::Nf4).unwrap();
    let FrozenWeight::Nf4(q) = &**cpu.weight() else {
        panic!("NF4 storage holds NF4 codes")
    };
    let on_gpu = FrozenLinear::from_weight(
        Arc::new(FrozenWeight::Nf4OnDevice(
            Nf4OnDevice::upload(q, &dev).unwrap(),
        )),
        FrozenStorage::Nf4,
    );
    let x = Tensor::randn(0f32, 1.0, (2, 7, k), &Device::Cpu).unwrap();
    let run = |lin: &FrozenLinear, x: Tensor| {
        let x = Var::from_tensor(&x).unwrap();
        let y = lin.forward(x.as_tensor()).unwrap();
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        (values(&y), values(g.get(x.as_tensor()).unwrap()))
    };
    let (y_cpu, g_cpu) = run(&cpu, x.clone());
    for dtype in [DType::F32, DType::BF16] {
        let xg = x.to_device(&dev).unwrap().to_dtype(dtype).unwrap();
        let (y, g) = run(&on_gpu, xg);
        // bf16: 8 bits of mantissa on inputs, weights and outputs.
        let tol = if dtype == DType::F32 { 1e-3 } else { 3e-2 };
        let (ey, eg) = (worst(&y, &y_cpu), worst(&g, &g_cpu));
        eprintln!("frozen op {dtype:?}: forward {ey:.2e}, input gradient {eg:.2e}");
        assert!(ey < tol && eg < tol, "{dtype:?}: {ey} {eg}");
    }
}

#[test]
fn loss_kernels_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    let (b, t, v) = (2, 9, 1000);
    let logits = (Tensor::randn(0f32, 3.0, (b, t, v), &Device::Cpu).unwrap() * 1.0).unwrap();
    let ids = Tensor::from_vec(
        (0..(b * t) as u32).map(|i| (i * 97) % v as u32).collect(),
        (b, t),
        &Device::Cpu,
    )
    .unwrap();
    let mut keep = vec![1f32; b * t];
    keep[3] = 0.0;
    let mask = Tensor::from_vec(keep, (b, t), &Device::Cpu).unwrap();
    let run = |dev: &Device| {
        let x = Var::from_tensor(&logits.to_device(dev).unwrap()).unwrap();
        let (sum, n) = masked_causal_lm_nll_sum(
            x.as_tensor(),
            &ids.to_device(dev).unwrap(),
            &mask.to_device(dev).unwrap(),
        )
        .unwrap();
        let g = sum.backward().unwrap();
        (
            sum.to_scalar::<f32>().unwrap(),
            n,
            values(g.get(x.as_tensor()).unwrap()),
        )
    };
    let (s_cpu, n_cpu, g_cpu) = run(&Device::Cpu);
    let (s, n, g) = run(&dev);
    assert_eq!(n, n_cpu);
    assert!((s - s_cpu).abs() <= 1e-4 * s_cpu.abs(), "{s} {s_cpu}");
    assert!(worst(&g, &g_cpu) < 1e-5, "{}", worst(&g, &g_cpu));
}

#[test]
fn masked_softmax_kernels_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    let (b, h, t, k) = (2, 4, 33, 300);
    let s = Tensor::randn(0f32, 2.0, (b, h, t, k), &Device::Cpu).unwrap();
    let m: Vec<f32> = (0..b * t * k)
        .map(|i| if i % k > (i / k) % t { -1e9 } else { 0.0 })
        .collect();
    let mask = Tensor::from_vec(m, (b, 1, t, k), &Device::Cpu).unwrap();
    let g = Tensor::randn(0f32, 1.0, (b, h, t, k), &Device::Cpu).unwrap();
    let run = |dev: &Device, dtype: DType| {
        let x = Var::from_tensor(&s.to_device(dev).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let mask = mask.to_device(dev).unwrap().to_dtype(dtype).unwrap();
        let y = masked_softmax(x.as_tensor(), &mask, 0.125).unwrap();
        let loss = (y.to_dtype(DType::F32).unwrap() * g.to_device(dev).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        let gx = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
        (values(&y), values(&gx))
    };
    let (y_cpu, g_cpu) = run(&Device::Cpu, DType::F32);
    for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
        let (y, g) = run(&dev, dtype);
        let (ey, eg) = (worst(&y, &y_cpu), worst(&g, &g_cpu));
        eprintln!("masked softmax {dtype:?}: forward {ey:.2e}, backward {eg:.2e}");
        assert!(ey < tol && eg < tol, "{dtype:?}: {ey} {eg}");
    }
}

/// Forward and input gradients (of `sum(y * g)`, `g` fixed) of `f` over
/// `inputs`, on `dev` in `dtype`, as f32 values.
fn forward_backward(
    dev: &Device,
    dtype: DType,
    inputs: &[Tensor],
    constants: &[Tensor],
    f: &dyn Fn(&[Tensor], &[Tensor]) -> Tensor,
) -> (Vec<f32>, Vec<Vec<f32>>) {
    let put = |t: &Tensor| t.to_device(dev).unwrap().to_dtype(dtype).unwrap();
    let vars: Vec<Var> = inputs
        .iter()
        .map(|t| Var::from_tensor(&put(t)).unwrap())
        .collect();
    let xs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let cs: Vec<Tensor> = constants.iter().map(put).collect();
    let y = f(&xs, &cs);
    let g = Tensor::randn(0f32, 1.0, y.shape(), &Device::Cpu)
        .unwrap()
        .sin()
        .unwrap();
    let loss = (y.to_dtype(DType::F32).unwrap() * g.to_device(dev).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let gs = xs.iter().map(|x| values(grads.get(x).unwrap())).collect();
    (values(&y), gs)
}

/// The GPU's RMSNorm, gate and RoPE ops against the CPU's fused ones.
#[test]
fn norm_gate_and_rope_kernels_match_the_cpu() {
    use qlora_scale::qlora::fused::{gated, rms_norm, rope};
    use qlora_scale::qlora::llama::Activation;
    let Some(dev) = gpu() else { return };
    let r = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap();
    type Case = (
        &'static str,
        Vec<Tensor>,
        Vec<Tensor>,
        Box<dyn Fn(&[Tensor], &[Tensor]) -> Tensor>,
    );
    let cases: Vec<Case> = vec![
        (
            "rms norm",
            vec![r(&[2, 5, 96])],
            vec![r(&[96])],
            Box::new(|x, c| rms_norm(&x[0], &c[0], 1e-5).unwrap()),
        ),
        (
            "silu gate",
            vec![r(&[2, 5, 80]), r(&[2, 5, 80])],
            vec![],
            Box::new(|x, _| gated(&x[0], &x[1], Activation::Silu).unwrap()),
        ),
        (
            "gelu gate",
            vec![r(&[2, 5, 80]), r(&[2, 5, 80])],
            vec![],
            Box::new(|x, _| gated(&x[0], &x[1], Activation::GeluTanh).unwrap()),
        ),
        // Full rotary (d = 16), and partial (8 of 16 features turn); the
        // tables have more rows than positions, as a KV cache's do.
        (
            "rope",
            vec![r(&[2, 3, 7, 16])],
            vec![r(&[9, 8]), r(&[9, 8])],
            Box::new(|x, c| rope(&x[0], &c[0], &c[1]).unwrap()),
        ),
        (
            "partial rope",
            vec![r(&[2, 3, 7, 16])],
            vec![r(&[7, 4]), r(&[7, 4])],
            Box::new(|x, c| rope(&x[0], &c[0], &c[1]).unwrap()),
        ),
    ];
    for (what, inputs, constants, f) in &cases {
        let (y_cpu, g_cpu) = forward_backward(&Device::Cpu, DType::F32, inputs, constants, f);
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 3e-2)] {
            let (y, g) = forward_backward(&dev, dtype, inputs, constants, f);
            let ey = worst(&y, &y_cpu);
            let eg = g
                .iter()
                .zip(&g_cpu)
                .map(|(a, b)| worst(a, b))
                .fold(0f32, f32::max);
            eprintln!("{what} {dtype:?}: forward {ey:.2e}, gradients {eg:.2e}");
            assert!(ey < tol && eg < tol, "{what} {dtype:?}: {ey} {eg}");
        }
    }
}

#[test]
fn lora_gradients_through_nf4_on_the_gpu_match_the_cpu() {
    let Some(dev) = gpu() else { return };
    for checkpointing in [false, true] {
        let cfg = tiny_cfg(2);
        let w = cfg.random_weights(5, DType::F32, &Device::Cpu).unwrap();
        let cpu = build(&cfg, &w, FrozenStorage::Nf4, DType::F32, false, lora(0.0));
        let want = lora_grads(&cpu, None);
        // f32 on the GPU: the device path itself, to 1e-2 (the issue's
        // bound; it lands near 1e-5 unless cuBLAS uses TF32).
        let g32 = build_on(
            &cfg,
            &w,
            FrozenStorage::Nf4,
            DType::F32,
            checkpointing,
            lora(0.0),
            &dev,
        );
        let e32 = compare(&lora_grads(&g32, None), &want, 1e-2).unwrap();
        // bf16, what training runs: bf16's rounding, as on the CPU
        // (tests/qlora_bf16.rs).
        let g16 = build_on(
            &cfg,
            &w,
            FrozenStorage::Nf4,
            DType::BF16,
            checkpointing,
            lora(0.0),
            &dev,
        );
        let e16 = compare(&lora_grads(&g16, None), &want, 3e-2).unwrap();
        eprintln!("LoRA gradients, checkpointing {checkpointing}: f32 {e32:.2e}, bf16 {e16:.2e}");
    }
}

fn run(compute: &Compute, out: &Path, steps: u64, start: Start) -> RunSummary {
    let settings = Settings {
        max_steps: Some(steps),
        checkpoint_every: Some(2),
        eval_every: Some(1000),
        output_dir: Some(out.to_path_buf()),
        ..Settings::default()
    };
    let run = plan(&settings, Path::new("/nonexistent/p.json"), || None).unwrap();
    train(
        &run.spec,
        compute,
        out,
        start,
        &mut TracingObserver,
        &SingleProcess,
    )
    .unwrap()
}

#[test]
fn a_checkpoint_written_on_the_gpu_resumes_on_the_cpu_and_back() {
    let Some(_) = gpu() else { return };
    let cuda = DeviceChoice::Cuda(0).resolve().unwrap();
    assert_eq!(cuda.dtype, DType::BF16);
    let cpu = Compute::cpu();
    let dir = tempfile::tempdir().unwrap();
    // 2 steps on the GPU, 2 more on the CPU, 2 more on the GPU.
    let out = dir.path().join("run");
    let a = run(&cuda, &out, 2, Start::Fresh);
    let b = run(
        &cpu,
        &out,
        4,
        Start::Resume {
            given: vec!["max_steps"],
        },
    );
    let c = run(
        &cuda,
        &out,
        6,
        Start::Resume {
            given: vec!["max_steps"],
        },
    );
    assert_eq!((b.resumed_from, c.resumed_from), (Some(2), Some(4)));
    // The same 6 steps on the CPU alone.
    let whole = run(&cpu, &dir.path().join("cpu"), 6, Start::Fresh);
    let losses: Vec<f64> = [a, b, c]
        .iter()
        .flat_map(|s| s.steps.iter().map(|l| l.loss))
        .collect();
    let want: Vec<f64> = whole.steps.iter().map(|l| l.loss).collect();
    assert_eq!(losses.len(), 6);
    for (got, want) in losses.iter().zip(&want) {
        assert!(
            ((got - want) / want).abs() < 0.02,
            "{losses:?} against {want:?}"
        );
    }
    // The exported adapter loads into a model built on the GPU (what
    // `train generate --device cuda` does).
    let spec = model::run_spec(&out).unwrap();
    let (m, _) = model::build_on(&spec, &cuda, FrozenStorage::Nf4).unwrap();
    model::load_adapter(&m, &out).unwrap();
    assert!(m.trainable_vars().iter().all(|(_, v)| v.device().is_cuda()));
}

/// The frozen NF4 matmul's throughput at a Llama-3-8B MLP shape (bf16 input
/// 2048 x 4096, weight 14336 x 4096): dequantization to bf16 on the device
/// plus cuBLAS, against cuBLAS alone on a dense bf16 weight. Printed as a
/// JSON line for scripts/gpu_check.sh (`--ignored`: a measurement, not a
/// check).
#[test]
#[ignore = "a measurement: scripts/gpu_check.sh runs it"]
fn frozen_matmul_tflops() {
    let Some(dev) = gpu() else { return };
    let (m, n, k) = (2048, 14336, 4096);
    let w = Tensor::randn(0f32, 0.02, (n, k), &Device::Cpu).unwrap();
    let q = Nf4Tensor::quantize(
        &w.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        &[n, k],
        false,
    )
    .unwrap();
    let lin = FrozenLinear::from_weight(
        Arc::new(FrozenWeight::Nf4OnDevice(
            Nf4OnDevice::upload(&q, &dev).unwrap(),
        )),
        FrozenStorage::Nf4,
    );
    let dense = w.to_device(&dev).unwrap().to_dtype(DType::BF16).unwrap();
    let x = Tensor::randn(0f32, 1.0, (m, k), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let time = |f: &dyn Fn() -> Tensor| {
        for _ in 0..3 {
            f();
        }
        dev.synchronize().unwrap();
        let reps = 20;
        let t0 = std::time::Instant::now();
        for _ in 0..reps {
            f();
        }
        dev.synchronize().unwrap();
        t0.elapsed().as_secs_f64() / reps as f64
    };
    let flops = 2.0 * (m * n * k) as f64;
    let frozen = time(&|| lin.forward(&x).unwrap());
    let cublas = time(&|| x.matmul(&dense.t().unwrap()).unwrap());
    let Some(FrozenWeight::Nf4OnDevice(d)) = Some(&**lin.weight()) else {
        unreachable!()
    };
    let dequant = time(&|| d.dequantize(DType::BF16).unwrap());
    println!(
        "{{\"frozen_matmul_tflops\": {:.1}, \"dense_bf16_matmul_tflops\": {:.1}, \"nf4_dequant_ms\": {:.3}, \"shape\": [{m}, {n}, {k}]}}",
        flops / frozen / 1e12,
        flops / cublas / 1e12,
        dequant * 1e3
    );
}
