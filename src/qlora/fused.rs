//! Fused element-wise ops of the decoder block: RMSNorm, the MLP gate
//! `act(gate) * up` and RoPE, each one Candle custom op with its own
//! backward.
//!
//! Why they exist: outside the matmuls, a training step's time goes to
//! Candle's element-wise ops and, in backward, to its gradient
//! accumulation. Every graph node costs a fresh buffer forward and, in
//! backward, a zeroed gradient buffer plus an add; and Candle's CPU
//! element-wise ops run on one thread here. The unfused RMSNorm is seven
//! nodes (`sqr`, `sum`, `/ d`, `+ eps`, `sqrt`, `div`, `mul`), the gate two
//! and RoPE seven or more; each op here is one node, splits its rows between
//! rayon's threads and computes its gradient in one pass with one output
//! buffer per gradient.
//!
//! The ops run on the CPU in `f32` and `f64` (the finite-difference tests
//! run in `f64`). Other dtypes and devices, and a norm weight or RoPE table
//! that is itself trained, go through the unfused reference compositions
//! ([`rms_norm_unfused`], [`gated_unfused`], [`rope_unfused`]), which stay
//! as the specification the tests compare against.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use qlora_scale::qlora::fused;
//! let dev = Device::Cpu;
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 8), &dev).unwrap()).unwrap();
//! let w = Tensor::ones(8, candle_core::DType::F32, &dev).unwrap();
//! let y = fused::rms_norm(x.as_tensor(), &w, 1e-6).unwrap();
//! let r = fused::rms_norm_unfused(x.as_tensor(), &w, 1e-6).unwrap();
//! let diff = (y - r).unwrap().abs().unwrap().max_all().unwrap();
//! assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
//! ```

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, D, DType, Layout, Shape, Storage, Tensor};
use candle_core::{WithDType, bail};
use rayon::prelude::*;

use super::llama::Activation;
use super::{buf, vmath};

/// Elements per rayon task, at least (whole rows each). The per-element
/// work is a few flops, so smaller tasks would cost more in scheduling
/// than they save; tensors under this size run on the calling thread.
const TASK_ELEMS: usize = 32 * 1024;

/// Lanes of the `f64` partial sums of a row (independent accumulators the
/// compiler can vectorise; one serial sum is latency-bound).
const LANES: usize = 8;

/// The floats the ops compute in, with Candle's own activation formulas.
trait Real: WithDType {
    /// `silu(x)` as Candle's `silu()`.
    fn silu(self) -> Self;
    /// `(silu(x), silu'(x))`.
    fn silu_d(self) -> (Self, Self);
    /// `gelu(x)`, tanh approximation, as Candle's `gelu()`.
    fn gelu(self) -> Self;
    /// `(gelu(x), gelu'(x))`, the exact derivative of [`Real::gelu`].
    fn gelu_d(self) -> (Self, Self);
    /// `y = silu(g) * u` over a chunk.
    fn silu_gate(g: &[Self], u: &[Self], y: &mut [Self]) {
        gate_chunk(g, u, y, Self::silu);
    }
    /// The SiLU gate's gradients over a chunk ([`gate_grad_chunk`]).
    fn silu_gate_grad(g: &[Self], u: &[Self], dy: &[Self], dg: &mut [Self], du: &mut [Self]) {
        gate_grad_chunk(g, u, dy, dg, du, Self::silu_d);
    }
}

