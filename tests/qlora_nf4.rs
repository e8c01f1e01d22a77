//! NF4 codec: code values, round-trip bounds, double quantization, sizes.

use candle_core::{DType, Device, Tensor};
use qlora_scale::qlora::frozen::{FrozenStorage, FrozenWeight};
use qlora_scale::qlora::nf4::{DQ_BLOCK, NF4_BLOCK, NF4_CODE, Nf4Scales, Nf4Tensor, nearest_code};

/// Deterministic pseudo-normal data with varying block magnitudes.
fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|i| {
            let mut z = 0f32;
            for _ in 0..4 {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                z += ((s >> 33) as f32 / (1u64 << 31) as f32) - 0.5;
            }
            // Block magnitudes spread over two orders of magnitude.
            z * (0.01 + (i / NF4_BLOCK % 7) as f32 * 0.3)
        })
        .collect()
}

#[test]
fn the_sixteen_code_values_are_qloras() {
    // As printed in the paper's appendix / bitsandbytes (f64 literals).
    let expected: [f64; 16] = [
        -1.0, -0.6961928, -0.5250730, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
        0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0,
    ];
    for (c, e) in NF4_CODE.iter().zip(expected) {
        assert!((*c as f64 - e).abs() < 1e-7, "{c} vs {e}");
    }
    assert_eq!(NF4_CODE[7], 0.0);
    // Every code maps to itself, and a block of codes times a scale
    // round-trips exactly.
    for (i, &c) in NF4_CODE.iter().enumerate() {
        assert_eq!(nearest_code(c) as usize, i);
    }
    let scale = 0.75f32;
    let w: Vec<f32> = (0..64).map(|i| NF4_CODE[i % 16] * scale).collect();
    let q = Nf4Tensor::quantize(&w, &[64], false).unwrap();
    for (i, &v) in w.iter().enumerate() {
        assert_eq!(q.code_index(i) as usize, i % 16);
        assert!((q.dequantize()[i] - v).abs() <= 1e-7);
    }
}

fn half_gap() -> f32 {
    NF4_CODE
        .windows(2)
        .map(|w| (w[1] - w[0]) / 2.0)
        .fold(0f32, f32::max)
}

#[test]
fn round_trip_error_is_bounded_per_block() {
    let n = 64 * 40 + 17; // not a multiple of the block: padded
    let w = data(n, 1);
    let q = Nf4Tensor::quantize(&w, &[n], false).unwrap();
    let back = q.dequantize();
    assert_eq!(back.len(), n);
    for (b, (src, dst)) in w.chunks(NF4_BLOCK).zip(back.chunks(NF4_BLOCK)).enumerate() {
        let absmax = src.iter().fold(0f32, |m, v| m.max(v.abs()));
        let bound = absmax * half_gap() * (1.0 + 1e-6);
        for (a, r) in src.iter().zip(dst) {
            assert!((a - r).abs() <= bound, "block {b}: |{a} - {r}| > {bound}");
        }
        // The absmax element is reproduced exactly.
        let imax = src
            .iter()
            .enumerate()
            .max_by(|x, y| x.1.abs().total_cmp(&y.1.abs()))
            .unwrap()
            .0;
        assert!((src[imax] - dst[imax]).abs() <= absmax * 1e-6);
    }
    // The error is much smaller than the bound on average.
    let mse: f32 = w
        .iter()
        .zip(&back)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f32>()
        / n as f32;
    let var: f32 = w.iter().map(|a| a * a).sum::<f32>() / n as f32;
    assert!(mse / var < 0.02, "relative mse {}", mse / var);
}

