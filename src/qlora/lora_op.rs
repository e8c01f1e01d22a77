//! The fused LoRA linear op: `y = x · Wᵀ + s · (x · Aᵀ) · Bᵀ` as one Candle
//! custom op over `x`, `A` and `B`, with its own backward.
//!
//! Why it exists: composed from Candle ops, a LoRA linear is five graph
//! nodes (the frozen matmul, `x · Aᵀ`, `· Bᵀ`, `affine(s)` and `add`), two of
//! them element-wise passes over a full-size output, and in backward Candle
//! accumulates the gradient of every node into a zeroed buffer with one more
//! full-size add. A training step runs this for every adapted linear of
//! every block. [`LoraMatmulOp`] is one node: its forward writes `x · Wᵀ`
//! through the frozen-weight kernels ([`super::kernel`]) and adds
//! `s · u · Bᵀ` (`u = x · Aᵀ`, `rows x r`) into it in place with the GEMM's
//! `dst = dst + s · lhs · rhs`; its backward writes each of the three
//! gradients into one allocation:
//!
//! - `v = dy · B` (`rows x r`);
//! - `dx = dy · W + s · v · A` (the kernels, then an in-place GEMM);
//! - `dA = s · vᵀ · x` and `dB = s · dyᵀ · u` (`u` recomputed: `r` is small).
//!
//! It runs on the CPU in `f32` over a weight the kernels read
//! ([`FrozenWeight::kernel_ready`]), and over a dequantized copy of the
//! weight for other non-GGML weights and in `f64` (the gradient tests), as
//! [`super::frozen`]'s op does. Under LoRA dropout the adapter path reads
//! `x ⊙ mask` (the mask captured in the op, one element-wise pass forward,
//! one backward). [`super::lora::LoraLinear`] uses it when it applies and
//! keeps the composition otherwise (GGML storages, other devices or dtypes).
//!
//! ```
//! use std::sync::Arc;
//! use candle_core::{Device, Tensor, Var};
//! use qlora_scale::qlora::frozen::{FrozenStorage, FrozenWeight};
//! use qlora_scale::qlora::lora_op::LoraMatmulOp;
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
//! let w = Arc::new(FrozenWeight::new(&w, FrozenStorage::Nf4).unwrap());
//! let a = Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 64), &dev).unwrap()).unwrap();
//! let b = Var::from_tensor(&Tensor::randn(0f32, 1.0, (8, 4), &dev).unwrap()).unwrap();
//! let x = Tensor::randn(0f32, 1.0, (2, 3, 64), &dev).unwrap();
//! assert!(LoraMatmulOp::supports(&w, FrozenStorage::Nf4, &x));
//! let y = LoraMatmulOp::new(w, 2.0).apply(&x, a.as_tensor(), b.as_tensor()).unwrap();
//! assert_eq!(y.dims(), &[2, 3, 8]);
//! let grads = y.sum_all().unwrap().backward().unwrap();
//! assert_eq!(grads.get(a.as_tensor()).unwrap().dims(), &[4, 64]);
//! ```

use std::borrow::Cow;
use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Shape, Storage, Tensor, WithDType,
};
use gemm::{Parallelism, gemm};

use super::bf16_gemm::CpuMatmul;
use super::frozen::{FrozenStorage, FrozenWeight};
use super::kernel;
use super::skinny;

/// `(m, n, k, r)`: rows of `x`, the weight's output and input widths, rank.
type Dims = (usize, usize, usize, usize);

/// The gradients of `x` (none when it needs none), `A` and `B`.
type Grads<G> = (Option<G>, G, G);

