//! Parameter counts from hand-built safetensors headers, plain and packed.

mod support;

use qlora_scale::files::{
    FilesError, PackedLayout, QuantHints, SafetensorsError, count_safetensors_file,
    count_safetensors_index, read_safetensors_header,
};
use support::{safetensors_header, write_safetensors};

const H: u64 = 64;
const I: u64 = 128;

fn count(
    tensors: &[(&str, &str, &[u64])],
    hints: &QuantHints,
) -> qlora_scale::files::SafetensorsCount {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    write_safetensors(&path, tensors);
    count_safetensors_file(&path, hints).unwrap()
}

fn bits(b: u32) -> QuantHints {
    QuantHints {
        bits: Some(b),
        ..QuantHints::default()
    }
}

#[test]
fn plain_tensors_sum_their_shapes() {
    let c = count(
        &[
            ("model.embed_tokens.weight", "BF16", &[1000, H]),
            ("model.layers.0.self_attn.q_proj.weight", "BF16", &[H, H]),
            ("model.layers.0.self_attn.q_proj.bias", "BF16", &[H]),
            ("model.layers.0.mlp.up_proj.weight", "F32", &[I, H]),
            ("model.norm.weight", "F16", &[H]),
            ("scalar", "F32", &[]),
        ],
        &QuantHints::default(),
    );
    assert_eq!(c.params, 1000 * H + H * H + H + I * H + H + 1);
    assert_eq!(c.params, c.stored_elements);
    assert_eq!(c.tensors, 6);
    assert!(c.layouts.is_empty());
}

/// GPTQ: qweight [in * bits / 32, out] int32, qzeros [groups, out * bits / 32],
/// scales [groups, out] f16, g_idx [in].
fn gptq(b: u64) -> Vec<(String, &'static str, Vec<u64>)> {
    let groups = H / 32;
    let p = "model.layers.0.mlp.up_proj";
    vec![
        (format!("{p}.qweight"), "I32", vec![H * b / 32, I]),
        (format!("{p}.qzeros"), "I32", vec![groups, I * b / 32]),
        (format!("{p}.scales"), "F16", vec![groups, I]),
        (format!("{p}.g_idx"), "I32", vec![H]),
        (format!("{p}.bias"), "F16", vec![I]),
        ("model.embed_tokens.weight".into(), "F16", vec![1000, H]),
    ]
}

