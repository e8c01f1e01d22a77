//! Frozen linear layers: a Candle custom op whose backward returns only the
//! input's gradient, for every frozen weight storage.
//!
//! Candle's `QMatMul` passes no gradient back to its input, and a plain
//! `matmul` against a frozen weight computes and keeps a weight gradient that
//! nobody needs. [`FrozenLinear`] applies [`FrozenMatmulOp`], whose backward
//! is `dL/dx = dL/dy · W`; it never computes a weight gradient. In `f32` on
//! the CPU, dense and NF4 weights go through [`super::kernel`], which
//! dequantizes a cache-sized chunk of `W` at a time per thread; other
//! storages and dtypes dequantize `W` into a temporary that is dropped at
//! once.
//!
//! ```
//! use candle_core::{Device, Tensor, Var};
//! use qlora_scale::qlora::frozen::{FrozenLinear, FrozenStorage};
//! let dev = Device::Cpu;
//! let w = Tensor::randn(0f32, 1.0, (8, 64), &dev).unwrap();
//! let lin = FrozenLinear::new(&w, FrozenStorage::Nf4).unwrap();
//! let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 64), &dev).unwrap()).unwrap();
//! let y = lin.forward(x.as_tensor()).unwrap();
//! let grads = y.sum_all().unwrap().backward().unwrap();
//! assert_eq!(grads.get(x.as_tensor()).unwrap().dims(), &[2, 64]);
//! ```

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Shape, Storage, Tensor};

use super::bf16_gemm::CpuMatmul;
use super::kernel;
use super::nf4::{Nf4Error, Nf4Tensor};
use super::nf4_device::Nf4OnDevice;

/// How a frozen weight is stored and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrozenStorage {
    /// `f32`, through the custom op (no weight gradient).
    F32,
    /// `bf16`, widened to `f32` a chunk at a time by the kernels.
    Bf16,
    /// `f16`, like [`FrozenStorage::Bf16`] (for a base stored as `f16`).
    F16,
    /// NF4 with `f32` block scales (4.5 bits per weight).
    Nf4,
    /// NF4 with double-quantized scales (about 4.13 bits per weight).
    Nf4DoubleQuant,
    /// Candle's GGML Q4K; forward through candle's int8 kernels, backward
    /// through a dequantized temporary. Input width must be a multiple of 256.
    Q4K,
    /// Candle's GGML Q8_0, like [`FrozenStorage::Q4K`]; width multiple of 32.
    Q8_0,
    /// The naive baseline: an `f32` weight and a plain candle matmul, which
    /// also computes the (unused) weight gradient. For benchmarks.
    PlainF32Matmul,
    /// Candle's own `QMatMul` forward (Q8_0), which silently passes no
    /// gradient to its input. Wrong for training: it exists so that tests can
    /// prove the gradient checks catch this class of bug.
    CandleQMatMulNoGrad,
}

impl FrozenStorage {
    /// Short name used in logs and benchmarks.
    pub fn name(self) -> &'static str {
        match self {
            FrozenStorage::F32 => "f32",
            FrozenStorage::Bf16 => "bf16",
            FrozenStorage::F16 => "f16",
            FrozenStorage::Nf4 => "nf4",
            FrozenStorage::Nf4DoubleQuant => "nf4-dq",
            FrozenStorage::Q4K => "q4k",
            FrozenStorage::Q8_0 => "q8_0",
            FrozenStorage::PlainF32Matmul => "f32-plain-matmul",
            FrozenStorage::CandleQMatMulNoGrad => "candle-qmatmul-nograd",
        }
    }
}

