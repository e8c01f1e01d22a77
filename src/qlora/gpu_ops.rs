//! RMSNorm, the MLP gate and RoPE on a GPU (feature `cuda`): each one op
//! with its own backward, as [`super::fused`]'s ops are on the CPU, over
//! the kernels of `kernels/qlora.cu`, for `f32` and `bf16`.
//!
//! The Candle compositions they replace on a GPU launch a kernel and write
//! an activation-sized temporary per element-wise step: RMSNorm about nine
//! forward (with the widening to `f32`), the gate's SiLU backward about
//! eight, RoPE's `rotate_half` a narrow, a negation, a concatenation and two
//! products. Each op here reads its inputs once and writes its output once,
//! computing in `f32`. `tests/gpu.rs` compares them with the CPU's.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::WrapErr;
use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor, bail,
};

use super::cuda::{contiguous, grid, kernel_fn, name, per_row, rows_of, with_out};
use super::llama::Activation;

/// Whether `x` (and the constants of its op, same dtype) go through these
/// ops: on a GPU, `f32` or `bf16`.
pub(crate) fn takes(x: &Tensor, constants: &[&Tensor]) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::F32 | DType::BF16)
        && constants
            .iter()
            .all(|c| c.dtype() == x.dtype() && c.device().same_device(x.device()) && !c.track_op())
}

fn cpu_only(name: &str) -> candle_core::Result<(CpuStorage, Shape)> {
    bail!("{name}: a GPU op reached the CPU")
}

// ------------------------------------------------------------------ RMSNorm

/// `x * rsqrt(mean(x^2) + eps) * w` over the last dimension, `w` frozen.
pub(crate) fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

#[derive(Debug, Clone, Copy)]
struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "qlora-gpu-rms-norm"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, d) = rows_of(xl)?;
        if wl.shape().elem_count() != d {
            bail!("rms norm: weight {:?} for rows of {d}", wl.dims());
        }
        let out = with_out!(xs, n * d, |out, T| {
            let x = contiguous::<T>(xs, xl, "rms norm input")?;
            let w = contiguous::<T>(ws, wl, "rms norm weight")?;
            let f = kernel_fn(&xs.device, &name("rms_norm", xs.dtype())?)?;
            let stream = xs.device.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&w).arg(&out).arg(&d).arg(&self.eps);
            if n > 0 {
                // SAFETY: the arguments match the kernel's signature.
                unsafe { b.launch(per_row(n)?) }.w()?;
            }
        })?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = x.apply_op3_no_bwd(w, &dy.contiguous()?, &RmsNormGrad { eps: self.eps })?;
        Ok((Some(dx), None))
    }
}

#[derive(Debug, Clone, Copy)]
struct RmsNormGrad {
    eps: f32,
}

impl CustomOp3 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "qlora-gpu-rms-norm-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
        gs: &CudaStorage,
        gl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (n, d) = rows_of(xl)?;
        let out = with_out!(xs, n * d, |out, T| {
            let x = contiguous::<T>(xs, xl, "rms norm input")?;
            let w = contiguous::<T>(ws, wl, "rms norm weight")?;
            let g = contiguous::<T>(gs, gl, "rms norm gradient")?;
            let f = kernel_fn(&xs.device, &name("rms_norm_grad", xs.dtype())?)?;
            let stream = xs.device.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&x).arg(&w).arg(&g).arg(&out).arg(&d).arg(&self.eps);
            if n > 0 {
                // SAFETY: the arguments match the kernel's signature.
                unsafe { b.launch(per_row(n)?) }.w()?;
            }
        })?;
        Ok((out, xl.shape().clone()))
    }
}

// --------------------------------------------------------------------- gate

/// `act(gate) * up`, element-wise, both inputs getting gradients.
pub(crate) fn gated(gate: &Tensor, up: &Tensor, act: Activation) -> candle_core::Result<Tensor> {
    gate.contiguous()?
        .apply_op2(&up.contiguous()?, Gate { act })
}

#[derive(Debug, Clone, Copy)]
struct Gate {
    act: Activation,
}

impl Gate {
    fn code(self) -> i32 {
        match self.act {
            Activation::Silu => 0,
            Activation::GeluTanh => 1,
        }
    }
}

