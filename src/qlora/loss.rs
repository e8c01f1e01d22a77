//! Masked causal-LM cross-entropy.
//!
//! Position `t` predicts token `t + 1`; a target counts when its mask is 1
//! (padding and, when asked, prompt tokens are 0). The log-sum-exp subtracts
//! the row maximum first, so large logits do not overflow; sums of `f32`
//! exponentials are carried in `f64`.
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

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use super::{buf, vmath};

/// Mean negative log-likelihood of the masked next-token targets.
/// `logits` `(b, t, v)`, `input_ids` `(b, t)`, `mask` `(b, t)` (1 = this
/// token is a target). Returns a scalar; 0 when nothing is masked in.
pub fn masked_causal_lm_loss(
    logits: &Tensor,
    input_ids: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<Tensor> {
    let (sum, count) = masked_causal_lm_nll_sum(logits, input_ids, mask)?;
    sum / count.max(1) as f64
}

/// The sum of the negative log-likelihoods of the masked next-token targets
/// (a scalar tensor) and how many targets there are. Training divides sums
/// by the token count of the whole step, over every micro-batch and every
/// rank, so the gradient does not depend on how a step's examples are split.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use qlora_scale::qlora::loss::{loss_mask, masked_causal_lm_nll_sum};
/// let dev = Device::Cpu;
/// let logits = Tensor::zeros((1, 3, 4), candle_core::DType::F32, &dev).unwrap();
/// let ids = Tensor::new(&[[0u32, 1, 2]], &dev).unwrap();
/// let mask = loss_mask(&[vec![1, 1, 1]], None).unwrap();
/// let (sum, n) = masked_causal_lm_nll_sum(&logits, &ids, &mask).unwrap();
/// assert_eq!(n, 2);
/// assert!((sum.to_scalar::<f32>().unwrap() - 2.0 * 4f32.ln()).abs() < 1e-6);
/// ```
pub fn masked_causal_lm_nll_sum(
    logits: &Tensor,
    input_ids: &Tensor,
    mask: &Tensor,
) -> candle_core::Result<(Tensor, usize)> {
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
        return Ok((Tensor::zeros((), logits.dtype(), logits.device())?, 0));
    }
    // Position `j` predicts token `j + 1`; the last position of each row
    // predicts nothing (target 0, mask 0). The op reads the logits as they
    // are, `b * t` rows: slicing them first would add three logit-sized
    // copies forward and three more (each a zeroed buffer plus a sum) to
    // backward, where candle accumulates every node's gradient.
    let ids: Vec<Vec<u32>> = input_ids.to_dtype(DType::U32)?.to_vec2()?;
    let keep: Vec<Vec<f32>> = mask.to_dtype(DType::F32)?.to_vec2()?;
    let mut targets = Vec::with_capacity(b * t);
    let mut m = Vec::with_capacity(b * t);
    for (row_ids, row_keep) in ids.iter().zip(&keep) {
        for j in 0..t {
            if j + 1 < t {
                targets.push(row_ids[j + 1]);
                m.push(row_keep[j + 1]);
            } else {
                targets.push(0);
                m.push(0.0);
            }
        }
    }
    if let Some(&bad) = targets.iter().find(|&&x| x as usize >= v) {
        candle_core::bail!("loss: token id {bad} out of range for {v} logits");
    }
    let count: f64 = m.iter().map(|&x| f64::from(x)).sum();
    // 16-bit logits (a GPU's compute dtype) are widened: the loss and its
    // gradient are taken in `f32`.
    let logits = match logits.dtype() {
        DType::BF16 | DType::F16 => logits.to_dtype(DType::F32)?,
        _ => logits.clone(),
    };
    let m = Tensor::from_vec(m, b * t, logits.device())?.to_dtype(logits.dtype())?;
    let nll = logits.contiguous()?.apply_op1(TokenNll {
        targets: std::sync::Arc::new(targets),
    })?;
    Ok(((nll * m)?.sum_all()?, count.round() as usize))
}

