//! Vectorised `f32` exponentials and the row kernels built on them: the
//! loss's log-sum-exp and softmax, attention's masked softmax and the MLP's
//! SiLU gate.
//!
//! [`exp`] is a branch-free scalar function (Cephes' `expf`: a degree-7
//! polynomial on the range-reduced argument, the power of two put together
//! from its bits) that the compiler turns into SIMD code wherever it sits in
//! a loop over lanes. The row kernels are compiled several times by the
//! `multiversion` crate, for AVX-512 (in a build with the `avx512` feature,
//! the default), AVX2 + FMA and the baseline, and pick
//! the widest the CPU has at run time, so one portable binary gets 16-lane
//! exponentials on an AVX-512 machine. The `wide` crate, used before, fixes
//! its instruction set when the crate is compiled: four lanes (SSE2) in a
//! portable build. On an AVX-512 Xeon a one-off timing summed a row of
//! exponentials about 3.5 times as fast as `wide`'s eight-lane `exp` did;
//! whole training runs got 5-9% faster (`docs/design-notes.md`). No crate
//! offers a vectorised `exp` chosen at run time on stable Rust, hence this
//! one function written here.
//!
//! Accuracy: within 1e-7 relative of `f64::exp` on the whole normal range;
//! `exp(x)` is 0 below -87.3 (where the true value is below 1.2e-38),
//! infinite above 88.7, and NaN for NaN.

use multiversion::multiversion;

/// Lanes each kernel works on at once: one AVX-512 register, two AVX2 ones.
const LANES: usize = 16;

/// Below this `exp` returns 0 (the true value is at most the smallest normal
/// `f32`).
const EXP_LO: f32 = -87.3;
/// Above this `exp` returns infinity (`exp(88.73)` passes `f32::MAX`).
const EXP_HI: f32 = 88.7;

/// `e^x` for `f32`, branch-free so that it vectorises.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low
    // mantissa bits: `n = round(x / ln 2)` as a float and as an integer,
    // without a float-to-int conversion.
    const MAGIC: f32 = 12_582_912.0;
    // ln 2 split in two so that `x - n ln 2` is exact to f32 precision.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let xc = x.clamp(EXP_LO, EXP_HI);
    let t = xc * std::f32::consts::LOG2_E + MAGIC;
    let n = t - MAGIC;
    let ni = (t.to_bits() as i32).wrapping_sub(MAGIC.to_bits() as i32);
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let p = p * (r * r) + r + 1.0;
    // 2^n in two halves: n reaches 128 near the top of the range, one past
    // the largest exponent.
    let h = ni >> 1;
    let s1 = f32::from_bits(((h + 127) << 23) as u32);
    let s2 = f32::from_bits(((ni - h + 127) << 23) as u32);
    let y = p * s1 * s2;
    if x < EXP_LO {
        0.0
    } else if x > EXP_HI {
        f32::INFINITY
    } else {
        y
    }
}

/// `x / (1 + e^-x)`, Candle's `silu` formula.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// `(silu(x), silu'(x))`.
#[inline(always)]
fn silu_d(x: f32) -> (f32, f32) {
    let e = 1.0 + exp(-x);
    let s = 1.0 / e;
    (x / e, s * (1.0 + x * (1.0 - s)))
}

/// The largest element (`-inf` for an empty row). NaNs are skipped, as
/// `f32::max` skips them.
#[cfg_attr(feature = "avx512", multiversion(targets = "simd"))]
#[cfg_attr(
    not(feature = "avx512"),
    multiversion(targets("x86_64+avx+avx2+fma", "aarch64+neon"))
)]
pub fn max(row: &[f32]) -> f32 {
    let (lanes, tail) = row.as_chunks::<LANES>();
    let mut acc = [f32::NEG_INFINITY; LANES];
    for c in lanes {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a = a.max(x);
        }
    }
    acc.into_iter()
        .chain(tail.iter().copied())
        .fold(f32::NEG_INFINITY, f32::max)
}

