//! Causal self-attention as one Candle op with its own backward.
//!
//! Built from Candle ops, attention is a dozen graph nodes per block: the
//! keys and values copied once per query head (GQA), `q·kᵀ`, the scale, the
//! soft cap, the mask, the five ops of a softmax, `p·v`. Candle's backward
//! then allocates a gradient for every one of them, and its element-wise
//! ops run on one thread here (`trainer.candle_elementwise_threads`).
//! [`AttentionOp`] does the same arithmetic on the CPU in one node: per
//! batch row and key/value head (one rayon task each), the scores of that
//! head's query heads, their softmax and the weighted sum, with the GEMMs
//! of the `gemm` crate. It keeps nothing from the forward pass: the
//! backward recomputes the probabilities from `q` and `k` (one small GEMM
//! per head) rather than hold a `(b, heads, t, keys)` tensor per block.
//!
//! Other dtypes and devices take [`attention_reference`], the composition of
//! Candle ops it replaces (also the tests' reference).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use qlora_scale::qlora::attention::{Attention, attention};
//! let dev = Device::Cpu;
//! let q = Tensor::randn(0f32, 1.0, (1, 4, 3, 8), &dev).unwrap();
//! let kv = Tensor::randn(0f32, 1.0, (1, 2, 3, 8), &dev).unwrap();
//! let mask = Tensor::zeros((1, 1, 3, 3), candle_core::DType::F32, &dev).unwrap();
//! let a = Attention { scale: 8f64.powf(-0.5), softcap: None };
//! let o = attention(&q, &kv, &kv, &mask, a).unwrap();
//! assert_eq!(o.dims(), &[1, 4, 3, 8]);
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Shape, Storage, Tensor, WithDType};
use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use super::{buf, vmath};

/// The constants of one block's attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attention {
    /// Factor of the scores `q·kᵀ`.
    pub scale: f64,
    /// Gemma 2: the scores become `cap · tanh(score / cap)` before the mask.
    pub softcap: Option<f64>,
}

/// `softmax(softcap(scale · q·kᵀ) + mask) · v` for queries `q` `(b, heads,
/// t, d)`, keys and values `k`, `v` `(b, kv_heads, keys, d)` (`heads` a
/// multiple of `kv_heads`: query head `h` reads key/value head `h / (heads /
/// kv_heads)`), and an additive `mask` `(b or 1, 1, t, keys)`. Returns
/// `(b, heads, t, d)`. Gradients flow to `q`, `k` and `v`, not to the mask.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    a: Attention,
) -> candle_core::Result<Tensor> {
    let dtype = q.dtype();
    let fused = q.device().is_cpu()
        && matches!(dtype, DType::F32 | DType::F64)
        && [k, v, mask].iter().all(|t| t.dtype() == dtype);
    if !fused {
        return attention_reference(q, k, v, mask, a);
    }
    let op = AttentionOp::new(q, k, v, mask.contiguous()?, a)?;
    q.contiguous()?
        .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// [`attention`] as a composition of Candle ops: what [`AttentionOp`]
/// replaces, for the dtypes and devices it does not take.
pub fn attention_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: &Tensor,
    a: Attention,
) -> candle_core::Result<Tensor> {
    let rep = q.dim(1)? / k.dim(1)?;
    let k = repeat_kv(k.contiguous()?, rep)?;
    let v = repeat_kv(v.contiguous()?, rep)?;
    let scores = q.contiguous()?.matmul(&k.t()?.contiguous()?)?;
    if a.softcap.is_none() && super::softmax::takes(&scores) {
        // 16-bit dtypes and GPUs: scale, mask and softmax in one op (in
        // f32), with its own backward.
        let att = super::softmax::masked_softmax(&scores, mask, a.scale)?;
        return att.matmul(&v);
    }
    let att = (scores * a.scale)?;
    let att = match a.softcap {
        Some(c) => ((att / c)?.tanh()? * c)?,
        None => att,
    };
    let att = att.broadcast_add(mask)?;
    let att = match att.dtype() {
        // 16-bit compute: the softmax in `f32` (transformers' eager
        // attention does the same), the product with `v` in 16 bits.
        dt @ (DType::BF16 | DType::F16) => {
            candle_nn::ops::softmax(&att.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dt)?
        }
        _ => candle_nn::ops::softmax(&att, D::Minus1)?,
    };
    att.matmul(&v)
}