/// Fused, stable per-row negative log-likelihood `logsumexp(x) - x[target]`
/// of logits read as rows of their last dimension. Its backward is
/// `(softmax(x) - onehot) * dL/dnll`, computed from the logits: no
/// log-softmax intermediates are kept, which saves several logit-sized
/// buffers per step.
#[derive(Debug, Clone)]
struct TokenNll {
    targets: std::sync::Arc<Vec<u32>>,
}

/// The per-row arithmetic of [`TokenNll`]: exact `f64` for `f64` logits
/// (the finite-difference tests run there); for `f32`, [`vmath`]'s lane
/// kernels, partial sums of at most [`SUM_BLOCK`] terms carried into an
/// `f64` total. A training step takes three
/// exponentials per logit (32k-vocabulary rows: 24M per step at 4 x 64
/// tokens); one scalar `f64` `exp` each took about 4% of a step's time.
trait NllFloat: WithDType {
    /// `log(sum(exp(row)))`, the row maximum subtracted first.
    fn row_lse(row: &[Self]) -> f64;
    /// `dst[j] = exp(row[j] - lse) * g`.
    fn scaled_softmax(row: &[Self], lse: f64, g: f64, dst: &mut [Self]);
}

/// Terms summed in `f32` lanes before they join the `f64` total.
const SUM_BLOCK: usize = 512;

impl NllFloat for f64 {
    fn row_lse(row: &[f64]) -> f64 {
        let max = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln()
    }

    fn scaled_softmax(row: &[f64], lse: f64, g: f64, dst: &mut [f64]) {
        for (d, x) in dst.iter_mut().zip(row) {
            *d = (x - lse).exp() * g;
        }
    }
}

impl NllFloat for f32 {
    fn row_lse(row: &[f32]) -> f64 {
        let max = vmath::max(row);
        let total: f64 = row
            .chunks(SUM_BLOCK)
            .map(|block| f64::from(vmath::sum_exp(block, max)))
            .sum();
        f64::from(max) + total.ln()
    }

    fn scaled_softmax(row: &[f32], lse: f64, g: f64, dst: &mut [f32]) {
        vmath::exp_scaled(row, lse as f32, g as f32, dst);
    }
}

fn nll_rows<T: NllFloat>(x: &[T], v: usize, targets: &[u32]) -> Vec<T> {
    x.par_chunks(v)
        .zip(targets.par_iter())
        .map(|(row, &t)| T::from_f64(T::row_lse(row) - row[t as usize].to_f64()))
        .collect()
}

/// `(softmax(x) - onehot(t)) * g` per row; `nll`, when given, the forward's
/// per-row results, from which `logsumexp(row) = nll + row[t]` comes
/// without another pass over the row.
fn nll_grad<T: NllFloat>(
    x: &[T],
    v: usize,
    targets: &[u32],
    g: &[f64],
    nll: Option<&[f64]>,
) -> Vec<T> {
    let mut out = buf::zeroed(x.len());
    out.par_chunks_mut(v)
        .zip(x.par_chunks(v))
        .zip(targets.par_iter().zip(g.par_iter()))
        .enumerate()
        .for_each(|(r, ((dst, row), (&t, &gr)))| {
            // Masked-out rows (padding, prompt tokens) have no gradient.
            if gr == 0.0 {
                return;
            }
            let lse = match nll {
                Some(nll) => nll[r] + row[t as usize].to_f64(),
                None => T::row_lse(row),
            };
            T::scaled_softmax(row, lse, gr, dst);
            let d = &mut dst[t as usize];
            *d = T::from_f64(d.to_f64() - gr);
        });
    out
}

/// Logits of any rank as `(rows, vocabulary)`: the last dimension is the
/// vocabulary.
fn rows(shape: &Shape) -> candle_core::Result<(usize, usize)> {
    match shape.dims().last() {
        Some(&v) if v > 0 => Ok((shape.elem_count() / v, v)),
        _ => candle_core::bail!("token nll: logits of shape {shape:?}"),
    }
}

