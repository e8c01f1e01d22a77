//! Path components: the last one of a name, and the one that names the
//! model (skipping cache directories, commit hashes and the Hugging Face
//! cache's `models--ORG--` prefix).

use crate::tables::{CACHE_PREFIX, CACHE_SEPARATOR, HASH_MIN_LEN, SKIP_SEGMENTS};

/// The position of the last `/` or `\\` in `bytes`. On x86-64, SSE2 is
/// always there: calling it directly skips `memrchr2`'s run-time choice
/// (an indirect call) and its AVX2 set-up, which short names do not repay.
#[inline]
fn last_separator(bytes: &[u8]) -> Option<usize> {
    #[cfg(target_arch = "x86_64")]
    if let Some(two) = memchr::arch::x86_64::sse2::memchr::Two::new(b'/', b'\\') {
        return two.rfind(bytes);
    }
    memchr::memrchr2(b'/', b'\\', bytes)
}

/// The last path component of `name`, `/` and `\\` both separating, trailing
/// separators ignored.
#[inline]
pub fn last_segment(name: &[u8]) -> &[u8] {
    let is_sep = |b: &u8| *b == b'/' || *b == b'\\';
    let end = name.iter().rposition(|b| !is_sep(b)).map_or(0, |i| i + 1);
    let trimmed = &name[..end];
    let start = last_separator(trimmed).map_or(0, |i| i + 1);
    &trimmed[start..]
}

/// Whether a path component names no model: a cache directory
/// (`snapshots`) or a commit hash.
#[inline]
fn is_skipped(component: &[u8]) -> bool {
    (component.len() >= HASH_MIN_LEN && component.iter().all(u8::is_ascii_hexdigit))
        || SKIP_SEGMENTS
            .iter()
            .any(|s| component.eq_ignore_ascii_case(s.as_bytes()))
}

/// The component of `name` that names the model: the last one that is not a
/// cache directory or a hash, and of a cache component
/// (`models--ORG--NAME`), the part after the last separator.
///
/// ```
/// use qlora_scale::detect::model_segment;
/// let p = b"/hf/hub/models--Qwen--Qwen2.5-0.5B/snapshots/7ae557604adf67be50417f59c2c2f167def9a775/";
/// assert_eq!(model_segment(p), b"Qwen2.5-0.5B");
/// assert_eq!(model_segment(b"meta-llama/Llama-2-7b-hf"), b"Llama-2-7b-hf");
/// ```
#[inline]
pub fn model_segment(name: &[u8]) -> &[u8] {
    let mut rest = name;
    let mut segment = last_segment(rest);
    loop {
        if segment.is_empty() || !is_skipped(segment) {
            break;
        }
        // Drop this component (and the separators after it) and look again.
        let before = segment.as_ptr() as usize - rest.as_ptr() as usize;
        rest = &rest[..before];
        let next = last_segment(rest);
        if next.is_empty() {
            break;
        }
        segment = next;
    }
    if !segment.starts_with(CACHE_PREFIX.as_bytes()) {
        return segment;
    }
    let sep = CACHE_SEPARATOR.as_bytes();
    match segment.windows(sep.len()).rposition(|w| w == sep) {
        Some(i) if i + sep.len() < segment.len() => &segment[i + sep.len()..],
        _ => segment,
    }
}