/// Errors building or applying a frozen weight.
#[derive(Debug, thiserror::Error)]
pub enum FrozenError {
    /// The weight is not a 2-D matrix.
    #[error("frozen weight must be 2-D (out, in), got shape {0:?}")]
    NotMatrix(Vec<usize>),
    /// A GGML storage needs the input width to be a multiple of its block.
    #[error("{storage} needs the input width to be a multiple of {block}, got {width}")]
    BlockMismatch {
        /// The storage asked for.
        storage: &'static str,
        /// Its block size.
        block: usize,
        /// The weight's input width.
        width: usize,
    },
    /// A storage this build multiplies on the CPU only.
    #[error("{0} frozen weights are CPU-only: use NF4, bf16 or f32 storage on a GPU")]
    CpuOnly(&'static str),
    /// NF4 codes already on one GPU, asked for on another.
    #[error("NF4 codes on one GPU cannot move to another: quantize them again from the weights")]
    OtherDevice,
    /// NF4 quantization failed.
    #[error(transparent)]
    Nf4(#[from] Nf4Error),
    /// A Candle error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// The stored values of a frozen `(out, in)` weight.
#[derive(Debug)]
pub enum FrozenWeight {
    /// Dense `f32` (or the dtype it was given in, when that is `f64`).
    Dense(Tensor),
    /// Dense 16-bit (`bf16` or `f16`).
    Half(Tensor),
    /// NF4 codes and scales.
    Nf4(Nf4Tensor),
    /// NF4 codes and scales held on a device (a GPU), dequantized there.
    Nf4OnDevice(Nf4OnDevice),
    /// A candle GGML quantized tensor and its matmul.
    Ggml(Arc<QTensor>, QMatMul),
}

impl FrozenWeight {
    /// Quantizes `w` (`(out, in)`) into `storage`.
    pub fn new(w: &Tensor, storage: FrozenStorage) -> Result<Self, FrozenError> {
        let dims = w.dims().to_vec();
        if dims.len() != 2 {
            return Err(FrozenError::NotMatrix(dims));
        }
        let ggml = |dtype: GgmlDType, name: &'static str| -> Result<Self, FrozenError> {
            let block = dtype.block_size();
            if !dims[1].is_multiple_of(block) {
                return Err(FrozenError::BlockMismatch {
                    storage: name,
                    block,
                    width: dims[1],
                });
            }
            let q = Arc::new(QTensor::quantize(&w.to_dtype(DType::F32)?, dtype)?);
            let mm = QMatMul::from_arc(q.clone())?;
            Ok(FrozenWeight::Ggml(q, mm))
        };
        Ok(match storage {
            FrozenStorage::F32 | FrozenStorage::PlainF32Matmul => {
                let dt = if w.dtype() == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                FrozenWeight::Dense(w.to_dtype(dt)?.contiguous()?.detach())
            }
            FrozenStorage::Bf16 => {
                FrozenWeight::Half(w.to_dtype(DType::BF16)?.contiguous()?.detach())
            }
            FrozenStorage::F16 => {
                FrozenWeight::Half(w.to_dtype(DType::F16)?.contiguous()?.detach())
            }
            FrozenStorage::Nf4 | FrozenStorage::Nf4DoubleQuant => {
                let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                let dq = storage == FrozenStorage::Nf4DoubleQuant;
                FrozenWeight::Nf4(Nf4Tensor::quantize(&data, &dims, dq)?)
            }
            FrozenStorage::Q4K => ggml(GgmlDType::Q4K, "Q4K")?,
            FrozenStorage::Q8_0 | FrozenStorage::CandleQMatMulNoGrad => {
                ggml(GgmlDType::Q8_0, "Q8_0")?
            }
        })
    }

    /// The weight moved to `device`: NF4 codes and scales as they are
    /// ([`Nf4OnDevice`]), dense weights in their dtype. A CPU weight stays
    /// as it is; GGML storages have no GPU kernels here and stay CPU-only.
    pub fn to_device(self, device: &Device) -> Result<Self, FrozenError> {
        if device.is_cpu() {
            return Ok(self);
        }
        Ok(match self {
            FrozenWeight::Dense(t) => FrozenWeight::Dense(t.to_device(device)?),
            FrozenWeight::Half(t) => FrozenWeight::Half(t.to_device(device)?),
            FrozenWeight::Nf4(q) => FrozenWeight::Nf4OnDevice(Nf4OnDevice::upload(&q, device)?),
            FrozenWeight::Nf4OnDevice(q) if q.device().same_device(device) => {
                FrozenWeight::Nf4OnDevice(q)
            }
            FrozenWeight::Nf4OnDevice(_) => return Err(FrozenError::OtherDevice),
            FrozenWeight::Ggml(..) => return Err(FrozenError::CpuOnly("Q4K and Q8_0")),
        })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        let d: &[usize] = match self {
            FrozenWeight::Dense(t) | FrozenWeight::Half(t) => t.dims(),
            FrozenWeight::Nf4(q) => q.shape(),
            FrozenWeight::Nf4OnDevice(q) => q.shape(),
            FrozenWeight::Ggml(q, _) => q.shape().dims(),
        };
        (d[0], d[1])
    }

    /// Bytes of storage of the weight.
    pub fn size_bytes(&self) -> usize {
        match self {
            FrozenWeight::Dense(t) | FrozenWeight::Half(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
            FrozenWeight::Nf4(q) => q.size_bytes(),
            FrozenWeight::Nf4OnDevice(q) => q.size_bytes(),
            FrozenWeight::Ggml(q, _) => q.storage_size_in_bytes(),
        }
    }

    /// The weight as a dense `(out, in)` tensor of `dtype` on `device`: a
    /// temporary, for the backward pass, merging and checks.
    pub fn dequantize(&self, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let t = match self {
            FrozenWeight::Dense(t) | FrozenWeight::Half(t) => t.clone(),
            FrozenWeight::Nf4(q) => Tensor::from_vec(q.dequantize(), q.shape(), &Device::Cpu)?,
            FrozenWeight::Nf4OnDevice(q) => q.dequantize(dtype)?,
            FrozenWeight::Ggml(q, _) => q.dequantize(&Device::Cpu)?,
        };
        t.to_dtype(dtype)?.to_device(device)
    }

    /// Whether [`kernel`] multiplies by this weight in `f32` (dense `f32`,
    /// `bf16` or `f16` on the CPU, or NF4 with whole blocks per row); other
    /// weights take the dequantize-then-matmul path.
    pub fn kernel_ready(&self) -> bool {
        let (n, k) = self.dims();
        match self {
            FrozenWeight::Dense(t) => t.dtype() == DType::F32 && t.device().is_cpu(),
            FrozenWeight::Half(t) => t.device().is_cpu(),
            FrozenWeight::Nf4(q) => kernel::WeightRef::Nf4(q).supported(n, k),
            FrozenWeight::Nf4OnDevice(_) | FrozenWeight::Ggml(..) => false,
        }
    }

    /// Runs `f` on the [`kernel::WeightRef`] of a [`Self::kernel_ready`]
    /// weight.
    pub(crate) fn with_kernel_ref<R>(
        &self,
        f: impl FnOnce(kernel::WeightRef) -> R,
    ) -> candle_core::Result<R> {
        match self {
            FrozenWeight::Nf4(q) => Ok(f(kernel::WeightRef::Nf4(q))),
            FrozenWeight::Dense(t) | FrozenWeight::Half(t) => {
                let (storage, layout) = t.storage_and_layout();
                match (&*storage, layout.contiguous_offsets()) {
                    (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                        Ok(f(kernel::WeightRef::Dense(&v[a..b])))
                    }
                    (Storage::Cpu(CpuStorage::BF16(v)), Some((a, b))) => {
                        Ok(f(kernel::WeightRef::Bf16(&v[a..b])))
                    }
                    (Storage::Cpu(CpuStorage::F16(v)), Some((a, b))) => {
                        Ok(f(kernel::WeightRef::F16(&v[a..b])))
                    }
                    _ => candle_core::bail!(
                        "frozen matmul: dense weight is not contiguous f32, bf16 or f16"
                    ),
                }
            }
            _ => candle_core::bail!("frozen matmul: no kernel for this weight"),
        }
    }

    /// Rows `ids` of the weight (an embedding lookup), dense `dtype`.
    pub fn rows(&self, ids: &[u32], dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        let (rows, cols) = self.dims();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
            candle_core::bail!("token id {bad} out of range for a vocabulary of {rows}");
        }
        match self {
            FrozenWeight::Nf4(q) => {
                let mut out = vec![0f32; ids.len() * cols];
                for (dst, &id) in out.chunks_mut(cols).zip(ids) {
                    q.dequantize_range_into(id as usize * cols, dst);
                }
                Tensor::from_vec(out, (ids.len(), cols), device)?.to_dtype(dtype)
            }
            FrozenWeight::Dense(t) | FrozenWeight::Half(t) => {
                // The rows first, then the dtype: never a full copy.
                let idx = Tensor::from_slice(ids, ids.len(), t.device())?;
                t.index_select(&idx, 0)?.to_dtype(dtype)?.to_device(device)
            }
            FrozenWeight::Nf4OnDevice(_) | FrozenWeight::Ggml(..) => {
                let idx = Tensor::from_slice(ids, ids.len(), device)?;
                self.dequantize(dtype, device)?.index_select(&idx, 0)
            }
        }
    }
}

/// The custom op `y = x · Wᵀ` whose backward is only `dL/dx = dL/dy · W`.
#[derive(Debug, Clone)]
pub struct FrozenMatmulOp {
    weight: Arc<FrozenWeight>,
    matmul: CpuMatmul,
}

impl FrozenMatmulOp {
    /// An op over a shared frozen weight, `f32` products.
    pub fn new(weight: Arc<FrozenWeight>) -> Self {
        Self {
            weight,
            matmul: CpuMatmul::F32,
        }
    }

    /// The same op with `f32` inputs multiplied as `matmul` says.
    pub fn with_cpu_matmul(mut self, matmul: CpuMatmul) -> Self {
        self.matmul = matmul;
        self
    }
}

impl FrozenMatmulOp {
    /// For an input of layout `l`: rows `m`, the weight's `(n, k)`, the
    /// input's start offset and the output's dims.
    fn shapes(&self, l: &Layout) -> candle_core::Result<(usize, usize, usize, usize, Vec<usize>)> {
        let (n, k) = self.weight.dims();
        let dims = l.dims();
        if dims.last() != Some(&k) {
            candle_core::bail!(
                "frozen matmul: input {dims:?} does not end in the weight's width {k}"
            );
        }
        let Some((start, _)) = l.contiguous_offsets() else {
            candle_core::bail!("frozen matmul: input must be contiguous");
        };
        let m = l.shape().elem_count() / k;
        let mut out_dims = dims.to_vec();
        *out_dims.last_mut().expect("rank >= 1") = n;
        Ok((m, n, k, start, out_dims))
    }
}

impl CustomOp1 for FrozenMatmulOp {
    fn name(&self) -> &'static str {
        "qlora-frozen-matmul"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, n, k, start, out_dims) = self.shapes(l)?;
        let out = match (&*self.weight, s) {
            (FrozenWeight::Ggml(_, mm), CpuStorage::F32(data)) => {
                let x = Tensor::from_slice(&data[start..start + m * k], (m, k), &Device::Cpu)?;
                let y = mm.forward(&x)?;
                let (ys, yl) = y.storage_and_layout();
                match (&*ys, yl.contiguous_offsets()) {
                    (Storage::Cpu(CpuStorage::F32(v)), Some((a, b))) => {
                        CpuStorage::F32(v[a..b].to_vec())
                    }
                    _ => candle_core::bail!("frozen matmul: unexpected QMatMul output"),
                }
            }
            (weight, CpuStorage::F32(data)) if weight.kernel_ready() => {
                let x = &data[start..start + m * k];
                CpuStorage::F32(
                    weight.with_kernel_ref(|w| kernel::matmul_wt(x, m, w, n, k, self.matmul))?,
                )
            }
            _ => {
                let w = self.weight.dequantize(s.dtype(), &Device::Cpu)?;
                let (ws, wl) = w.storage_and_layout();
                let Storage::Cpu(wc) = &*ws else {
                    candle_core::bail!("frozen matmul: weight is not on the CPU");
                };
                let lhs = Layout::contiguous_with_offset((m, k), start);
                // Wᵀ as a (k, n) view of the row-major (n, k) weight.
                let rhs = Layout::new(Shape::from((k, n)), vec![1, k], wl.start_offset());
                s.matmul(wc, (1, m, n, k), &lhs, &rhs)?
            }
        };
        Ok((out, Shape::from(out_dims)))
    }

