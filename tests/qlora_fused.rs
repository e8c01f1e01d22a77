//! The fused LoRA op equals the composition it replaces: outputs and the
//! gradients of `x`, `A` and `B`, for every storage it takes, odd shapes,
//! ranks 1 and 16, 3-D inputs, a bias; and the layer keeps the composition
//! where the op does not apply.

use candle_core::{DType, Device, Tensor, Var};
use qlora_scale::qlora::FrozenStorage;
use qlora_scale::qlora::frozen::FrozenLinear;
use qlora_scale::qlora::lora::{LoraAdapter, LoraLinear, dropout_mask};

/// A layer of `(n, k)` over `storage`, rank `r`, random non-zero `A` and
/// `B` (so the LoRA path counts), scale 1.5, an optional bias; all `dtype`.
fn layer(
    n: usize,
    k: usize,
    r: usize,
    storage: FrozenStorage,
    bias: bool,
    dtype: DType,
) -> LoraLinear {
    let dev = Device::Cpu;
    let rnd = |shape: (usize, usize), std: f64| {
        Tensor::randn(0f64, std, shape, &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    };
    let w = rnd((n, k), 0.1);
    let base = FrozenLinear::new(&w, storage).unwrap();
    let adapter = LoraAdapter {
        a: Var::from_tensor(&rnd((r, k), 0.2)).unwrap(),
        b: Var::from_tensor(&rnd((n, r), 0.2)).unwrap(),
    };
    let bias = bias.then(|| rnd((1, n), 1.0).squeeze(0).unwrap());
    LoraLinear::new(base, bias, Some(adapter), 1.5)
}

/// The output and the gradients of `x`, `A`, `B` of `sum(y * g)` for a
/// fixed random `g`, through the fused op or the composition, with an
/// optional LoRA dropout mask.
fn run(l: &LoraLinear, x: &Var, g: &Tensor, mask: Option<&Tensor>, fused: bool) -> Vec<Vec<f64>> {
    let ad = l.adapter().unwrap();
    let ab = Some((ad.a.as_tensor(), ad.b.as_tensor()));
    assert!(l.uses_fused_op(x.as_tensor(), ab, mask));
    let y = if fused {
        l.forward_with(x.as_tensor(), ab, mask).unwrap()
    } else {
        l.forward_unfused(x.as_tensor(), ab, mask).unwrap()
    };
    let grads = (&y * g).unwrap().sum_all().unwrap().backward().unwrap();
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let mut out = vec![flat(&y)];
    for v in [x.as_tensor(), ad.a.as_tensor(), ad.b.as_tensor()] {
        out.push(flat(grads.get(v).expect("a gradient")));
    }
    out
}

/// Every value of the fused run within `tol` of the composition's, relative
/// to the largest magnitude of its tensor.
fn assert_close(what: &str, got: &[Vec<f64>], want: &[Vec<f64>], tol: f64) {
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.len(), w.len(), "{what}: tensor {i} length");
        let scale = w.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
        let worst = g
            .iter()
            .zip(w)
            .map(|(a, b)| (a - b).abs() / scale)
            .fold(0f64, f64::max);
        assert!(
            worst <= tol,
            "{what}: tensor {i} (y, dx, dA, dB) off by {worst:e}"
        );
    }
}

