//! `bf16` products with `f32` sums for the frozen matmuls on the CPU, on
//! Intel AMX where the CPU has it.
//!
//! With `cpu_matmul = "bf16"` the frozen matmul kernels
//! ([`super::kernel`]) round both operands of each product to `bf16` (the
//! activations or their gradient, and the dequantized weight), multiply
//! them exactly and sum in `f32`: the arithmetic of QLoRA's usual `bf16`
//! compute dtype, and of `bf16` matmuls on a GPU. Two engines compute it:
//!
//! - [`Engine::Amx`]: the tile instructions of Intel AMX (`tdpbf16ps`,
//!   Sapphire Rapids and later), about 16 times the `f32` multiply-adds
//!   of AVX-512 per cycle. Used when the CPU reports AMX-TILE and AMX-BF16
//!   and Linux grants the process the tile state.
//! - [`Engine::Emulated`]: anywhere else, the same rounded operands
//!   widened back to `f32` and multiplied by the `f32` GEMM. Same products,
//!   sums in another order; no faster than `f32`, so there it only keeps a
//!   run's numbers the same across machines.
//!
//! No crate this project can use has an AMX kernel (the `gemm` crate 0.19
//! has none, and neither has Candle), so this module issues the
//! instructions itself through `asm!`.
//!
//! Layouts ([`PackedA`], [`PackedB`]): the left operand `A` in blocks of
//! 16 rows x 32 depths (1 KiB, one tile), the right operand `B` in groups
//! of 16 columns, each a run of 1 KiB blocks whose row `p` holds, for each
//! of the 16 columns, the values at depths `2p` and `2p + 1` (the pairs
//! `tdpbf16ps` multiplies); rows, columns and depth zero-padded to
//! multiples of 32. [`gemm()`] sums 2 x 2 tiles at a time, 512 depths a
//! pass, into a row-major `f32` buffer ([`c_len`]). `docs/design-notes.md`
//! says why it is laid out so.

use std::sync::OnceLock;

/// How the frozen matmuls multiply on the CPU (`cpu_matmul` of a run).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    serde::Serialize,
    serde::Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum CpuMatmul {
    /// `f32` operands and sums.
    #[default]
    F32,
    /// `bf16` operands, `f32` sums.
    Bf16,
}

impl CpuMatmul {
    /// `Bf16` when `bf16` is set (`trainer.cpu_matmul_bf16` of the tables).
    pub const fn from_bf16_flag(bf16: bool) -> Self {
        if bf16 {
            CpuMatmul::Bf16
        } else {
            CpuMatmul::F32
        }
    }

    /// What computes it on this CPU, for the setup line and the dry run:
    /// `f32`, `bf16 (AMX)` or `bf16 (emulated in f32: no AMX)`.
    pub fn describe(self) -> &'static str {
        match (self, engine()) {
            (CpuMatmul::F32, _) => "f32",
            (CpuMatmul::Bf16, Engine::Amx) => "bf16 (AMX)",
            (CpuMatmul::Bf16, Engine::Emulated) => "bf16 (emulated in f32: no AMX)",
        }
    }
}

/// What computes the `bf16` products on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// Intel AMX tiles.
    Amx,
    /// Rounded operands through the `f32` GEMM.
    Emulated,
}

/// The engine of this process, decided once: [`Engine::Amx`] when the CPU
/// has AMX-TILE and AMX-BF16 and the OS lets the process use the tiles.
pub fn engine() -> Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    *ENGINE.get_or_init(|| {
        if amx::available() {
            Engine::Amx
        } else {
            Engine::Emulated
        }
    })
}

/// Rows and depth are padded to multiples of this.
pub const PAD: usize = 32;

/// `x` rounded to the nearest `bf16` (ties to even), as its bits. NaN stays
/// NaN. Branch-free, so loops of it vectorize.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1))) >> 16;
    let nan = (bits >> 16) | 0x0040;
    (if bits & 0x7fff_ffff > 0x7f80_0000 {
        nan
    } else {
        rounded
    }) as u16
}

/// The `f32` value of `bf16` bits.
#[inline(always)]
pub fn from_bf16(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

/// Rounds every value of `v` to `bf16` in place (the emulated engine's
/// operands).
pub fn round_in_place(v: &mut [f32]) {
    v.iter_mut().for_each(|x| *x = from_bf16(to_bf16(*x)));
}

/// Defines a function whose body is compiled twice: as it is, and for
/// AVX-512 (F, BW, VL), the second called when the AMX engine runs (every
/// AMX CPU has AVX-512), so that the packing loops take 16 lanes there.
macro_rules! wide_fn {
    ($(#[doc = $doc:literal])* fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[doc = $doc])*
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
                unsafe fn wide($($arg: $ty),*) {
                    body($($arg),*)
                }
                if engine() == Engine::Amx {
                    // SAFETY: the AMX engine is only chosen on a CPU with
                    // AVX-512 F, BW and VL (`amx::available` checks them).
                    unsafe { wide($($arg),*) };
                    return;
                }
            }
            body($($arg),*)
        }
    };
}

/// Values in one 16 x 16 tile of `bf16` pairs (1 KiB).
const TILE: usize = 512;

/// One tile row (64 bytes) of `bf16` bits, on a cache line of its own.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u16; 32]);

/// Packed `bf16` bits that start on a cache line, so that no tile row (64
/// bytes) straddles two lines. A `Vec<u16>` of a packed operand's size
/// comes from `mmap`, 16 bytes past a page boundary, and then each row a
/// `tileloadd` reads touched two lines.
#[derive(Default)]
struct Lines(Vec<Line>);