/// Each key/value head `(b, kv, t, d)` repeated `n` times in place:
/// `(b, kv * n, t, d)`.
fn repeat_kv(x: Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x);
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, d))?
        .contiguous()?
        .reshape((b, kv * n, t, d))
}

/// The shapes of one application.
#[derive(Debug, Clone, Copy)]
struct Dims {
    b: usize,
    heads: usize,
    kv: usize,
    t: usize,
    keys: usize,
    d: usize,
    /// Batch rows of the mask: 1 (shared) or `b`.
    mask_rows: usize,
}

impl Dims {
    /// Query heads per key/value head.
    fn rep(&self) -> usize {
        self.heads / self.kv
    }
}

/// The op: constants and the mask; `q`, `k`, `v` are its three arguments.
struct AttentionOp {
    dims: Dims,
    mask: Tensor,
    a: Attention,
}

impl AttentionOp {
    /// Checks the shapes: `k` and `v` alike, `q`'s heads a multiple of
    /// theirs, the mask `(b or 1, 1, t, keys)`.
    fn new(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Tensor,
        a: Attention,
    ) -> candle_core::Result<Self> {
        let (b, heads, t, d) = q.dims4()?;
        let (kb, kv, keys, kd) = k.dims4()?;
        let (mask_rows, one, mt, mk) = mask.dims4()?;
        if kb != b || kd != d || kv == 0 || heads % kv != 0 || v.dims() != k.dims() {
            candle_core::bail!(
                "attention: queries {:?}, keys {:?} and values {:?} disagree",
                q.dims(),
                k.dims(),
                v.dims()
            );
        }
        if !(mask_rows == 1 || mask_rows == b) || one != 1 || mt != t || mk != keys {
            candle_core::bail!(
                "attention: mask {:?} does not fit ({b}, 1, {t}, {keys})",
                mask.dims()
            );
        }
        let dims = Dims {
            b,
            heads,
            kv,
            t,
            keys,
            d,
            mask_rows,
        };
        Ok(Self { dims, mask, a })
    }
}

/// The two float types the op computes in.
trait Real: WithDType {
    fn tanh(self) -> Self;

    /// `row = softmax(row + mask)` in place, the row maximum subtracted
    /// first.
    fn softmax_masked(row: &mut [Self], mask: &[Self]);
}

impl Real for f32 {
    fn tanh(self) -> Self {
        f32::tanh(self)
    }

    /// [`vmath`]'s lane kernel (`wide`'s eight-lane `exp` before it, a scalar
    /// `expf` per score before that: about 2% of a training step).
    fn softmax_masked(row: &mut [f32], mask: &[f32]) {
        vmath::softmax_masked(row, mask);
    }
}

impl Real for f64 {
    fn tanh(self) -> Self {
        f64::tanh(self)
    }

