//! Safetensors headers that lie (security issue #16, item 8): sizes that do
//! not match the data, duplicate keys, overlapping tensors, unknown dtypes,
//! very large headers, and integer tensors handed to the trainer as weights.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};
use qlora_scale::files::{
    FilesError, QuantHints, SafetensorsError, count_safetensors_file, detect_model_size_local,
    read_safetensors_header,
};
use qlora_scale::qlora::{LlamaConfig, LlamaModel, ModelOptions, SafetensorsDir};
use qlora_scale::report::chain_message;

/// A safetensors file: the length prefix, `json`, then `data_len` bytes.
fn file_bytes(json: &str, data_len: usize) -> Vec<u8> {
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json.as_bytes());
    bytes.extend(std::iter::repeat_n(0u8, data_len));
    bytes
}

fn header_error(json: &str, data_len: usize) -> SafetensorsError {
    let bytes = file_bytes(json, data_len);
    read_safetensors_header(&bytes[..], bytes.len() as u64).unwrap_err()
}

/// The error counting a file holding `json` and `data_len` bytes gives,
/// through the public path API: it names the file.
fn file_error(json: &str, data_len: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, file_bytes(json, data_len)).unwrap();
    let err = count_safetensors_file(&path, &QuantHints::default()).unwrap_err();
    assert!(matches!(err, FilesError::Safetensors { .. }), "{err}");
    let message = chain_message(&err);
    assert!(message.contains("model.safetensors"), "{message}");
    message
}

#[test]
fn a_100_byte_file_claiming_a_huge_tensor_is_refused() {
    // 1e12 F32 elements in 4 bytes of data.
    let json = r#"{"w":{"dtype":"F32","shape":[1000000,1000000],"data_offsets":[0,4]}}"#;
    let data = 100 - 8 - json.len();
    let bytes = file_bytes(json, data);
    assert_eq!(bytes.len(), 100);
    let err = read_safetensors_header(&bytes[..], 100).unwrap_err();
    assert!(
        matches!(&err, SafetensorsError::SizeMismatch { name, span: 4, .. } if name == "w"),
        "{err}"
    );
    // And through detection: the name, not a trillion-parameter model.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, &bytes).unwrap();
    let (size, problems) = detect_model_size_local(&path);
    assert!(size.params < 1_000_000, "{size:?}");
    assert_eq!(problems.len(), 1, "{problems:?}");
    let message = file_error(json, data);
    assert!(
        message.contains("tensor \"w\"") && message.contains("does not match"),
        "{message}"
    );
}

#[test]
fn shape_times_dtype_must_equal_the_offsets_span() {
    for (json, data) in [
        // Too few bytes.
        (
            r#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,11]}}"#,
            11,
        ),
        // Too many bytes.
        (
            r#"{"w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,13]}}"#,
            13,
        ),
        // A scalar takes its dtype's size.
        (
            r#"{"w":{"dtype":"I64","shape":[],"data_offsets":[0,4]}}"#,
            4,
        ),
        // Sub-byte F4: 3 values are 12 bits, not whole bytes.
        (
            r#"{"w":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}"#,
            2,
        ),
    ] {
        let err = header_error(json, data);
        assert!(
            matches!(&err, SafetensorsError::SizeMismatch { name, .. } if name == "w"),
            "{json}: {err}"
        );
    }
    // Sizes that do match are accepted, sub-byte dtypes by their bits.
    for (json, data) in [
        (
            r#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}}"#,
            12,
        ),
        (
            r#"{"w":{"dtype":"F4","shape":[4],"data_offsets":[0,2]}}"#,
            2,
        ),
        (
            r#"{"w":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}"#,
            3,
        ),
        (
            r#"{"w":{"dtype":"BOOL","shape":[0],"data_offsets":[0,0]}}"#,
            0,
        ),
    ] {
        let bytes = file_bytes(json, data);
        read_safetensors_header(&bytes[..], bytes.len() as u64)
            .unwrap_or_else(|e| panic!("{json}: {e}"));
    }
}