impl Lines {
    /// `len` zeros (`len` a multiple of 32), cleared on rayon's threads
    /// when `parallel` (`buf::filled`).
    fn zeroed(len: usize, parallel: bool) -> Lines {
        debug_assert_eq!(len % 32, 0, "whole lines");
        let zero = Line([0; 32]);
        Lines(if parallel {
            super::buf::filled(len / 32, zero)
        } else {
            vec![zero; len / 32]
        })
    }

    /// Makes these `len` zeros (`len` a multiple of 32), in the memory
    /// they hold when it is large enough.
    fn refill(&mut self, len: usize) {
        debug_assert_eq!(len % 32, 0, "whole lines");
        self.0.clear();
        self.0.resize(len / 32, Line([0; 32]));
    }
}

impl std::ops::Deref for Lines {
    type Target = [u16];
    fn deref(&self) -> &[u16] {
        // SAFETY: a `Line` is 32 `u16`s with no padding (`repr(C)`, 64
        // bytes, aligned to 64), so the lines are `32 * len` of them.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr().cast(), self.0.len() * 32) }
    }
}

impl std::ops::DerefMut for Lines {
    fn deref_mut(&mut self) -> &mut [u16] {
        // SAFETY: as `deref`, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast(), self.0.len() * 32) }
    }
}

impl PartialEq for Lines {
    fn eq(&self, other: &Lines) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

/// The left operand `A` (`rows x depth`) packed for the tiles: blocks of 16
/// rows x 32 depths (1 KiB), block `(rb, kb)` at `(rb * kblocks + kb) *
/// 512`; rows padded to a multiple of 32, depth to a multiple of 32, with
/// zeros.
#[derive(Default)]
pub struct PackedA {
    data: Lines,
    rows: usize,
    depth: usize,
    kblocks: usize,
}

impl PackedA {
    /// Packs the row-major `rows x depth` `f32` values of `src`, rows
    /// `stride` apart; `parallel` splits the work between rayon's threads.
    ///
    /// # Panics
    /// If `src` is too short.
    pub fn pack(&mut self, src: &[f32], rows: usize, depth: usize, stride: usize, parallel: bool) {
        assert!(
            rows == 0 || src.len() >= (rows - 1) * stride + depth,
            "bf16 pack: A of {rows} x {depth} does not fit {} values",
            src.len()
        );
        let kblocks = depth.div_ceil(PAD);
        let rows_pad = rows.div_ceil(PAD) * PAD;
        // The padding is zero from the last packing when the shape is the
        // same (packing writes only the values of `src`).
        if (self.rows, self.depth) != (rows, depth) || self.data.len() != rows_pad * kblocks * PAD {
            // Cleared on rayon's threads when `parallel` (a `resize` was
            // one `memset` of up to 32 MiB, the logits' gradient, on the
            // calling thread).
            let len = rows_pad * kblocks * PAD;
            self.data = Lines::zeroed(len, parallel);
        }
        self.rows = rows;
        self.depth = depth;
        self.kblocks = kblocks;
        if kblocks == 0 {
            return;
        }
        // One 16-row block of A per item: its packed run of `kblocks` tiles.
        let block = |(rb, dst): (usize, &mut [u16])| {
            let src = &src[(rb * 16 * stride).min(src.len())..];
            pack_a_rows(
                src,
                rows.saturating_sub(rb * 16).min(16),
                depth,
                stride,
                dst,
            );
        };
        if parallel {
            use rayon::prelude::*;
            self.data
                .par_chunks_mut(kblocks * TILE)
                .enumerate()
                .for_each(block);
        } else {
            self.data
                .chunks_mut(kblocks * TILE)
                .enumerate()
                .for_each(block);
        }
    }
}

wide_fn! {
    /// Packs up to 16 rows (`stride` apart in `src`, `depth` values each)
    /// into one row block of [`PackedA`] (`dst`, its `kblocks` tiles).
    fn pack_a_rows(src: &[f32], rows: usize, depth: usize, stride: usize, dst: &mut [u16]) {
        for i in 0..rows {
            let row = &src[i * stride..i * stride + depth];
            for (kb, seg) in row.chunks(PAD).enumerate() {
                let at = kb * TILE + i * PAD;
                convert(seg, &mut dst[at..at + seg.len()]);
            }
        }
    }
}

/// `dst[i] = to_bf16(src[i])`.
#[inline(always)]
fn convert(src: &[f32], dst: &mut [u16]) {
    dst.iter_mut().zip(src).for_each(|(d, &v)| *d = to_bf16(v));
}

/// The right operand `B` (`depth x cols`) packed for the tiles: groups of
/// 16 columns, each a run of `kblocks` blocks of 1 KiB; row `p` of a block
/// holds, for each of its 16 columns, the values at depths `2p` and
/// `2p + 1`. Groups padded to an even number, depth to a multiple of 32,
/// with zeros.
#[derive(Default)]
pub struct PackedB {
    data: Lines,
    cols: usize,
    depth: usize,
    kblocks: usize,
}

impl PackedB {
    /// Sizes the buffer for `depth x cols`; zeroes it unless the last
    /// packing had the same shape (whose padding is still zero).
    fn reset(&mut self, depth: usize, cols: usize) {
        let len = packed_groups(cols) * depth.div_ceil(PAD) * TILE;
        if (self.cols, self.depth) != (cols, depth) || self.data.len() != len {
            self.data.refill(len);
        }
        self.cols = cols;
        self.depth = depth;
        self.kblocks = depth.div_ceil(PAD);
    }

    /// Packs `B = Sᵀ` for the row-major `cols x depth` values of `src`
    /// (each row of `src` is a column of `B`: the rows of a weight chunk for
    /// `x · Wᵀ`).
    ///
    /// # Panics
    /// If `src` is not `cols * depth` long.
    pub fn pack_transposed(&mut self, src: &[f32], cols: usize, depth: usize) {
        self.pack_groups(src, cols, depth, wide_group_f32(), convert);
    }

