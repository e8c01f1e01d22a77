//! Builders for hand-made safetensors and GGUF headers.
#![allow(dead_code)]

use std::fs::File;
use std::io::Write;
use std::path::Path;

/// Bytes per element of a safetensors dtype.
fn dtype_size(dtype: &str) -> u64 {
    match dtype {
        "F64" | "I64" | "U64" => 8,
        "F32" | "I32" | "U32" => 4,
        "F16" | "BF16" | "I16" | "U16" => 2,
        _ => 1,
    }
}

/// A safetensors header (length prefix + JSON) for `tensors`, laid out back
/// to back, and the length of the data section it describes.
pub fn safetensors_header(tensors: &[(&str, &str, &[u64])]) -> (Vec<u8>, u64) {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut offset = 0u64;
    for (name, dtype, shape) in tensors {
        let bytes = shape.iter().product::<u64>() * dtype_size(dtype);
        map.insert(
            (*name).into(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let json = serde_json::to_vec(&map).unwrap();
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    (out, offset)
}

/// Writes a safetensors file whose data section is a hole: the length is
/// right, nothing is written, so large shapes cost no disk.
pub fn write_safetensors(path: &Path, tensors: &[(&str, &str, &[u64])]) {
    let (header, data_len) = safetensors_header(tensors);
    let mut file = File::create(path).unwrap();
    file.write_all(&header).unwrap();
    file.set_len(header.len() as u64 + data_len).unwrap();
}

/// A GGUF metadata value for [`gguf`].
pub enum Kv<'a> {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    Str(&'a str),
    U64(u64),
    I64(i64),
    F64(f64),
    StrArray(&'a [&'a str]),
    U32Array(&'a [u32]),
    /// An array of arrays of u8.
    NestedArray(&'a [&'a [u8]]),
}

fn gguf_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

/// A GGUF v`version` file: the header, then (for realism) no tensor data.
pub fn gguf(version: u32, kvs: &[(&str, Kv)], tensors: &[(&str, &[u64])]) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (key, value) in kvs {
        gguf_str(&mut out, key);
        let (code, bytes): (u32, Vec<u8>) = match value {
            Kv::U8(v) => (0, v.to_le_bytes().to_vec()),
            Kv::I8(v) => (1, v.to_le_bytes().to_vec()),
            Kv::U16(v) => (2, v.to_le_bytes().to_vec()),
            Kv::I16(v) => (3, v.to_le_bytes().to_vec()),
            Kv::U32(v) => (4, v.to_le_bytes().to_vec()),
            Kv::I32(v) => (5, v.to_le_bytes().to_vec()),
            Kv::F32(v) => (6, v.to_le_bytes().to_vec()),
            Kv::Bool(v) => (7, vec![u8::from(*v)]),
            Kv::Str(s) => {
                let mut b = Vec::new();
                gguf_str(&mut b, s);
                (8, b)
            }
            Kv::U64(v) => (10, v.to_le_bytes().to_vec()),
            Kv::I64(v) => (11, v.to_le_bytes().to_vec()),
            Kv::F64(v) => (12, v.to_le_bytes().to_vec()),
            Kv::StrArray(items) => {
                let mut b = 8u32.to_le_bytes().to_vec();
                b.extend((items.len() as u64).to_le_bytes());
                for s in *items {
                    gguf_str(&mut b, s);
                }
                (9, b)
            }
            Kv::U32Array(items) => {
                let mut b = 4u32.to_le_bytes().to_vec();
                b.extend((items.len() as u64).to_le_bytes());
                for v in *items {
                    b.extend(v.to_le_bytes());
                }
                (9, b)
            }
            Kv::NestedArray(items) => {
                let mut b = 9u32.to_le_bytes().to_vec();
                b.extend((items.len() as u64).to_le_bytes());
                for inner in *items {
                    b.extend(0u32.to_le_bytes());
                    b.extend((inner.len() as u64).to_le_bytes());
                    b.extend(*inner);
                }
                (9, b)
            }
        };
        out.extend(code.to_le_bytes());
        out.extend(bytes);
    }
    let mut offset = 0u64;
    for (name, dims) in tensors {
        gguf_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for d in *dims {
            out.extend(d.to_le_bytes());
        }
        out.extend(12u32.to_le_bytes()); // Q4_K
        out.extend(offset.to_le_bytes());
        offset += 32;
    }
    out
}
