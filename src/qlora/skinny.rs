//! `out = x · aᵀ` for a narrow `a`: the LoRA products whose result has `r`
//! (the adapter rank) columns, `u = x · Aᵀ` and `v = dy · B`.
//!
//! With `r` of 8 or 16, the `gemm` crate's micro-kernels (6 columns wide)
//! pack the whole `m x k` left operand for a result of `m x r`, and run at
//! 40-50 GFLOP/s on an AVX-512 core where the frozen products run at 170.
//! Here each result is a dot product of two contiguous rows: two rows of `x`
//! against four rows of `a` at a time, sixteen (AVX-512) or eight (AVX2)
//! lanes, eight accumulators in registers, one horizontal sum per result.
//! 2.4 times the `gemm` crate's speed on a rank-8 adapter of a 768-wide
//! linear (`cargo bench --bench qlora -- lora_x_at`, `BENCHMARKS.md`). Hand-written because no crate has a kernel for
//! this shape; on CPUs without AVX2 and FMA, [`rows_dot`] says so and the
//! caller uses the `gemm` crate.

use rayon::prelude::*;

/// Rows of `x` per parallel task.
const TASK_ROWS: usize = crate::tables::trainer::LORA_KERNEL_TASK_ROWS as usize;

/// The vector kernel this CPU runs, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Avx512,
    Avx2,
}

/// The kernels this CPU can run, widest first (AVX-512 only in a build with
/// the `avx512` feature).
fn isas_here() -> Vec<Isa> {
    #[allow(unused_mut)]
    let mut isas = vec![];
    #[cfg(target_arch = "x86_64")]
    {
        if cfg!(feature = "avx512") && std::arch::is_x86_feature_detected!("avx512f") {
            isas.push(Isa::Avx512);
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            isas.push(Isa::Avx2);
        }
    }
    isas
}

/// The widest kernel this CPU runs, if any (detected once).
fn isa() -> Option<Isa> {
    static ISA: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
    *ISA.get_or_init(|| isas_here().first().copied())
}

/// `out[i * r + j] = sum_t x[i * k + t] * a[j * k + t]`: `x` is `m x k`,
/// `a` is `r x k`, both row-major, `out` is `m x r`. Returns `false`, and
/// leaves `out` alone, on a CPU without AVX2 and FMA.
///
/// # Panics
/// If the lengths disagree with `k` and `r`.
pub fn rows_dot(x: &[f32], k: usize, a: &[f32], r: usize, out: &mut [f32]) -> bool {
    rows_dot_on(isa(), x, k, a, r, out)
}