/// A matrix in a slice: element `(i, j)` at `i * rs + j * cs`.
#[derive(Clone, Copy)]
struct Mat<'a, T> {
    data: &'a [T],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a, T> Mat<'a, T> {
    /// A row-major `rows x cols` matrix.
    fn new(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// The transpose, as a view of the same values.
    fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    /// Whether every element lies inside the slice.
    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// `dst = beta · lhs · rhs`, or `dst += beta · lhs · rhs` when
/// `accumulate`, for a row-major `dst` of `lhs.rows x rhs.cols`.
///
/// # Panics
/// If the shapes disagree or a view reaches outside its slice (a bug in this
/// module: the op checks its inputs' shapes first).
fn gemm_into<T: WithDType>(dst: &mut [T], accumulate: bool, lhs: Mat<T>, rhs: Mat<T>, beta: T) {
    let (m, n, k) = (lhs.rows, rhs.cols, lhs.cols);
    assert!(
        rhs.rows == k && dst.len() == m * n && lhs.fits() && rhs.fits(),
        "fused lora: gemm ({m}x{k}) . ({}x{n}) into {}",
        rhs.rows,
        dst.len()
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            dst.fill(T::zero());
        }
        return;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= 1 << 18 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    };
    let s = |v: usize| isize::try_from(v).expect("stride fits isize");
    // SAFETY: `dst` is an exclusive borrow of exactly `m x n` row-major
    // values; every element of `lhs` and `rhs` lies inside its slice
    // (checked above) and gemm only reads them.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            s(n),
            accumulate,
            lhs.data.as_ptr(),
            s(lhs.cs),
            s(lhs.rs),
            rhs.data.as_ptr(),
            s(rhs.cs),
            s(rhs.rs),
            T::one(),
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `x · Wᵀ` (`m x n`) for `x` of `m x k`, through a dense `T` copy of `W`.
fn dense_xwt<T: WithDType>(w: &FrozenWeight, x: &[T], m: usize) -> candle_core::Result<Vec<T>> {
    let (n, k) = w.dims();
    let wd = dense_weight::<T>(w)?;
    let mut y = vec![T::zero(); m * n];
    gemm_into(
        &mut y,
        false,
        Mat::new(x, m, k),
        Mat::new(&wd, n, k).t(),
        T::one(),
    );
    Ok(y)
}

/// `dy · W` (`m x k`) for `dy` of `m x n`, through a dense `T` copy of `W`.
fn dense_dyw<T: WithDType>(w: &FrozenWeight, dy: &[T], m: usize) -> candle_core::Result<Vec<T>> {
    let (n, k) = w.dims();
    let wd = dense_weight::<T>(w)?;
    let mut dx = vec![T::zero(); m * k];
    gemm_into(
        &mut dx,
        false,
        Mat::new(dy, m, n),
        Mat::new(&wd, n, k),
        T::one(),
    );
    Ok(dx)
}

/// The weight dequantized to a dense row-major `T` temporary.
fn dense_weight<T: WithDType>(w: &FrozenWeight) -> candle_core::Result<Vec<T>> {
    w.dequantize(T::DTYPE, &Device::Cpu)?
        .flatten_all()?
        .to_vec1::<T>()
}

/// An element type of the op: how it multiplies by the frozen weight.
trait Elem: WithDType {
    /// `x · Wᵀ` (`m x n`) for `x` of `m x k`.
    /// `prec` is for `f32`: wider types multiply in their own precision.
    fn base_xwt(
        w: &FrozenWeight,
        x: &[Self],
        m: usize,
        _prec: CpuMatmul,
    ) -> candle_core::Result<Vec<Self>> {
        dense_xwt(w, x, m)
    }

    /// `dy · W` (`m x k`) for `dy` of `m x n`.
    fn base_dyw(
        w: &FrozenWeight,
        dy: &[Self],
        m: usize,
        _prec: CpuMatmul,
    ) -> candle_core::Result<Vec<Self>> {
        dense_dyw(w, dy, m)
    }

    /// `out = x · aᵀ` for `x` of `m x k` and a narrow `a` of `r x k` with
    /// a kernel for the shape ([`skinny`]); `false` where there is none
    /// (the caller multiplies with the `gemm` crate).
    fn rows_dot(_x: &[Self], _k: usize, _a: &[Self], _r: usize, _out: &mut [Self]) -> bool {
        false
    }
}

/// `f32`: the chunked kernels for a weight they read, as the frozen op.
impl Elem for f32 {
    fn base_xwt(
        w: &FrozenWeight,
        x: &[f32],
        m: usize,
        prec: CpuMatmul,
    ) -> candle_core::Result<Vec<f32>> {
        let (n, k) = w.dims();
        if !w.kernel_ready() {
            return dense_xwt(w, x, m);
        }
        w.with_kernel_ref(|wr| kernel::matmul_wt(x, m, wr, n, k, prec))
    }

    fn base_dyw(
        w: &FrozenWeight,
        dy: &[f32],
        m: usize,
        prec: CpuMatmul,
    ) -> candle_core::Result<Vec<f32>> {
        let (n, k) = w.dims();
        if !w.kernel_ready() {
            return dense_dyw(w, dy, m);
        }
        w.with_kernel_ref(|wr| kernel::matmul_w(dy, m, wr, n, k, prec))
    }

    fn rows_dot(x: &[f32], k: usize, a: &[f32], r: usize, out: &mut [f32]) -> bool {
        skinny::rows_dot(x, k, a, r, out)
    }
}

/// `f64` (the gradient tests): a dequantized `f64` weight.
impl Elem for f64 {}

/// The contiguous values of a CPU storage under `l`.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("fused lora: operands must be contiguous");
    };
    Ok(&s.as_slice::<T>()?[a..b])
}

