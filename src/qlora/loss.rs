//! Masked causal-LM cross-entropy.
//!
//! Position `t` predicts token `t + 1`; a target counts when its mask is 1
//! (padding and, when asked, prompt tokens are 0). Log-softmax subtracts the
//! row maximum first, so large logits do not overflow.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qlora_scale::qlora::loss::{loss_mask, masked_causal_lm_loss};
//! let dev = Device::Cpu;
//! let logits = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &dev).unwrap();
//! let ids = Tensor::new(&[[0u32, 1, 2]], &dev).unwrap();
//! let mask = loss_mask(&[vec![1, 1, 1]], Some(&[1])).unwrap();
//! let loss = masked_causal_lm_loss(&logits, &ids, &mask).unwrap();
//! assert!((loss.to_scalar::<f32>().unwrap() - 4f32.ln()).abs() < 1e-6);
//! ```

use candle_core::{D, DType, Device, Tensor};

/// Mean negative log-likelihood of the masked next-token targets.
/// `logits` `(b, t, v)`, `input_ids` `(b, t)`, `mask` `(b, t)` (1 = this
/// token is a target). Returns a scalar; 0 when nothing is masked in.
pub fn masked_causal_lm_loss(
    logits: &Tensor,
    input_ids: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    if input_ids.dims() != [b, t] || mask.dims() != [b, t] {
        candle_core::bail!(
            "loss: logits {:?}, ids {:?} and mask {:?} disagree",
            logits.dims(),
            input_ids.dims(),
            mask.dims()
        );
    }
    if t < 2 {
        return Tensor::zeros((), logits.dtype(), logits.device());
    }
    let n = b * (t - 1);
    let lg = logits.narrow(1, 0, t - 1)?.reshape((n, v))?;
    let tg = input_ids
        .narrow(1, 1, t - 1)?
        .to_dtype(DType::U32)?
        .reshape((n, 1))?;
    let m = mask
        .narrow(1, 1, t - 1)?
        .to_dtype(logits.dtype())?
        .reshape(n)?;
    // The max only shifts: its gradient cancels, so it is detached.
    let max = lg.max_keepdim(D::Minus1)?.detach();
    let shifted = lg.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let logp = (shifted.gather(&tg, D::Minus1)? - lse)?.squeeze(D::Minus1)?;
    let count = m
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?
        .max(1.0);
    (logp * m)?.sum_all()?.neg()? / count
}

/// A `(b, t)` loss mask from per-row attention masks (1 = token, 0 =
/// padding), zeroing the first `prompt_lens[i]` tokens of row `i` when given.
pub fn loss_mask(
    attention: &[Vec<u8>],
    prompt_lens: Option<&[usize]>,
) -> candle_core::Result<Tensor> {
    let b = attention.len();
    let t = attention.first().map_or(0, Vec::len);
    if attention.iter().any(|r| r.len() != t) {
        candle_core::bail!("loss mask: rows of different lengths");
    }
    if let Some(p) = prompt_lens
        && p.len() != b
    {
        candle_core::bail!("loss mask: {} prompt lengths for {b} rows", p.len());
    }
    let mut m = Vec::with_capacity(b * t);
    for (i, row) in attention.iter().enumerate() {
        let skip = prompt_lens.map_or(0, |p| p[i]);
        m.extend(
            row.iter()
                .enumerate()
                .map(|(j, &a)| if a != 0 && j >= skip { 1f32 } else { 0.0 }),
        );
    }
    Tensor::from_vec(m, (b, t), &Device::Cpu)
}