#[test]
fn the_size_product_overflowing_is_an_error() {
    // The element count fits in 64 bits, its bytes do not.
    let json = format!(
        r#"{{"w":{{"dtype":"F64","shape":[{}],"data_offsets":[0,8]}}}}"#,
        u64::MAX / 4
    );
    let err = header_error(&json, 8);
    assert!(
        matches!(&err, SafetensorsError::Overflow { name } if name == "w"),
        "{err}"
    );
}

#[test]
fn duplicate_keys_are_refused_naming_the_key() {
    let json = concat!(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
        r#""v":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},"#,
        r#""w":{"dtype":"F32","shape":[1000000,1000],"data_offsets":[8,8]}}"#
    );
    let err = header_error(json, 8);
    assert!(
        matches!(&err, SafetensorsError::DuplicateKey { name } if name == "w"),
        "{err}"
    );
    let message = file_error(json, 8);
    assert!(
        message.contains("key \"w\" appears more than once"),
        "{message}"
    );
    // Even a duplicate that repeats the entry exactly.
    let json = concat!(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
        r#""w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#
    );
    assert!(matches!(
        header_error(json, 4),
        SafetensorsError::DuplicateKey { .. }
    ));
    // And a repeated __metadata__.
    let json = r#"{"__metadata__":{},"__metadata__":{}}"#;
    assert!(matches!(
        header_error(json, 0),
        SafetensorsError::DuplicateKey { .. }
    ));
}

#[test]
fn overlapping_tensors_are_refused_naming_both() {
    let json = concat!(
        r#"{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},"#,
        r#""c":{"dtype":"F32","shape":[2],"data_offsets":[16,24]},"#,
        r#""b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#
    );
    let err = header_error(json, 24);
    assert!(
        matches!(&err, SafetensorsError::Overlap { first, second } if first == "a" && second == "b"),
        "{err}"
    );
    let message = file_error(json, 24);
    assert!(
        message.contains("tensors \"a\" and \"b\" overlap"),
        "{message}"
    );
    // Every tensor at offset 0: the same bytes counted many times.
    let json = concat!(
        r#"{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},"#,
        r#""b":{"dtype":"I32","shape":[1],"data_offsets":[0,4]}}"#
    );
    assert!(matches!(
        header_error(json, 4),
        SafetensorsError::Overlap { .. }
    ));
    // Back to back, and an empty tensor at a boundary, are fine.
    let json = concat!(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"#,
        r#""e":{"dtype":"F32","shape":[0,3],"data_offsets":[8,8]},"#,
        r#""b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}"#
    );
    let bytes = file_bytes(json, 16);
    let tensors = read_safetensors_header(&bytes[..], bytes.len() as u64).unwrap();
    assert_eq!(tensors.len(), 3);
}

#[test]
fn offsets_that_end_before_they_begin_are_refused() {
    let json = r#"{"w":{"dtype":"U8","shape":[0],"data_offsets":[4,0]}}"#;
    let err = header_error(json, 4);
    assert!(
        err.to_string()
            .contains("tensor \"w\": data_offsets end before they begin"),
        "{err}"
    );
}

#[test]
fn unknown_dtypes_are_refused_naming_the_tensor() {
    let json = r#"{"w":{"dtype":"Q4_K","shape":[4],"data_offsets":[0,4]}}"#;
    let err = header_error(json, 4);
    assert!(
        matches!(&err, SafetensorsError::UnknownDtype { name, dtype } if name == "w" && dtype == "Q4_K"),
        "{err}"
    );
    let message = file_error(json, 4);
    assert!(
        message.contains("tensor \"w\": unknown dtype \"Q4_K\""),
        "{message}"
    );
}

/// A header of `n` one-element F32 tensors, back to back.
fn many_tensors(n: usize) -> (String, usize) {
    let mut json = String::with_capacity(n * 64);
    json.push('{');
    for i in 0..n {
        if i > 0 {
            json.push(',');
        }
        json.push_str(&format!(
            r#""model.layers.{i}.weight":{{"dtype":"F32","shape":[1],"data_offsets":[{},{}]}}"#,
            4 * i,
            4 * i + 4
        ));
    }
    json.push('}');
    (json, 4 * n)
}