fn rows_dot_on(
    isa: Option<Isa>,
    x: &[f32],
    k: usize,
    a: &[f32],
    r: usize,
    out: &mut [f32],
) -> bool {
    let Some(isa) = isa else {
        return false;
    };
    // With no depth the rows are counted from the output.
    let m = x
        .len()
        .checked_div(k)
        .unwrap_or_else(|| out.len() / r.max(1));
    assert!(
        x.len() == m * k && a.len() == r * k && out.len() == m * r,
        "rows_dot: x {} a {} out {} for k = {k}, r = {r}",
        x.len(),
        a.len(),
        out.len()
    );
    if m == 0 || r == 0 {
        return true;
    }
    if k == 0 {
        out.fill(0.0);
        return true;
    }
    let run = |xs: &[f32], os: &mut [f32]| {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the kernels' features were detected at run time (`isa`),
        // and the slices' lengths agree with `k` and `r` (checked above).
        unsafe {
            match isa {
                Isa::Avx512 => avx512::rows_dot(xs, k, a, r, os),
                Isa::Avx2 => avx2::rows_dot(xs, k, a, r, os),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (xs, os, isa);
    };
    if m * k * r >= 1 << 18 && rayon::current_num_threads() > 1 {
        x.par_chunks(TASK_ROWS * k)
            .zip(out.par_chunks_mut(TASK_ROWS * r))
            .for_each(|(xs, os)| run(xs, os));
    } else {
        run(x, out);
    }
    true
}

/// One instruction set's kernel: `$lanes` floats per vector `$v`.
macro_rules! rows_dot_isa {
    ($isa:ident, $feat:literal, $lanes:literal, $v:ty, $zero:ident, $load:ident, $fma:ident, $hsum:path) => {
        #[cfg(target_arch = "x86_64")]
        mod $isa {
            use std::arch::x86_64::*;

            /// `R` rows of `x` (stride `k`) against `J` rows of `a`
            /// (stride `k`), into `out` (row stride `r`).
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn tile<const R: usize, const J: usize>(
                x: *const f32,
                a: *const f32,
                k: usize,
                out: *mut f32,
                r: usize,
            ) {
                let full = k / $lanes * $lanes;
                let mut acc = [[$zero(); J]; R];
                let mut t = 0;
                // SAFETY (whole body): the caller passes `R` rows of `x` and
                // `J` rows of `a` of `k` floats each, and `R` rows of `out`
                // with `J` columns from `out`.
                unsafe {
                    while t < full {
                        let xs: [$v; R] = std::array::from_fn(|i| $load(x.add(i * k + t)));
                        for j in 0..J {
                            let av = $load(a.add(j * k + t));
                            for i in 0..R {
                                acc[i][j] = $fma(xs[i], av, acc[i][j]);
                            }
                        }
                        t += $lanes;
                    }
                    for i in 0..R {
                        for j in 0..J {
                            let mut s = $hsum(acc[i][j]);
                            for u in full..k {
                                s += *x.add(i * k + u) * *a.add(j * k + u);
                            }
                            *out.add(i * r + j) = s;
                        }
                    }
                }
            }

            /// All of `x` (`out.len() / r` rows) against all of `a`.
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn rows_dot(
                x: &[f32],
                k: usize,
                a: &[f32],
                r: usize,
                out: &mut [f32],
            ) {
                let m = x.len() / k;
                let (xp, ap, op) = (x.as_ptr(), a.as_ptr(), out.as_mut_ptr());
                let mut i = 0;
                // SAFETY: every tile reads rows `i..i+R` of `x` (`< m`) and
                // `j..j+J` of `a` (`< r`), and writes their `R x J` block
                // of `out`.
                unsafe {
                    while i < m {
                        let (xi, oi) = (xp.add(i * k), op.add(i * r));
                        if i + 2 <= m {
                            row_block::<2>(xi, ap, k, oi, r);
                            i += 2;
                        } else {
                            row_block::<1>(xi, ap, k, oi, r);
                            i += 1;
                        }
                    }
                }
            }

            /// `R` rows of `x` against every row of `a`: four at a time,
            /// then one by one.
            #[target_feature(enable = $feat)]
            #[inline]
            unsafe fn row_block<const R: usize>(
                x: *const f32,
                a: *const f32,
                k: usize,
                out: *mut f32,
                r: usize,
            ) {
                let mut j = 0;
                // SAFETY: the caller's rows; rows `j..j+4` or `j` of `a`
                // are below `r`, their columns of `out` too.
                unsafe {
                    while j + 4 <= r {
                        tile::<R, 4>(x, a.add(j * k), k, out.add(j), r);
                        j += 4;
                    }
                    while j < r {
                        tile::<R, 1>(x, a.add(j * k), k, out.add(j), r);
                        j += 1;
                    }
                }
            }
        }
    };
}

rows_dot_isa!(
    avx512,
    "avx512f",
    16,
    __m512,
    _mm512_setzero_ps,
    _mm512_loadu_ps,
    _mm512_fmadd_ps,
    _mm512_reduce_add_ps
);
rows_dot_isa!(
    avx2,
    "avx2,fma",
    8,
    __m256,
    _mm256_setzero_ps,
    _mm256_loadu_ps,
    _mm256_fmadd_ps,
    super::hsum256
);

/// The sum of an AVX vector's eight lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
fn hsum256(v: std::arch::x86_64::__m256) -> f32 {
    use std::arch::x86_64::*;
    let q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let h = _mm_add_ps(q, _mm_movehl_ps(q, q));
    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: usize) -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104_729) % 1013) as f32 / 1013.0 - 0.5) * 2.0)
            .collect()
    }

    /// Every kernel this CPU has against an `f64` loop, on shapes with odd
    /// rows, ranks that are not a multiple of four and depths with a tail.
    #[test]
    fn kernels_match_f64() {
        let isas = isas_here();
        if isas.is_empty() {
            eprintln!("skipped: this CPU has neither AVX-512 nor AVX2 + FMA");
        }
        for isa in isas {
            for (m, k, r) in [
                (1, 1, 1),
                (5, 37, 3),
                (64, 768, 8),
                (33, 100, 16),
                (130, 2048, 7),
                (7, 5, 9),
            ] {
                let (x, a) = (data(m * k, 1), data(r * k, 2));
                let mut out = vec![f32::NAN; m * r];
                assert!(rows_dot_on(Some(isa), &x, k, &a, r, &mut out));
                for i in 0..m {
                    for j in 0..r {
                        let want: f64 = (0..k)
                            .map(|t| f64::from(x[i * k + t]) * f64::from(a[j * k + t]))
                            .sum();
                        let got = f64::from(out[i * r + j]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64).sqrt(),
                            "{isa:?} ({m}, {k}, {r}) [{i}][{j}]: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn without_a_kernel_the_caller_is_told() {
        let mut out = vec![7.0; 2];
        assert!(!rows_dot_on(None, &[1.0; 4], 2, &[1.0; 2], 1, &mut out));
        assert_eq!(out, [7.0; 2]);
    }

    #[test]
    fn empty_depth_gives_zeros() {
        if isa().is_none() {
            return;
        }
        let mut out = vec![7.0; 6];
        assert!(rows_dot(&[], 0, &[], 2, &mut out));
        assert_eq!(out, [0.0; 6]);
    }
}