    fn softmax_masked(row: &mut [f64], mask: &[f64]) {
        let mut max = f64::NEG_INFINITY;
        for (x, &m) in row.iter_mut().zip(mask) {
            *x += m;
            if *x > max {
                max = *x;
            }
        }
        let mut sum = 0.0;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

/// A strided `rows x cols` matrix: element `(i, j)` at `i*rs + j*cs`.
#[derive(Debug, Clone, Copy)]
struct Mat {
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Mat {
    /// Row-major.
    fn rows(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose of a row-major `cols x rows` matrix.
    fn transposed(rows: usize, cols: usize) -> Self {
        Self {
            rows,
            cols,
            rs: 1,
            cs: rows,
        }
    }

    /// Whether every element lies inside a buffer of `len`.
    fn fits(&self, len: usize) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < len
    }
}

/// `dst = beta · lhs·rhs`, or `dst += beta · lhs·rhs` when `accumulate`; one
/// thread.
///
/// # Panics
/// If the shapes disagree or a matrix reaches outside its buffer: a bug in
/// this module (the op checks its inputs' shapes first).
#[allow(clippy::too_many_arguments)]
fn mm<T: Real>(
    dst: &mut [T],
    d: Mat,
    accumulate: bool,
    lhs: &[T],
    l: Mat,
    rhs: &[T],
    r: Mat,
    beta: T,
) {
    assert!(
        d.rows == l.rows && d.cols == r.cols && l.cols == r.rows,
        "attention: GEMM shapes"
    );
    assert!(
        d.fits(dst.len()) && l.fits(lhs.len()) && r.fits(rhs.len()),
        "attention: GEMM bounds"
    );
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    let st = |s: usize| isize::try_from(s).expect("stride fits isize");
    // SAFETY: every element each matrix addresses lies in its buffer
    // (checked above); `dst` is borrowed mutably, `lhs` and `rhs` are only read.
    unsafe {
        gemm(
            d.rows,
            d.cols,
            l.cols,
            dst.as_mut_ptr(),
            st(d.cs),
            st(d.rs),
            accumulate,
            lhs.as_ptr(),
            st(l.cs),
            st(l.rs),
            rhs.as_ptr(),
            st(r.cs),
            st(r.rs),
            T::one(),
            beta,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// The inputs of one application, as slices.
struct Inputs<'a, T> {
    q: &'a [T],
    k: &'a [T],
    v: &'a [T],
    mask: &'a [T],
}

impl AttentionOp {
    /// The mask rows `(t, keys)` of batch row `bi`.
    fn mask_of<'a, T>(&self, mask: &'a [T], bi: usize) -> &'a [T] {
        let Dims {
            t, keys, mask_rows, ..
        } = self.dims;
        let row = if mask_rows == 1 { 0 } else { bi };
        &mask[row * t * keys..(row + 1) * t * keys]
    }

    /// Into `p` `(t, keys)`: the softmax probabilities of query head `qh`
    /// `(t, d)` over key head `kh` `(keys, d)`; into `capped`, when there is
    /// a soft cap, the capped scores (the backward's `tanh`).
    fn probs<T: Real>(
        &self,
        qh: &[T],
        kh: &[T],
        mask: &[T],
        p: &mut [T],
        mut capped: Option<&mut [T]>,
    ) {
        let Dims { t, keys, d, .. } = self.dims;
        let scale = T::from_f64(self.a.scale);
        mm(
            p,
            Mat::rows(t, keys),
            false,
            qh,
            Mat::rows(t, d),
            kh,
            Mat::transposed(d, keys),
            scale,
        );
        let cap = self.a.softcap.map(T::from_f64);
        for (i, row) in p.chunks_exact_mut(keys).enumerate() {
            if let Some(c) = cap {
                for x in row.iter_mut() {
                    *x = (*x / c).tanh() * c;
                }
                if let Some(buf) = capped.as_deref_mut() {
                    buf[i * keys..(i + 1) * keys].copy_from_slice(row);
                }
            }
            T::softmax_masked(row, &mask[i * keys..(i + 1) * keys]);
        }
    }

    /// The key head, value head and mask rows of batch row `bi`, key/value
    /// head `g`.
    fn group_of<'a, T>(&self, x: &Inputs<'a, T>, bi: usize, g: usize) -> [&'a [T]; 3] {
        let Dims { kv, keys, d, .. } = self.dims;
        let at = (bi * kv + g) * keys * d;
        let (k, v) = (&x.k[at..at + keys * d], &x.v[at..at + keys * d]);
        [k, v, self.mask_of(x.mask, bi)]
    }

    /// Where query head `r` of batch row `bi`, key/value head `g` starts in
    /// a `(b, heads, t, d)` tensor.
    fn head_at(&self, bi: usize, g: usize, r: usize) -> usize {
        let Dims { heads, t, d, .. } = self.dims;
        (bi * heads + g * self.dims.rep() + r) * t * d
    }

    /// The output heads `(rep, t, d)` of batch row `bi`, key/value head `g`.
    fn forward_group<T: Real>(&self, x: &Inputs<T>, bi: usize, g: usize, out: &mut [T]) {
        let Dims { t, keys, d, .. } = self.dims;
        let [kh, vh, mask] = self.group_of(x, bi, g);
        let mut p = vec![T::zero(); t * keys];
        for (r, o) in out.chunks_exact_mut(t * d).enumerate() {
            let q_at = self.head_at(bi, g, r);
            self.probs(&x.q[q_at..q_at + t * d], kh, mask, &mut p, None);
            mm(
                o,
                Mat::rows(t, d),
                false,
                &p,
                Mat::rows(t, keys),
                vh,
                Mat::rows(keys, d),
                T::one(),
            );
        }
    }

    /// The whole output `(b, heads, t, d)`, one rayon task per batch row and
    /// key/value head.
    fn forward<T: Real>(&self, x: &Inputs<T>) -> Vec<T> {
        let Dims {
            b, heads, kv, t, d, ..
        } = self.dims;
        let mut out = buf::zeroed(b * heads * t * d);
        out.par_chunks_mut(self.dims.rep() * t * d)
            .enumerate()
            .for_each(|(i, o)| self.forward_group(x, i / kv, i % kv, o));
        out
    }
}

/// The gradients of one batch row and key/value head.
struct GroupGrads<'a, T> {
    /// `(rep, t, d)`: the group's query heads.
    dq: &'a mut [T],
    /// `(keys, d)`.
    dk: &'a mut [T],
    /// `(keys, d)`.
    dv: &'a mut [T],
}

impl AttentionOp {
    /// The gradients of batch row `bi`, key/value head `g`, from the
    /// output's gradient `dout` `(b, heads, t, d)`. With `p` the
    /// probabilities: `dv += pᵀ·do`, `dp = do·vᵀ`, `ds = p ⊙ (dp − Σ dp ⊙ p)`
    /// (times `1 − tanh²` under a soft cap), `dq = scale · ds·k`,
    /// `dk += scale · dsᵀ·q`.
    fn backward_group<T: Real>(
        &self,
        x: &Inputs<T>,
        dout: &[T],
        bi: usize,
        g: usize,
        gr: GroupGrads<T>,
    ) {
        let Dims { t, keys, d, .. } = self.dims;
        let [kh, vh, mask] = self.group_of(x, bi, g);
        let scale = T::from_f64(self.a.scale);
        let (mut p, mut ds) = (vec![T::zero(); t * keys], vec![T::zero(); t * keys]);
        let mut capped = self.a.softcap.map(|_| vec![T::zero(); t * keys]);
        for (r, dq) in gr.dq.chunks_exact_mut(t * d).enumerate() {
            let at = self.head_at(bi, g, r);
            let (qh, doh) = (&x.q[at..at + t * d], &dout[at..at + t * d]);
            self.probs(qh, kh, mask, &mut p, capped.as_deref_mut());
            let (td, kd, tk) = (Mat::rows(t, d), Mat::rows(keys, d), Mat::rows(t, keys));
            mm(
                gr.dv,
                kd,
                true,
                &p,
                Mat::transposed(keys, t),
                doh,
                td,
                T::one(),
            );
            mm(
                &mut ds,
                tk,
                false,
                doh,
                td,
                vh,
                Mat::transposed(d, keys),
                T::one(),
            );
            self.softmax_backward(&p, &mut ds, capped.as_deref());
            mm(dq, td, false, &ds, tk, kh, kd, scale);
            mm(
                gr.dk,
                kd,
                true,
                &ds,
                Mat::transposed(keys, t),
                qh,
                td,
                scale,
            );
        }
    }

