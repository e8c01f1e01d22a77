//! Attention's `softmax(scale · s + mask)` over the last dimension as one
//! op with its own backward, for the attention of [`super::attention`] off
//! the CPU's fused path (16-bit dtypes, GPUs).
//!
//! Composed of Candle ops, the scaled, masked softmax is about eight passes
//! over the `(b, heads, t, keys)` scores forward (scale, add, widen, max,
//! subtract, exp, sum, divide) and more backward, each a kernel launch and a
//! scores-sized temporary: at 2048 tokens and 32 heads, 512 MiB of `f32` a
//! pass. [`masked_softmax`] reads the scores and the mask once and writes the
//! probabilities once (in the scores' dtype, computed in `f32`); its backward
//! `scale · y ⊙ (g - Σ g ⊙ y)` reads the probabilities and the incoming
//! gradient once. On a GPU both are kernels of `kernels/qlora.cu`; on the
//! CPU the same arithmetic in Rust.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qlora_scale::qlora::softmax::masked_softmax;
//! let s = Tensor::new(&[[[[1f32, 2.0, 3.0]]]], &Device::Cpu).unwrap();
//! let mask = Tensor::new(&[[[[0f32, 0.0, -1e9]]]], &Device::Cpu).unwrap();
//! let p = masked_softmax(&s, &mask, 1.0).unwrap().flatten_all().unwrap();
//! let p: Vec<f32> = p.to_vec1().unwrap();
//! assert!((p[0] - 0.26894).abs() < 1e-5 && p[2] == 0.0);
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

/// `softmax(scale · s + mask)` over the last dimension: `s` `(b, heads, t,
/// keys)`, `mask` `(1 or b, 1, t, keys)` additive (0 or a large negative),
/// of `s`'s dtype. The gradient flows to `s` only.
pub fn masked_softmax(s: &Tensor, mask: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let (b, heads, t, keys) = s.dims4()?;
    let (mb, one, mt, mk) = mask.dims4()?;
    if one != 1 || mt != t || mk != keys || !(mb == 1 || mb == b) {
        candle_core::bail!(
            "masked softmax: mask {:?} does not fit scores {:?}",
            mask.dims(),
            s.dims()
        );
    }
    let op = MaskedSoftmax {
        scale,
        heads,
        t,
        mask_rows: mb,
    };
    s.contiguous()?
        .apply_op2(&mask.to_dtype(s.dtype())?.contiguous()?.detach(), op)
}

/// The forward op: arguments the scores and the mask.
#[derive(Debug, Clone, Copy)]
struct MaskedSoftmax {
    scale: f64,
    heads: usize,
    t: usize,
    mask_rows: usize,
}

impl MaskedSoftmax {
    /// The mask row of score row `r`.
    fn mask_row(&self, r: usize) -> usize {
        let bi = r / (self.heads * self.t);
        (if self.mask_rows == 1 { 0 } else { bi }) * self.t + r % self.t
    }
}

/// The floats the CPU forms compute in: `f64` for `f64`, `f32` otherwise.
trait Float: WithDType + Send + Sync {
    fn wide(self) -> f64;
    fn narrow(x: f64) -> Self;
}

impl Float for f32 {
    fn wide(self) -> f64 {
        f64::from(self)
    }
    fn narrow(x: f64) -> Self {
        x as f32
    }
}

impl Float for f64 {
    fn wide(self) -> f64 {
        self
    }
    fn narrow(x: f64) -> Self {
        x
    }
}

impl Float for half::bf16 {
    fn wide(self) -> f64 {
        f64::from(self.to_f32())
    }
    fn narrow(x: f64) -> Self {
        half::bf16::from_f32(x as f32)
    }
}

impl Float for half::f16 {
    fn wide(self) -> f64 {
        f64::from(self.to_f32())
    }
    fn narrow(x: f64) -> Self {
        half::f16::from_f32(x as f32)
    }
}