fn as_refs<'a>(v: &'a [(String, &'static str, Vec<u64>)]) -> Vec<(&'a str, &'a str, &'a [u64])> {
    v.iter()
        .map(|(n, d, s)| (n.as_str(), *d, s.as_slice()))
        .collect()
}

#[test]
fn gptq_qweight_is_unpacked_and_companions_are_not_params() {
    for b in [4u64, 8] {
        let tensors = gptq(b);
        let c = count(&as_refs(&tensors), &bits(b as u32));
        assert_eq!(c.params, H * I + I + 1000 * H, "{b}-bit");
        assert_eq!(
            c.layouts.iter().copied().collect::<Vec<_>>(),
            [PackedLayout::GptqAwq]
        );
    }
    // Without a config, 4-bit is assumed.
    let c = count(&as_refs(&gptq(4)), &QuantHints::default());
    assert_eq!(c.params, H * I + I + 1000 * H);
}

#[test]
fn awq_layout_counts_the_same() {
    // AWQ packs along the output dimension: qweight [in, out / 8].
    let p = "model.layers.0.self_attn.o_proj";
    let c = count(
        &[
            (&format!("{p}.qweight"), "I32", &[H, H / 8]),
            (&format!("{p}.qzeros"), "I32", &[H / 64, H / 8]),
            (&format!("{p}.scales"), "F16", &[H / 64, H]),
        ],
        &QuantHints::default(),
    );
    assert_eq!(c.params, H * H);
}

#[test]
fn bitsandbytes_4bit_counts_two_params_a_byte() {
    let w = "model.layers.0.mlp.down_proj.weight";
    let c = count(
        &[
            (w, "U8", &[H * I / 2, 1]),
            (&format!("{w}.absmax"), "F32", &[H * I / 64]),
            (&format!("{w}.quant_map"), "F32", &[16]),
            (&format!("{w}.nested_absmax"), "F32", &[4]),
            (&format!("{w}.nested_quant_map"), "F32", &[256]),
            (&format!("{w}.quant_state.bitsandbytes__nf4"), "U8", &[120]),
            ("model.norm.weight", "F16", &[H]),
        ],
        &QuantHints::default(),
    );
    assert_eq!(c.params, H * I + H);
    assert!(c.layouts.contains(&PackedLayout::Bnb4));
}

#[test]
fn bitsandbytes_8bit_leaves_out_scb() {
    let p = "model.layers.0.mlp.down_proj";
    let c = count(
        &[
            (&format!("{p}.weight"), "I8", &[H, I]),
            (&format!("{p}.SCB"), "F32", &[H]),
            (&format!("{p}.weight_format"), "U8", &[]),
        ],
        &QuantHints::default(),
    );
    assert_eq!(c.params, H * I);
    assert!(c.layouts.contains(&PackedLayout::Bnb8));
}

#[test]
fn mlx_bits_come_from_the_config() {
    let tensors = |b: u64| {
        let p = "model.layers.0.mlp.gate_proj";
        vec![
            (format!("{p}.weight"), "U32", vec![I, H * b / 32]),
            (format!("{p}.scales"), "BF16", vec![I, H / 64]),
            (format!("{p}.biases"), "BF16", vec![I, H / 64]),
            (
                "model.embed_tokens.weight".into(),
                "U32",
                vec![1000, H * b / 32],
            ),
            (
                "model.embed_tokens.scales".into(),
                "BF16",
                vec![1000, H / 64],
            ),
            (
                "model.embed_tokens.biases".into(),
                "BF16",
                vec![1000, H / 64],
            ),
            (
                "model.layers.0.self_attn.o_proj.bias".into(),
                "BF16",
                vec![H],
            ),
        ]
    };
    let expected = I * H + 1000 * H + H;
    for b in [4u64, 8] {
        let config = serde_json::json!({"quantization": {"group_size": 64, "bits": b}});
        let c = count(&as_refs(&tensors(b)), &QuantHints::from_config(&config));
        assert_eq!(c.params, expected, "{b}-bit");
        assert!(c.layouts.contains(&PackedLayout::Mlx));
    }
    // No config: 4-bit.
    assert_eq!(
        count(&as_refs(&tensors(4)), &QuantHints::default()).params,
        expected
    );
    // A per-module override (MLX mixed quantization).
    let mut mixed = tensors(4);
    mixed[3].2 = vec![1000, H * 8 / 32];
    let config = serde_json::json!({"quantization": {
        "group_size": 64, "bits": 4, "model.embed_tokens": {"group_size": 64, "bits": 8}
    }});
    assert_eq!(
        count(&as_refs(&mixed), &QuantHints::from_config(&config)).params,
        expected
    );
}

#[test]
fn fp8_scales_are_not_params() {
    let p = "model.layers.0.mlp.up_proj";
    let c = count(
        &[
            (&format!("{p}.weight"), "F8_E4M3", &[I, H]),
            (&format!("{p}.weight_scale_inv"), "F32", &[1, 1]),
            (&format!("{p}.input_scale"), "F32", &[]),
        ],
        &QuantHints::default(),
    );
    assert_eq!(c.params, I * H);
}

#[test]
fn sharded_index_counts_all_shards_together() {
    let dir = tempfile::tempdir().unwrap();
    let p = "model.layers.0.mlp.up_proj";
    // The qweight in one shard, its companions in the other.
    write_safetensors(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[
            (&format!("{p}.qweight"), "I32", &[H / 8, I]),
            ("lm_head.weight", "F16", &[1000, H]),
        ],
    );
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[
            (&format!("{p}.scales"), "F16", &[2, I]),
            (&format!("{p}.qzeros"), "I32", &[2, I / 8]),
        ],
    );
    let index = serde_json::json!({
        "metadata": {"total_size": 123456},
        "weight_map": {
            format!("{p}.qweight"): "model-00001-of-00002.safetensors",
            "lm_head.weight": "model-00001-of-00002.safetensors",
            format!("{p}.scales"): "model-00002-of-00002.safetensors",
            format!("{p}.qzeros"): "model-00002-of-00002.safetensors",
        }
    });
    let index_path = dir.path().join("model.safetensors.index.json");
    std::fs::write(&index_path, index.to_string()).unwrap();
    let (c, idx) = count_safetensors_index(&index_path, &QuantHints::default()).unwrap();
    assert_eq!(c.params, H * I + 1000 * H);
    assert_eq!(c.lm_head_params, 1000 * H);
    assert_eq!(idx.total_size_bytes, Some(123456));
    assert_eq!(idx.shards.len(), 2);

    // A missing shard is an error naming it.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
    let err = count_safetensors_index(&index_path, &QuantHints::default()).unwrap_err();
    assert!(matches!(err, FilesError::Io { .. }));
    assert!(
        err.to_string().contains("model-00002-of-00002.safetensors"),
        "{err}"
    );

    // Shards outside the directory are refused.
    std::fs::write(
        &index_path,
        r#"{"weight_map": {"w": "../elsewhere.safetensors"}}"#,
    )
    .unwrap();
    let err = count_safetensors_index(&index_path, &QuantHints::default()).unwrap_err();
    assert!(
        matches!(
            err,
            FilesError::Index {
                field: "weight_map",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn malformed_headers_are_clear_errors() {
    // Shorter than the length prefix.
    let err = read_safetensors_header(&b"\x01\x02"[..], 2).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::Truncated { needed: 8, len: 2 }),
        "{err}"
    );
    // An absurd header length is refused before anything is allocated.
    let mut bytes = u64::MAX.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    let err = read_safetensors_header(&bytes[..], bytes.len() as u64).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::HeaderTooLarge { .. }),
        "{err}"
    );
    // A header length past the end of the file.
    let mut bytes = 1000u64.to_le_bytes().to_vec();
    bytes.extend(b"{}");
    let err = read_safetensors_header(&bytes[..], bytes.len() as u64).unwrap_err();
    assert!(
        matches!(err, SafetensorsError::Truncated { needed: 1008, .. }),
        "{err}"
    );
    // Not JSON.
    let mut bytes = 3u64.to_le_bytes().to_vec();
    bytes.extend(b"{x}");
    let err = read_safetensors_header(&bytes[..], bytes.len() as u64).unwrap_err();
    assert!(matches!(err, SafetensorsError::Json(_)), "{err}");
    // data_offsets beyond the data section: a truncated download.
    let (header, data_len) = safetensors_header(&[("w", "F32", &[4, 4])]);
    let err = read_safetensors_header(&header[..], header.len() as u64 + data_len - 1).unwrap_err();
    assert!(
        err.to_string()
            .contains("tensor \"w\": data_offsets lie outside the file"),
        "{err}"
    );
    // Shapes whose product overflows.
    let json = format!(
        r#"{{"w":{{"dtype":"F32","shape":[{0},{0}],"data_offsets":[0,0]}}}}"#,
        u64::MAX
    );
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json.as_bytes());
    let err = read_safetensors_header(&bytes[..], bytes.len() as u64).unwrap_err();
    assert!(matches!(err, SafetensorsError::Overflow { .. }), "{err}");
    // A dtype missing.
    let json = r#"{"w":{"shape":[1],"data_offsets":[0,0]}}"#;
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json.as_bytes());
    let err = read_safetensors_header(&bytes[..], bytes.len() as u64).unwrap_err();
    assert_eq!(err.to_string(), "tensor \"w\": no \"dtype\" string");
}

#[test]
fn file_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.safetensors");
    std::fs::write(&path, b"\x10\0\0\0\0\0\0\0{").unwrap();
    let err = count_safetensors_file(&path, &QuantHints::default()).unwrap_err();
    let message = qlora_scale::report::chain_message(&err);
    assert!(
        message.contains("broken.safetensors") && message.contains("truncated"),
        "{message}"
    );
}