    /// [`Self::pack_transposed`] from `bf16` values (their bits): a 16-bit
    /// weight, packed without rounding.
    ///
    /// # Panics
    /// If `src` is not `cols * depth` long.
    pub fn pack_transposed_bits(&mut self, src: &[u16], cols: usize, depth: usize) {
        self.pack_groups(src, cols, depth, wide_group_bits(), |from, to| {
            to.copy_from_slice(from)
        });
    }

    /// The 16-column groups of [`Self::pack_transposed`] from `cols` rows
    /// of `depth` values of `src`: whole groups by `wide` on AMX CPUs (when
    /// `depth` is whole depth blocks), the rest the plain way, `segment`
    /// writing the `bf16` bits of a run of values.
    fn pack_groups<T>(
        &mut self,
        src: &[T],
        cols: usize,
        depth: usize,
        wide: Option<WideGroup<T>>,
        segment: impl Fn(&[T], &mut [u16]),
    ) {
        assert_eq!(src.len(), cols * depth, "bf16 pack: not {cols} x {depth}");
        self.reset(depth, cols);
        let kblocks = self.kblocks;
        if kblocks == 0 {
            return;
        }
        for (g, dst) in self.data.chunks_mut(kblocks * TILE).enumerate() {
            let first = (g * 16).min(cols);
            let n = cols.saturating_sub(first).min(16);
            let rows = &src[first * depth..(first + n) * depth];
            if let Some(wide) = wide
                && n == 16
                && depth.is_multiple_of(PAD)
                && engine() == Engine::Amx
            {
                // SAFETY: the AMX engine runs only on a CPU with AVX-512
                // F, BW, VL and BF16 (`amx::available`), what `wide` needs;
                // the group's 16 rows of `depth` values and its `kblocks`
                // tiles are in bounds.
                unsafe { wide(rows.as_ptr(), depth, kblocks, dst.as_mut_ptr()) };
                continue;
            }
            pack_b_transposed_group(n, depth, dst, |j, d, out| {
                segment(&rows[j * depth + d.start..j * depth + d.end], out)
            });
        }
    }

    /// Packs `B` from the row-major `depth x cols` values of `src` (a
    /// block of rows of `W` for `dy · W`).
    ///
    /// # Panics
    /// If `src` is not `depth * cols` long.
    pub fn pack_rows(&mut self, src: &[f32], depth: usize, cols: usize) {
        assert_eq!(src.len(), depth * cols, "bf16 pack: not {depth} x {cols}");
        self.reset(depth, cols);
        if cols == 0 {
            return;
        }
        let (kblocks, data) = (self.kblocks, &mut self.data);
        pack_b_rows(src, cols, kblocks, data);
    }