macro_rules! real {
    ($t:ty { $($chunks:tt)* }) => {
        impl Real for $t {
            fn silu(self) -> $t {
                self / (1.0 + (-self).exp())
            }
            fn silu_d(self) -> ($t, $t) {
                let e = 1.0 + (-self).exp();
                let s = 1.0 / e;
                (self / e, s * (1.0 + self * (1.0 - s)))
            }
            fn gelu(self) -> $t {
                const C: $t = 0.79788456080286535587989211986876373;
                0.5 * self * (1.0 + <$t>::tanh(C * self * (1.0 + 0.044715 * self * self)))
            }
            fn gelu_d(self) -> ($t, $t) {
                const C: $t = 0.79788456080286535587989211986876373;
                let th = <$t>::tanh(C * self * (1.0 + 0.044715 * self * self));
                let dk = C * (1.0 + 3.0 * 0.044715 * self * self);
                let y = 0.5 * self * (1.0 + th);
                (y, 0.5 * (1.0 + th) + 0.5 * self * (1.0 - th * th) * dk)
            }
            $($chunks)*
        }
    };
}
// The `f32` SiLU gate runs on [`vmath`]'s lane kernels (a scalar `expf` per
// element was about 2% of a training step).
real!(f32 {
    fn silu_gate(g: &[f32], u: &[f32], y: &mut [f32]) {
        vmath::silu_gate(g, u, y);
    }
    fn silu_gate_grad(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
        vmath::silu_gate_grad(g, u, dy, dg, du);
    }
});
real!(f64 {});

/// Whether `x` can go through the fused ops: on the CPU, `f32` or `f64`.
fn fusable(x: &Tensor) -> bool {
    x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
}

/// Whether a captured constant (norm weight, RoPE table) suits `x`: same
/// dtype, on the CPU, and not trained (the ops give it no gradient).
fn constant_for(c: &Tensor, x: &Tensor) -> bool {
    c.dtype() == x.dtype() && c.device().is_cpu() && !c.track_op()
}

/// Elements per task: whole rows of `d`, about [`TASK_ELEMS`].
fn task_len(d: usize) -> usize {
    let d = d.max(1);
    d * (TASK_ELEMS / d).max(1)
}

/// The contiguous data of a CPU storage under `l`.
fn slice<'a, T: WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        bail!("{op}: input must be contiguous");
    };
    Ok(&T::cpu_storage_as_slice(s)?[a..b])
}

/// Runs `f` on the contiguous CPU data of `t`.
fn with_data<T: WithDType, R>(
    t: &Tensor,
    op: &str,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => f(slice(c, l, op)?),
        _ => bail!("{op}: tensor not on the CPU"),
    }
}

/// `sum(a * b)` and `sum(a * a)` of one row, in `f64` lanes.
fn row_sums<T: WithDType>(a: &[T], b: &[T]) -> (f64, f64) {
    let (mut ab, mut aa) = ([0f64; LANES], [0f64; LANES]);
    let (ac, at) = a.as_chunks::<LANES>();
    let (bc, bt) = b.as_chunks::<LANES>();
    for (x, y) in ac.iter().zip(bc) {
        for k in 0..LANES {
            let (x, y) = (x[k].to_f64(), y[k].to_f64());
            ab[k] += x * y;
            aa[k] += x * x;
        }
    }
    for (x, y) in at.iter().zip(bt) {
        let (x, y) = (x.to_f64(), y.to_f64());
        ab[0] += x * y;
        aa[0] += x * x;
    }
    (ab.iter().sum(), aa.iter().sum())
}

/// `1 / sqrt(mean(x^2) + eps)` of a row from its sum of squares.
fn inv_rms(sum_sq: f64, d: usize, eps: f64) -> f64 {
    1.0 / (sum_sq / d as f64 + eps).sqrt()
}

// ---------------------------------------------------------------- RMSNorm

/// Reference RMSNorm over the last dimension, `x / sqrt(mean(x^2) + eps) *
/// w`, as Candle ops (seven graph nodes; `w` gets a gradient if it tracks
/// one).
pub fn rms_norm_unfused(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    if matches!(x.dtype(), DType::BF16 | DType::F16) {
        // 16-bit compute (a GPU's): the mean of squares in `f32`, as
        // transformers computes it.
        let y = rms_norm_unfused(&x.to_dtype(DType::F32)?, &w.to_dtype(DType::F32)?, eps)?;
        return y.to_dtype(x.dtype());
    }
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// RMSNorm of `x` over its last dimension with a frozen weight `w` (one
/// value per feature): `x * rsqrt(mean(x^2) + eps) * w`, one graph node
/// whose backward gives `x` its gradient (`w` gets none). Falls back to
/// [`rms_norm_unfused`] off the CPU, outside `f32`/`f64`, or when `w` is
/// trained.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    #[cfg(feature = "cuda")]
    if super::gpu_ops::takes(x, &[w]) && w.dims() == [d] {
        return super::gpu_ops::rms_norm(x, w, eps);
    }
    if !fusable(x) || !constant_for(w, x) || w.dims() != [d] {
        return rms_norm_unfused(x, w, eps);
    }
    x.contiguous()?.apply_op1(RmsNormOp { w: w.clone(), eps })
}

