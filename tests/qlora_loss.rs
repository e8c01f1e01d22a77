//! Masked causal-LM loss: stability, masking, gradient.

use candle_core::{Device, Tensor, Var};
use qlora_scale::qlora::loss::{loss_mask, masked_causal_lm_loss};

fn reference(logits: &[Vec<Vec<f64>>], ids: &[Vec<u32>], mask: &[Vec<f32>]) -> f64 {
    let (mut sum, mut n) = (0.0, 0.0);
    for b in 0..ids.len() {
        for t in 0..ids[b].len() - 1 {
            if mask[b][t + 1] == 0.0 {
                continue;
            }
            let row = &logits[b][t];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            sum += lse - row[ids[b][t + 1] as usize];
            n += 1.0;
        }
    }
    sum / n
}

#[test]
fn large_logits_are_stable_and_masking_is_respected() {
    let dev = Device::Cpu;
    let (b, t, v) = (2, 5, 7);
    let logits: Vec<Vec<Vec<f64>>> = (0..b)
        .map(|i| {
            (0..t)
                .map(|j| {
                    (0..v)
                        .map(|k| 1e4 * (((i * 31 + j * 7 + k * 3) % 11) as f64 - 5.0))
                        .collect()
                })
                .collect()
        })
        .collect();
    let ids = vec![vec![1u32, 2, 3, 4, 5], vec![6, 0, 1, 0, 0]];
    let attn = vec![vec![1u8; 5], vec![1, 1, 1, 0, 0]];
    let mask = loss_mask(&attn, Some(&[2, 1])).unwrap();
    let lt = Tensor::new(logits.clone(), &dev).unwrap();
    let it = Tensor::new(ids.clone(), &dev).unwrap();
    let loss = masked_causal_lm_loss(&lt, &it, &mask)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let want = reference(&logits, &ids, &mask.to_vec2().unwrap());
    assert!(loss.is_finite());
    assert!(
        (loss - want).abs() <= 1e-9 * want.abs().max(1.0),
        "{loss} vs {want}"
    );
    // Logits at positions whose next token is masked out do not matter.
    let mut changed = logits.clone();
    changed[1][3][0] += 5e4; // predicts padding
    changed[0][0][2] += 5e4; // predicts a prompt token
    let lt2 = Tensor::new(changed, &dev).unwrap();
    let loss2 = masked_causal_lm_loss(&lt2, &it, &mask)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    assert_eq!(loss, loss2);
}

#[test]
fn gradient_is_softmax_minus_onehot_over_count() {
    let dev = Device::Cpu;
    let x: Vec<f64> = (0..2 * 3 * 4).map(|i| ((i * 7) % 5) as f64 * 0.3).collect();
    let logits = Var::from_tensor(&Tensor::from_vec(x, (2, 3, 4), &dev).unwrap()).unwrap();
    let ids = Tensor::new(&[[0u32, 1, 2], [3, 2, 1]], &dev).unwrap();
    let mask = loss_mask(&[vec![1, 1, 1], vec![1, 1, 0]], None)
        .unwrap()
        .to_dtype(candle_core::DType::F64)
        .unwrap();
    let loss = masked_causal_lm_loss(logits.as_tensor(), &ids, &mask).unwrap();
    let g = loss
        .backward()
        .unwrap()
        .get(logits.as_tensor())
        .unwrap()
        .to_vec3::<f64>()
        .unwrap();
    let eps = 1e-6;
    let flat = logits
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for idx in 0..flat.len() {
        let at = |d: f64| {
            let mut v = flat.clone();
            v[idx] += d;
            let t = Tensor::from_vec(v, (2, 3, 4), &dev).unwrap();
            masked_causal_lm_loss(&t, &ids, &mask)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let fd = (at(eps) - at(-eps)) / (2.0 * eps);
        let an = g[idx / 12][(idx / 4) % 3][idx % 4];
        assert!((fd - an).abs() < 1e-7, "{idx}: {an} vs {fd}");
    }
    // The last position predicts nothing, the masked target neither.
    assert!(g[0][2].iter().all(|x| *x == 0.0));
    assert!(g[1][1].iter().all(|x| *x == 0.0));
}

#[test]
fn out_of_range_targets_are_errors() {
    let dev = Device::Cpu;
    let logits = Tensor::zeros((1, 2, 3), candle_core::DType::F32, &dev).unwrap();
    let ids = Tensor::new(&[[0u32, 9]], &dev).unwrap();
    let mask = loss_mask(&[vec![1, 1]], None).unwrap();
    assert!(masked_causal_lm_loss(&logits, &ids, &mask).is_err());
}

/// The `f32` path (vectorised, lanes of eight) against the exact `f64` path
/// on rows that span many lanes plus a tail, with logits from -3e4 to 60:
/// same loss and same gradient to `f32` precision, masked rows exactly zero.
#[test]
fn f32_loss_and_gradient_match_the_f64_path() {
    let dev = Device::Cpu;
    let (b, t, v) = (2, 4, 1003);
    let x: Vec<f64> = (0..b * t * v)
        .map(|i| match i % 97 {
            0 => -3.0e4,
            1 => 60.0,
            k => ((i * 7919) % 1000) as f64 * 0.013 - 6.5 + k as f64 * 0.01,
        })
        .collect();
    let ids = Tensor::new(&[[5u32, 17, 1002, 0], [999, 3, 640, 8]], &dev).unwrap();
    let mask = loss_mask(&[vec![1, 1, 1, 1], vec![1, 1, 0, 1]], None).unwrap();
    let run = |dtype: candle_core::DType| {
        let logits = Tensor::from_vec(x.clone(), (b, t, v), &dev)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let logits = Var::from_tensor(&logits).unwrap();
        let mask = mask.to_dtype(dtype).unwrap();
        let loss = masked_causal_lm_loss(logits.as_tensor(), &ids, &mask).unwrap();
        let grads = loss.backward().unwrap();
        let g = grads.get(logits.as_tensor()).unwrap();
        let as64 = |t: &Tensor| t.to_dtype(candle_core::DType::F64).unwrap();
        (
            as64(&loss).to_scalar::<f64>().unwrap(),
            as64(g).flatten_all().unwrap().to_vec1::<f64>().unwrap(),
        )
    };
    let (loss64, g64) = run(candle_core::DType::F64);
    let (loss32, g32) = run(candle_core::DType::F32);
    assert!(
        (loss32 - loss64).abs() <= 1e-5 * loss64.abs(),
        "{loss32} vs {loss64}"
    );
    for (i, (a, e)) in g32.iter().zip(&g64).enumerate() {
        assert!((a - e).abs() <= 1e-6 + 1e-4 * e.abs(), "{i}: {a} vs {e}");
    }
    // Row (1, 1) predicts a masked target; the last positions predict none.
    let row = |bi: usize, ti: usize| &g32[(bi * t + ti) * v..(bi * t + ti + 1) * v];
    assert!(row(1, 1).iter().all(|&g| g == 0.0));
    assert!(row(0, 3).iter().all(|&g| g == 0.0));
    assert!(row(0, 0).iter().any(|&g| g != 0.0));
}