    /// [`Self::pack_rows`] from `bf16` values (their bits): `depth` rows of
    /// `cols`, `stride` apart in `src` (a block of rows and columns of a
    /// 16-bit weight, read in place).
    ///
    /// # Panics
    /// If `src` is too short.
    pub fn pack_rows_bits(&mut self, src: &[u16], depth: usize, stride: usize, cols: usize) {
        assert!(
            depth == 0 || src.len() >= (depth - 1) * stride + cols,
            "bf16 pack: {depth} rows of {cols} do not fit {} values",
            src.len()
        );
        self.reset(depth, cols);
        if cols == 0 {
            return;
        }
        let (kblocks, data) = (self.kblocks, &mut self.data);
        pack_b_rows_bits(src, depth, stride, cols, kblocks, data);
    }
}

/// One 16-column group of [`PackedB::pack_transposed`] the plain way (the
/// edges, and CPUs without AVX-512): `n <= 16` rows of `depth` values,
/// `segment(j, d0..d1, out)` writing the `bf16` bits of row `j`'s depths
/// `d0..d1`, become the group's tiles in `dst`.
fn pack_b_transposed_group(
    n: usize,
    depth: usize,
    dst: &mut [u16],
    segment: impl Fn(usize, std::ops::Range<usize>, &mut [u16]),
) {
    let mut pairs = [[0u32; 16]; 16];
    for (kb, tile) in dst.chunks_exact_mut(TILE).enumerate() {
        let (d0, d1) = (kb * PAD, (kb * PAD + PAD).min(depth));
        for (j, row) in pairs.iter_mut().enumerate() {
            let mut seg = [0u16; PAD];
            if j < n {
                segment(j, d0..d1, &mut seg[..d1 - d0]);
            }
            for (p, v) in row.iter_mut().enumerate() {
                *v = u32::from(seg[2 * p]) | (u32::from(seg[2 * p + 1]) << 16);
            }
        }
        for (p, out) in tile.chunks_exact_mut(32).enumerate() {
            for (j, o) in out.chunks_exact_mut(2).enumerate() {
                let v = pairs[j][p];
                o[0] = v as u16;
                o[1] = (v >> 16) as u16;
            }
        }
    }
}

wide_fn! {
/// [`PackedB::pack_rows_bits`]: each pair of rows (`stride` apart in `src`,
/// `cols` `bf16` values each) interleaved into row `p` of the tiles of
/// depth block `kb`.
fn pack_b_rows_bits(src: &[u16], depth: usize, stride: usize, cols: usize, kblocks: usize, data: &mut [u16]) {
    for d2 in 0..depth.div_ceil(2) {
        let (kb, p) = (d2 / 16, d2 % 16);
        let even = &src[2 * d2 * stride..2 * d2 * stride + cols];
        let odd = (2 * d2 + 1 < depth).then(|| &src[(2 * d2 + 1) * stride..(2 * d2 + 1) * stride + cols]);
        for (g, e) in even.chunks(16).enumerate() {
            let at = (g * kblocks + kb) * TILE + p * 32;
            let dst = &mut data[at..at + 2 * e.len()];
            match odd {
                Some(o) => {
                    for ((d, &a), &b) in dst.chunks_exact_mut(2).zip(e).zip(&o[g * 16..]) {
                        d[0] = a;
                        d[1] = b;
                    }
                }
                None => {
                    for (d, &a) in dst.chunks_exact_mut(2).zip(e) {
                        d[0] = a;
                    }
                }
            }
        }
    }
}
}

wide_fn! {
/// [`PackedB::pack_rows`]: each pair of rows of `src` (`cols` values each)
/// interleaved into row `p` of the tiles of depth block `kb`.
fn pack_b_rows(src: &[f32], cols: usize, kblocks: usize, data: &mut [u16]) {
    for (d2, rows) in src.chunks(2 * cols).enumerate() {
        let (kb, p) = (d2 / 16, d2 % 16);
        let (even, odd) = rows.split_at(cols);
        for (g, e) in even.chunks(16).enumerate() {
            let at = (g * kblocks + kb) * TILE + p * 32;
            let dst = &mut data[at..at + 2 * e.len()];
            match odd.get(g * 16..g * 16 + e.len()) {
                Some(o) => {
                    for ((d, &a), &b) in dst.chunks_exact_mut(2).zip(e).zip(o) {
                        d[0] = to_bf16(a);
                        d[1] = to_bf16(b);
                    }
                }
                None => {
                    for (d, &a) in dst.chunks_exact_mut(2).zip(e) {
                        d[0] = to_bf16(a);
                    }
                }
            }
        }
    }
}
}

/// A packer of one whole 16-row group with AVX-512: rows, depth, depth
/// blocks, the group's tiles.
type WideGroup<T> = unsafe fn(*const T, usize, usize, *mut u16);

/// [`pack_group_avx512`] where it exists.
fn wide_group_f32() -> Option<WideGroup<f32>> {
    #[cfg(target_arch = "x86_64")]
    return Some(pack_group_avx512);
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// [`pack_group_bits_avx512`] where it exists.
fn wide_group_bits() -> Option<WideGroup<u16>> {
    #[cfg(target_arch = "x86_64")]
    return Some(pack_group_bits_avx512);
    #[cfg(not(target_arch = "x86_64"))]
    None
}

/// One full group of [`PackedB::pack_transposed`]: the 16 rows at `src`
/// (`depth` values each, a multiple of 32) as the group's `kblocks` tiles
/// at `dst`. Each 16 x 32 block of the rows becomes 16 rows of `bf16`
/// pairs (two conversions a row), transposed in registers into the tile.
///
/// # Safety
/// AVX-512 F and BF16; `src` holds 16 rows of `depth`, `dst` `kblocks`
/// tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pack_group_avx512(src: *const f32, depth: usize, kblocks: usize, dst: *mut u16) {
    use std::arch::x86_64::*;
    for kb in 0..kblocks {
        let rows: [__m512; 16] = std::array::from_fn(|j| {
            // SAFETY: row j, depths 32kb..32kb+32, inside `src`.
            let (lo, hi) = unsafe {
                let p = src.add(j * depth + kb * PAD);
                (_mm512_loadu_ps(p), _mm512_loadu_ps(p.add(16)))
            };
            // bf16 of depths 0..16 then 16..32: as 32-bit lanes, the
            // pairs (2p, 2p + 1).
            let pairs: __m512bh = _mm512_cvtne2ps_pbh(hi, lo);
            // SAFETY: both are 512 bits of plain data.
            unsafe { std::mem::transmute::<__m512bh, __m512>(pairs) }
        });
        // SAFETY: tile kb is inside `dst` (the caller).
        unsafe { store_transposed(rows, dst.add(kb * TILE)) };
    }
}

/// [`pack_group_avx512`] for `bf16` rows: each 32-value row segment is
/// already 16 pairs.
///
/// # Safety
/// AVX-512 F; `src` holds 16 rows of `depth`, `dst` `kblocks` tiles.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn pack_group_bits_avx512(src: *const u16, depth: usize, kblocks: usize, dst: *mut u16) {
    use std::arch::x86_64::*;
    for kb in 0..kblocks {
        // SAFETY: row j, depths 32kb..32kb+32 (64 bytes), inside `src`.
        let rows: [__m512; 16] = std::array::from_fn(|j| unsafe {
            _mm512_loadu_ps(src.add(j * depth + kb * PAD).cast())
        });
        // SAFETY: tile kb is inside `dst` (the caller).
        unsafe { store_transposed(rows, dst.add(kb * TILE)) };
    }
}

/// Writes the 16 x 16 transpose of `rows` (32-bit lanes) as one tile at
/// `dst`: row `p` of the tile is lane `p` of every row.
///
/// # Safety
/// AVX-512 F; `dst` holds a tile (512 values).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn store_transposed(rows: [std::arch::x86_64::__m512; 16], dst: *mut u16) {
    for (p, row) in transpose16(rows).iter().enumerate() {
        // SAFETY: row p of the tile, inside `dst`.
        unsafe { std::arch::x86_64::_mm512_storeu_ps(dst.add(p * 32).cast(), *row) };
    }
}