/// The fused RMSNorm ([`rms_norm`]).
#[derive(Debug, Clone)]
struct RmsNormOp {
    w: Tensor,
    eps: f64,
}

fn rms_fwd<T: Real>(x: &[T], w: &[T], eps: f64) -> Vec<T> {
    let (d, n) = (w.len(), task_len(w.len()));
    let mut y = buf::zeroed(x.len());
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(yc, xc)| {
            for (yr, xr) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)) {
                let r = T::from_f64(inv_rms(row_sums(xr, xr).0, d, eps));
                for ((o, &v), &wi) in yr.iter_mut().zip(xr).zip(w) {
                    *o = v * r * wi;
                }
            }
        });
    y
}

/// `dx = r * g - x * r^3 * mean(g * x)` with `g = dy * w`, `r = 1 /
/// sqrt(mean(x^2) + eps)`, per row.
fn rms_bwd<T: Real>(x: &[T], dy: &[T], w: &[T], eps: f64) -> Vec<T> {
    let (d, n) = (w.len(), task_len(w.len()));
    let mut dx = buf::zeroed(x.len());
    dx.par_chunks_mut(n)
        .zip(x.par_chunks(n).zip(dy.par_chunks(n)))
        .for_each_init(Vec::new, |g, (oc, (xc, gc))| {
            let rows = oc.chunks_exact_mut(d).zip(xc.chunks_exact(d));
            for ((or, xr), dr) in rows.zip(gc.chunks_exact(d)) {
                g.clear();
                g.extend(dr.iter().zip(w).map(|(&a, &b)| a * b));
                let (gx, xx) = row_sums(xr, g);
                let r = inv_rms(xx, d, eps);
                let c = T::from_f64(r * r * r * gx / d as f64);
                let r = T::from_f64(r);
                for ((o, &gi), &xi) in or.iter_mut().zip(g.iter()).zip(xr) {
                    *o = r * gi - xi * c;
                }
            }
        });
    dx
}

impl RmsNormOp {
    fn fwd<T: Real>(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<CpuStorage> {
        let w: Vec<T> = self.w.to_vec1()?;
        Ok(T::to_cpu_storage_owned(rms_fwd(
            slice(s, l, self.name())?,
            &w,
            self.eps,
        )))
    }

    fn grad<T: Real>(&self, x: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
        let w: Vec<T> = self.w.to_vec1()?;
        let dx = with_data(x, self.name(), |x: &[T]| {
            with_data(dy, self.name(), |dy: &[T]| Ok(rms_bwd(x, dy, &w, self.eps)))
        })?;
        Tensor::from_vec(dx, x.shape(), x.device())
    }
}

impl CustomOp1 for RmsNormOp {
    fn name(&self) -> &'static str {
        "qlora-fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(_) => self.fwd::<f32>(s, l)?,
            CpuStorage::F64(_) => self.fwd::<f64>(s, l)?,
            other => bail!("{}: unsupported dtype {:?}", self.name(), other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        Ok(Some(match x.dtype() {
            DType::F32 => self.grad::<f32>(x, &dy)?,
            DType::F64 => self.grad::<f64>(x, &dy)?,
            other => bail!("{}: unsupported dtype {other:?}", self.name()),
        }))
    }
}

// ------------------------------------------------------------- MLP gate

/// Reference gate `act(gate) * up` as Candle ops (Candle's `silu()` and
/// `gelu()`, two graph nodes).
pub fn gated_unfused(gate: &Tensor, up: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    let a = match act {
        Activation::Silu => gate.silu()?,
        Activation::GeluTanh => gate.gelu()?,
    };
    a * up
}

/// The MLP gate `act(gate) * up` of two same-shaped tensors, one graph
/// node whose backward gives both their gradients. The forward formulas are
/// Candle's `silu()` and `gelu()` (tanh approximation); the GELU gradient
/// is its exact derivative (Candle's backward rounds its constants to six
/// digits). Falls back to [`gated_unfused`] off the CPU or outside
/// `f32`/`f64`.
pub fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if super::gpu_ops::takes(gate, &[]) && super::gpu_ops::takes(up, &[]) {
        if up.dims() != gate.dims() || up.dtype() != gate.dtype() {
            bail!("gate {:?} and up {:?} differ", gate.dims(), up.dims());
        }
        return super::gpu_ops::gated(gate, up, act);
    }
    if !fusable(gate) || up.dtype() != gate.dtype() || !up.device().is_cpu() {
        return gated_unfused(gate, up, act);
    }
    if up.dims() != gate.dims() {
        bail!("gate {:?} and up {:?} differ", gate.dims(), up.dims());
    }
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, GateOp { act })
}