    /// On a GPU: the weight dequantized on the device into a temporary in
    /// the input's dtype (bf16 from NF4 codes, by the kernel of
    /// [`super::nf4_device`]), then cuBLAS.
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k, start, out_dims) = self.shapes(l)?;
        let device = Device::Cuda(s.device().clone());
        let w = self.weight.dequantize(s.dtype(), &device)?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cuda(wc) = &*ws else {
            candle_core::bail!("frozen matmul: weight is not on the GPU");
        };
        let lhs = Layout::contiguous_with_offset((m, k), start);
        let rhs = Layout::new(Shape::from((k, n)), vec![1, k], wl.start_offset());
        let out = s.matmul(wc, (1, m, n, k), &lhs, &rhs)?;
        Ok((out, Shape::from(out_dims)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (n, k) = self.weight.dims();
        let m = grad_res.elem_count() / n;
        if grad_res.dtype() == DType::F32
            && grad_res.device().is_cpu()
            && self.weight.kernel_ready()
        {
            let dy = grad_res.contiguous()?;
            let (storage, layout) = dy.storage_and_layout();
            if let (Storage::Cpu(CpuStorage::F32(data)), Some((a, b))) =
                (&*storage, layout.contiguous_offsets())
            {
                let dy = &data[a..b];
                let gx = self
                    .weight
                    .with_kernel_ref(|w| kernel::matmul_w(dy, m, w, n, k, self.matmul))?;
                return Ok(Some(Tensor::from_vec(gx, arg.shape(), arg.device())?));
            }
        }
        let w = self
            .weight
            .dequantize(grad_res.dtype(), grad_res.device())?;
        let gx = grad_res.reshape((m, n))?.matmul(&w)?.reshape(arg.shape())?;
        Ok(Some(gx))
    }
}

