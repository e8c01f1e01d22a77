//! GGUF headers: every value type, parameter counts, malformed files.

mod support;

use qlora_scale::files::{GgufError, GgufValue, read_gguf_header};
use support::{Kv, gguf};

fn all_types() -> Vec<u8> {
    gguf(
        3,
        &[
            ("general.architecture", Kv::Str("llama")),
            ("general.size_label", Kv::Str("7B")),
            ("general.parameter_count", Kv::U64(7_241_732_096)),
            ("t.u8", Kv::U8(200)),
            ("t.i8", Kv::I8(-100)),
            ("t.u16", Kv::U16(60_000)),
            ("t.i16", Kv::I16(-30_000)),
            ("t.u32", Kv::U32(4_000_000_000)),
            ("t.i32", Kv::I32(-2_000_000_000)),
            ("t.f32", Kv::F32(0.5)),
            ("t.bool", Kv::Bool(true)),
            ("t.i64", Kv::I64(-5)),
            ("t.f64", Kv::F64(1e-6)),
            (
                "tokenizer.ggml.tokens",
                Kv::StrArray(&["<s>", "</s>", "hello"]),
            ),
            ("t.u32s", Kv::U32Array(&[1, 2, 3, 4])),
            ("t.nested", Kv::NestedArray(&[b"ab", b"", b"xyz"])),
        ],
        &[
            ("token_embd.weight", &[4096, 32000]),
            ("blk.0.attn_norm.weight", &[4096]),
        ],
    )
}

#[test]
fn every_value_type_is_read() {
    let bytes = all_types();
    let h = read_gguf_header(&bytes[..], bytes.len() as u64).unwrap();
    assert_eq!(h.version, 3);
    assert!(!h.big_endian);
    assert_eq!(h.parameter_count(), Some(7_241_732_096));
    assert_eq!(h.size_label(), Some("7B"));
    assert_eq!(h.architecture(), Some("llama"));
    let m = &h.metadata;
    assert_eq!(m["t.u8"], GgufValue::Unsigned(200));
    assert_eq!(m["t.i8"], GgufValue::Signed(-100));
    assert_eq!(m["t.u16"], GgufValue::Unsigned(60_000));
    assert_eq!(m["t.i16"], GgufValue::Signed(-30_000));
    assert_eq!(m["t.u32"], GgufValue::Unsigned(4_000_000_000));
    assert_eq!(m["t.i32"], GgufValue::Signed(-2_000_000_000));
    assert_eq!(m["t.f32"], GgufValue::Float(0.5));
    assert_eq!(m["t.bool"], GgufValue::Bool(true));
    assert_eq!(m["t.i64"], GgufValue::Signed(-5));
    assert_eq!(m["t.f64"], GgufValue::Float(1e-6));
    assert_eq!(
        m["tokenizer.ggml.tokens"],
        GgufValue::Array {
            element_type: 8,
            len: 3
        }
    );
    assert_eq!(
        m["t.u32s"],
        GgufValue::Array {
            element_type: 4,
            len: 4
        }
    );
    assert_eq!(
        m["t.nested"],
        GgufValue::Array {
            element_type: 9,
            len: 3
        }
    );
    assert_eq!(h.tensor_count, 2);
    assert_eq!(h.tensor_elements, 4096 * 32000 + 4096);
}

#[test]
fn version_2_and_the_tensor_sum() {
    let bytes = gguf(
        2,
        &[("general.name", Kv::Str("tiny"))],
        &[("a", &[3, 5]), ("b", &[7]), ("c", &[])],
    );
    let h = read_gguf_header(&bytes[..], bytes.len() as u64).unwrap();
    assert_eq!(h.version, 2);
    assert_eq!(h.parameter_count(), None);
    assert_eq!(h.size_label(), None);
    assert_eq!(h.tensor_elements, 15 + 7 + 1);
}

