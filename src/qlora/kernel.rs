//! CPU kernels of the frozen matmul: `y = x · Wᵀ` and its input gradient
//! `dx = dy · W`, for a dense `f32` or an NF4 weight, in `f32`.
//!
//! Candle's own path (dequantize the whole weight, then one `matmul`) has two
//! costs this module avoids:
//! - the dequantized weight is a full `f32` copy (98 MiB for a 32k x 768
//!   head) written to fresh pages and then read back from memory;
//! - its multi-threaded GEMM splits each product between the threads with a
//!   synchronisation per block.
//!
//! Here the threads split the output into contiguous column ranges (the
//! weight's rows for `y`, its columns for `dx`), and each thread dequantizes
//! its part of the weight a chunk of about [`CHUNK_BYTES`] at a time into a
//! scratch buffer it reuses, then multiplies it with a single-threaded GEMM
//! (the `gemm` crate, the kernel Candle itself uses). Nothing is shared
//! between threads but the read-only inputs; each writes its own columns.
//!
//! The sums are the same products in another order, so results equal
//! Candle's to `f32` rounding (tests compare both).

use std::borrow::Cow;
use std::cell::RefCell;
use std::ops::Range;

use gemm::{Parallelism, gemm};
use rayon::prelude::*;

use half::slice::HalfFloatSliceExt;

use super::bf16_gemm::{self, CpuMatmul, Engine};
use super::buf;
use super::nf4::{NF4_BLOCK, Nf4Tensor};

/// Bytes of dequantized weight a thread holds at once: small enough to stay
/// in a core's L2 cache while the GEMM reads it.
pub const CHUNK_BYTES: usize = 512 << 10;