/// The fused MLP gate ([`gated`]).
#[derive(Debug, Clone)]
struct GateOp {
    act: Activation,
}

/// `y = act(g) * u` over one chunk.
fn gate_chunk<T: WithDType>(g: &[T], u: &[T], y: &mut [T], act: impl Fn(T) -> T) {
    for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
        *o = act(a) * b;
    }
}

/// `(dg, du) = (dy * u * act'(g), dy * act(g))` over one chunk; `act_d`
/// gives `(act(x), act'(x))`.
fn gate_grad_chunk<T: WithDType>(
    g: &[T],
    u: &[T],
    dy: &[T],
    dg: &mut [T],
    du: &mut [T],
    act_d: impl Fn(T) -> (T, T),
) {
    let outs = dg.iter_mut().zip(du.iter_mut());
    for ((og, ou), ((&a, &b), &d)) in outs.zip(g.iter().zip(u).zip(dy)) {
        let (f, fd) = act_d(a);
        *og = d * b * fd;
        *ou = d * f;
    }
}

/// `act(gate) * up`, chunk by chunk in parallel; `chunk` is the per-chunk
/// arithmetic ([`gate_chunk`] or a vectorised one).
fn gate_fwd<T: Real>(g: &[T], u: &[T], chunk: impl Fn(&[T], &[T], &mut [T]) + Sync) -> Vec<T> {
    let mut y = buf::zeroed(g.len());
    y.par_chunks_mut(TASK_ELEMS)
        .zip(g.par_chunks(TASK_ELEMS).zip(u.par_chunks(TASK_ELEMS)))
        .for_each(|(yc, (gc, uc))| chunk(gc, uc, yc));
    y
}

/// The gate's two input gradients, chunk by chunk in parallel; `chunk` is
/// the per-chunk arithmetic ([`gate_grad_chunk`] or a vectorised one).
fn gate_bwd<T: Real>(
    g: &[T],
    u: &[T],
    dy: &[T],
    chunk: impl Fn(&[T], &[T], &[T], &mut [T], &mut [T]) + Sync,
) -> (Vec<T>, Vec<T>) {
    let (mut dg, mut du) = (buf::zeroed(g.len()), buf::zeroed(g.len()));
    let n = TASK_ELEMS;
    dg.par_chunks_mut(n)
        .zip(du.par_chunks_mut(n))
        .zip(g.par_chunks(n).zip(u.par_chunks(n)).zip(dy.par_chunks(n)))
        .for_each(|((dgc, duc), ((gc, uc), yc))| chunk(gc, uc, yc, dgc, duc));
    (dg, du)
}

impl GateOp {
    fn fwd<T: Real>(&self, g: &[T], u: &[T]) -> CpuStorage {
        T::to_cpu_storage_owned(match self.act {
            Activation::Silu => gate_fwd(g, u, T::silu_gate),
            Activation::GeluTanh => gate_fwd(g, u, |g, u, y| gate_chunk(g, u, y, T::gelu)),
        })
    }