fn softmax_rows<T: Float>(x: &[T], mask: &[T], keys: usize, op: &MaskedSoftmax) -> Vec<T> {
    let mut out = vec![T::narrow(0.0); x.len()];
    let scale = op.scale;
    out.par_chunks_mut(keys)
        .zip(x.par_chunks(keys))
        .enumerate()
        .for_each(|(r, (dst, row))| {
            let m = &mask[op.mask_row(r) * keys..][..keys];
            let v = |j: usize| scale * row[j].wide() + m[j].wide();
            let max = (0..keys).map(v).fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = (0..keys).map(|j| (v(j) - max).exp()).sum();
            for (j, d) in dst.iter_mut().enumerate() {
                *d = T::narrow((v(j) - max).exp() / sum);
            }
        });
    out
}

fn softmax_grad_rows<T: Float>(y: &[T], g: &[T], keys: usize, scale: f64) -> Vec<T> {
    let mut out = vec![T::narrow(0.0); y.len()];
    out.par_chunks_mut(keys)
        .zip(y.par_chunks(keys).zip(g.par_chunks(keys)))
        .for_each(|(dst, (yr, gr))| {
            let dot: f64 = yr.iter().zip(gr).map(|(a, b)| a.wide() * b.wide()).sum();
            for ((d, a), b) in dst.iter_mut().zip(yr).zip(gr) {
                *d = T::narrow(scale * a.wide() * (b.wide() - dot));
            }
        });
    out
}

/// The contiguous values of a CPU storage under `l`.
fn slice<'a, T: WithDType>(v: &'a [T], l: &Layout) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("masked softmax: operands must be contiguous"),
    }
}

