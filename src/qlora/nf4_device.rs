//! NF4 weights held as tensors on the compute device (a GPU's memory):
//! packed 4-bit codes and block scales, dequantized on the device when a
//! product needs the dense weight.
//!
//! [`Nf4OnDevice::upload`] copies an [`Nf4Tensor`] quantized on the host;
//! [`Nf4OnDevice::dequantize`] runs [`Nf4Dequant`], a Candle custom op whose
//! CUDA forward is the kernel of `kernels/qlora.cu` and whose CPU forward
//! computes the same values from the same tensors (so the layout of codes and
//! scales is exercised without a GPU).
//!
//! ```
//! use candle_core::{DType, Device};
//! use qlora_scale::qlora::Nf4Tensor;
//! use qlora_scale::qlora::nf4_device::Nf4OnDevice;
//! let w: Vec<f32> = (0..200).map(|i| (i as f32 * 0.37).sin()).collect();
//! let q = Nf4Tensor::quantize(&w, &[2, 100], true).unwrap();
//! let d = Nf4OnDevice::upload(&q, &Device::Cpu).unwrap();
//! let back = d.dequantize(DType::F32).unwrap().flatten_all().unwrap();
//! assert_eq!(back.to_vec1::<f32>().unwrap(), q.dequantize());
//! ```

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Storage, Tensor};

use super::nf4::{DQ_BLOCK, NF4_BLOCK, NF4_CODE, Nf4Scales, Nf4Tensor};

/// Block scales on the device.
#[derive(Debug, Clone)]
pub enum DeviceScales {
    /// One `f32` absmax per block of [`NF4_BLOCK`] weights.
    F32(Tensor),
    /// Double quantization: signed 8-bit codes (stored as `u8`, Candle has
    /// no `i8`), one `f32` step per [`DQ_BLOCK`] codes, and the mean.
    Double {
        /// The codes' bytes.
        codes: Tensor,
        /// The steps.
        steps: Tensor,
        /// The mean added back.
        mean: f32,
    },
}

/// An NF4 tensor whose codes and scales live on a device.
#[derive(Debug, Clone)]
pub struct Nf4OnDevice {
    shape: Vec<usize>,
    numel: usize,
    packed: Tensor,
    scales: DeviceScales,
}

impl Nf4OnDevice {
    /// Copies `q`'s codes and scales to `device`.
    pub fn upload(q: &Nf4Tensor, device: &Device) -> candle_core::Result<Self> {
        let packed = Tensor::from_slice(q.packed(), q.packed().len(), device)?;
        let scales = match q.scales() {
            Nf4Scales::F32(s) => DeviceScales::F32(Tensor::from_slice(s, s.len(), device)?),
            Nf4Scales::Double { codes, steps, mean } => {
                let bytes: Vec<u8> = codes.iter().map(|&c| c as u8).collect();
                DeviceScales::Double {
                    codes: Tensor::from_vec(bytes, codes.len(), device)?,
                    steps: Tensor::from_slice(steps, steps.len(), device)?,
                    mean: *mean,
                }
            }
        };
        Ok(Self {
            shape: q.shape().to_vec(),
            numel: q.numel(),
            packed,
            scales,
        })
    }

    /// Shape of the dense tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The device holding the codes.
    pub fn device(&self) -> &Device {
        self.packed.device()
    }

    /// Bytes on the device: codes and scales.
    pub fn size_bytes(&self) -> usize {
        self.packed.elem_count()
            + match &self.scales {
                DeviceScales::F32(s) => 4 * s.elem_count(),
                DeviceScales::Double { codes, steps, .. } => {
                    codes.elem_count() + 4 * steps.elem_count() + 4
                }
            }
    }

    /// The dense tensor in `dtype` (`f32` or `bf16` on a GPU; any float
    /// dtype on the CPU), on the codes' device.
    pub fn dequantize(&self, dtype: DType) -> candle_core::Result<Tensor> {
        let op = Nf4Dequant {
            numel: self.numel,
            scales: &self.scales,
            dtype,
        };
        self.packed
            .apply_op1_no_bwd(&op)?
            .reshape(self.shape.as_slice())
    }
}

/// The dequantization of [`Nf4OnDevice`]: reads the packed codes (the op's
/// argument) and the scales, writes `numel` values of `dtype`.
pub(crate) struct Nf4Dequant<'a> {
    pub(crate) numel: usize,
    pub(crate) scales: &'a DeviceScales,
    pub(crate) dtype: DType,
}

/// A CPU tensor's contiguous values of type `T`.
fn cpu_values<T: candle_core::WithDType>(t: &Tensor) -> candle_core::Result<Vec<T>> {
    t.flatten_all()?.to_vec1::<T>()
}

impl CustomOp1 for Nf4Dequant<'_> {
    fn name(&self) -> &'static str {
        "qlora-nf4-dequant"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::U8(packed), Some((a, b))) = (s, l.contiguous_offsets()) else {
            candle_core::bail!("nf4 dequant: the codes must be contiguous u8");
        };
        let packed = &packed[a..b];
        if packed.len() < self.numel.div_ceil(2) {
            candle_core::bail!(
                "nf4 dequant: {} bytes for {} values",
                packed.len(),
                self.numel
            );
        }
        let scale_of: Box<dyn Fn(usize) -> f32> = match self.scales {
            DeviceScales::F32(t) => {
                let s = cpu_values::<f32>(t)?;
                Box::new(move |blk| s[blk])
            }
            DeviceScales::Double { codes, steps, mean } => {
                let (codes, steps, mean) =
                    (cpu_values::<u8>(codes)?, cpu_values::<f32>(steps)?, *mean);
                Box::new(move |blk| codes[blk] as i8 as f32 * steps[blk / DQ_BLOCK] + mean)
            }
        };
        let mut out = vec![0f32; self.numel];
        for (blk, dst) in out.chunks_mut(NF4_BLOCK).enumerate() {
            let scale = scale_of(blk);
            for (j, d) in dst.iter_mut().enumerate() {
                let i = blk * NF4_BLOCK + j;
                let byte = packed[i / 2];
                let code = if i.is_multiple_of(2) {
                    byte & 0x0f
                } else {
                    byte >> 4
                };
                *d = NF4_CODE[usize::from(code)] * scale;
            }
        }
        let t = Tensor::from_vec(out, self.numel, &Device::Cpu)?.to_dtype(self.dtype)?;
        let (st, _) = t.storage_and_layout();
        let Storage::Cpu(c) = &*st else {
            candle_core::bail!("nf4 dequant: a CPU tensor off the CPU");
        };
        Ok((c.clone(), Shape::from(self.numel)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let out = super::cuda::nf4_dequant(s, l, self.scales, self.numel, self.dtype)?;
        Ok((out, Shape::from(self.numel)))
    }
}