/// A frozen `(n, k)` row-major weight the kernels can read.
#[derive(Debug, Clone, Copy)]
pub enum WeightRef<'a> {
    /// Dense `f32`, read in place.
    Dense(&'a [f32]),
    /// NF4 (with or without double quantization), dequantized chunk by
    /// chunk. Needs `k` to be a multiple of [`NF4_BLOCK`], so that every
    /// row starts a block.
    Nf4(&'a Nf4Tensor),
    /// Dense `bf16` (a 16-bit embedding or head), widened chunk by chunk.
    Bf16(&'a [half::bf16]),
    /// Dense `f16`, widened chunk by chunk.
    F16(&'a [half::f16]),
}

impl WeightRef<'_> {
    /// Whether the kernels can multiply by this `(n, k)` weight.
    pub fn supported(&self, n: usize, k: usize) -> bool {
        match self {
            WeightRef::Dense(w) => w.len() == n * k,
            WeightRef::Bf16(w) => w.len() == n * k,
            WeightRef::F16(w) => w.len() == n * k,
            WeightRef::Nf4(q) => q.shape() == [n, k] && k.is_multiple_of(NF4_BLOCK),
        }
    }

    /// Writes the weight's values `offset..offset + dst.len()` (row-major)
    /// into `dst` as `f32`. For NF4, `offset` and the length are whole
    /// blocks (the kernels only ask for whole rows or block-aligned parts).
    fn widen_into(&self, offset: usize, dst: &mut [f32]) {
        let end = offset + dst.len();
        match self {
            WeightRef::Dense(w) => dst.copy_from_slice(&w[offset..end]),
            WeightRef::Bf16(w) => dst
                .iter_mut()
                .zip(&w[offset..end])
                .for_each(|(d, s)| *d = s.to_f32()),
            WeightRef::F16(w) => dst
                .iter_mut()
                .zip(&w[offset..end])
                .for_each(|(d, s)| *d = s.to_f32()),
            WeightRef::Nf4(q) => q.dequantize_blocks_into(offset / NF4_BLOCK, dst),
        }
    }
}

/// The output buffer, written by several threads at disjoint columns.
#[derive(Clone, Copy)]
struct SharedOut {
    ptr: *mut f32,
    len: usize,
}

impl SharedOut {
    /// The buffer's pointer and length, for the tasks of one `for_each`.
    fn of(out: &mut [f32]) -> SharedOut {
        SharedOut {
            ptr: out.as_mut_ptr(),
            len: out.len(),
        }
    }

    /// The first `len` values of `v`'s capacity, not yet initialised: the
    /// caller must write every one of them before `set_len`.
    fn of_uninit(v: &mut Vec<f32>, len: usize) -> SharedOut {
        SharedOut {
            ptr: v.spare_capacity_mut()[..len].as_mut_ptr().cast(),
            len,
        }
    }

    /// The pointer to element `offset` (not dereferenced here).
    fn at(self, offset: usize) -> *mut f32 {
        self.ptr.wrapping_add(offset)
    }
}

// SAFETY: `SharedOut` is only handed to the tasks of one `for_each` below,
// each of which writes a column range no other task writes, and the buffer
// outlives the `for_each` (it is borrowed mutably for its whole duration).
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// A strided `rows x cols` view: element `(i, j)` at `offset + i*rs + j*cs`.
#[derive(Clone, Copy)]
struct View {
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl View {
    /// `Wᵀ[.., rows]` of a row-major `W` with rows of `k` values, starting at
    /// `offset`: `(k x rows)`, element `(i, j)` at `offset + j*k + i`.
    fn transposed(offset: usize, k: usize, rows: usize) -> View {
        View {
            offset,
            rows: k,
            cols: rows,
            rs: 1,
            cs: k,
        }
    }

    fn row_major(offset: usize, rows: usize, cols: usize, rs: usize) -> View {
        View {
            offset,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// Whether every element lies inside a buffer of `len`.
    fn fits(&self, len: usize) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return self.offset <= len;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|a| (self.cols - 1).checked_mul(self.cs).map(|b| (a, b)))
            .and_then(|(a, b)| a.checked_add(b))
            .and_then(|d| d.checked_add(self.offset));
        last.is_some_and(|l| l < len)
    }
}

/// `dst = lhs · rhs` (or `dst += lhs · rhs` when `accumulate`), one thread.
///
/// # Panics
/// If the shapes disagree or a view reaches outside its buffer (a bug in
/// this module, never bad input: the public functions check their inputs).
fn sgemm(dst: SharedOut, d: View, accumulate: bool, lhs: &[f32], l: View, rhs: &[f32], r: View) {
    assert!(
        d.rows == l.rows && d.cols == r.cols && l.cols == r.rows,
        "sgemm: shapes ({}x{}) = ({}x{}) . ({}x{})",
        d.rows,
        d.cols,
        l.rows,
        l.cols,
        r.rows,
        r.cols
    );
    assert!(
        d.fits(dst.len) && l.fits(lhs.len()) && r.fits(rhs.len()),
        "sgemm: view out of bounds"
    );
    if d.rows == 0 || d.cols == 0 {
        return;
    }
    let stride = |s: usize| isize::try_from(s).expect("stride fits isize");
    // SAFETY: every element each view addresses lies inside its buffer
    // (checked above); `lhs` and `rhs` are shared borrows that gemm only
    // reads; `dst` is valid for writes at `d` and, by the callers' split, no
    // other thread touches those elements during this call.
    unsafe {
        gemm(
            d.rows,
            d.cols,
            l.cols,
            dst.ptr.add(d.offset),
            stride(d.cs),
            stride(d.rs),
            accumulate,
            lhs.as_ptr().add(l.offset),
            stride(l.cs),
            stride(l.rs),
            rhs.as_ptr().add(r.offset),
            stride(r.cs),
            stride(r.rs),
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            Parallelism::None,
        );
    }
}

/// A thread's buffer for the AMX products: a packed weight chunk.
#[derive(Default)]
struct AmxBuffers {
    b: bf16_gemm::PackedB,
}

thread_local! {
    /// Each thread's dequantization buffer, reused across calls.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
    /// Each thread's AMX buffers, reused across calls.
    static AMX: RefCell<AmxBuffers> = RefCell::new(AmxBuffers::default());
}

/// Runs `f` with this thread's AMX buffers.
fn with_amx<R>(f: impl FnOnce(&mut AmxBuffers) -> R) -> R {
    AMX.with(|cell| f(&mut cell.borrow_mut()))
}

/// Runs `f` with this thread's scratch buffer of at least `len` values.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|cell| {
        let mut buf = cell.borrow_mut();
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        f(&mut buf[..len])
    })
}

