//! SWAR byte helpers: reading eight bytes of a slice as one word, and
//! marking the word's ASCII digits; the written-size search and the
//! override filter use them.

// Word-at-a-time byte scanning: eight bytes per `u64`, little-endian (byte
// `i` of a word at bits `8i..8i + 8`), each test setting the high bit of the
// bytes that pass. No test carries from one byte into the next.

/// Bytes per word.
pub(super) const WORD: usize = 8;
/// `0x01` in every byte.
const ONES: u64 = u64::from_ne_bytes([0x01; WORD]);
/// The high bit of every byte.
const HIGH: u64 = ONES * 0x80;

/// The high bit of each byte of `word` that is an ASCII digit. With
/// `t = byte ^ b'0'`, a digit is a `t` below 10: adding `0x76` to the low
/// seven bits of `t` sets the high bit exactly when they are 10 or more.
#[inline]
pub(super) fn digit_bytes(word: u64) -> u64 {
    let t = word ^ (ONES * u64::from(b'0'));
    !(((t & !HIGH) + ONES * (0x80 - 10)) | t) & HIGH
}

/// The word of `bytes[at..]`'s first eight bytes, zeros past the end.
#[inline]
pub(super) fn word_at(bytes: &[u8], at: usize) -> u64 {
    let rest = bytes.get(at..).unwrap_or_default();
    if let Some(word) = rest.first_chunk::<WORD>() {
        return u64::from_le_bytes(*word);
    }
    // Fewer than eight bytes: two overlapping reads, as `memcpy` does.
    let n = rest.len();
    if let (Some(lo), Some(hi)) = (rest.first_chunk::<4>(), rest.last_chunk::<4>()) {
        return u64::from(u32::from_le_bytes(*lo))
            | u64::from(u32::from_le_bytes(*hi)) << (8 * (n - 4));
    }
    match rest {
        [] => 0,
        // One to three bytes: the first, the middle and the last.
        [first, ..] => {
            u64::from(*first)
                | u64::from(rest[n / 2]) << (8 * (n / 2))
                | u64::from(rest[n - 1]) << (8 * (n - 1))
        }
    }
}
