//! Arbitrary bytes as safetensors or GGUF: errors, never panics.

mod support;

use proptest::prelude::*;
use qlora_scale::files::{read_gguf_header, read_safetensors_header};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_as_safetensors(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_safetensors_header(&bytes[..], bytes.len() as u64);
    }

    #[test]
    fn arbitrary_bytes_as_gguf(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = read_gguf_header(&bytes[..], bytes.len() as u64);
    }

    /// A valid GGUF prefix followed by garbage reaches the key/value and
    /// tensor parsers, which random bytes alone rarely do.
    #[test]
    fn gguf_prefix_then_garbage(
        version in 2u32..4,
        tensors in 0u64..4,
        kvs in 0u64..4,
        tail in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        let mut bytes = b"GGUF".to_vec();
        bytes.extend(version.to_le_bytes());
        bytes.extend(tensors.to_le_bytes());
        bytes.extend(kvs.to_le_bytes());
        bytes.extend(tail);
        let _ = read_gguf_header(&bytes[..], bytes.len() as u64);
    }

    /// Valid GGUF and safetensors files with bytes flipped.
    #[test]
    fn corrupted_valid_files(flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)) {
        let mut g = support::gguf(
            3,
            &[("general.size_label", support::Kv::Str("7B")), ("a", support::Kv::StrArray(&["x", "yz"]))],
            &[("w", &[2, 3])],
        );
        let (mut s, _) = support::safetensors_header(&[("w", "F16", &[2, 3]), ("q.qweight", "I32", &[1, 4])]);
        for (i, b) in &flips {
            let gi = i.index(g.len());
            g[gi] ^= b;
            let si = i.index(s.len());
            s[si] ^= b;
        }
        let _ = read_gguf_header(&g[..], g.len() as u64);
        let _ = read_safetensors_header(&s[..], s.len() as u64 + 1000);
    }

    /// The reader trusts `file_len` only as an upper bound: a file shorter
    /// than claimed is a truncation error, not a hang or a huge allocation.
    #[test]
    fn claimed_length_longer_than_data(bytes in proptest::collection::vec(any::<u8>(), 0..64), extra in 0u64..1_000_000_000) {
        let _ = read_safetensors_header(&bytes[..], bytes.len() as u64 + extra);
        let _ = read_gguf_header(&bytes[..], bytes.len() as u64 + extra);
    }
}