/// The 16 x 16 transpose of 32-bit lanes: `out[i]` lane `j` is `r[j]` lane
/// `i`. Interleaves pairs of rows by element, then by pairs, then by
/// 128-bit lanes twice.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose16(r: [std::arch::x86_64::__m512; 16]) -> [std::arch::x86_64::__m512; 16] {
    use std::arch::x86_64::*;
    let t: [__m512; 16] = std::array::from_fn(|i| {
        let (a, b) = (r[i / 2 * 2], r[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm512_unpacklo_ps(a, b)
        } else {
            _mm512_unpackhi_ps(a, b)
        }
    });
    // Within each group of four rows q: (t0, t2) and (t1, t3).
    let u: [__m512; 16] = std::array::from_fn(|i| {
        let q = i / 4 * 4;
        let (a, b) = match i % 4 {
            0 | 1 => (t[q], t[q + 2]),
            _ => (t[q + 1], t[q + 3]),
        };
        if i % 2 == 0 {
            _mm512_shuffle_ps::<0x44>(a, b)
        } else {
            _mm512_shuffle_ps::<0xee>(a, b)
        }
    });
    // Rows i and i + 4 of each group of eight: 128-bit lanes 0, 2 / 1, 3.
    let v: [__m512; 16] = std::array::from_fn(|i| {
        let h = i / 8 * 8;
        let j = i % 4;
        let (a, b) = (u[h + j], u[h + j + 4]);
        if i % 8 < 4 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    });
    // Rows i and i + 8: lanes 0, 2 / 1, 3 again.
    std::array::from_fn(|i| {
        let j = i % 8;
        let (a, b) = (v[j], v[j + 8]);
        if i < 8 {
            _mm512_shuffle_f32x4::<0x88>(a, b)
        } else {
            _mm512_shuffle_f32x4::<0xdd>(a, b)
        }
    })
}

/// 16-column groups of a packed `B` of `cols` columns: an even number.
pub fn packed_groups(cols: usize) -> usize {
    cols.div_ceil(32) * 2
}

/// Where [`gemm()`] writes: `rows x cols` `f32` values at `ptr`, rows `ld`
/// values apart (a block of columns of a larger row-major matrix).
#[derive(Clone, Copy, Debug)]
pub struct Out {
    /// The first value.
    pub ptr: *mut f32,
    /// Rows: those of `A`.
    pub rows: usize,
    /// Columns: those of `B`.
    pub cols: usize,
    /// Values from one row to the next, at least `cols`.
    pub ld: usize,
}

/// `out (+)= A[.., 32·kb0 ..] · B` with AMX tiles: `B`'s depth of `A`'s,
/// from depth block `kb0` on (all of `A` when `kb0` is 0 and the depths
/// agree). The sums go straight into `out` (tiles past its edges through a
/// scratch tile); `accumulate` adds to what it holds, else overwrites it.
///
/// # Safety
/// `out` must be valid for reads and writes of its `rows x cols` values
/// (reads only of values this call or an earlier one wrote, unless
/// `accumulate`), and no other thread may touch them during the call.
///
/// # Panics
/// If `B` reaches past `A`'s depth, `out` does not have `A`'s rows and
/// `B`'s columns, or when [`engine`] is not [`Engine::Amx`].
pub unsafe fn gemm(a: &PackedA, kb0: usize, b: &PackedB, out: Out, accumulate: bool) {
    assert_eq!(engine(), Engine::Amx, "bf16 gemm: no AMX on this CPU");
    assert!(
        kb0 + b.kblocks <= a.kblocks,
        "bf16 gemm: B is deeper than A"
    );
    assert!(
        out.rows == a.rows && out.cols == b.cols && out.ld >= out.cols,
        "bf16 gemm: the output is not {} x {}",
        a.rows,
        b.cols
    );
    if out.rows == 0 || out.cols == 0 {
        return;
    }
    if b.kblocks == 0 {
        if !accumulate {
            for i in 0..out.rows {
                // SAFETY: row i of `out`, valid for writes (the caller).
                unsafe { std::ptr::write_bytes(out.ptr.add(i * out.ld), 0, out.cols) };
            }
        }
        return;
    }
    let shape = Shape {
        rows_pad: a.rows.div_ceil(PAD) * PAD,
        cols_pad: packed_groups(b.cols) * 16,
        a_kblocks: a.kblocks,
        kb0,
        kblocks: b.kblocks,
    };
    // SAFETY: the engine is AMX; the packed sizes follow from their
    // `rows`/`cols`/`kblocks` (set together by the packers), the depth
    // range was checked against both, and `out` is the caller's.
    unsafe { amx::gemm(&a.data, &b.data, out, shape, accumulate) };
}

/// The sizes of one product of the AMX kernel.
struct Shape {
    /// Rows of `A`, a multiple of 32.
    rows_pad: usize,
    /// Columns of `B`, a multiple of 32.
    cols_pad: usize,
    /// Depth blocks of each row block of `A`.
    a_kblocks: usize,
    /// The first of them multiplied.
    kb0: usize,
    /// Depth blocks multiplied (those of `B`).
    kblocks: usize,
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod amx {
    //! The AMX kernel: 2 x 2 tiles of 16 x 16 `f32` sums per step.

    use super::{Out, Shape, TILE};

    /// Whether the CPU has AMX-TILE and AMX-BF16 (and AVX-512 F, BW, VL and
    /// BF16 for the packing) and Linux grants this process the tile data state
    /// (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), in a build with the `avx512`
    /// feature.
    pub fn available() -> bool {
        use std::arch::x86_64::__cpuid_count;
        if !cfg!(feature = "avx512") || __cpuid_count(0, 0).eax < 7 {
            return false;
        }
        let edx = __cpuid_count(7, 0).edx;
        let (tile, bf16) = (edx & (1 << 24) != 0, edx & (1 << 22) != 0);
        let avx512 = std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("avx512bf16");
        if !(tile && bf16 && avx512) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        rc == 0
    }

    /// The tile configuration: palette 1, tiles 0-7 of 16 rows x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    impl TileConfig {
        fn all_full() -> Self {
            let mut c = [0u8; 64];
            c[0] = 1;
            for t in 0..8 {
                c[16 + 2 * t] = 64;
                c[48 + t] = 16;
            }
            TileConfig(c)
        }
    }

