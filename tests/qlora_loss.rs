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