    fn grad<T: Real>(
        &self,
        g: &Tensor,
        u: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<[Tensor; 2]> {
        let name = self.name();
        let (dg, du) = with_data(g, name, |g: &[T]| {
            with_data(u, name, |u: &[T]| {
                with_data(dy, name, |dy: &[T]| {
                    Ok(match self.act {
                        Activation::Silu => gate_bwd(g, u, dy, T::silu_gate_grad),
                        Activation::GeluTanh => gate_bwd(g, u, dy, |g, u, dy, dg, du| {
                            gate_grad_chunk(g, u, dy, dg, du, T::gelu_d)
                        }),
                    })
                })
            })
        })?;
        Ok([
            Tensor::from_vec(dg, g.shape(), g.device())?,
            Tensor::from_vec(du, u.shape(), u.device())?,
        ])
    }
}

impl CustomOp2 for GateOp {
    fn name(&self) -> &'static str {
        "qlora-fused-gate"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        if l1.shape() != l2.shape() {
            bail!(
                "{}: shapes {:?} and {:?} differ",
                self.name(),
                l1.shape(),
                l2.shape()
            );
        }
        let name = self.name();
        let out = match (s1, s2) {
            (CpuStorage::F32(_), CpuStorage::F32(_)) => {
                self.fwd::<f32>(slice(s1, l1, name)?, slice(s2, l2, name)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_)) => {
                self.fwd::<f64>(slice(s1, l1, name)?, slice(s2, l2, name)?)
            }
            _ => bail!(
                "{name}: unsupported dtypes {:?}, {:?}",
                s1.dtype(),
                s2.dtype()
            ),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.contiguous()?;
        let [dg, du] = match g.dtype() {
            DType::F32 => self.grad::<f32>(g, u, &dy)?,
            DType::F64 => self.grad::<f64>(g, u, &dy)?,
            other => bail!("{}: unsupported dtype {other:?}", self.name()),
        };
        Ok((Some(dg), Some(du)))
    }
}

// ------------------------------------------------------------------ RoPE

/// Reference RoPE as Candle ops: Candle's `rope_slow` ("rotate_half"
/// layout) on the first `2 * cos.dim(1)` features of each head of `x` `(b,
/// h, t, d)`; the rest pass unrotated (Phi-3's `partial_rotary_factor`).
pub fn rope_unfused(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (d, rot) = (x.dim(D::Minus1)?, 2 * cos.dim(1)?);
    if rot == d {
        return candle_nn::rotary_emb::rope_slow(x, cos, sin);
    }
    let turned =
        candle_nn::rotary_emb::rope_slow(&x.narrow(D::Minus1, 0, rot)?.contiguous()?, cos, sin)?;
    Tensor::cat(&[turned, x.narrow(D::Minus1, rot, d - rot)?], D::Minus1)
}

/// RoPE of `x` `(b, h, t, d)` with tables `cos`, `sin` `(>= t, rot / 2)`
/// (row `i` for the `i`-th of the `t` positions, as the caller sliced them:
/// with a KV cache they start at the cache's length): the first `rot`
/// features of each head turn ("rotate_half" layout), the rest pass. One
/// graph node; its backward turns the gradient by the opposite angle.
/// Falls back to [`rope_unfused`] off the CPU, outside `f32`/`f64`, or
/// when a table is trained.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let (_, _, t, d) = x.dims4()?;
    let (tc, half) = cos.dims2()?;
    #[cfg(feature = "cuda")]
    if super::gpu_ops::takes(x, &[cos, sin]) && sin.dims() == cos.dims() && tc >= t && 2 * half <= d
    {
        return super::gpu_ops::rope(x, &cos.narrow(0, 0, t)?, &sin.narrow(0, 0, t)?);
    }
    let usable = fusable(x) && constant_for(cos, x) && constant_for(sin, x);
    if !usable || sin.dims() != cos.dims() || tc < t || 2 * half > d {
        return rope_unfused(x, cos, sin);
    }
    let table = |c: &Tensor| c.narrow(0, 0, t)?.contiguous();
    x.contiguous()?.apply_op1(RopeOp {
        cos: table(cos)?,
        sin: table(sin)?,
    })
}

/// The fused RoPE ([`rope`]), tables `(t, rot / 2)`.
#[derive(Debug, Clone)]
struct RopeOp {
    cos: Tensor,
    sin: Tensor,
}