    /// Depth blocks (of 32) per pass: the `A` panel of 32 rows x 256 depths
    /// (16 KiB) stays in L1 while the `B` panels stream past it. On an AMX
    /// Xeon (48 KiB L1) 8 ran the kernel alone faster than 4, 12, 16 or 24,
    /// and as fast as 6 (`cargo bench --bench qlora -- amx_kernel`,
    /// `docs/design-notes.md`).
    const KC: usize = crate::tables::trainer::AMX_PASS_DEPTH_BLOCKS as usize;

    /// Depth blocks done in one pass all the same: a 32-row panel of up to
    /// 512 depths (32 KiB) still fits L1, and one pass needs no round trip
    /// of the sums. The input gradient's products (a weight chunk of 320
    /// depths) ran 1.27x as long cut into two passes.
    const KC_ONE_PASS: usize = crate::tables::trainer::AMX_ONE_PASS_DEPTH_BLOCKS as usize;

    /// A 16 x 16 tile of sums at `(r, c)` of `out`: in place when it lies
    /// inside, else a scratch tile whose inside part is copied.
    struct TileAt {
        ptr: *mut f32,
        /// Bytes from one row to the next.
        stride: usize,
        /// Rows and columns of it inside `out`, when it is a scratch tile.
        part: Option<(usize, usize)>,
        /// Where its inside part lives in `out`.
        at: *mut f32,
    }

    impl TileAt {
        fn new(out: Out, r: usize, c: usize, scratch: *mut f32) -> TileAt {
            let (rows, cols) = (
                out.rows.saturating_sub(r).min(16),
                out.cols.saturating_sub(c).min(16),
            );
            let at = out.ptr.wrapping_add(r * out.ld + c);
            if rows == 16 && cols == 16 {
                TileAt {
                    ptr: at,
                    stride: out.ld * 4,
                    part: None,
                    at,
                }
            } else {
                TileAt {
                    ptr: scratch,
                    stride: 64,
                    part: Some((rows, cols)),
                    at,
                }
            }
        }

        /// Fills the scratch tile from `out` (zeros outside it).
        ///
        /// # Safety
        /// The inside part is readable.
        unsafe fn fetch(&self, ld: usize) {
            if let Some((rows, cols)) = self.part {
                for i in 0..16 {
                    for j in 0..16 {
                        let v = if i < rows && j < cols {
                            // SAFETY: inside `out` (the caller).
                            unsafe { *self.at.add(i * ld + j) }
                        } else {
                            0.0
                        };
                        // SAFETY: the scratch tile has 256 values.
                        unsafe { *self.ptr.add(i * 16 + j) = v };
                    }
                }
            }
        }

        /// Copies the scratch tile's inside part into `out`.
        ///
        /// # Safety
        /// The inside part is writable.
        unsafe fn flush(&self, ld: usize) {
            if let Some((rows, cols)) = self.part {
                for i in 0..rows {
                    for j in 0..cols {
                        // SAFETY: inside `out` and the scratch tile.
                        unsafe { *self.at.add(i * ld + j) = *self.ptr.add(i * 16 + j) };
                    }
                }
            }
        }
    }

    /// One tile of `f32` sums (16 x 16), its rows on cache lines of their
    /// own.
    #[derive(Clone, Copy)]
    #[repr(C, align(64))]
    struct SumTile([f32; 256]);

    /// Loads the four sum tiles `tmm0..tmm3` (row-major `(r, c)`,
    /// `(r, c + 16)`, `(r + 16, c)`, `(r + 16, c + 16)`) from
    /// `(address, bytes from row to row)`.
    ///
    /// # Safety
    /// Tiles configured by [`TileConfig::all_full`]; each address holds 16
    /// rows of 64 bytes at its stride.
    #[inline(always)]
    unsafe fn load_sums(at: [(*mut f32, usize); 4]) {
        // SAFETY: the caller's.
        unsafe {
            core::arch::asm!(
                "tileloadd tmm0, [{c00} + {s00} * 1]",
                "tileloadd tmm1, [{c01} + {s01} * 1]",
                c00 = in(reg) at[0].0, s00 = in(reg) at[0].1,
                c01 = in(reg) at[1].0, s01 = in(reg) at[1].1,
                options(nostack, readonly),
            );
            core::arch::asm!(
                "tileloadd tmm2, [{c10} + {s10} * 1]",
                "tileloadd tmm3, [{c11} + {s11} * 1]",
                c10 = in(reg) at[2].0, s10 = in(reg) at[2].1,
                c11 = in(reg) at[3].0, s11 = in(reg) at[3].1,
                options(nostack, readonly),
            );
        }
    }

    /// Stores the sum tiles where [`load_sums`] loads them.
    ///
    /// # Safety
    /// As [`load_sums`], the 16 rows writable.
    #[inline(always)]
    unsafe fn store_sums(at: [(*mut f32, usize); 4]) {
        // SAFETY: the caller's.
        unsafe {
            core::arch::asm!(
                "tilestored [{c00} + {s00} * 1], tmm0",
                "tilestored [{c01} + {s01} * 1], tmm1",
                c00 = in(reg) at[0].0, s00 = in(reg) at[0].1,
                c01 = in(reg) at[1].0, s01 = in(reg) at[1].1,
                options(nostack),
            );
            core::arch::asm!(
                "tilestored [{c10} + {s10} * 1], tmm2",
                "tilestored [{c11} + {s11} * 1], tmm3",
                c10 = in(reg) at[2].0, s10 = in(reg) at[2].1,
                c11 = in(reg) at[3].0, s11 = in(reg) at[3].1,
                options(nostack),
            );
        }
    }

