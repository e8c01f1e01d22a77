//! Filters derived from the tables at compile time: which overriding
//! families may match around a written size ([`OverrideFilter`]), and
//! whether a component may be a known model's name ([`KnownNameFilter`]).

use super::swar::{WORD, word_at};
use crate::tables::{KNOWN_MODEL_NAMES, OVERRIDE_FAMILIES};

/// Which overriding families can match where a name's size starts, from
/// the [`FILTER_WINDOW`] bytes around it (half before the size, half from
/// its start): for each offset and byte value, a bitmask of the families
/// (bit `i`: [`OVERRIDE_FAMILIES`]`[i]`; families from the 64th on share bit
/// 63) that allow that byte there. A family allows every byte where its
/// prefix or rest does not reach.
///
/// Derived from [`OVERRIDE_FAMILIES`] at compile time. The masks are a
/// necessary condition only: a candidate is then compared in full.
struct OverrideFilter {
    /// By offset in the window, then byte. Where the name starts or ends
    /// inside the window, [`window_at`] reads zeros, which the families that
    /// do not reach there allow like any byte.
    by_byte: [[u64; 256]; FILTER_WINDOW],
}

/// Bytes [`OverrideFilter`] reads around a size's start.
const FILTER_WINDOW: usize = 8;
/// Of those, the bytes before the size's start.
const FILTER_BEFORE: usize = FILTER_WINDOW / 2;

impl OverrideFilter {
    const fn new(families: &[crate::tables::OverrideFamily]) -> OverrideFilter {
        let mut filter = OverrideFilter {
            by_byte: [[0; 256]; FILTER_WINDOW],
        };
        let mut i = 0;
        while i < families.len() {
            let bit = 1u64 << if i < 63 { i } else { 63 };
            let (prefix, rest) = (families[i].prefix.as_bytes(), families[i].rest.as_bytes());
            let mut k = 0;
            while k < FILTER_WINDOW {
                let byte = if k < FILTER_BEFORE {
                    let back = FILTER_BEFORE - k;
                    if back <= prefix.len() {
                        Some(prefix[prefix.len() - back])
                    } else {
                        None
                    }
                } else if k - FILTER_BEFORE < rest.len() {
                    Some(rest[k - FILTER_BEFORE])
                } else {
                    None
                };
                match byte {
                    Some(c) => {
                        filter.by_byte[k][c.to_ascii_lowercase() as usize] |= bit;
                        filter.by_byte[k][c.to_ascii_uppercase() as usize] |= bit;
                    }
                    None => {
                        let mut v = 0;
                        while v < 256 {
                            filter.by_byte[k][v] |= bit;
                            v += 1;
                        }
                    }
                }
                k += 1;
            }
            i += 1;
        }
        filter
    }

    /// The families that may match in `segment` with their size at `at`.
    #[inline]
    fn candidates(&self, segment: &[u8], at: usize) -> u64 {
        let window = window_at(segment, at);
        let mut mask = u64::MAX;
        for (k, masks) in self.by_byte.iter().enumerate() {
            mask &= masks[((window >> (8 * k)) & 0xff) as usize];
        }
        mask
    }
}

/// The [`FILTER_WINDOW`] bytes of `bytes` from `at - FILTER_BEFORE`, as a
/// little-endian word with zeros outside `bytes`: one word read where it
/// fits, shifted into place.
#[inline]
fn window_at(bytes: &[u8], at: usize) -> u64 {
    let from = at
        .saturating_sub(FILTER_BEFORE)
        .min(bytes.len().saturating_sub(WORD));
    let word = word_at(bytes, from);
    // The window starts `at - FILTER_BEFORE - from` bytes after the word.
    let shift = |bytes: usize| u32::try_from(8 * bytes).unwrap_or(u32::MAX);
    if at >= FILTER_BEFORE + from {
        word.checked_shr(shift(at - FILTER_BEFORE - from))
            .unwrap_or(0)
    } else {
        word.checked_shl(shift(FILTER_BEFORE + from - at))
            .unwrap_or(0)
    }
}

static OVERRIDE_FILTER: OverrideFilter = OverrideFilter::new(&OVERRIDE_FAMILIES);

/// The overriding family whose written size is the name's size at `at`:
/// its prefix ends at `at` and its rest starts there (ASCII
/// case-insensitive). The first listed wins.
#[inline]
pub(super) fn overriding_family(segment: &[u8], at: usize) -> Option<u64> {
    match OVERRIDE_FILTER.candidates(segment, at) {
        0 => None,
        candidates => first_overriding(segment, at, candidates),
    }
}

/// The first of the `candidates` ([`OverrideFilter`]'s bits) that matches
/// in full.
#[inline(never)]
fn first_overriding(segment: &[u8], at: usize, mut candidates: u64) -> Option<u64> {
    let (before, after) = segment.split_at_checked(at)?;
    while candidates != 0 {
        let bit = candidates.trailing_zeros() as usize;
        candidates &= candidates - 1;
        // Bit 63 stands for every family from the 64th on.
        let group = if bit < 63 {
            bit..bit + 1
        } else {
            bit..OVERRIDE_FAMILIES.len()
        };
        for f in OVERRIDE_FAMILIES.get(group).unwrap_or_default() {
            let (prefix, rest) = (f.prefix.as_bytes(), f.rest.as_bytes());
            let prefix_ok = before
                .len()
                .checked_sub(prefix.len())
                .is_some_and(|i| before[i..].eq_ignore_ascii_case(prefix));
            if prefix_ok
                && after
                    .get(..rest.len())
                    .is_some_and(|r| r.eq_ignore_ascii_case(rest))
            {
                return Some(f.params);
            }
        }
    }
    None
}

/// Whether a component may be a known model's name ([`KNOWN_MODEL_NAMES`],
/// ASCII case-insensitive): its length and its first and last bytes must be
/// those of some name. Derived at compile time; the map lookup, which hashes
/// the whole component, follows only when this passes.
pub(super) struct KnownNameFilter {
    shortest: usize,
    longest: usize,
    first: [bool; 256],
    last: [bool; 256],
}

impl KnownNameFilter {
    const fn new(names: &[&str]) -> KnownNameFilter {
        let mut filter = KnownNameFilter {
            shortest: usize::MAX,
            longest: 0,
            first: [false; 256],
            last: [false; 256],
        };
        let mut i = 0;
        while i < names.len() {
            let name = names[i].as_bytes();
            if let ([first, ..], [.., last]) = (name, name) {
                if name.len() < filter.shortest {
                    filter.shortest = name.len();
                }
                if name.len() > filter.longest {
                    filter.longest = name.len();
                }
                filter.first[first.to_ascii_lowercase() as usize] = true;
                filter.first[first.to_ascii_uppercase() as usize] = true;
                filter.last[last.to_ascii_lowercase() as usize] = true;
                filter.last[last.to_ascii_uppercase() as usize] = true;
            }
            i += 1;
        }
        filter
    }

    #[inline]
    pub(super) fn admits(&self, component: &[u8]) -> bool {
        match component {
            [first, .., last] | [first @ last] => {
                (self.shortest..=self.longest).contains(&component.len())
                    && self.first[usize::from(*first)]
                    && self.last[usize::from(*last)]
            }
            [] => false,
        }
    }
}

pub(super) static KNOWN_NAME_FILTER: KnownNameFilter = KnownNameFilter::new(&KNOWN_MODEL_NAMES);