/// Turns each row (one head at one position) of `x` `(rows, d)`: rows
/// cycle through the `t` positions of `cos`, `sin` `(t, half)`. In the
/// formula's order of `rope_slow`: `y1 = x1 cos + (-x2) sin`, `y2 = x2 cos
/// + x1 sin`; the tail past `2 * half` is copied.
fn rope_rows<T: Real>(x: &[T], (cos, sin): (&[T], &[T]), d: usize, t: usize) -> Vec<T> {
    let (n, half) = (task_len(d), cos.len() / t.max(1));
    let mut y = buf::zeroed(x.len());
    y.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .enumerate()
        .for_each(|(i, (yc, xc))| {
            let first = i * (n / d.max(1));
            for (j, (yr, xr)) in yc.chunks_exact_mut(d).zip(xc.chunks_exact(d)).enumerate() {
                let p = (first + j) % t.max(1);
                let (c, s) = (&cos[p * half..][..half], &sin[p * half..][..half]);
                let (x1, x2) = xr[..2 * half].split_at(half);
                let (y12, ytail) = yr.split_at_mut(2 * half);
                let (y1, y2) = y12.split_at_mut(half);
                for k in 0..half {
                    y1[k] = x1[k] * c[k] + (T::zero() - x2[k]) * s[k];
                    y2[k] = x2[k] * c[k] + x1[k] * s[k];
                }
                ytail.copy_from_slice(&xr[2 * half..]);
            }
        });
    y
}

impl RopeOp {
    /// `x` turned by the tables' angles, or by their opposite (`back`).
    fn turn<T: Real>(&self, x: &[T], d: usize, back: bool) -> candle_core::Result<Vec<T>> {
        let t = self.cos.dim(0)?;
        let cos: Vec<T> = self.cos.flatten_all()?.to_vec1()?;
        let mut sin: Vec<T> = self.sin.flatten_all()?.to_vec1()?;
        if back {
            sin.iter_mut().for_each(|s| *s = T::zero() - *s);
        }
        Ok(rope_rows(x, (&cos, &sin), d, t))
    }

    fn grad<T: Real>(&self, dy: &Tensor) -> candle_core::Result<Tensor> {
        let d = dy.dim(D::Minus1)?;
        let dx = with_data(dy, self.name(), |dy: &[T]| self.turn(dy, d, true))?;
        Tensor::from_vec(dx, dy.shape(), dy.device())
    }
}