/// Runs `f` on the contiguous CPU values of `t`.
fn with_values<T: WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> candle_core::Result<R>,
) -> candle_core::Result<R> {
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        candle_core::bail!("fused lora: operands must be on the CPU");
    };
    f(slice(s, l)?)
}

/// The custom op `y = x · Wᵀ + s · (x · Aᵀ) · Bᵀ` over `(x, A, B)`, with the
/// frozen weight `W` and the scale `s` captured; its backward returns the
/// gradients of `x`, `A` and `B` (see the module docs for why it exists).
#[derive(Debug, Clone)]
pub struct LoraMatmulOp {
    weight: Arc<FrozenWeight>,
    scale: f64,
    /// How the frozen product multiplies (`f32` inputs only).
    matmul: CpuMatmul,
    /// LoRA dropout: the mask (`x`'s shape and dtype, kept values already
    /// scaled by `1 / (1 - p)`) the adapter path's input is multiplied by.
    dropout: Option<Tensor>,
}

impl LoraMatmulOp {
    /// An op over a shared frozen weight and the LoRA scale `s`.
    pub fn new(weight: Arc<FrozenWeight>, scale: f64) -> Self {
        Self {
            weight,
            scale,
            matmul: CpuMatmul::F32,
            dropout: None,
        }
    }

    /// The same op with the frozen product's `f32` inputs multiplied as
    /// `matmul` says ([`CpuMatmul`]; the adapter's products stay `f32`).
    pub fn with_cpu_matmul(mut self, matmul: CpuMatmul) -> Self {
        self.matmul = matmul;
        self
    }

    /// The same op with LoRA dropout: the adapter path reads `x ⊙ mask`
    /// (`mask` of `x`'s shape and dtype), the frozen path reads `x`.
    pub fn with_dropout(mut self, mask: Option<&Tensor>) -> candle_core::Result<Self> {
        self.dropout = mask.map(Tensor::contiguous).transpose()?;
        Ok(self)
    }

