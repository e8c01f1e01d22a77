//! The first size a name writes: the digit runs where a size can start,
//! found a word at a time, and the size DFA run anchored from each.

use super::Matchers;
use super::SizeSource;
use super::number::{parse_moe, parse_size};
use super::swar::{WORD, digit_bytes, word_at};
use crate::tables::{PATTERN_KINDS, PatternKind};

/// The first size written in `segment`, skipping tokens the tables mark as
/// not sizes.
///
/// Every size pattern starts with a digit, and `[0-9]+` absorbs any digits
/// before a later start in the same run, so the leftmost match always starts
/// where a run of digits starts: the DFA is run, anchored, only from there.
/// After a token that is not a size, the search goes on from the first run
/// that starts at or after the token's end. Each run is scanned at most
/// twice (from its own start and, across a decimal point, from the run
/// before), so the search is linear.
#[inline]
pub(super) fn size_from_name(m: &Matchers, segment: &[u8]) -> Option<(u64, SizeSource, usize)> {
    // No match starts before `next`.
    let mut next = 0;
    // The digit bit of the byte before the word, moved to byte 0.
    let mut carry = 0u64;
    let mut base = 0;
    while base < segment.len() {
        let digits = digit_bytes(word_at(segment, base));
        // Digits not preceded by a digit.
        let mut starts = digits & !((digits << 8) | carry);
        carry = digits >> (8 * (WORD - 1));
        while starts != 0 {
            let pos = base + (starts.trailing_zeros() / 8) as usize;
            starts &= starts - 1;
            if pos < next {
                continue;
            }
            if let Some((end, pattern)) = m.size.match_at(segment, pos) {
                let found = match PATTERN_KINDS[pattern] {
                    PatternKind::Size => parse_size(segment, pos).map(|p| (p, SizeSource::Name)),
                    PatternKind::Moe => parse_moe(segment, pos),
                    PatternKind::Ignore => None,
                };
                if let Some((params, source)) = found.filter(|&(p, _)| p > 0) {
                    return Some((params, source, pos));
                }
                // Go on after this token.
                next = end;
            }
        }
        base += WORD;
    }
    None
}
