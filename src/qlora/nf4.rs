//! NF4 codec with optional double quantization (QLoRA, arXiv:2305.14314).
//!
//! Weights are cut into blocks of [`NF4_BLOCK`] values; each block stores one
//! absmax scale and 64 four-bit indices into [`NF4_CODE`]. With double
//! quantization the block scales are themselves stored as signed 8-bit values
//! in blocks of [`DQ_BLOCK`] scales (after subtracting their mean), with one
//! `f32` scale per such block: about 4.127 bits per weight instead of 4.5.
//!
//! A tensor whose element count is not a multiple of the block is padded with
//! zeros; the padding is never visible through [`Nf4Tensor::dequantize`].
//!
//! ```
//! use qlora_scale::qlora::nf4::Nf4Tensor;
//! let w: Vec<f32> = (0..200).map(|i| ((i as f32) * 0.37).sin()).collect();
//! let q = Nf4Tensor::quantize(&w, &[10, 20], true).unwrap();
//! let back = q.dequantize();
//! assert_eq!(back.len(), 200);
//! assert!(w.iter().zip(&back).all(|(a, b)| (a - b).abs() < 0.15));
//! ```

use rayon::prelude::*;

/// The 16 NF4 code values, from the quantiles of a standard normal
/// (offset 0.9677083) normalised to `[-1, 1]` with an exact zero; the table
/// of QLoRA (arXiv:2305.14314, appendix E) and bitsandbytes.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073,
    -0.394_917_5,
    -0.284_441_4,
    -0.184_773_4,
    -0.091_050_03,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_2,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Weights per absmax block (QLoRA's block size 64).
pub const NF4_BLOCK: usize = 64;

/// Block scales per second-level block under double quantization (QLoRA: 256).
pub const DQ_BLOCK: usize = 256;

/// Errors of the NF4 codec.
#[derive(Debug, thiserror::Error)]
pub enum Nf4Error {
    /// The data length does not match the product of the shape.
    #[error("NF4: {len} values do not fill shape {shape:?}")]
    ShapeMismatch {
        /// Number of values given.
        len: usize,
        /// Shape given.
        shape: Vec<usize>,
    },
    /// A value is NaN or infinite: it cannot be quantized.
    #[error("NF4: value {value} at index {index} is not finite")]
    NotFinite {
        /// Index of the first bad value.
        index: usize,
        /// The value.
        value: f32,
    },
}

/// How the per-block absmax scales are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Scales {
    /// One `f32` per block of [`NF4_BLOCK`] weights (4.5 bits per weight).
    F32(Vec<f32>),
    /// Double quantization: scales minus `mean`, as `i8` in blocks of
    /// [`DQ_BLOCK`], each block with one `f32` step.
    Double {
        /// Quantized `(scale - mean) / step`.
        codes: Vec<i8>,
        /// Step of each block of [`DQ_BLOCK`] scales.
        steps: Vec<f32>,
        /// Mean of all block scales, subtracted before quantizing.
        mean: f32,
    },
}

impl Nf4Scales {
    /// Quantizes `scales` to 8 bits (double quantization).
    pub fn double_quantize(scales: &[f32]) -> Self {
        let mean = if scales.is_empty() {
            0.0
        } else {
            (scales.iter().map(|&s| s as f64).sum::<f64>() / scales.len() as f64) as f32
        };
        let mut codes = Vec::with_capacity(scales.len());
        let mut steps = Vec::with_capacity(scales.len().div_ceil(DQ_BLOCK));
        for block in scales.chunks(DQ_BLOCK) {
            let absmax = block.iter().fold(0f32, |m, &s| m.max((s - mean).abs()));
            let step = absmax / 127.0;
            steps.push(step);
            let inv = if step > 0.0 { 1.0 / step } else { 0.0 };
            codes.extend(
                block
                    .iter()
                    .map(|&s| ((s - mean) * inv).round().clamp(-127.0, 127.0) as i8),
            );
        }
        Nf4Scales::Double { codes, steps, mean }
    }