impl CustomOp2 for Gate {
    fn name(&self) -> &'static str {
        "qlora-gpu-gate"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = gl.shape().elem_count();
        if ul.shape() != gl.shape() {
            bail!("gate {:?} and up {:?} differ", gl.dims(), ul.dims());
        }
        let act = self.code();
        let out = with_out!(gs, n, |out, T| {
            let g = contiguous::<T>(gs, gl, "gate")?;
            let u = contiguous::<T>(us, ul, "up")?;
            let f = kernel_fn(&gs.device, &name("gate", gs.dtype())?)?;
            let stream = gs.device.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&g).arg(&u).arg(&out).arg(&n).arg(&act);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(grid(n)) }.w()?;
        })?;
        Ok((out, gl.shape().clone()))
    }

    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // One kernel writes both gradients, one after the other.
        let both = g.apply_op3_no_bwd(u, &dy.contiguous()?, &GateGrad(*self))?;
        let n = g.elem_count();
        let dg = both.narrow(0, 0, n)?.reshape(g.shape())?;
        let du = both.narrow(0, n, n)?.reshape(u.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

#[derive(Debug, Clone, Copy)]
struct GateGrad(Gate);

impl CustomOp3 for GateGrad {
    fn name(&self) -> &'static str {
        "qlora-gpu-gate-grad"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
        ds: &CudaStorage,
        dl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = gl.shape().elem_count();
        let act = self.0.code();
        let out = with_out!(gs, 2 * n, |out, T| {
            let g = contiguous::<T>(gs, gl, "gate")?;
            let u = contiguous::<T>(us, ul, "up")?;
            let dy = contiguous::<T>(ds, dl, "gate gradient")?;
            let f = kernel_fn(&gs.device, &name("gate_grad", gs.dtype())?)?;
            let stream = gs.device.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&g).arg(&u).arg(&dy).arg(&out).arg(&n).arg(&act);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(grid(n)) }.w()?;
        })?;
        Ok((out, Shape::from(2 * n)))
    }
}

// --------------------------------------------------------------------- RoPE

/// RoPE of `x` `(b, h, t, d)` with tables `(t, rot / 2)` ("rotate_half"
/// layout; features past `rot` pass).
pub(crate) fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?
        .apply_op3(&cos.contiguous()?, &sin.contiguous()?, Rope { sign: 1.0 })
}

#[derive(Debug, Clone, Copy)]
struct Rope {
    /// 1, or -1 for the opposite angle (the backward).
    sign: f32,
}

impl CustomOp3 for Rope {
    fn name(&self) -> &'static str {
        "qlora-gpu-rope"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        cpu_only(self.name())
    }

    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        cs: &CudaStorage,
        cl: &Layout,
        ss: &CudaStorage,
        sl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (_, _, t, d) = xl.shape().dims4()?;
        let (tc, half) = cl.shape().dims2()?;
        if tc != t || 2 * half > d || sl.shape() != cl.shape() {
            bail!("rope: tables {:?} for {:?}", cl.dims(), xl.dims());
        }
        let rows = xl.shape().elem_count() / d;
        let work = rows * (d - half);
        let out = with_out!(xs, rows * d, |out, T| {
            let x = contiguous::<T>(xs, xl, "rope input")?;
            let c = contiguous::<T>(cs, cl, "rope cos")?;
            let s = contiguous::<T>(ss, sl, "rope sin")?;
            let f = kernel_fn(&xs.device, &name("rope", xs.dtype())?)?;
            let stream = xs.device.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&x)
                .arg(&c)
                .arg(&s)
                .arg(&out)
                .arg(&rows)
                .arg(&t)
                .arg(&d)
                .arg(&half)
                .arg(&self.sign);
            let cfg: LaunchConfig = grid(work);
            // SAFETY: the arguments match the kernel's signature.
            unsafe { b.launch(cfg) }.w()?;
        })?;
        Ok((out, xl.shape().clone()))
    }

    fn bwd(
        &self,
        _: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        _: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let back = Rope { sign: -self.sign };
        let dx = dy.contiguous()?.apply_op3_no_bwd(cos, sin, &back)?;
        Ok((Some(dx), None, None))
    }
}
