//! Exact parameter counts from `config.json`, checked against published
//! totals. Fixtures: `tests/fixtures/configs/`, the architecture fields of
//! each model's real `config.json`.

use std::path::{Path, PathBuf};

use qlora_scale::files::{ConfigError, FilesError, config_param_count_str, count_config_file};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/configs")
        .join(name)
}

/// `(fixture, exact total, where the total is published)`.
const CASES: &[(&str, u64, &str)] = &[
    ("llama-2-7b.json", 6_738_415_616, "Hub safetensors total"),
    (
        "tinyllama-1.1b.json",
        1_100_048_384,
        "Hub safetensors total",
    ),
    (
        "llama-3-8b.json",
        8_030_261_248,
        "Hub safetensors total (8.03B)",
    ),
    (
        "mistral-7b-v0.1.json",
        7_241_732_096,
        "Hub safetensors total",
    ),
    (
        "mixtral-8x7b-v0.1.json",
        46_702_792_704,
        "Hub safetensors total",
    ),
    ("qwen2.5-0.5b.json", 494_032_768, "Hub safetensors total"),
    // Card: 7.61B total, 6.53B non-embedding.
    ("qwen2.5-7b.json", 7_615_616_512, "model card 7.61B"),
    // Card: 0.6B total, 0.44B non-embedding (the Hub widget shows 0.75B
    // because the checkpoint stores the tied lm_head a second time).
    ("qwen3-0.6b.json", 596_049_920, "model card 0.6B"),
    ("qwen1.5-moe-a2.7b.json", 14_315_784_192, "model card 14.3B"),
    // Card: 30.5B total, 29.9B non-embedding.
    ("qwen3-30b-a3b.json", 30_532_122_624, "model card 30.5B"),
    // The Gemma papers give non-embedding counts (1,981,884,416 and
    // 2,024,517,888), which these match exactly; their embedding counts use
    // the padded 256,128-row vocabulary instead of config's 256,000.
    (
        "gemma-2b.json",
        2_506_172_416,
        "Gemma paper, non-embedding exact",
    ),
    (
        "gemma-2-2b.json",
        2_614_341_888,
        "Gemma 2 paper, non-embedding exact",
    ),
    ("gemma-3-1b.json", 999_885_952, "Hub safetensors total (1B)"),
    ("phi-2.json", 2_779_683_840, "Hub safetensors total (2.78B)"),
    ("phi-3-mini-4k.json", 3_821_079_552, "Hub safetensors total"),
    ("gpt2.json", 124_439_808, "Hub safetensors total"),
    (
        "gpt2-xl.json",
        1_557_611_200,
        "Hub safetensors total (1.56B)",
    ),
    ("pythia-160m.json", 162_322_944, "Pythia README"),
    ("pythia-410m.json", 405_334_016, "Pythia README"),
    (
        "falcon-7b.json",
        6_921_720_704,
        "Hub safetensors total (6.92B)",
    ),
];