    /// The block scales as `f32` (reconstructed under double quantization).
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Nf4Scales::F32(s) => s.clone(),
            Nf4Scales::Double { codes, steps, mean } => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| c as f32 * steps[i / DQ_BLOCK] + mean)
                .collect(),
        }
    }

    /// Bytes this scale storage occupies.
    pub fn size_bytes(&self) -> usize {
        match self {
            Nf4Scales::F32(s) => 4 * s.len(),
            Nf4Scales::Double { codes, steps, .. } => codes.len() + 4 * steps.len() + 4,
        }
    }
}

/// Bytes a tensor of `numel` values takes as NF4 with one `f32` scale per
/// block (what [`Nf4Tensor::quantize`] allocates without double quant):
/// two codes per byte, the last block padded.
pub const fn nf4_storage_bytes(numel: usize) -> usize {
    let blocks = numel.div_ceil(NF4_BLOCK);
    blocks * (NF4_BLOCK / 2 + 4)
}

/// Decodes one block's packed codes `src` with absmax `scale` into `dst`
/// (a whole block, or the shorter last block of a padded tensor).
#[inline]
fn decode_block(src: &[u8], scale: f32, dst: &mut [f32]) {
    let table: [f32; 16] = NF4_CODE.map(|c| c * scale);
    for (pair, &byte) in dst.chunks_mut(2).zip(src) {
        pair[0] = table[usize::from(byte & 0x0f)];
        if let Some(hi) = pair.get_mut(1) {
            *hi = table[usize::from(byte >> 4)];
        }
    }
}

/// A tensor stored as NF4: packed 4-bit codes plus block scales.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    shape: Vec<usize>,
    numel: usize,
    /// Two codes per byte: element `2i` in the low nibble, `2i+1` in the high.
    packed: Vec<u8>,
    scales: Nf4Scales,
}

/// Index of the code value nearest to `x` (which lies in `[-1, 1]`).
#[inline]
pub fn nearest_code(x: f32) -> u8 {
    // Midpoints between consecutive code values: a value maps to the code
    // whose interval contains it.
    let mut idx = 0u8;
    for i in 0..15 {
        let mid = 0.5 * (NF4_CODE[i] + NF4_CODE[i + 1]);
        if x > mid {
            idx = (i + 1) as u8;
        }
    }
    idx
}