/// `sum(e^(x - shift))` over `row`, summed in [`LANES`] `f32` partial sums
/// (callers keep rows short, or carry blocks into an `f64`).
#[cfg_attr(feature = "avx512", multiversion(targets = "simd"))]
#[cfg_attr(
    not(feature = "avx512"),
    multiversion(targets("x86_64+avx+avx2+fma", "aarch64+neon"))
)]
pub fn sum_exp(row: &[f32], shift: f32) -> f32 {
    let (lanes, tail) = row.as_chunks::<LANES>();
    let mut acc = [0f32; LANES];
    for c in lanes {
        for (a, &x) in acc.iter_mut().zip(c) {
            *a += exp(x - shift);
        }
    }
    acc.into_iter().sum::<f32>() + tail.iter().map(|&x| exp(x - shift)).sum::<f32>()
}

/// `dst[j] = e^(src[j] - shift) * scale`.
///
/// # Panics
/// If `src` and `dst` differ in length.
#[cfg_attr(feature = "avx512", multiversion(targets = "simd"))]
#[cfg_attr(
    not(feature = "avx512"),
    multiversion(targets("x86_64+avx+avx2+fma", "aarch64+neon"))
)]
pub fn exp_scaled(src: &[f32], shift: f32, scale: f32, dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "exp_scaled: lengths differ");
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = exp(x - shift) * scale;
    }
}

/// `row = softmax(row + mask)` in place, the maximum subtracted first. A row
/// whose every entry is `-inf` comes out NaN, as the scalar formula gives.
///
/// # Panics
/// If `row` and `mask` differ in length.
#[cfg_attr(feature = "avx512", multiversion(targets = "simd"))]
#[cfg_attr(
    not(feature = "avx512"),
    multiversion(targets("x86_64+avx+avx2+fma", "aarch64+neon"))
)]
pub fn softmax_masked(row: &mut [f32], mask: &[f32]) {
    assert_eq!(row.len(), mask.len(), "softmax_masked: lengths differ");
    let mut top = [f32::NEG_INFINITY; LANES];
    {
        let (lanes, tail) = row.as_chunks_mut::<LANES>();
        let (mlanes, mtail) = mask.as_chunks::<LANES>();
        for (c, m) in lanes.iter_mut().zip(mlanes) {
            for ((x, &mv), t) in c.iter_mut().zip(m).zip(top.iter_mut()) {
                *x += mv;
                *t = t.max(*x);
            }
        }
        for (x, &mv) in tail.iter_mut().zip(mtail) {
            *x += mv;
            top[0] = top[0].max(*x);
        }
    }
    let max = top.into_iter().fold(f32::NEG_INFINITY, f32::max);
    let mut acc = [0f32; LANES];
    let (lanes, tail) = row.as_chunks_mut::<LANES>();
    for c in lanes.iter_mut() {
        for (x, a) in c.iter_mut().zip(acc.iter_mut()) {
            *x = exp(*x - max);
            *a += *x;
        }
    }
    let mut sum = acc.into_iter().sum::<f32>();
    for x in tail.iter_mut() {
        *x = exp(*x - max);
        sum += *x;
    }
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

/// `y = silu(g) * u`.
///
/// # Panics
/// If the slices differ in length.
#[cfg_attr(feature = "avx512", multiversion(targets = "simd"))]
#[cfg_attr(
    not(feature = "avx512"),
    multiversion(targets("x86_64+avx+avx2+fma", "aarch64+neon"))
)]
pub fn silu_gate(g: &[f32], u: &[f32], y: &mut [f32]) {
    assert!(
        g.len() == y.len() && u.len() == y.len(),
        "silu_gate: lengths differ"
    );
    for ((o, &a), &b) in y.iter_mut().zip(g).zip(u) {
        *o = silu(a) * b;
    }
}