#[test]
fn double_quant_reconstructs_scales_within_8_bits() {
    let n = 64 * 1000;
    let w = data(n, 2);
    let plain = Nf4Tensor::quantize(&w, &[n], false).unwrap();
    let dq = Nf4Tensor::quantize(&w, &[n], true).unwrap();
    let Nf4Scales::F32(s) = plain.scales().clone() else {
        panic!("expected f32 scales")
    };
    let Nf4Scales::Double { steps, mean, .. } = dq.scales().clone() else {
        panic!("expected double quant")
    };
    assert_eq!(steps.len(), s.len().div_ceil(DQ_BLOCK));
    let rec = dq.scales().to_f32();
    for (i, (a, r)) in s.iter().zip(&rec).enumerate() {
        let block = &s[(i / DQ_BLOCK) * DQ_BLOCK..((i / DQ_BLOCK + 1) * DQ_BLOCK).min(s.len())];
        let absmax = block.iter().fold(0f32, |m, v| m.max((v - mean).abs()));
        assert!(
            (a - r).abs() <= absmax / 254.0 * (1.0 + 1e-5) + 1e-7,
            "scale {i}: {a} vs {r}"
        );
    }
    // And the weights stay within the NF4 bound plus the scale error.
    let back = dq.dequantize();
    for (b, (src, dst)) in w.chunks(NF4_BLOCK).zip(back.chunks(NF4_BLOCK)).enumerate() {
        let bound = s[b] * half_gap() + (s[b] - rec[b]).abs() + 1e-6;
        for (a, r) in src.iter().zip(dst) {
            assert!((a - r).abs() <= bound);
        }
    }
}

#[test]
fn sizes_in_bytes_and_bits_per_weight() {
    // Real shapes: a 768 x 2048 MLP weight and a 4096 x 4096 attention weight.
    for (rows, cols) in [(768usize, 2048usize), (4096, 4096)] {
        let n = rows * cols;
        let w = vec![0.5f32; n];
        let plain = Nf4Tensor::quantize(&w, &[rows, cols], false).unwrap();
        assert_eq!(plain.size_bytes(), n / 2 + 4 * n / 64);
        assert!((plain.bits_per_weight() - 4.5).abs() < 1e-9);
        let dq = Nf4Tensor::quantize(&w, &[rows, cols], true).unwrap();
        assert_eq!(
            dq.size_bytes(),
            n / 2 + n / 64 + 4 * (n / 64).div_ceil(256) + 4
        );
        let bits = dq.bits_per_weight();
        assert!(
            (4.126..4.129).contains(&bits),
            "{rows}x{cols}: {bits} bits/weight"
        );
    }
    // Padding: 3 x 5 occupies one block.
    let q = Nf4Tensor::quantize(&[1.0; 15], &[3, 5], false).unwrap();
    assert_eq!(q.size_bytes(), 32 + 4);
    assert_eq!(q.dequantize(), vec![1.0; 15]);
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    assert!(Nf4Tensor::quantize(&[1.0, 2.0], &[3], false).is_err());
    let err = Nf4Tensor::quantize(&[1.0, f32::NAN], &[2], false).unwrap_err();
    assert!(err.to_string().contains("index 1"), "{err}");
    let dev = Device::Cpu;
    let t = Tensor::zeros((2, 2, 2), DType::F32, &dev).unwrap();
    assert!(FrozenWeight::new(&t, FrozenStorage::Nf4).is_err());
    let t = Tensor::zeros((4, 100), DType::F32, &dev).unwrap();
    let err = FrozenWeight::new(&t, FrozenStorage::Q4K).unwrap_err();
    assert!(err.to_string().contains("multiple of 256"), "{err}");
}

#[test]
fn quantizes_from_f32_bf16_and_f16() {
    let dev = Device::Cpu;
    let w = data(96 * 64, 3);
    let t = Tensor::from_vec(w.clone(), (96, 64), &dev).unwrap();
    let reference = FrozenWeight::new(&t, FrozenStorage::Nf4).unwrap();
    let r = reference
        .dequantize(DType::F32, &dev)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    for dt in [DType::BF16, DType::F16] {
        let q = FrozenWeight::new(&t.to_dtype(dt).unwrap(), FrozenStorage::Nf4DoubleQuant).unwrap();
        let d = q
            .dequantize(DType::F32, &dev)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let err: f32 = d
            .iter()
            .zip(&r)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        // Rounding to 16 bits may move a value across a code boundary.
        assert!(err <= amax * 0.3, "{dt:?}: {err}");
        // Embedding rows agree with the full dequantization.
        let rows = q
            .rows(&[0, 95, 7], DType::F32, &dev)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(rows[1], d[95 * 64..96 * 64].to_vec());
    }
}
