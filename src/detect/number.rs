//! Reading the numbers the size DFA matched: digit runs, a size with its
//! unit (`7B`, `0.5b`, `7b1`), a mixture of experts (`8x7B`).

use super::SizeSource;
use crate::tables::{MOE_LAYOUTS, UNIT_PARAMS};

/// Reads ASCII digits from `bytes[i..]`: (value, digits read, 10^n for the
/// n digits kept). Keeps at most 18 digits (the rest only count as read), so
/// neither value nor scale overflows.
#[inline]
fn digits(bytes: &[u8], mut i: usize) -> (u64, usize, u64) {
    let (mut value, mut scale, start) = (0u64, 1u64, i);
    while let Some(d) = bytes.get(i).filter(|b| b.is_ascii_digit()) {
        if scale < 1_000_000_000_000_000_000 {
            value = value * 10 + u64::from(d - b'0');
            scale *= 10;
        }
        i += 1;
    }
    (value, i - start, scale)
}

/// Reads the parameter count written at `bytes[start..]`, where the size DFA
/// matched: ASCII digits, an optional fraction (`.5`, `_6`), optional
/// `-`/`_`, a unit letter, and optional digits after the unit as the fraction
/// (`7b1` is 7.1B) when no letter follows them. Saturates on overflow.
#[inline]
pub(super) fn parse_size(bytes: &[u8], start: usize) -> Option<u64> {
    let mut i = start;
    let mut int: u64 = 0;
    while let Some(d) = bytes.get(i).filter(|b| b.is_ascii_digit()) {
        int = int.saturating_mul(10).saturating_add(u64::from(d - b'0'));
        i += 1;
    }
    if i == start {
        return None;
    }
    let (mut frac, mut scale) = (0u64, 1u64);
    if matches!(bytes.get(i), Some(b'.' | b'_')) && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)
    {
        let (f, n, s) = digits(bytes, i + 1);
        (frac, scale) = (f, s);
        i += 1 + n;
    }
    while matches!(bytes.get(i), Some(b'-' | b'_')) {
        i += 1;
    }
    let letter = bytes.get(i)?.to_ascii_lowercase();
    if !letter.is_ascii_lowercase() {
        return None;
    }
    let unit = UNIT_PARAMS[usize::from(letter - b'a')];
    if unit == 0 {
        return None;
    }
    if scale == 1 {
        let (f, n, s) = digits(bytes, i + 1);
        if n > 0 && !bytes.get(i + 1 + n).is_some_and(u8::is_ascii_alphabetic) {
            (frac, scale) = (f, s);
        }
    }
    let whole = int.saturating_mul(unit);
    if frac == 0 {
        return Some(whole);
    }
    // frac < scale, so the fraction of a unit is below `unit` and fits u64.
    let part = u128::from(frac) * u128::from(unit) / u128::from(scale);
    Some(whole.saturating_add(part as u64))
}

/// Reads a mixture of experts at `bytes[start..]` (`8x7B`): the total from
/// the known layouts, else experts x expert size (an estimate).
#[inline]
pub(super) fn parse_moe(bytes: &[u8], start: usize) -> Option<(u64, SizeSource)> {
    let (experts, n, _) = digits(bytes, start);
    if n == 0
        || !bytes
            .get(start + n)
            .is_some_and(|b| b.eq_ignore_ascii_case(&b'x'))
    {
        return None;
    }
    let expert = parse_size(bytes, start + n + 1)?;
    for layout in &MOE_LAYOUTS {
        if u64::from(layout.experts) == experts && layout.expert_params == expert {
            return Some((layout.total_params, SizeSource::Name));
        }
    }
    Some((experts.saturating_mul(expert), SizeSource::NameEstimate))
}