    /// See [`super::gemm`].
    ///
    /// # Safety
    /// The process has the tile permission; `a` holds `rows_pad / 16`
    /// row blocks of `a_kblocks` tiles, `b` `cols_pad / 16` groups of
    /// `kblocks` tiles, `kb0 + kblocks <= a_kblocks`; `out` as
    /// [`super::gemm`] asks, with `out.rows <= rows_pad` and `out.cols <=
    /// cols_pad`.
    pub unsafe fn gemm(a: &[u16], b: &[u16], out: Out, shape: Shape, accumulate: bool) {
        let Shape {
            rows_pad,
            cols_pad,
            a_kblocks,
            kb0,
            kblocks,
        } = shape;
        assert!(kb0 + kblocks <= a_kblocks && rows_pad % 32 == 0 && cols_pad % 32 == 0);
        assert!(
            a.len() >= rows_pad / 16 * a_kblocks * TILE
                && b.len() >= cols_pad / 16 * kblocks * TILE
        );
        assert!(out.rows <= rows_pad && out.cols <= cols_pad);
        let cfg = TileConfig::all_full();
        let mut scratch = [SumTile([0.0; 256]); 4];
        let sp: *mut f32 = scratch.as_mut_ptr().cast();
        let groups = cols_pad / 16;
        let passes = if kblocks <= KC_ONE_PASS {
            1
        } else {
            kblocks.div_ceil(KC)
        };
        // Sums between depth passes, for the 32 rows in hand: one 1 KiB
        // tile per (row block, column group), each contiguous. Kept in
        // `out` instead, they came back from rows `ld` apart, which for a
        // 2048-wide output all fall in one L1 set: the kernel alone ran
        // 1.45x as long (`cargo bench --bench qlora -- amx_kernel`).
        // Written by `tilestored` before any `tileloadd` reads it, so left
        // uninitialised (only the pointer is used).
        let mut panel = Vec::<SumTile>::with_capacity(if passes > 1 { 2 * groups } else { 0 });
        let pp: *mut f32 = panel.as_mut_ptr().cast();
        // SAFETY: `cfg` is a valid palette-1 configuration; the caller
        // guarantees the permission.
        unsafe { core::arch::asm!("ldtilecfg [{0}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        for r in (0..rows_pad).step_by(32) {
            for pass in 0..passes {
                // Passes of equal depth (to a block): a short last pass
                // would pay a round trip of the sums for little work.
                let k0 = pass * kblocks / passes;
                let kn = (pass + 1) * kblocks / passes - k0;
                let (first, last) = (pass == 0, pass + 1 == passes);
                let a0 = a[((r / 16) * a_kblocks + kb0 + k0) * TILE..].as_ptr();
                let a1 = a[((r / 16 + 1) * a_kblocks + kb0 + k0) * TILE..].as_ptr();
                for g in (0..groups).step_by(2) {
                    let b0 = b[(g * kblocks + k0) * TILE..].as_ptr();
                    let b1 = b[((g + 1) * kblocks + k0) * TILE..].as_ptr();
                    let (c, l) = (g * 16, out.ld);
                    let t = [
                        TileAt::new(out, r, c, sp),
                        TileAt::new(out, r, c + 16, sp.wrapping_add(256)),
                        TileAt::new(out, r + 16, c, sp.wrapping_add(512)),
                        TileAt::new(out, r + 16, c + 16, sp.wrapping_add(768)),
                    ];
                    let at_out = t.each_ref().map(|t| (t.ptr, t.stride));
                    let at_panel = [(0, g), (0, g + 1), (1, g), (1, g + 1)]
                        .map(|(i, j)| (pp.wrapping_add((i * groups + j) * 256), 64));
                    // SAFETY: every tile lies inside its buffer: A blocks
                    // (r/16, k0..k0+kn) and (r/16+1, ..), B blocks of groups
                    // g, g+1 (asserted lengths), the panel's tiles (when
                    // there are several passes: 2 x `groups` tiles); the
                    // sum tiles are inside `out` or scratch tiles
                    // (`TileAt`), and `out`'s values are read only after
                    // this call wrote them or when `accumulate` (the
                    // caller's guarantee).
                    unsafe {
                        if !first {
                            load_sums(at_panel);
                        } else if accumulate {
                            t.iter().for_each(|t| t.fetch(l));
                            load_sums(at_out);
                        } else {
                            core::arch::asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                options(nostack, nomem),
                            );
                        }
                        core::arch::asm!(
                            "2:",
                            "tileloadd tmm4, [{a0} + {s64} * 1]",
                            "tileloadd tmm6, [{b0} + {s64} * 1]",
                            "tileloadd tmm5, [{a1} + {s64} * 1]",
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tileloadd tmm7, [{b1} + {s64} * 1]",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            "add {a0}, 1024",
                            "add {a1}, 1024",
                            "add {b0}, 1024",
                            "add {b1}, 1024",
                            "dec {n}",
                            "jnz 2b",
                            a0 = inout(reg) a0 => _,
                            a1 = inout(reg) a1 => _,
                            b0 = inout(reg) b0 => _,
                            b1 = inout(reg) b1 => _,
                            s64 = in(reg) 64usize,
                            n = inout(reg) kn => _,
                            options(nostack, readonly),
                        );
                        if last {
                            store_sums(at_out);
                            t.iter().for_each(|t| t.flush(l));
                        } else {
                            store_sums(at_panel);
                        }
                    }
                }
            }
        }
        // SAFETY: gives the tile state back; no tile is used after this.
        unsafe { core::arch::asm!("tilerelease", options(nostack, nomem)) };
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
mod amx {
    //! No AMX off x86-64 Linux.

    pub fn available() -> bool {
        false
    }

    pub unsafe fn gemm(_: &[u16], _: &[u16], _: super::Out, _: super::Shape, _: bool) {
        unreachable!("bf16 gemm: no AMX on this platform (engine() is Emulated)")
    }
}

#[cfg(test)]
mod tests {
    use super::super::kernel::tests::data;
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to even.
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        // The largest finite f32 rounds up to infinity, as bf16 has it.
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
    }

    /// `A · B` of the rounded operands in `f64`.
    fn reference(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let r = |x: f32| f64::from(from_bf16(to_bf16(x)));
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for d in 0..k {
                let av = r(a[i * k + d]);
                for j in 0..n {
                    out[i * n + j] += av * r(b[d * n + j]);
                }
            }
        }
        out
    }