    /// The adapter path's input: `x ⊙ mask` under dropout, else `x`.
    fn lora_input<'a, T: Elem>(&self, x: &'a [T]) -> candle_core::Result<Cow<'a, [T]>> {
        let Some(mask) = &self.dropout else {
            return Ok(Cow::Borrowed(x));
        };
        with_values::<T, _>(mask, |m| {
            if m.len() != x.len() {
                candle_core::bail!(
                    "fused lora: dropout mask of {} values for an input of {}",
                    m.len(),
                    x.len()
                );
            }
            Ok(Cow::Owned(x.iter().zip(m).map(|(&v, &k)| v * k).collect()))
        })
    }

    /// `dx += s · v · A`, times the dropout mask when there is one.
    fn add_lora_dx<T: Elem>(
        &self,
        dx: &mut [T],
        v: Mat<T>,
        a: Mat<T>,
        s: T,
    ) -> candle_core::Result<()> {
        let Some(mask) = &self.dropout else {
            gemm_into(dx, true, v, a, s);
            return Ok(());
        };
        let mut t = vec![T::zero(); dx.len()];
        gemm_into(&mut t, false, v, a, s);
        with_values::<T, _>(mask, |m| {
            if m.len() != dx.len() {
                candle_core::bail!("fused lora: dropout mask does not fit the input");
            }
            for ((d, &g), &k) in dx.iter_mut().zip(&t).zip(m) {
                *d += g * k;
            }
            Ok(())
        })
    }

    /// Whether the op computes `x · Wᵀ` for a weight stored as `storage`:
    /// `x` on the CPU in `f32` or `f64`, any weight but the GGML ones (whose
    /// `f32` forward runs Candle's int8 kernels) and the benchmark-only
    /// storages (whose forward differs on purpose). In `f32` a weight the
    /// kernels read goes through them; another (NF4 rows that are not whole
    /// blocks) is dequantized per call, as the frozen op does.
    pub fn supports(weight: &FrozenWeight, storage: FrozenStorage, x: &Tensor) -> bool {
        let plain = !matches!(
            storage,
            FrozenStorage::PlainF32Matmul | FrozenStorage::CandleQMatMulNoGrad
        ) && !matches!(weight, FrozenWeight::Ggml(..));
        plain && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)
    }

    /// `x · Wᵀ + s · (x · Aᵀ) · Bᵀ` for `x` of `(..., in)`, `A` of
    /// `(r, in)` and `B` of `(out, r)`, all of one dtype: `(..., out)`.
    pub fn apply(self, x: &Tensor, a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?
            .apply_op3(&a.contiguous()?, &b.contiguous()?, self)
    }

    /// Checks the operands' shapes: `(m, n, k, r)`.
    fn dims(&self, x: &[usize], a: &[usize], b: &[usize]) -> candle_core::Result<Dims> {
        let (n, k) = self.weight.dims();
        let (&[r, ka], &[nb, rb]) = (a, b) else {
            candle_core::bail!("fused lora: A {a:?} and B {b:?} must be 2-D");
        };
        if x.last() != Some(&k) || ka != k || nb != n || rb != r {
            candle_core::bail!(
                "fused lora: x {x:?}, A {a:?}, B {b:?} do not fit a ({n}, {k}) weight"
            );
        }
        Ok((x.iter().product::<usize>() / k.max(1), n, k, r))
    }

    /// The forward in `T`: `y = x · Wᵀ`, then `y += s · (x · Aᵀ) · Bᵀ`.
    fn forward<T: Elem>(&self, x: &[T], a: &[T], b: &[T], d: Dims) -> candle_core::Result<Vec<T>> {
        let (m, n, _, r) = d;
        let mut y = T::base_xwt(&self.weight, x, m, self.matmul)?;
        let u = x_at(&self.lora_input(x)?, a, d);
        let bt = Mat::new(b, n, r).t();
        gemm_into(
            &mut y,
            true,
            Mat::new(&u, m, r),
            bt,
            T::from_f64(self.scale),
        );
        Ok(y)
    }

    /// The three gradients in `T`, given `dy`; `dx` only when `want_dx`.
    fn backward<T: Elem>(
        &self,
        (x, a, b, dy): (&[T], &[T], &[T], &[T]),
        d: Dims,
        want_dx: bool,
    ) -> candle_core::Result<Grads<Vec<T>>> {
        let (m, n, k, r) = d;
        let s = T::from_f64(self.scale);
        // `v = dy · B`, as rows of `dy` against the rows of `Bᵀ`.
        let bt = transposed(b, n, r);
        let mut v = vec![T::zero(); m * r];
        if !T::rows_dot(dy, n, &bt, r, &mut v) {
            gemm_into(
                &mut v,
                false,
                Mat::new(dy, m, n),
                Mat::new(b, n, r),
                T::one(),
            );
        }
        let vm = Mat::new(&v, m, r);
        let dx = if want_dx {
            let mut dx = T::base_dyw(&self.weight, dy, m, self.matmul)?;
            self.add_lora_dx(&mut dx, vm, Mat::new(a, r, k), s)?;
            Some(dx)
        } else {
            None
        };
        let xin = self.lora_input(x)?;
        let mut da = vec![T::zero(); r * k];
        gemm_into(&mut da, false, vm.t(), Mat::new(&xin, m, k), s);
        let u = x_at(&xin, a, d);
        // `dB = s · dyᵀ · u`, computed as its transpose `s · uᵀ · dy` (`r x
        // n`): the `gemm` crate is about three times as fast with the
        // narrow dimension on the left.
        let mut dbt = vec![T::zero(); r * n];
        gemm_into(
            &mut dbt,
            false,
            Mat::new(&u, m, r).t(),
            Mat::new(dy, m, n),
            s,
        );
        Ok((dx, da, transposed(&dbt, r, n)))
    }

    /// The backward in `T` on the op's tensors.
    fn bwd_typed<T: Elem>(
        &self,
        (x, a, b, dy): (&Tensor, &Tensor, &Tensor, &Tensor),
    ) -> candle_core::Result<Grads<Tensor>> {
        let d = self.dims(x.dims(), a.dims(), b.dims())?;
        let dy = dy.contiguous()?;
        let (dx, da, db) = with_values::<T, _>(x, |xv| {
            with_values::<T, _>(a, |av| {
                with_values::<T, _>(b, |bv| {
                    with_values::<T, _>(&dy, |dyv| {
                        self.backward((xv, av, bv, dyv), d, x.track_op())
                    })
                })
            })
        })?;
        let dev = Device::Cpu;
        let dx = dx
            .map(|v| Tensor::from_vec(v, x.shape(), &dev))
            .transpose()?;
        let da = Tensor::from_vec(da, a.shape(), &dev)?;
        let db = Tensor::from_vec(db, b.shape(), &dev)?;
        Ok((dx, da, db))
    }
}