    /// `ds` (holding `dp`) becomes the gradient of the scores before the
    /// soft cap: `p ⊙ (dp − Σⱼ dp ⊙ p)`, times `1 − (capped / cap)²`.
    fn softmax_backward<T: Real>(&self, p: &[T], ds: &mut [T], capped: Option<&[T]>) {
        let keys = self.dims.keys;
        let cap = self.a.softcap.map(T::from_f64);
        for (i, (pr, dr)) in p
            .chunks_exact(keys)
            .zip(ds.chunks_exact_mut(keys))
            .enumerate()
        {
            let mut dot = T::zero();
            for (&pv, &dv) in pr.iter().zip(dr.iter()) {
                dot += pv * dv;
            }
            for (&pv, dv) in pr.iter().zip(dr.iter_mut()) {
                *dv = pv * (*dv - dot);
            }
            if let (Some(c), Some(cr)) = (cap, capped) {
                for (dv, &s) in dr.iter_mut().zip(&cr[i * keys..(i + 1) * keys]) {
                    let th = s / c;
                    *dv *= T::one() - th * th;
                }
            }
        }
    }

    /// All three gradients, one rayon task per batch row and key/value head
    /// (each writes its own query heads, key head and value head).
    fn backward<T: Real>(&self, x: &Inputs<T>, dout: &[T]) -> [Vec<T>; 3] {
        let Dims {
            b,
            heads,
            kv,
            t,
            keys,
            d,
            ..
        } = self.dims;
        let mut dq = buf::zeroed(b * heads * t * d);
        let mut dk = buf::zeroed(b * kv * keys * d);
        let mut dv = buf::zeroed(b * kv * keys * d);
        dq.par_chunks_mut(self.dims.rep() * t * d)
            .zip(dk.par_chunks_mut(keys * d))
            .zip(dv.par_chunks_mut(keys * d))
            .enumerate()
            .for_each(|(i, ((dq, dk), dv))| {
                self.backward_group(x, dout, i / kv, i % kv, GroupGrads { dq, dk, dv })
            });
        [dq, dk, dv]
    }
}

/// The contiguous values of a CPU storage, as `T`.
fn values<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("attention: input is not contiguous")
    };
    Ok(&s.as_slice::<T>()?[a..b])
}