impl CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "qlora-fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, _, t, d) = l.shape().dims4()?;
        if self.cos.dim(0)? != t {
            bail!(
                "{}: tables for {} positions, x has {t}",
                self.name(),
                self.cos.dim(0)?
            );
        }
        let name = self.name();
        let out = match s {
            CpuStorage::F32(_) => CpuStorage::F32(self.turn(slice(s, l, name)?, d, false)?),
            CpuStorage::F64(_) => CpuStorage::F64(self.turn(slice(s, l, name)?, d, false)?),
            other => bail!("{name}: unsupported dtype {:?}", other.dtype()),
        };
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _: &Tensor, _: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dy = dy.contiguous()?;
        Ok(Some(match dy.dtype() {
            DType::F32 => self.grad::<f32>(&dy)?,
            DType::F64 => self.grad::<f64>(&dy)?,
            other => bail!("{}: unsupported dtype {other:?}", self.name()),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    type Op = dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

    /// Uniform values in `(-scale, scale)`, seeded.
    fn random(dims: &[usize], scale: f64, dt: DType, seed: u64) -> Tensor {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
        Tensor::from_vec(v, dims, &Device::Cpu)
            .and_then(|t| t.to_dtype(dt))
            .unwrap()
    }

    /// `max |a - b| / max |b|`.
    fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
        assert_eq!(a.dims(), b.dims());
        let v = |t: &Tensor| -> Vec<f64> {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        let (a, b) = (v(a), v(b));
        let scale = b.iter().fold(f64::MIN_POSITIVE, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(&b)
            .fold(0f64, |m, (x, y)| m.max((x - y).abs()));
        diff / scale
    }

    fn tol(dt: DType) -> f64 {
        if dt == DType::F64 { 1e-10 } else { 1e-5 }
    }

    /// `fused` and `reference` of `inputs` (made `Var`s) agree in value and
    /// in the gradients of a random-weighted sum of the output.
    fn check(inputs: &[Tensor], fused: &Op, reference: &Op, tol: f64) {
        let vars: Vec<Var> = inputs
            .iter()
            .map(|t| Var::from_tensor(t).unwrap())
            .collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let (yf, yr) = (fused(&ts).unwrap(), reference(&ts).unwrap());
        let e = rel_err(&yf, &yr);
        assert!(e <= tol, "values differ by {e:e} (relative)");
        let wts = random(yf.dims(), 1.0, yf.dtype(), 99);
        let grads = |y: Tensor| (y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let (gf, gr) = (grads(yf), grads(yr));
        for (i, t) in ts.iter().enumerate() {
            let e = rel_err(gf.get(t).unwrap(), gr.get(t).unwrap());
            assert!(
                e <= tol,
                "gradient of input {i} differs by {e:e} (relative)"
            );
        }
    }

    #[test]
    fn rms_norm_matches_reference() {
        for dt in [DType::F32, DType::F64] {
            // 6006 rows of 6: two tasks, the second partial.
            for (dims, seed) in [
                (vec![3, 2, 1001, 6], 1),
                (vec![5, 77], 2),
                (vec![4, 768], 3),
            ] {
                let d = *dims.last().unwrap();
                let w = (random(&[d], 0.5, dt, seed + 10) + 1.0).unwrap();
                let (w2, x) = (w.clone(), random(&dims, 2.0, dt, seed));
                let f: &Op = &move |t| rms_norm(&t[0], &w, 1e-6);
                let r: &Op = &move |t| rms_norm_unfused(&t[0], &w2, 1e-6);
                check(&[x], f, r, tol(dt));
            }
            // Not contiguous: a transposed input.
            let w = (random(&[77], 0.5, dt, 4) + 1.0).unwrap();
            let (w2, x) = (w.clone(), random(&[77, 5], 2.0, dt, 5));
            let f: &Op = &move |t| rms_norm(&t[0].t()?, &w, 1e-5);
            let r: &Op = &move |t| rms_norm_unfused(&t[0].t()?, &w2, 1e-5);
            check(&[x], f, r, tol(dt));
        }
    }

    #[test]
    fn rms_norm_of_a_trained_weight_keeps_its_gradient() {
        let x = random(&[3, 8], 1.0, DType::F32, 6);
        let w = Var::from_tensor(&random(&[8], 1.0, DType::F32, 7)).unwrap();
        let g = rms_norm(&x, w.as_tensor(), 1e-6)
            .and_then(|y| y.sum_all()?.backward())
            .unwrap();
        assert!(g.get(w.as_tensor()).is_some());
    }

    /// GELU (tanh) as elementary Candle ops: their backward is the exact
    /// derivative, unlike Candle's `gelu()`, whose rounds its constants.
    fn gelu_exact(x: &Tensor) -> candle_core::Result<Tensor> {
        let c = (2.0 / std::f64::consts::PI).sqrt();
        let inner = ((x.sqr()? * 0.044715)? + 1.0)?.mul(x)?;
        ((inner * c)?.tanh()? + 1.0)?.mul(x)? * 0.5
    }

    #[test]
    fn gate_matches_reference() {
        for dt in [DType::F32, DType::F64] {
            // 63189 elements: two tasks, the second partial.
            let dims = [7, 9, 1003];
            let (g, u) = (random(&dims, 4.0, dt, 11), random(&dims, 2.0, dt, 12));
            for act in [Activation::Silu, Activation::GeluTanh] {
                let f: &Op = &move |t| gated(&t[0], &t[1], act);
                let r: &Op = &move |t| match (act, t[0].dtype()) {
                    (Activation::GeluTanh, DType::F64) => gelu_exact(&t[0])? * &t[1],
                    _ => gated_unfused(&t[0], &t[1], act),
                };
                check(&[g.clone(), u.clone()], f, r, tol(dt));
                // Phi-3's halves of one projection: not contiguous.
                let gu = Tensor::cat(&[&g, &u], 2).unwrap();
                let halves = |t: &Tensor| -> candle_core::Result<[Tensor; 2]> {
                    Ok([t.narrow(2, 0, 1003)?, t.narrow(2, 1003, 1003)?])
                };
                let f: &Op = &move |t| halves(&t[0]).and_then(|[a, b]| gated(&a, &b, act));
                let r: &Op = &move |t| {
                    halves(&t[0]).and_then(|[a, b]| match (act, dt) {
                        (Activation::GeluTanh, DType::F64) => gelu_exact(&a)? * b,
                        _ => gated_unfused(&a, &b, act),
                    })
                };
                check(&[gu], f, r, tol(dt));
            }
        }
    }

    #[test]
    fn gelu_forward_is_candles_and_gradient_within_its_rounding() {
        let dims = [5, 301];
        for dt in [DType::F32, DType::F64] {
            let (g, u) = (random(&dims, 4.0, dt, 13), random(&dims, 2.0, dt, 14));
            let f: &Op = &|t| gated(&t[0], &t[1], Activation::GeluTanh);
            let r: &Op = &|t| gated_unfused(&t[0], &t[1], Activation::GeluTanh);
            // Candle's gelu backward rounds its constants to 6 digits.
            check(&[g.clone(), u.clone()], f, r, 1e-5);
            let e = rel_err(&f(&[g.clone(), u.clone()]).unwrap(), &r(&[g, u]).unwrap());
            assert!(e <= tol(dt), "{e:e}");
        }
    }

    /// `(cos, sin)` `(t, half)` of random angles.
    fn tables(t: usize, half: usize, dt: DType, seed: u64) -> (Tensor, Tensor) {
        let a = random(&[t, half], 6.0, dt, seed);
        (a.cos().unwrap(), a.sin().unwrap())
    }

    #[test]
    fn rope_matches_reference() {
        for dt in [DType::F32, DType::F64] {
            // (x dims, table rows, half): full; Phi-3 partial; a KV cache's
            // longer tables; many tasks whose rows wrap positions.
            let cases = [
                (vec![2, 3, 7, 6], 7, 3),
                (vec![2, 3, 7, 10], 7, 3),
                (vec![1, 2, 5, 8], 12, 4),
                (vec![2, 4, 1500, 8], 1500, 4),
                (vec![1, 2, 1, 6], 1, 2),
            ];
            for (i, (dims, rows, half)) in cases.into_iter().enumerate() {
                let (c, s) = tables(rows, half, dt, 20 + i as u64);
                let (c2, s2) = (c.clone(), s.clone());
                let f: &Op = &move |t| rope(&t[0], &c, &s);
                let r: &Op = &move |t| rope_unfused(&t[0], &c2, &s2);
                check(&[random(&dims, 2.0, dt, i as u64)], f, r, tol(dt));
            }
            // Not contiguous: heads split off `(b, t, h, d)`.
            let (c, s) = tables(9, 4, dt, 30);
            let (c2, s2) = (c.clone(), s.clone());
            let f: &Op = &move |t| rope(&t[0].transpose(1, 2)?, &c, &s);
            let r: &Op = &move |t| rope_unfused(&t[0].transpose(1, 2)?, &c2, &s2);
            check(&[random(&[2, 9, 3, 10], 2.0, dt, 31)], f, r, tol(dt));
        }
    }

    #[test]
    fn other_dtypes_take_the_reference_path() {
        let dt = DType::BF16;
        let x = random(&[2, 3, 4, 8], 2.0, dt, 40);
        let w = random(&[8], 1.0, dt, 41);
        let (c, s) = tables(4, 4, dt, 42);
        let same = |a: Tensor, b: Tensor| assert_eq!(rel_err(&a, &b), 0.0);
        same(
            rms_norm(&x, &w, 1e-6).unwrap(),
            rms_norm_unfused(&x, &w, 1e-6).unwrap(),
        );
        same(rope(&x, &c, &s).unwrap(), rope_unfused(&x, &c, &s).unwrap());
        let act = Activation::Silu;
        same(
            gated(&x, &x, act).unwrap(),
            gated_unfused(&x, &x, act).unwrap(),
        );
    }
}