impl CustomOp2 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "qlora-masked-softmax"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        ms: &CpuStorage,
        ml: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let keys = *l.dims().last().unwrap_or(&1);
        let out = match (s, ms) {
            (CpuStorage::F32(x), CpuStorage::F32(m)) => {
                CpuStorage::F32(softmax_rows(slice(x, l)?, slice(m, ml)?, keys, self))
            }
            (CpuStorage::F64(x), CpuStorage::F64(m)) => {
                CpuStorage::F64(softmax_rows(slice(x, l)?, slice(m, ml)?, keys, self))
            }
            (CpuStorage::BF16(x), CpuStorage::BF16(m)) => {
                CpuStorage::BF16(softmax_rows(slice(x, l)?, slice(m, ml)?, keys, self))
            }
            (CpuStorage::F16(x), CpuStorage::F16(m)) => {
                CpuStorage::F16(softmax_rows(slice(x, l)?, slice(m, ml)?, keys, self))
            }
            _ => candle_core::bail!("masked softmax: unsupported dtype {:?}", s.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
        ms: &candle_core::CudaStorage,
        ml: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::masked_softmax(
            s,
            l,
            ms,
            ml,
            (self.heads, self.t, self.mask_rows),
            self.scale as f32,
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(
        &self,
        _s: &Tensor,
        _mask: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(y.dtype())?.contiguous()?;
        let ds = y
            .contiguous()?
            .apply_op2_no_bwd(&g, &SoftmaxGrad { scale: self.scale })?;
        Ok((Some(ds), None))
    }
}

/// `scale · y ⊙ (g - Σ g ⊙ y)` per row: arguments the probabilities `y`
/// and the incoming gradient `g`.
#[derive(Debug, Clone, Copy)]
struct SoftmaxGrad {
    scale: f64,
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "qlora-masked-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        y: &CpuStorage,
        l: &Layout,
        g: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let keys = *l.dims().last().unwrap_or(&1);
        let out = match (y, g) {
            (CpuStorage::F32(y), CpuStorage::F32(g)) => CpuStorage::F32(softmax_grad_rows(
                slice(y, l)?,
                slice(g, gl)?,
                keys,
                self.scale,
            )),
            (CpuStorage::F64(y), CpuStorage::F64(g)) => CpuStorage::F64(softmax_grad_rows(
                slice(y, l)?,
                slice(g, gl)?,
                keys,
                self.scale,
            )),
            (CpuStorage::BF16(y), CpuStorage::BF16(g)) => CpuStorage::BF16(softmax_grad_rows(
                slice(y, l)?,
                slice(g, gl)?,
                keys,
                self.scale,
            )),
            (CpuStorage::F16(y), CpuStorage::F16(g)) => CpuStorage::F16(softmax_grad_rows(
                slice(y, l)?,
                slice(g, gl)?,
                keys,
                self.scale,
            )),
            _ => candle_core::bail!("masked softmax: unsupported dtype {:?}", y.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        y: &candle_core::CudaStorage,
        l: &Layout,
        g: &candle_core::CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::softmax_grad(y, l, g, gl, self.scale as f32)?;
        Ok((out, l.shape().clone()))
    }
}

/// Whether attention on `scores` takes [`masked_softmax`]: 16-bit scores
/// on the CPU (whose fused attention takes `f32` and `f64`), and `f32` or
/// `bf16` scores on a GPU (the kernels' dtypes).
pub fn takes(scores: &Tensor) -> bool {
    match (scores.device().is_cpu(), scores.dtype()) {
        (true, dt) => matches!(dt, DType::BF16 | DType::F16),
        (false, dt) => matches!(dt, DType::F32 | DType::BF16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{D, Device, Var};

    /// The composition of Candle ops this op replaces.
    fn reference(s: &Tensor, mask: &Tensor, scale: f64) -> Tensor {
        candle_nn::ops::softmax(
            &(s * scale).unwrap().broadcast_add(mask).unwrap(),
            D::Minus1,
        )
        .unwrap()
    }

    fn check(dtype: DType, mask_rows: usize, tol: f64) {
        let dev = Device::Cpu;
        let (b, h, t, k) = (2, 3, 5, 7);
        let s = Tensor::randn(0f64, 2.0, (b, h, t, k), &dev).unwrap();
        let m: Vec<f64> = (0..mask_rows * t * k)
            .map(|i| if (i % k) > (i / k) % t + 1 { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(m, (mask_rows, 1, t, k), &dev).unwrap();
        let g = Tensor::randn(0f64, 1.0, (b, h, t, k), &dev).unwrap();
        let run = |f: &dyn Fn(&Tensor, &Tensor) -> Tensor| {
            let x = Var::from_tensor(&s.to_dtype(dtype).unwrap()).unwrap();
            let y = f(x.as_tensor(), &mask.to_dtype(dtype).unwrap());
            let loss = (y.to_dtype(DType::F64).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap();
            let gx = loss.backward().unwrap().get(x.as_tensor()).unwrap().clone();
            let flat = |t: &Tensor| -> Vec<f64> {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            };
            (flat(&y), flat(&gx))
        };
        let (y1, g1) = run(&|x, m| masked_softmax(x, m, 0.7).unwrap());
        let (y2, g2) = run(&|x, m| reference(x, m, 0.7));
        let worst = |a: &[f64], b: &[f64]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0, f64::max)
        };
        assert!(
            worst(&y1, &y2) <= tol,
            "{dtype:?} forward {}",
            worst(&y1, &y2)
        );
        assert!(
            worst(&g1, &g2) <= tol,
            "{dtype:?} backward {}",
            worst(&g1, &g2)
        );
        assert!(
            y1.iter().step_by(k).all(|&p| p > 0.0),
            "the first key is always seen"
        );
    }

    #[test]
    fn matches_the_composition_in_every_dtype_and_mask_shape() {
        check(DType::F64, 1, 1e-12);
        check(DType::F64, 2, 1e-12);
        check(DType::F32, 2, 1e-5);
        // bf16: the reference rounds every intermediate, this op once.
        check(DType::BF16, 1, 2e-2);
    }

    #[test]
    fn a_mask_of_another_shape_is_an_error() {
        let dev = Device::Cpu;
        let s = Tensor::zeros((2, 3, 4, 4), DType::F32, &dev).unwrap();
        let bad = Tensor::zeros((3, 1, 4, 4), DType::F32, &dev).unwrap();
        let e = masked_softmax(&s, &bad, 1.0).unwrap_err().to_string();
        assert!(e.contains("does not fit"), "{e}");
    }
}