#[test]
fn config_counts_match_published_totals() {
    let mut wrong = Vec::new();
    for &(file, expected, source) in CASES {
        match count_config_file(&fixture(file)) {
            Ok(count) if count.params == expected => {}
            Ok(count) => wrong.push(format!(
                "{file}: counted {}, expected {expected} ({source})",
                count.params
            )),
            Err(e) => wrong.push(format!("{file}: {e}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn every_supported_architecture_has_a_fixture() {
    let mut types: Vec<String> = CASES
        .iter()
        .map(|(file, ..)| count_config_file(&fixture(file)).unwrap().model_type)
        .collect();
    types.sort();
    types.dedup();
    for required in [
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen3",
        "qwen2_moe",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi",
        "phi3",
        "gpt2",
        "gpt_neox",
        "falcon",
    ] {
        assert!(
            types.iter().any(|t| t == required),
            "no fixture for {required}"
        );
    }
}

#[test]
fn tied_embeddings_and_experts_are_reported() {
    let qwen = count_config_file(&fixture("qwen2.5-0.5b.json")).unwrap();
    assert!(qwen.tied_embeddings);
    assert_eq!(qwen.experts, None);
    let gemma = count_config_file(&fixture("gemma-2b.json")).unwrap();
    assert!(gemma.tied_embeddings, "Gemma ties by default");
    let mixtral = count_config_file(&fixture("mixtral-8x7b-v0.1.json")).unwrap();
    assert!(!mixtral.tied_embeddings);
    assert_eq!(mixtral.experts, Some(8));
}

#[test]
fn unknown_model_type_names_the_file_and_the_type() {
    let path = fixture("unknown-mamba.json");
    let err = count_config_file(&path).unwrap_err();
    assert!(
        matches!(&err, FilesError::Config { source: ConfigError::UnsupportedModelType { model_type }, .. } if model_type == "mamba")
    );
    let message = qlora_scale::report::chain_message(&err);
    assert!(message.contains("unknown-mamba.json"), "{message}");
    assert!(message.contains("\"mamba\""), "{message}");
}

#[test]
fn missing_and_invalid_fields_are_named() {
    let err =
        config_param_count_str(r#"{"model_type": "llama", "vocab_size": 32000}"#).unwrap_err();
    assert_eq!(err.to_string(), "llama: missing field \"hidden_size\"");
    let err = config_param_count_str(
        r#"{"model_type": "gpt2", "vocab_size": 1, "n_embd": -4, "n_layer": 1, "n_positions": 1}"#,
    )
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "gpt2: field \"n_embd\" must be a positive integer"
    );
    assert!(matches!(
        config_param_count_str("[1, 2]"),
        Err(ConfigError::NotAnObject)
    ));
    assert!(matches!(
        config_param_count_str("{"),
        Err(ConfigError::Json(_))
    ));
    assert!(matches!(
        config_param_count_str("{}"),
        Err(ConfigError::NoModelType)
    ));
}

#[test]
fn absurd_sizes_overflow_into_an_error() {
    let big = u64::MAX / 2;
    let text = format!(
        r#"{{"model_type": "llama", "vocab_size": {big}, "hidden_size": {big},
            "intermediate_size": 4, "num_hidden_layers": 2, "num_attention_heads": 1}}"#
    );
    assert!(matches!(
        config_param_count_str(&text),
        Err(ConfigError::Overflow { .. })
    ));
}

#[test]
fn moe_sparse_step_and_dense_layers() {
    // Qwen2-MoE with every other layer sparse and layer 1 forced dense: one
    // sparse layer of four.
    let base = |experts: u64, extra: &str| {
        format!(
            r#"{{"model_type": "qwen2_moe", "vocab_size": 10, "hidden_size": 8,
                "intermediate_size": 16, "num_hidden_layers": 4, "num_attention_heads": 2,
                "num_experts": {experts}, "moe_intermediate_size": 4,
                "shared_expert_intermediate_size": 8, "tie_word_embeddings": true {extra}}}"#
        )
    };
    let dense = config_param_count_str(&base(0, "")).unwrap();
    let sparse = config_param_count_str(&base(
        4,
        r#", "decoder_sparse_step": 2, "mlp_only_layers": [1]"#,
    ))
    .unwrap();
    // Attention (with q/k/v biases) + 2 norms a layer, shared by both.
    let attention = 4 * 8 * 8 + 3 * 8 + 2 * 8;
    let dense_mlp = 3 * 8 * 16;
    let sparse_mlp = 8 * 4 + 4 * (3 * 8 * 4) + (3 * 8 * 8) + 8;
    let embeddings = 10 * 8 + 8;
    assert_eq!(dense.params, 4 * (attention + dense_mlp) + embeddings);
    assert_eq!(
        sparse.params,
        4 * attention + 3 * dense_mlp + sparse_mlp + embeddings
    );
}