/// Fused against composed for one layer and input shape.
fn check(storage: FrozenStorage, dtype: DType, x_shape: &[usize], n: usize, r: usize, bias: bool) {
    let k = *x_shape.last().unwrap();
    let l = layer(n, k, r, storage, bias, dtype);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f64, 1.0, x_shape, &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let x = Var::from_tensor(&x).unwrap();
    let mut g_shape = x_shape.to_vec();
    *g_shape.last_mut().unwrap() = n;
    let g = Tensor::randn(0f64, 1.0, g_shape, &dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
    let what = format!("{storage:?} {dtype:?} x {x_shape:?} n {n} r {r} bias {bias}");
    assert_close(
        &what,
        &run(&l, &x, &g, None, true),
        &run(&l, &x, &g, None, false),
        tol,
    );
    // With LoRA dropout (p = 0.3): the adapter path reads x times the mask.
    let mask = dropout_mask(x_shape, 0.3, 11, dtype, &dev).unwrap();
    let (fused, composed) = (
        run(&l, &x, &g, Some(&mask), true),
        run(&l, &x, &g, Some(&mask), false),
    );
    assert_close(&format!("{what} dropout"), &fused, &composed, tol);
}

const STORAGES: [FrozenStorage; 4] = [
    FrozenStorage::Nf4,
    FrozenStorage::Nf4DoubleQuant,
    FrozenStorage::Bf16,
    FrozenStorage::F32,
];

#[test]
fn fused_equals_composed_in_f32_for_every_kernel_storage() {
    // n = 1031 is not a multiple of the kernels' 16-column split, and with
    // k = 128 the NF4 chunks are 1024 rows: a partial chunk. Rows of x: 14
    // (3-D) and 5.
    for storage in STORAGES {
        for r in [1, 16] {
            check(storage, DType::F32, &[2, 7, 128], 1031, r, false);
            check(storage, DType::F32, &[5, 64], 33, r, true);
        }
    }
}

#[test]
fn fused_equals_composed_in_f64() {
    for storage in STORAGES {
        for r in [1, 16] {
            check(storage, DType::F64, &[2, 7, 128], 1031, r, false);
            check(storage, DType::F64, &[5, 64], 33, r, true);
        }
    }
}

#[test]
fn fused_equals_composed_for_nf4_rows_that_are_not_whole_blocks() {
    // k = 96: the kernels do not take it; the op dequantizes, as the
    // frozen op does.
    for dtype in [DType::F32, DType::F64] {
        check(FrozenStorage::Nf4, dtype, &[2, 3, 96], 20, 4, true);
    }
}

#[test]
fn an_input_without_gradient_gets_none_and_the_adapters_still_train() {
    let l = layer(40, 64, 8, FrozenStorage::Nf4, false, DType::F32);
    let ad = l.adapter().unwrap();
    let x = Tensor::randn(0f32, 1.0, (3, 64), &Device::Cpu).unwrap();
    let y = l.forward(&x, None).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    assert!(grads.get(&x).is_none());
    assert!(grads.get(ad.a.as_tensor()).is_some());
    assert!(grads.get(ad.b.as_tensor()).is_some());
}

#[test]
fn the_composition_stays_where_the_op_does_not_apply() {
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (3, 256), &dev).unwrap();
    // GGML storage and the benchmark-only storages keep their own forward.
    for storage in [
        FrozenStorage::Q8_0,
        FrozenStorage::Q4K,
        FrozenStorage::PlainF32Matmul,
    ] {
        let l = layer(16, 256, 4, storage, false, DType::F32);
        let ad = l.adapter().unwrap();
        let ab = Some((ad.a.as_tensor(), ad.b.as_tensor()));
        assert!(!l.uses_fused_op(&x, ab, None), "{storage:?}");
    }
    let mut l = layer(16, 256, 4, FrozenStorage::Nf4, false, DType::F32);
    let ad = l.adapter().unwrap().clone();
    let ab = Some((ad.a.as_tensor(), ad.b.as_tensor()));
    // A dropout mask of the input's shape and dtype takes the op; one of
    // another dtype or shape, another dtype of input, no adapter, a merged
    // adapter do not.
    let mask = Tensor::ones((3, 256), DType::F32, &dev).unwrap();
    assert!(l.uses_fused_op(&x, ab, Some(&mask)));
    let wrong = Tensor::ones((3, 128), DType::F32, &dev).unwrap();
    assert!(!l.uses_fused_op(&x, ab, Some(&wrong)));
    let half = mask.to_dtype(DType::BF16).unwrap();
    assert!(!l.uses_fused_op(&x, ab, Some(&half)));
    let xb = x.to_dtype(DType::BF16).unwrap();
    assert!(!l.uses_fused_op(&xb, ab, None));
    assert!(!l.uses_fused_op(&x, None, None));
    assert!(l.uses_fused_op(&x, ab, None));
    l.merge().unwrap();
    assert!(!l.uses_fused_op(&x, ab, None));
}

#[test]
fn a_mismatched_adapter_is_an_error_not_a_panic() {
    let l = layer(16, 64, 4, FrozenStorage::Nf4, false, DType::F32);
    let dev = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (3, 64), &dev).unwrap();
    let a = Tensor::zeros((4, 32), DType::F32, &dev).unwrap();
    let b = Tensor::zeros((16, 4), DType::F32, &dev).unwrap();
    assert!(l.forward_with(&x, Some((&a, &b)), None).is_err());
}