/// Splits `0..len` into at most `parts` contiguous ranges, each a multiple
/// of `align` long but the last.
fn split(len: usize, parts: usize, align: usize) -> Vec<Range<usize>> {
    let per = len.div_ceil(parts.max(1)).div_ceil(align) * align;
    (0..len)
        .step_by(per.max(1))
        .map(|s| s..(s + per).min(len))
        .collect()
}

/// The environment variable that sizes Candle's element-wise thread pool.
pub const CANDLE_THREADS_VAR: &str = "CANDLE_NUM_THREADS";

/// Gives Candle's element-wise ops `trainer.candle_elementwise_threads`
/// threads (`tables/defaults.toml`) unless [`CANDLE_THREADS_VAR`] is set.
///
/// Candle 0.11 runs its large element-wise ops on a pool of its own whose
/// workers spin for a while after each op, waiting for the next. The
/// frozen matmuls of this module run on rayon's threads, so on a CPU with
/// few cores the spinning workers take the cores the matmuls need, and the
/// calling thread spins in turn when a worker it waits for is off its core
/// (`docs/design-notes.md`, "Where a step's time goes"). With one thread
/// Candle starts no worker and runs those ops on the calling thread.
///
/// Returns the value Candle will read. Has no effect once Candle has
/// started its pool (its first large element-wise op).
///
/// # Safety
/// Sets an environment variable: call it before the process starts a
/// second thread (first thing in `main`), as [`std::env::set_var`] requires.
pub unsafe fn limit_candle_threads() -> String {
    if let Some(v) = std::env::var_os(CANDLE_THREADS_VAR) {
        return v.to_string_lossy().into_owned();
    }
    let n = crate::tables::trainer::CANDLE_ELEMENTWISE_THREADS.to_string();
    // SAFETY: the caller guarantees no other thread runs yet.
    unsafe { std::env::set_var(CANDLE_THREADS_VAR, &n) };
    n
}

/// Threads to use: rayon's pool size.
fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// Rows of the weight per chunk when `cols` of each are dequantized.
fn chunk_rows(cols: usize) -> usize {
    (CHUNK_BYTES / 4 / cols.max(1)).max(16)
}

/// Checks the operands of a product with an `(n, k)` weight.
fn check(what: &str, x_len: usize, m: usize, width: usize, w: &WeightRef, n: usize, k: usize) {
    assert!(
        w.supported(n, k),
        "{what}: weight is not a supported ({n}, {k}) matrix"
    );
    assert_eq!(x_len, m * width, "{what}: input is not {m} x {width}");
}

/// `x` as the products read it: itself in `f32`, rounded to `bf16` values
/// for the emulated `bf16` engine.
fn operand(x: &[f32], prec: CpuMatmul) -> Cow<'_, [f32]> {
    match prec {
        CpuMatmul::F32 => Cow::Borrowed(x),
        CpuMatmul::Bf16 => {
            let mut v = x.to_vec();
            bf16_gemm::round_in_place(&mut v);
            Cow::Owned(v)
        }
    }
}

/// Rows of a weight chunk for the `bf16` products: [`chunk_rows`] rounded
/// down to whole 32-deep blocks.
fn chunk_rows_bf16(cols: usize) -> usize {
    (chunk_rows(cols) / bf16_gemm::PAD * bf16_gemm::PAD).max(bf16_gemm::PAD)
}