/// `u = x · Aᵀ` (`m x r`).
fn x_at<T: Elem>(x: &[T], a: &[T], (m, _, k, r): Dims) -> Vec<T> {
    let mut u = vec![T::zero(); m * r];
    if !T::rows_dot(x, k, a, r, &mut u) {
        gemm_into(
            &mut u,
            false,
            Mat::new(x, m, k),
            Mat::new(a, r, k).t(),
            T::one(),
        );
    }
    u
}

/// The `cols x rows` transpose of a row-major `rows x cols` matrix.
fn transposed<T: WithDType>(src: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::zero(); rows * cols];
    for (i, row) in src.chunks_exact(cols).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            out[j * rows + i] = v;
        }
    }
    out
}

impl CustomOp3 for LoraMatmulOp {
    fn name(&self) -> &'static str {
        "qlora-fused-lora-matmul"
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
        let d = self.dims(l1.dims(), l2.dims(), l3.dims())?;
        let mut out_dims = l1.dims().to_vec();
        *out_dims.last_mut().expect("x has a last dimension") = d.1;
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                let (x, a, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
                CpuStorage::F32(self.forward::<f32>(x, a, b, d)?)
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                let (x, a, b) = (slice(s1, l1)?, slice(s2, l2)?, slice(s3, l3)?);
                CpuStorage::F64(self.forward::<f64>(x, a, b, d)?)
            }
            _ => candle_core::bail!("fused lora: x, A and B must all be f32 or all f64"),
        };
        Ok((out, Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dx, da, db) = match x.dtype() {
            DType::F32 => self.bwd_typed::<f32>((x, a, b, grad_res))?,
            DType::F64 => self.bwd_typed::<f64>((x, a, b, grad_res))?,
            dt => candle_core::bail!("fused lora: no backward in {dt:?}"),
        };
        Ok((dx, Some(da), Some(db)))
    }
}