impl Nf4Tensor {
    /// Quantizes `data` (row-major, `shape`) to NF4, with double quantization
    /// of the scales when `double_quant` is set.
    pub fn quantize(data: &[f32], shape: &[usize], double_quant: bool) -> Result<Self, Nf4Error> {
        let numel: usize = shape.iter().product();
        if numel != data.len() {
            return Err(Nf4Error::ShapeMismatch {
                len: data.len(),
                shape: shape.to_vec(),
            });
        }
        if let Some((index, &value)) = data.iter().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(Nf4Error::NotFinite { index, value });
        }
        let nblocks = numel.div_ceil(NF4_BLOCK);
        let mut packed = vec![0u8; nblocks * NF4_BLOCK / 2];
        let mut scales = vec![0f32; nblocks];
        packed
            .par_chunks_mut(NF4_BLOCK / 2)
            .zip(scales.par_iter_mut())
            .enumerate()
            .for_each(|(b, (out, scale))| {
                let start = b * NF4_BLOCK;
                let end = (start + NF4_BLOCK).min(numel);
                let block = &data[start..end];
                let absmax = block.iter().fold(0f32, |m, &v| m.max(v.abs()));
                *scale = absmax;
                let inv = if absmax > 0.0 { 1.0 / absmax } else { 0.0 };
                let code = |i: usize| -> u8 {
                    // Padding encodes the exact zero.
                    block.get(i).map_or(7, |&v| nearest_code(v * inv))
                };
                for (j, byte) in out.iter_mut().enumerate() {
                    *byte = code(2 * j) | (code(2 * j + 1) << 4);
                }
            });
        let scales = if double_quant {
            Nf4Scales::double_quantize(&scales)
        } else {
            Nf4Scales::F32(scales)
        };
        Ok(Self {
            shape: shape.to_vec(),
            numel,
            packed,
            scales,
        })
    }

    /// Shape of the original tensor.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Number of (unpadded) elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// The scale storage.
    pub fn scales(&self) -> &Nf4Scales {
        &self.scales
    }

    /// The packed codes: two per byte, element `2i` in the low nibble.
    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    /// The 4-bit code index of element `i` (padding included).
    pub fn code_index(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte & 0x0f
        } else {
            byte >> 4
        }
    }

    /// Bytes of storage: packed codes plus scales.
    pub fn size_bytes(&self) -> usize {
        self.packed.len() + self.scales.size_bytes()
    }

    /// Storage in bits per (unpadded) weight.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.size_bytes() as f64 / self.numel.max(1) as f64
    }

    /// Dequantizes into `out`, which must hold exactly [`Self::numel`] values.
    ///
    /// # Panics
    /// If `out.len() != self.numel()` (a programming error, not bad input).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.numel, "NF4 dequantize: wrong output length");
        let scales = self.scales.to_f32();
        out.par_chunks_mut(NF4_BLOCK)
            .zip(self.packed.par_chunks(NF4_BLOCK / 2))
            .zip(scales.par_iter())
            .for_each(|((dst, src), &scale)| decode_block(src, scale, dst));
    }

    /// Dequantizes whole blocks `first ..` into `out`, whose length must be
    /// a multiple of [`NF4_BLOCK`] (one block per [`NF4_BLOCK`] values): the
    /// fast path of the matmul kernels, which read rows that start a block.
    ///
    /// # Panics
    /// If `out` is not whole blocks or runs past the last block (a
    /// programming error).
    pub fn dequantize_blocks_into(&self, first: usize, out: &mut [f32]) {
        assert!(
            out.len().is_multiple_of(NF4_BLOCK),
            "NF4 dequantize: {} values are not whole blocks",
            out.len()
        );
        let bytes = self
            .packed
            .get(first * NF4_BLOCK / 2..(first * NF4_BLOCK + out.len()) / 2)
            .expect("NF4 dequantize: blocks out of bounds");
        for (b, (dst, src)) in out
            .chunks_exact_mut(NF4_BLOCK)
            .zip(bytes.chunks_exact(NF4_BLOCK / 2))
            .enumerate()
        {
            decode_block(src, self.block_scale(first + b), dst);
        }
    }

    /// The reconstructed absmax scale of block `b`.
    pub fn block_scale(&self, b: usize) -> f32 {
        match &self.scales {
            Nf4Scales::F32(s) => s[b],
            Nf4Scales::Double { codes, steps, mean } => {
                codes[b] as f32 * steps[b / DQ_BLOCK] + mean
            }
        }
    }

    /// Dequantizes elements `start .. start + out.len()` into `out` (e.g. one
    /// embedding row).
    ///
    /// # Panics
    /// If the range runs past [`Self::numel`] (a programming error).
    pub fn dequantize_range_into(&self, start: usize, out: &mut [f32]) {
        assert!(
            start + out.len() <= self.numel,
            "NF4 dequantize: range out of bounds"
        );
        let mut block = usize::MAX;
        let mut scale = 0f32;
        for (j, dst) in out.iter_mut().enumerate() {
            let i = start + j;
            if i / NF4_BLOCK != block {
                block = i / NF4_BLOCK;
                scale = self.block_scale(block);
            }
            *dst = NF4_CODE[self.code_index(i) as usize] * scale;
        }
    }

    /// Dequantizes to a new vector of [`Self::numel`] values.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.numel];
        self.dequantize_into(&mut out);
        out
    }
}