/// `y = x · Wᵀ` for `x` of `m x k` (row-major) and `W` of `n x k`: `m x n`,
/// with `prec`'s products ([`CpuMatmul`]).
///
/// # Panics
/// If `x` is not `m x k` or `w` is not a supported `n x k` weight
/// ([`WeightRef::supported`]).
pub fn matmul_wt(
    x: &[f32],
    m: usize,
    w: WeightRef,
    n: usize,
    k: usize,
    prec: CpuMatmul,
) -> Vec<f32> {
    matmul_wt_on(x, m, w, n, k, prec, bf16_gemm::engine())
}

/// [`matmul_wt`] with `bf16` products on `engine` (`Amx` only where
/// [`bf16_gemm::engine`] says so).
fn matmul_wt_on(
    x: &[f32],
    m: usize,
    w: WeightRef,
    n: usize,
    k: usize,
    prec: CpuMatmul,
    engine: Engine,
) -> Vec<f32> {
    check("frozen matmul", x.len(), m, k, &w, n, k);
    if prec == CpuMatmul::Bf16 && engine == Engine::Amx {
        let mut out = Vec::with_capacity(m * n);
        matmul_wt_amx(x, m, w, n, k, SharedOut::of_uninit(&mut out, m * n));
        // SAFETY: the threads' column ranges cover all `n` columns, and
        // each writes every row of its columns.
        unsafe { out.set_len(m * n) };
        return out;
    }
    let mut out = buf::zeroed::<f32>(m * n);
    let x = operand(x, prec);
    let x = &x[..];
    let dst = SharedOut::of(&mut out);
    let x_view = View::row_major(0, m, k, k);
    split(n, threads(), 16)
        .into_par_iter()
        .for_each(|cols| match w {
            WeightRef::Dense(wd) if prec == CpuMatmul::F32 => {
                let r = View::transposed(cols.start * k, k, cols.len());
                let d = View::row_major(cols.start, m, cols.len(), n);
                sgemm(dst, d, false, x, x_view, wd, r);
            }
            _ => {
                let rows = chunk_rows(k);
                with_scratch(rows * k, |buf| {
                    for start in cols.clone().step_by(rows) {
                        let end = (start + rows).min(cols.end);
                        let chunk = &mut buf[..(end - start) * k];
                        w.widen_into(start * k, chunk);
                        if prec == CpuMatmul::Bf16 {
                            bf16_gemm::round_in_place(chunk);
                        }
                        let r = View::transposed(0, k, end - start);
                        let d = View::row_major(start, m, end - start, n);
                        sgemm(dst, d, false, x, x_view, chunk, r);
                    }
                });
            }
        });
    out
}

/// [`matmul_wt`] on AMX: `x` packed once as the left operand; each thread
/// dequantizes its chunks of weight rows, packs them as the right operand
/// (`Wᵀ`) and sums each chunk straight into its columns of `y`.
fn matmul_wt_amx(x: &[f32], m: usize, w: WeightRef, n: usize, k: usize, dst: SharedOut) {
    let mut xa = bf16_gemm::PackedA::default();
    xa.pack(x, m, k, k, true);
    split(n, threads(), bf16_gemm::PAD)
        .into_par_iter()
        .for_each(|cols| {
            let rows = chunk_rows_bf16(k);
            with_scratch(rows * k, |buf| {
                with_amx(|amx| {
                    for start in cols.clone().step_by(rows) {
                        let end = (start + rows).min(cols.end);
                        if let WeightRef::Bf16(wb) = w {
                            let bits = wb[start * k..end * k].reinterpret_cast();
                            amx.b.pack_transposed_bits(bits, end - start, k);
                        } else {
                            let chunk = &mut buf[..(end - start) * k];
                            w.widen_into(start * k, chunk);
                            amx.b.pack_transposed(chunk, end - start, k);
                        }
                        let out = bf16_gemm::Out {
                            ptr: dst.at(start),
                            rows: m,
                            cols: end - start,
                            ld: n,
                        };
                        // SAFETY: columns start..end of the m x n output,
                        // which only this task touches; the product writes
                        // them before it reads them (no accumulation).
                        unsafe { bf16_gemm::gemm(&xa, 0, &amx.b, out, false) };
                    }
                });
            });
        });
}