#[test]
fn big_endian_files_are_read() {
    // The same header written big-endian by hand.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_be_bytes());
    b.extend(1u64.to_be_bytes());
    b.extend(1u64.to_be_bytes());
    let key = b"general.parameter_count";
    b.extend((key.len() as u64).to_be_bytes());
    b.extend(key);
    b.extend(10u32.to_be_bytes());
    b.extend(1234u64.to_be_bytes());
    b.extend(1u64.to_be_bytes());
    b.push(b'w');
    b.extend(2u32.to_be_bytes());
    b.extend(10u64.to_be_bytes());
    b.extend(20u64.to_be_bytes());
    b.extend(0u32.to_be_bytes());
    b.extend(0u64.to_be_bytes());
    let h = read_gguf_header(&b[..], b.len() as u64).unwrap();
    assert!(h.big_endian);
    assert_eq!(h.parameter_count(), Some(1234));
    assert_eq!(h.tensor_elements, 200);
}

#[test]
fn every_truncation_is_an_error() {
    let bytes = all_types();
    for cut in 0..bytes.len() {
        let err = read_gguf_header(&bytes[..cut], cut as u64).unwrap_err();
        assert!(
            matches!(
                err,
                GgufError::Truncated { .. }
                    | GgufError::LengthTooLarge { .. }
                    | GgufError::BadMagic
            ),
            "cut at {cut}: {err}"
        );
    }
}

#[test]
fn lengths_are_capped_by_the_file() {
    // A key claiming 2^60 bytes.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    b.extend([0; 16]);
    let err = read_gguf_header(&b[..], b.len() as u64).unwrap_err();
    assert!(
        matches!(err, GgufError::LengthTooLarge { what: "key", .. }),
        "{err}"
    );

    // A tensor count the file cannot hold.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let err = read_gguf_header(&b[..], b.len() as u64).unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::LengthTooLarge {
                what: "tensor count",
                ..
            }
        ),
        "{err}"
    );

    // An array of u64 claiming more elements than bytes left.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.push(b'k');
    b.extend(9u32.to_le_bytes());
    b.extend(10u32.to_le_bytes());
    b.extend((u64::MAX / 4).to_le_bytes());
    let err = read_gguf_header(&b[..], b.len() as u64).unwrap_err();
    assert!(
        matches!(
            err,
            GgufError::LengthTooLarge {
                what: "array length",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn bad_magic_versions_and_types() {
    let err = read_gguf_header(&b"GGML\x03\0\0\0"[..], 8).unwrap_err();
    assert!(matches!(err, GgufError::BadMagic));
    let mut v1 = all_types();
    v1[4..8].copy_from_slice(&1u32.to_le_bytes());
    let err = read_gguf_header(&v1[..], v1.len() as u64).unwrap_err();
    assert_eq!(
        err.to_string(),
        "unsupported GGUF version 1 (versions 2 and 3 are read)"
    );

    let mut b = gguf(3, &[("k", Kv::U8(1))], &[]);
    // Type code of the only value: after magic, version, counts, key.
    let at = 4 + 4 + 8 + 8 + 8 + 1;
    b[at..at + 4].copy_from_slice(&13u32.to_le_bytes());
    let err = read_gguf_header(&b[..], b.len() as u64).unwrap_err();
    assert_eq!(err.to_string(), "key \"k\": unknown value type 13");

    let b = gguf(3, &[], &[("t", &[1, 2, 3, 4, 5])]);
    let err = read_gguf_header(&b[..], b.len() as u64).unwrap_err();
    assert!(matches!(err, GgufError::TooManyDims { dims: 5, .. }));
}

#[test]
fn long_strings_are_skipped_not_kept() {
    let long = "x".repeat((qlora_scale::files::MAX_KEPT_STRING_LEN + 1) as usize);
    let b = gguf(
        3,
        &[
            ("tokenizer.chat_template", Kv::Str(&long)),
            ("general.size_label", Kv::Str("1B")),
        ],
        &[],
    );
    let h = read_gguf_header(&b[..], b.len() as u64).unwrap();
    assert_eq!(
        h.metadata["tokenizer.chat_template"],
        GgufValue::LongText {
            bytes: long.len() as u64
        }
    );
    assert_eq!(h.size_label(), Some("1B"));
}