impl CustomOp1 for TokenNll {
    fn name(&self) -> &'static str {
        "qlora-token-nll"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = rows(l.shape())?;
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("token nll: logits must be contiguous");
        };
        if n != self.targets.len() {
            candle_core::bail!("token nll: {n} rows for {} targets", self.targets.len());
        }
        let out = match s {
            CpuStorage::F32(x) => CpuStorage::F32(nll_rows(&x[a..b], v, &self.targets)),
            CpuStorage::F64(x) => CpuStorage::F64(nll_rows(&x[a..b], v, &self.targets)),
            other => candle_core::bail!("token nll: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, Shape::from(n)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = rows(l.shape())?;
        if n != self.targets.len() {
            candle_core::bail!("token nll: {n} rows for {} targets", self.targets.len());
        }
        let out = super::cuda::token_nll(s, l, v, &self.targets)?;
        Ok((out, Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, _) = rows(arg.shape())?;
        if n != self.targets.len() || grad.elem_count() != n {
            candle_core::bail!(
                "token nll: {n} rows, {} targets, {} gradients",
                self.targets.len(),
                grad.elem_count()
            );
        }
        let g = grad.to_dtype(arg.dtype())?.contiguous()?;
        // On the CPU the forward's results give each row's logsumexp (a
        // GPU recomputes it in the kernel).
        let nll = if res.device().is_cpu() && res.elem_count() == n {
            Some(std::sync::Arc::new(
                res.to_dtype(DType::F64)?.to_vec1::<f64>()?,
            ))
        } else {
            None
        };
        let op = TokenNllGrad {
            targets: self.targets.clone(),
            nll,
        };
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&g, &op)?))
    }
}

/// The backward of [`TokenNll`]: `(softmax(x) - onehot(target)) * g` per
/// row of the logits `x`, `g` the row's incoming gradient (rows with `g =
/// 0`, padding and prompt tokens, get zeros).
#[derive(Debug, Clone)]
struct TokenNllGrad {
    targets: std::sync::Arc<Vec<u32>>,
    /// The forward's per-row results, when read (CPU).
    nll: Option<std::sync::Arc<Vec<f64>>>,
}

impl candle_core::CustomOp2 for TokenNllGrad {
    fn name(&self) -> &'static str {
        "qlora-token-nll-grad"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, v) = rows(l.shape())?;
        let (Some((a, b)), Some((ga, gb))) = (l.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("token nll: logits and gradient must be contiguous");
        };
        if n != self.targets.len() || gb - ga != n {
            candle_core::bail!("token nll: {n} rows, {} gradients", gb - ga);
        }
        let out = match (s, gs) {
            (CpuStorage::F32(x), CpuStorage::F32(g)) => {
                let g: Vec<f64> = g[ga..gb].iter().map(|&x| f64::from(x)).collect();
                CpuStorage::F32(nll_grad(
                    &x[a..b],
                    v,
                    &self.targets,
                    &g,
                    self.nll.as_deref().map(Vec::as_slice),
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(g)) => CpuStorage::F64(nll_grad(
                &x[a..b],
                v,
                &self.targets,
                &g[ga..gb],
                self.nll.as_deref().map(Vec::as_slice),
            )),
            (x, g) => candle_core::bail!(
                "token nll: unsupported dtypes {:?} and {:?}",
                x.dtype(),
                g.dtype()
            ),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        gs: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (n, v) = rows(l.shape())?;
        if n != self.targets.len() || gl.shape().elem_count() != n {
            candle_core::bail!("token nll: {n} rows, {} gradients", gl.shape().elem_count());
        }
        let out = super::cuda::token_nll_grad(s, l, gs, gl, v, &self.targets)?;
        Ok((out, l.shape().clone()))
    }
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