/// [`matmul_w`] on AMX: `dy` packed once as the left operand; each thread
/// sums its output columns of `dx` over chunks of weight rows (packed as
/// the right operand), in place.
fn matmul_w_amx(dy: &[f32], m: usize, w: WeightRef, n: usize, k: usize, dst: SharedOut) {
    let mut dya = bf16_gemm::PackedA::default();
    dya.pack(dy, m, n, n, true);
    split(k, threads(), NF4_BLOCK)
        .into_par_iter()
        .for_each(|cols| {
            let width = cols.len();
            let rows = chunk_rows_bf16(width);
            with_scratch(rows * width, |buf| {
                with_amx(|amx| {
                    for start in (0..n).step_by(rows) {
                        let end = (start + rows).min(n);
                        if let WeightRef::Bf16(wb) = w {
                            // W[start..end, cols], read in place.
                            let bits = wb[start * k + cols.start..].reinterpret_cast();
                            amx.b.pack_rows_bits(bits, end - start, k, width);
                        } else {
                            let chunk = &mut buf[..(end - start) * width];
                            // W[start..end, cols] (for NF4 whole blocks, as
                            // in the f32 path).
                            for (i, row) in chunk.chunks_exact_mut(width).enumerate() {
                                w.widen_into((start + i) * k + cols.start, row);
                            }
                            amx.b.pack_rows(chunk, end - start, width);
                        }
                        // `start` is a multiple of `rows`, itself of 32.
                        let kb0 = start / bf16_gemm::PAD;
                        let out = bf16_gemm::Out {
                            ptr: dst.at(cols.start),
                            rows: m,
                            cols: width,
                            ld: k,
                        };
                        // SAFETY: columns `cols` of the m x k output, which
                        // only this task touches; the first chunk writes
                        // them, the later ones add to them.
                        unsafe { bf16_gemm::gemm(&dya, kb0, &amx.b, out, start > 0) };
                    }
                });
            });
        });
}

/// `dx = dy · W` for `dy` of `m x n` (row-major) and `W` of `n x k`: `m x k`,
/// the input gradient of [`matmul_wt`], with `prec`'s products.
///
/// # Panics
/// If `dy` is not `m x n` or `w` is not a supported `n x k` weight.
pub fn matmul_w(
    dy: &[f32],
    m: usize,
    w: WeightRef,
    n: usize,
    k: usize,
    prec: CpuMatmul,
) -> Vec<f32> {
    matmul_w_on(dy, m, w, n, k, prec, bf16_gemm::engine())
}