/// The contiguous values of a CPU tensor, with its storage held.
fn run_on<T: Real, R>(
    tensors: [&Tensor; 5],
    f: impl FnOnce([&[T]; 5]) -> R,
) -> candle_core::Result<R> {
    let held: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices: Vec<&[T]> = Vec::with_capacity(5);
    for (s, l) in &held {
        let Storage::Cpu(c) = &**s else {
            candle_core::bail!("attention: tensor is not on the CPU")
        };
        slices.push(values(c, l)?);
    }
    match <[&[T]; 5]>::try_from(slices) {
        Ok(slices) => Ok(f(slices)),
        Err(_) => candle_core::bail!("attention: expected five tensors"),
    }
}

impl CustomOp3 for AttentionOp {
    fn name(&self) -> &'static str {
        "qlora-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Dims { b, heads, t, d, .. } = self.dims;
        let (ms, ml) = self.mask.storage_and_layout();
        let Storage::Cpu(mc) = &*ms else {
            candle_core::bail!("attention: mask is not on the CPU")
        };
        let out = match s1.dtype() {
            DType::F32 => CpuStorage::F32(self.forward::<f32>(&Inputs {
                q: values(s1, l1)?,
                k: values(s2, l2)?,
                v: values(s3, l3)?,
                mask: values(mc, ml)?,
            })),
            DType::F64 => CpuStorage::F64(self.forward::<f64>(&Inputs {
                q: values(s1, l1)?,
                k: values(s2, l2)?,
                v: values(s3, l3)?,
                mask: values(mc, ml)?,
            })),
            dt => candle_core::bail!("attention: no CPU kernel for {dt:?}"),
        };
        Ok((out, Shape::from((b, heads, t, d))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.contiguous()?;
        let tensors = [q, k, v, &self.mask, &grad];
        let [dq, dk, dv] = match q.dtype() {
            DType::F32 => self.grads::<f32>(tensors)?,
            DType::F64 => self.grads::<f64>(tensors)?,
            dt => candle_core::bail!("attention: no CPU kernel for {dt:?}"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

impl AttentionOp {
    /// The gradients of `q`, `k`, `v` as tensors, from `[q, k, v, mask,
    /// grad]`.
    fn grads<T: Real>(&self, tensors: [&Tensor; 5]) -> candle_core::Result<[Tensor; 3]> {
        let [dq, dk, dv] = run_on::<T, _>(tensors, |[q, k, v, mask, dout]| {
            self.backward(&Inputs { q, k, v, mask }, dout)
        })?;
        let dev = tensors[0].device();
        Ok([
            Tensor::from_vec(dq, tensors[0].shape(), dev)?,
            Tensor::from_vec(dk, tensors[1].shape(), dev)?,
            Tensor::from_vec(dv, tensors[2].shape(), dev)?,
        ])
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor, Var};

    use super::*;

    /// A causal mask `(rows, 1, t, keys)` for `t` queries after `keys - t`
    /// earlier keys, with the first key of batch row 1 masked out (padding).
    fn mask(rows: usize, t: usize, keys: usize, dtype: DType) -> Tensor {
        let mut m = Vec::new();
        for r in 0..rows {
            for i in keys - t..keys {
                for j in 0..keys {
                    let seen = j <= i && !(r == 1 && j == 0);
                    m.push(if seen { 0f32 } else { -1e9 });
                }
            }
        }
        Tensor::from_vec(m, (rows, 1, t, keys), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }

    /// Largest difference over largest magnitude.
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let diff = (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap();
        let mag = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap();
        let f = |t: Tensor| t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap();
        f(diff) / f(mag).max(1e-30)
    }

    /// The output and the gradients of `q`, `k`, `v` of a weighted sum of
    /// the output, through `f`.
    fn run(
        f: fn(&Tensor, &Tensor, &Tensor, &Tensor, Attention) -> candle_core::Result<Tensor>,
        vars: &[Var; 3],
        mask: &Tensor,
        weights: &Tensor,
        a: Attention,
    ) -> Vec<Tensor> {
        let [q, k, v] = vars;
        let o = f(q.as_tensor(), k.as_tensor(), v.as_tensor(), mask, a).unwrap();
        let grads = (&o * weights)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let mut out = vec![o];
        out.extend(
            vars.iter()
                .map(|x| grads.get(x.as_tensor()).unwrap().clone()),
        );
        out
    }

    /// The fused op against the composition of Candle ops: output and all
    /// three gradients, with GQA, a padded batch row, a shared or per-row
    /// mask, more keys than queries (a KV cache), with and without a soft cap.
    fn check(dtype: DType, tol: f64) {
        let dev = Device::Cpu;
        let cases = [
            (2, 4, 2, 5, 5, 6, 2, None),
            (2, 6, 2, 3, 7, 4, 1, Some(5.0)),
            (1, 2, 2, 9, 9, 8, 1, Some(2.0)),
        ];
        for (b, heads, kv, t, keys, d, rows, softcap) in cases {
            let var = |shape: (usize, usize, usize, usize)| {
                Var::from_tensor(
                    &Tensor::randn(0f32, 1.0, shape, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap(),
                )
                .unwrap()
            };
            let vars = [
                var((b, heads, t, d)),
                var((b, kv, keys, d)),
                var((b, kv, keys, d)),
            ];
            let weights = Tensor::randn(0f32, 1.0, (b, heads, t, d), &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let a = Attention {
                scale: (d as f64).powf(-0.5) * 3.0,
                softcap,
            };
            let m = mask(rows, t, keys, dtype);
            let fused = run(attention, &vars, &m, &weights, a);
            let reference = run(attention_reference, &vars, &m, &weights, a);
            for (i, (x, y)) in fused.iter().zip(&reference).enumerate() {
                let r = rel(x, y);
                assert!(
                    r < tol,
                    "{dtype:?} case {b}x{heads}/{kv}x{t}x{keys}x{d}: output/grad {i} differs by {r:e}"
                );
            }
        }
    }

    #[test]
    fn fused_attention_matches_candle_ops_in_f32() {
        check(DType::F32, 1e-5);
    }

    #[test]
    fn fused_attention_matches_candle_ops_in_f64() {
        check(DType::F64, 1e-12);
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 3, 4, 8), DType::F32, &dev).unwrap();
        let kv = Tensor::zeros((1, 2, 4, 8), DType::F32, &dev).unwrap();
        let m = Tensor::zeros((1, 1, 4, 4), DType::F32, &dev).unwrap();
        let a = Attention {
            scale: 1.0,
            softcap: None,
        };
        let err = attention(&q, &kv, &kv, &m, a).unwrap_err().to_string();
        assert!(err.contains("disagree"), "{err}");
        let bad_mask = Tensor::zeros((1, 1, 4, 5), DType::F32, &dev).unwrap();
        let q = Tensor::zeros((1, 4, 4, 8), DType::F32, &dev).unwrap();
        let err = attention(&q, &kv, &kv, &bad_mask, a)
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not fit"), "{err}");
        let m = Tensor::zeros((1, 1, 4, 4), DType::F32, &dev).unwrap();
        let short_v = Tensor::zeros((1, 2, 3, 8), DType::F32, &dev).unwrap();
        let err = attention(&q, &kv, &short_v, &m, a).unwrap_err().to_string();
        assert!(err.contains("values"), "{err}");
    }
}