/// A frozen `(out, in)` linear layer without bias.
#[derive(Debug, Clone)]
pub struct FrozenLinear {
    weight: Arc<FrozenWeight>,
    storage: FrozenStorage,
    matmul: CpuMatmul,
}

impl FrozenLinear {
    /// Stores `w` (`(out, in)`) as `storage`.
    pub fn new(w: &Tensor, storage: FrozenStorage) -> Result<Self, FrozenError> {
        Ok(Self {
            weight: Arc::new(FrozenWeight::new(w, storage)?),
            storage,
            matmul: CpuMatmul::F32,
        })
    }

    /// A layer over an already stored weight (e.g. tied embeddings).
    pub fn from_weight(weight: Arc<FrozenWeight>, storage: FrozenStorage) -> Self {
        Self {
            weight,
            storage,
            matmul: CpuMatmul::F32,
        }
    }

    /// The same layer multiplying `f32` inputs on the CPU as `matmul` says
    /// ([`CpuMatmul`]).
    pub fn with_cpu_matmul(mut self, matmul: CpuMatmul) -> Self {
        self.matmul = matmul;
        self
    }

    /// How the layer multiplies `f32` inputs on the CPU.
    pub fn cpu_matmul(&self) -> CpuMatmul {
        self.matmul
    }

    /// The stored weight.
    pub fn weight(&self) -> &Arc<FrozenWeight> {
        &self.weight
    }

    /// The storage kind.
    pub fn storage(&self) -> FrozenStorage {
        self.storage
    }

    /// `y = x · Wᵀ` for `x` of shape `(..., in)`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match (self.storage, &*self.weight) {
            (FrozenStorage::PlainF32Matmul, FrozenWeight::Dense(w)) => x.broadcast_matmul(&w.t()?),
            (FrozenStorage::CandleQMatMulNoGrad, FrozenWeight::Ggml(_, mm)) => mm.forward(x),
            (_, FrozenWeight::Ggml(..)) if x.dtype() != DType::F32 => {
                // Candle's int8 kernels take f32 input only: dequantize.
                let op = FrozenMatmulOp::new(Arc::new(FrozenWeight::Dense(
                    self.weight.dequantize(x.dtype(), x.device())?,
                )));
                x.contiguous()?.apply_op1(op)
            }
            _ => x
                .contiguous()?
                .apply_op1(FrozenMatmulOp::new(self.weight.clone()).with_cpu_matmul(self.matmul)),
        }
    }
}