/// [`matmul_w`] with `bf16` products on `engine`.
fn matmul_w_on(
    dy: &[f32],
    m: usize,
    w: WeightRef,
    n: usize,
    k: usize,
    prec: CpuMatmul,
    engine: Engine,
) -> Vec<f32> {
    check("frozen matmul backward", dy.len(), m, n, &w, n, k);
    if prec == CpuMatmul::Bf16 && engine == Engine::Amx && n > 0 {
        let mut out = Vec::with_capacity(m * k);
        matmul_w_amx(dy, m, w, n, k, SharedOut::of_uninit(&mut out, m * k));
        // SAFETY: the threads' column ranges cover all `k` columns, and
        // each writes every row of its columns (`n > 0`: at least one
        // chunk of sums).
        unsafe { out.set_len(m * k) };
        return out;
    }
    let mut out = buf::zeroed::<f32>(m * k);
    let dy = operand(dy, prec);
    let dy = &dy[..];
    let dst = SharedOut::of(&mut out);
    split(k, threads(), NF4_BLOCK)
        .into_par_iter()
        .for_each(|cols| match w {
            WeightRef::Dense(wd) if prec == CpuMatmul::F32 => {
                let l = View::row_major(0, m, n, n);
                let r = View::row_major(cols.start, n, cols.len(), k);
                let d = View::row_major(cols.start, m, cols.len(), k);
                sgemm(dst, d, false, dy, l, wd, r);
            }
            _ => {
                let width = cols.len();
                let rows = chunk_rows(width);
                with_scratch(rows * width, |buf| {
                    for start in (0..n).step_by(rows) {
                        let end = (start + rows).min(n);
                        let chunk = &mut buf[..(end - start) * width];
                        // W[start..end, cols], one row segment at a time
                        // (for NF4, whole blocks: `cols` is block-aligned
                        // and `k` a multiple of the block).
                        for (i, row) in chunk.chunks_exact_mut(width).enumerate() {
                            w.widen_into((start + i) * k + cols.start, row);
                        }
                        if prec == CpuMatmul::Bf16 {
                            bf16_gemm::round_in_place(chunk);
                        }
                        let l = View::row_major(start, m, end - start, n);
                        let r = View::row_major(0, end - start, width, width);
                        let d = View::row_major(cols.start, m, width, k);
                        sgemm(dst, d, start > 0, dy, l, chunk, r);
                    }
                });
            }
        });
    out
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use CpuMatmul::F32;

    /// `len` values in `[-0.5, 0.5)`, a fixed function of `seed`.
    pub(in crate::qlora) fn data(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2_654_435_761) ^ seed) as f32 / u32::MAX as f32 - 0.5)
            .collect()
    }

    /// `a · b` in f64 for `a` of `m x t` and `b` of `t x n`, each read
    /// through an index function `(row, col) -> f32`.
    fn product(
        (m, t, n): (usize, usize, usize),
        a: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize, usize) -> f32,
    ) -> Vec<f64> {
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..t)
                    .map(|p| f64::from(a(i, p)) * f64::from(b(p, j)))
                    .sum();
            }
        }
        out
    }

    /// `x · Wᵀ` and `dy · W` in f64, the obvious way.
    fn reference(
        x: &[f32],
        dy: &[f32],
        m: usize,
        w: &[f32],
        n: usize,
        k: usize,
    ) -> (Vec<f64>, Vec<f64>) {
        let y = product((m, k, n), |i, t| x[i * k + t], |t, j| w[j * k + t]);
        let dx = product((m, n, k), |i, j| dy[i * n + j], |j, t| w[j * k + t]);
        (y, dx)
    }

    fn widen<T: Copy + Into<f32>>(w: &[T]) -> Vec<f32> {
        w.iter().map(|&v| v.into()).collect()
    }

    fn close(got: &[f32], want: &[f64]) {
        assert_eq!(got.len(), want.len());
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(g) - w).abs() <= 1e-4 * (1.0 + w.abs()),
                "element {i}: {g} vs {w}"
            );
        }
    }

    #[test]
    fn dense_16_bit_and_nf4_match_the_reference_on_odd_shapes() {
        // n not a multiple of the thread split's alignment, several NF4
        // chunks (k = 128 gives chunks of 1024 rows), m = 1 and m > 1.
        for &(m, n, k) in &[(1, 5, 64), (3, 1031, 128), (7, 33, 192), (2, 2100, 64)] {
            let (x, dy) = (data(m * k, 1), data(m * n, 7));
            let w = data(n * k, 2);
            let (y, dx) = reference(&x, &dy, m, &w, n, k);
            close(&matmul_wt(&x, m, WeightRef::Dense(&w), n, k, F32), &y);
            close(&matmul_w(&dy, m, WeightRef::Dense(&w), n, k, F32), &dx);
            let w16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let wh: Vec<half::f16> = w.iter().map(|&v| half::f16::from_f32(v)).collect();
            let (yb, dxb) = reference(&x, &dy, m, &widen(&w16), n, k);
            close(&matmul_wt(&x, m, WeightRef::Bf16(&w16), n, k, F32), &yb);
            close(&matmul_w(&dy, m, WeightRef::Bf16(&w16), n, k, F32), &dxb);
            let (yh, dxh) = reference(&x, &dy, m, &widen(&wh), n, k);
            close(&matmul_wt(&x, m, WeightRef::F16(&wh), n, k, F32), &yh);
            close(&matmul_w(&dy, m, WeightRef::F16(&wh), n, k, F32), &dxh);
            for dq in [false, true] {
                let q = Nf4Tensor::quantize(&w, &[n, k], dq).expect("quantize");
                let (yq, dxq) = reference(&x, &dy, m, &q.dequantize(), n, k);
                close(&matmul_wt(&x, m, WeightRef::Nf4(&q), n, k, F32), &yq);
                close(&matmul_w(&dy, m, WeightRef::Nf4(&q), n, k, F32), &dxq);
            }
        }
    }

    /// `v` rounded to `bf16` values.
    fn rounded(v: &[f32]) -> Vec<f32> {
        let mut v = v.to_vec();
        bf16_gemm::round_in_place(&mut v);
        v
    }

    #[test]
    fn bf16_products_match_the_rounded_reference_on_both_engines() {
        let mut engines = vec![Engine::Emulated];
        if bf16_gemm::engine() == Engine::Amx {
            engines.push(Engine::Amx);
        } else {
            eprintln!("this CPU has no AMX: the emulated engine only");
        }
        // m = 1 and odd m; n and k not multiples of 32 (dense); several
        // backward chunks (n = 2100); NF4 with whole blocks.
        for &(m, n, k) in &[
            (1, 5, 64),
            (3, 1031, 128),
            (37, 33, 192),
            (2, 2100, 64),
            (5, 7, 9),
        ] {
            let (x, dy) = (data(m * k, 1), data(m * n, 7));
            let w = data(n * k, 2);
            let q = Nf4Tensor::quantize(&w, &[n, k], true).ok();
            for engine in &engines {
                let (y, dx) = reference(&rounded(&x), &rounded(&dy), m, &rounded(&w), n, k);
                let dense = WeightRef::Dense(&w);
                close(
                    &matmul_wt_on(&x, m, dense, n, k, CpuMatmul::Bf16, *engine),
                    &y,
                );
                close(
                    &matmul_w_on(&dy, m, dense, n, k, CpuMatmul::Bf16, *engine),
                    &dx,
                );
                // A 16-bit weight: its values are already bf16.
                let w16: Vec<half::bf16> = w.iter().map(|&v| half::bf16::from_f32(v)).collect();
                let (y16, dx16) = reference(&rounded(&x), &rounded(&dy), m, &widen(&w16), n, k);
                let b16 = WeightRef::Bf16(&w16);
                close(
                    &matmul_wt_on(&x, m, b16, n, k, CpuMatmul::Bf16, *engine),
                    &y16,
                );
                close(
                    &matmul_w_on(&dy, m, b16, n, k, CpuMatmul::Bf16, *engine),
                    &dx16,
                );
                let Some(q) = q.as_ref().filter(|_| k % NF4_BLOCK == 0) else {
                    continue;
                };
                let wq = rounded(&q.dequantize());
                let (yq, dxq) = reference(&rounded(&x), &rounded(&dy), m, &wq, n, k);
                let nf4 = WeightRef::Nf4(q);
                close(
                    &matmul_wt_on(&x, m, nf4, n, k, CpuMatmul::Bf16, *engine),
                    &yq,
                );
                close(
                    &matmul_w_on(&dy, m, nf4, n, k, CpuMatmul::Bf16, *engine),
                    &dxq,
                );
            }
        }
    }

    #[test]
    fn nf4_needs_whole_blocks_per_row() {
        let w = data(3 * 100, 2);
        let q = Nf4Tensor::quantize(&w, &[3, 100], false).expect("quantize");
        assert!(!WeightRef::Nf4(&q).supported(3, 100));
        assert!(WeightRef::Dense(&w).supported(3, 100));
        assert!(!WeightRef::Dense(&w).supported(4, 100));
    }

    #[test]
    fn split_covers_the_range_with_aligned_parts() {
        assert_eq!(split(10, 3, 4), vec![0..4, 4..8, 8..10]);
        assert_eq!(split(128, 2, 64), vec![0..64, 64..128]);
        assert_eq!(split(64, 2, 64), vec![0..64]);
        assert_eq!(split(0, 2, 64), Vec::<Range<usize>>::new());
    }
}