/// The gate's gradients: `dg = dy * u * silu'(g)`, `du = dy * silu(g)`.
///
/// # Panics
/// If the slices differ in length.
#[cfg_attr(feature = "avx512", multiversion(targets = "simd"))]
#[cfg_attr(
    not(feature = "avx512"),
    multiversion(targets("x86_64+avx+avx2+fma", "aarch64+neon"))
)]
pub fn silu_gate_grad(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = g.len();
    assert!(
        u.len() == n && dy.len() == n && dg.len() == n && du.len() == n,
        "silu_gate_grad: lengths differ"
    );
    for (((og, ou), (&a, &b)), &d) in dg
        .iter_mut()
        .zip(du.iter_mut())
        .zip(g.iter().zip(u))
        .zip(dy)
    {
        let (f, fd) = silu_d(a);
        *og = d * b * fd;
        *ou = d * f;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Relative error of `exp` against `f64::exp` over the normal range,
    /// sampled densely.
    #[test]
    fn exp_is_within_1e7_relative_over_the_normal_range() {
        let mut worst = (0f64, 0f32);
        let n = 400_000;
        for i in 0..=n {
            let x = -87.29 + (88.69 + 87.29) * (i as f32 / n as f32);
            let want = f64::from(x).exp();
            let err = ((f64::from(exp(x)) - want) / want).abs();
            if err > worst.0 {
                worst = (err, x);
            }
        }
        assert!(worst.0 < 1e-7, "exp({}) is off by {:e}", worst.1, worst.0);
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        // The top of the range needs 2^128 in two halves.
        let top = exp(88.7);
        assert!(top.is_finite() && (f64::from(top) / f64::from(88.7f32).exp() - 1.0).abs() < 1e-7);
    }

    fn data(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7919 % 1009) as f32 / 1009.0 - 0.5) * 30.0)
            .collect()
    }

    /// The lane kernels against plain `f64` loops, on lengths with and
    /// without a tail.
    #[test]
    fn row_kernels_match_f64() {
        for n in [0, 1, 15, 16, 17, 100, 1000] {
            let row = data(n);
            let want_max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
            assert_eq!(max(&row), want_max, "max, n = {n}");
            let shift = 3.0;
            let want: f64 = row.iter().map(|&x| f64::from(x - shift).exp()).sum();
            let got = f64::from(sum_exp(&row, shift));
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1e-30),
                "sum_exp n = {n}: {got} vs {want}"
            );
            let mut dst = vec![0f32; n];
            exp_scaled(&row, shift, 0.5, &mut dst);
            for (&d, &x) in dst.iter().zip(&row) {
                let w = f64::from(x - shift).exp() * 0.5;
                assert!((f64::from(d) - w).abs() <= 1e-6 * w, "exp_scaled n = {n}");
            }
        }
    }

    #[test]
    fn softmax_masked_matches_f64_and_masks() {
        for n in [1, 7, 16, 33, 128] {
            let mut row = data(n);
            let mask: Vec<f32> = (0..n)
                .map(|j| if j % 3 == 2 { f32::NEG_INFINITY } else { 0.0 })
                .collect();
            let z: Vec<f64> = row
                .iter()
                .zip(&mask)
                .map(|(&x, &m)| f64::from(x + m))
                .collect();
            let max = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
            softmax_masked(&mut row, &mask);
            for (j, (&p, v)) in row.iter().zip(&z).enumerate() {
                let w = (v - max).exp() / sum;
                assert!(
                    (f64::from(p) - w).abs() <= 1e-6 * w.max(1e-7),
                    "n = {n}, j = {j}"
                );
                if mask[j] == f32::NEG_INFINITY {
                    assert_eq!(p, 0.0);
                }
            }
        }
        let mut dead = vec![f32::NEG_INFINITY; 4];
        softmax_masked(&mut dead, &[0.0; 4]);
        assert!(dead.iter().all(|p| p.is_nan()));
    }

    #[test]
    fn silu_gate_and_grad_match_f64() {
        let g = data(37);
        let u: Vec<f32> = data(37).iter().map(|x| x * 0.1 + 0.3).collect();
        let dy: Vec<f32> = data(37).iter().rev().map(|x| x * 0.05).collect();
        let mut y = vec![0f32; 37];
        silu_gate(&g, &u, &mut y);
        let (mut dg, mut du) = (vec![0f32; 37], vec![0f32; 37]);
        silu_gate_grad(&g, &u, &dy, &mut dg, &mut du);
        for j in 0..37 {
            let x = f64::from(g[j]);
            let s = 1.0 / (1.0 + (-x).exp());
            let (b, d) = (f64::from(u[j]), f64::from(dy[j]));
            let close = |a: f32, w: f64| (f64::from(a) - w).abs() <= 1e-5 * w.abs().max(1e-3);
            assert!(close(y[j], x * s * b), "y[{j}]");
            assert!(close(du[j], d * x * s), "du[{j}]");
            assert!(close(dg[j], d * b * s * (1.0 + x * (1.0 - s))), "dg[{j}]");
        }
    }
}