    #[test]
    fn amx_matches_the_rounded_product_on_odd_shapes() {
        if engine() != Engine::Amx {
            eprintln!("skipped: this CPU has no AMX (the emulated engine is tested in kernel.rs)");
            return;
        }
        // Depths over one pass of 512 (several passes), odd everything.
        for &(m, k, n) in &[
            (1, 32, 16),
            (33, 70, 47),
            (64, 96, 64),
            (17, 31, 3),
            (5, 0, 9),
            (40, 1100, 70),
            (96, 520, 40),
        ] {
            let a = data(m * k, 1);
            let bt = data(n * k, 2);
            let b: Vec<f32> = (0..k * n).map(|i| bt[(i % n) * k + i / n]).collect();
            let mut pa = PackedA::default();
            pa.pack(&a, m, k, k, true);
            let want = reference(&a, &b, m, k, n);
            let mut by_rows = PackedB::default();
            by_rows.pack_rows(&b, k, n);
            let mut by_cols = PackedB::default();
            by_cols.pack_transposed(&bt, n, k);
            assert_eq!(by_rows.data, by_cols.data, "the two B packers agree");
            // Columns 2..2 + n of rows n + 5 wide, the rest left alone.
            let cp = n + 5;
            for accumulate in [false, true] {
                let mut c = vec![if accumulate { 1.0f32 } else { f32::NAN }; m * cp];
                let out = Out {
                    ptr: c.as_mut_ptr().wrapping_add(2),
                    rows: m,
                    cols: n,
                    ld: cp,
                };
                if m > 0 {
                    assert!(2 + (m - 1) * cp + n <= c.len());
                }
                // SAFETY: `out` lies inside `c`.
                unsafe { gemm(&pa, 0, &by_rows, out, accumulate) };
                let base = if accumulate { 1.0 } else { 0.0 };
                for i in 0..m {
                    for (j, &v) in c[i * cp..(i + 1) * cp].iter().enumerate() {
                        if !(2..2 + n).contains(&j) {
                            let untouched = if accumulate { v == 1.0 } else { v.is_nan() };
                            assert!(untouched, "({i}, {j}) outside the output: {v}");
                            continue;
                        }
                        let (g, w) = (f64::from(v), want[i * n + j - 2]);
                        assert!(
                            (g - base - w).abs() < 1e-5 * (1.0 + w.abs()),
                            "{m}x{k}x{n} ({i}, {j}): {g} vs {}",
                            w + base
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_b_packers_agree() {
        // Whole groups and depth blocks (the AVX-512 path on AMX CPUs).
        let (depth, cols) = (96, 48);
        let b = data(depth * cols, 4);
        let bt: Vec<f32> = (0..cols * depth)
            .map(|i| b[(i % depth) * cols + i / depth])
            .collect();
        let (mut by_rows, mut by_cols) = (PackedB::default(), PackedB::default());
        by_rows.pack_rows(&b, depth, cols);
        by_cols.pack_transposed(&bt, cols, depth);
        assert!(by_rows.data == by_cols.data);
        // From bf16 bits: the same tiles.
        let bits = |v: &[f32]| v.iter().map(|&x| to_bf16(x)).collect::<Vec<u16>>();
        let mut from_bits = PackedB::default();
        from_bits.pack_transposed_bits(&bits(&bt), cols, depth);
        assert!(from_bits.data == by_rows.data);
        from_bits.pack_rows_bits(&bits(&b), depth, cols, cols);
        assert!(from_bits.data == by_rows.data);
        // Partial ones.
        let (depth, cols) = (70, 37);
        let b = data(depth * cols, 3);
        let bt: Vec<f32> = (0..cols * depth)
            .map(|i| b[(i % depth) * cols + i / depth])
            .collect();
        let mut by_rows = PackedB::default();
        by_rows.pack_rows(&b, depth, cols);
        let mut by_cols = PackedB::default();
        by_cols.pack_transposed(&bt, cols, depth);
        assert_eq!(by_rows.data, by_cols.data);
        let bits = |v: &[f32]| v.iter().map(|&x| to_bf16(x)).collect::<Vec<u16>>();
        let mut from_bits = PackedB::default();
        from_bits.pack_transposed_bits(&bits(&bt), cols, depth);
        assert_eq!(from_bits.data, by_rows.data);
        // Rows read in place from a wider matrix: columns 3..3 + cols of
        // rows `cols + 5` wide.
        let wide: Vec<u16> = (0..depth)
            .flat_map(|d| {
                let mut r = vec![7u16; 3];
                r.extend(bits(&b[d * cols..(d + 1) * cols]));
                r.extend([9u16; 2]);
                r
            })
            .collect();
        from_bits.pack_rows_bits(&wide[3..], depth, cols + 5, cols);
        assert_eq!(from_bits.data, by_rows.data);
        // Element (d, c) where the tiles read it.
        let kblocks = depth.div_ceil(PAD);
        for (d, c) in [(0, 0), (1, 0), (33, 17), (69, 36)] {
            let at =
                ((c / 16 * kblocks + d / PAD) * 16 + (d % PAD) / 2) * 32 + (c % 16) * 2 + d % 2;
            assert_eq!(by_rows.data[at], to_bf16(b[d * cols + c]), "({d}, {c})");
        }
    }
}