#[test]
fn a_large_header_parses_in_bounded_time() {
    let (json, data) = many_tensors(200_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, file_bytes(&json, data)).unwrap();
    let started = Instant::now();
    let count = count_safetensors_file(&path, &QuantHints::default()).unwrap();
    let took = started.elapsed();
    assert_eq!(count.tensors, 200_000);
    assert_eq!(count.params, 200_000);
    // About 0.1 s in a debug build; generous for a loaded machine.
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_long_name_is_not_quadratic() {
    // A name holding `.weight.` 100,000 times: each occurrence used to hash
    // the prefix before it (about 5 s here; a 100 MB name, hours).
    let name = format!("m{}.x", ".weight".repeat(100_000));
    let json = format!(r#"{{"{name}":{{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}}}"#);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    std::fs::write(&path, file_bytes(&json, 4)).unwrap();
    let started = Instant::now();
    let count = count_safetensors_file(&path, &QuantHints::default()).unwrap();
    let took = started.elapsed();
    assert_eq!(count.params, 1);
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

#[test]
fn a_header_over_the_cap_is_refused_unread() {
    let len = qlora_scale::files::MAX_HEADER_LEN + 1;
    let mut bytes = len.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    // The file claims to be long enough: the cap, not truncation, refuses it.
    let err = read_safetensors_header(&bytes[..], len + 8).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::HeaderTooLarge { len: l } if l == len),
        "{err}"
    );
    assert!(err.to_string().contains("limit"), "{err}");
}

fn write_model(dir: &Path, cfg: &LlamaConfig, weights: &HashMap<String, Tensor>) {
    std::fs::write(dir.join("config.json"), serde_json::to_vec(cfg).unwrap()).unwrap();
    candle_core::safetensors::save(weights, dir.join("model.safetensors")).unwrap();
}

#[test]
fn the_loader_refuses_an_integer_weight() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny(1, 32, 48, 37);
    let mut w = cfg.random_weights(3, DType::F32, &Device::Cpu).unwrap();
    let name = "model.layers.0.mlp.up_proj.weight";
    let shape = w[name].dims().to_vec();
    let ints = Tensor::zeros(shape, DType::I64, &Device::Cpu).unwrap();
    w.insert(name.to_string(), ints);
    write_model(dir.path(), &cfg, &w);

    let src = SafetensorsDir::open(dir.path(), &Device::Cpu).unwrap();
    let err = LlamaModel::new(&cfg, &src, &ModelOptions::default()).unwrap_err();
    let message = chain_message(&err);
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(message.contains(name), "{message}");
    assert!(
        message.contains("I64") && message.contains("not a float"),
        "{message}"
    );

    // The same model with float weights loads (BF16 too).
    let w = cfg.random_weights(3, DType::F32, &Device::Cpu).unwrap();
    let w: HashMap<String, Tensor> = w
        .into_iter()
        .map(|(k, v)| (k, v.to_dtype(DType::BF16).unwrap()))
        .collect();
    write_model(dir.path(), &cfg, &w);
    let src = SafetensorsDir::open(dir.path(), &Device::Cpu).unwrap();
    LlamaModel::new(&cfg, &src, &ModelOptions::default()).unwrap();
}

#[test]
fn the_loader_refuses_a_duplicate_key() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LlamaConfig::tiny(1, 32, 48, 37);
    std::fs::write(
        dir.path().join("config.json"),
        serde_json::to_vec(&cfg).unwrap(),
    )
    .unwrap();
    let json = concat!(
        r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"#,
        r#""w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#
    );
    std::fs::write(dir.path().join("model.safetensors"), file_bytes(json, 4)).unwrap();
    let err = SafetensorsDir::open(dir.path(), &Device::Cpu).unwrap_err();
    let message = chain_message(&err);
    assert!(message.contains("model.safetensors"), "{message}");
    assert!(
        message.contains("key \"w\" appears more than once"),
        "{message}"
    );
}

#[test]
fn a_duplicate_field_inside_an_entry_is_refused() {
    let json = r#"{"w":{"dtype":"F32","dtype":"I8","shape":[1],"data_offsets":[0,4]}}"#;
    let err = header_error(json, 4);
    assert!(matches!(err, SafetensorsError::Json(_)), "{err}");
}
