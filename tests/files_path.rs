//! `detect_model_size_from_path`: directories and files, source priority,
//! disagreement, pickles, name fallback.

mod support;

use std::fs;
use std::path::{Path, PathBuf};

use qlora_scale::files::{CountSource, FilesError, PackedLayout};
use qlora_scale::{SizeCategory, SizeSource, detect_model_size_from_path};
use support::{Kv, gguf, write_safetensors};

fn config_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/configs")
        .join(name)
}

/// A tiny tied Llama: vocab 100, hidden 8, one layer, intermediate 16.
const TINY_CONFIG: &str = r#"{"model_type": "llama", "vocab_size": 100, "hidden_size": 8,
    "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
    "tie_word_embeddings": true}"#;
const TINY_PARAMS: u64 = 100 * 8 + (4 * 8 * 8 + 3 * 8 * 16 + 2 * 8) + 8;

/// Its tensors, with the tied lm_head stored a second time.
fn tiny_tensors() -> Vec<(&'static str, &'static str, &'static [u64])> {
    vec![
        ("model.embed_tokens.weight", "BF16", &[100, 8]),
        ("model.layers.0.self_attn.q_proj.weight", "BF16", &[8, 8]),
        ("model.layers.0.self_attn.k_proj.weight", "BF16", &[8, 8]),
        ("model.layers.0.self_attn.v_proj.weight", "BF16", &[8, 8]),
        ("model.layers.0.self_attn.o_proj.weight", "BF16", &[8, 8]),
        ("model.layers.0.mlp.gate_proj.weight", "BF16", &[16, 8]),
        ("model.layers.0.mlp.up_proj.weight", "BF16", &[16, 8]),
        ("model.layers.0.mlp.down_proj.weight", "BF16", &[8, 16]),
        ("model.layers.0.input_layernorm.weight", "BF16", &[8]),
        (
            "model.layers.0.post_attention_layernorm.weight",
            "BF16",
            &[8],
        ),
        ("model.norm.weight", "BF16", &[8]),
        ("lm_head.weight", "BF16", &[100, 8]),
    ]
}

#[test]
fn directory_sources_agree_and_config_wins() {
    let dir = ModelDir::new();
    fs::write(dir.path().join("config.json"), TINY_CONFIG).unwrap();
    write_safetensors(&dir.path().join("model.safetensors"), &tiny_tensors());
    let g = gguf(
        3,
        &[
            ("general.parameter_count", Kv::U64(TINY_PARAMS)),
            ("general.size_label", Kv::Str("2.6K")),
        ],
        &[("token_embd.weight", &[8, 100])],
    );
    fs::write(dir.path().join("tiny.Q4_K_M.gguf"), g).unwrap();
    fs::write(dir.path().join("pytorch_model.bin"), b"not opened").unwrap();

    let found = detect_model_size_from_path(dir.path()).unwrap();
    assert_eq!(found.size.params, TINY_PARAMS);
    assert_eq!(found.size.source, SizeSource::Files);
    assert_eq!(found.size.source.describe(), "from files");
    assert_eq!(found.chosen, Some(CountSource::Config));
    let sources: Vec<_> = found.counts.iter().map(|c| (c.source, c.params)).collect();
    assert_eq!(
        sources,
        [
            (CountSource::Config, TINY_PARAMS),
            // The stored tied lm_head is not counted twice.
            (CountSource::Safetensors, TINY_PARAMS),
            (CountSource::GgufMetadata, TINY_PARAMS),
            (CountSource::GgufTensors, 800),
        ]
    );
    assert_eq!(found.tied_duplicate_removed, 800);
    assert_eq!(found.size_label.as_deref(), Some("2.6K"));
    assert_eq!(found.not_read, [dir.path().join("pytorch_model.bin")]);
    assert!(found.problems.is_empty(), "{:?}", found.problems);
    // Only the partial GGUF tensor sum disagrees.
    assert_eq!(found.disagreements.len(), 1);
    assert_eq!(found.disagreements[0].source, CountSource::GgufTensors);
    assert!(found.disagreements[0].fraction > 0.1);
}

#[test]
fn disagreement_is_reported_and_the_more_reliable_source_wins() {
    let dir = ModelDir::new();
    fs::copy(config_fixture("gpt2.json"), dir.path().join("config.json")).unwrap();
    // A GGUF claiming 7B beside a gpt2 config.
    let g = gguf(
        3,
        &[("general.parameter_count", Kv::U64(7_000_000_000))],
        &[],
    );
    fs::write(dir.path().join("model.gguf"), g).unwrap();
    let found = detect_model_size_from_path(dir.path()).unwrap();
    assert_eq!(found.chosen, Some(CountSource::Config));
    assert_eq!(found.size.params, 124_439_808);
    let d = &found.disagreements[0];
    assert_eq!(
        (d.source, d.params),
        (CountSource::GgufMetadata, 7_000_000_000)
    );
    assert_eq!(
        (d.chosen, d.chosen_params),
        (CountSource::Config, 124_439_808)
    );
}

#[test]
fn a_broken_config_leaves_the_other_sources() {
    let dir = ModelDir::new();
    fs::copy(
        config_fixture("unknown-mamba.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    write_safetensors(
        &dir.path().join("model.safetensors"),
        &[("w", "F16", &[1000, 1000])],
    );
    let found = detect_model_size_from_path(dir.path()).unwrap();
    assert_eq!(found.chosen, Some(CountSource::Safetensors));
    assert_eq!(found.size.params, 1_000_000);
    assert_eq!(found.problems.len(), 1);
    let problem = qlora_scale::report::chain_message(&found.problems[0]);
    assert!(
        problem.contains("config.json") && problem.contains("\"mamba\""),
        "{problem}"
    );
}

#[test]
fn sharded_directory_and_quantized_layouts() {
    let dir = ModelDir::new();
    fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "unknown_arch", "quantization_config": {"bits": 8, "quant_method": "gptq"}}"#,
    )
    .unwrap();
    write_safetensors(
        &dir.path().join("model-00001-of-00002.safetensors"),
        &[
            ("a.qweight", "I32", &[64, 256]),
            ("a.scales", "F16", &[4, 256]),
        ],
    );
    write_safetensors(
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[("b.weight", "F16", &[256, 256])],
    );
    fs::write(
        dir.path().join("model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 165888}, "weight_map": {
            "a.qweight": "model-00001-of-00002.safetensors",
            "a.scales": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    // An adapter beside the model is not counted.
    write_safetensors(
        &dir.path().join("adapter_model.safetensors"),
        &[("lora", "F32", &[10])],
    );
    let found = detect_model_size_from_path(dir.path()).unwrap();
    assert_eq!(found.chosen, Some(CountSource::Safetensors));
    // 8-bit: 4 values an int32 word.
    assert_eq!(found.size.params, 64 * 256 * 4 + 256 * 256);
    assert_eq!(found.packed_layouts, [PackedLayout::GptqAwq]);
    assert_eq!(found.total_size_bytes, Some(165_888));
}

#[test]
fn single_files_are_read_by_kind() {
    let dir = ModelDir::new();
    let gguf_path = dir.path().join("Mistral-7B-v0.1.Q4_K_M.gguf");
    fs::write(
        &gguf_path,
        gguf(
            3,
            &[("general.size_label", Kv::Str("7B"))],
            &[("w", &[1000, 7000])],
        ),
    )
    .unwrap();
    let found = detect_model_size_from_path(&gguf_path).unwrap();
    assert_eq!(found.chosen, Some(CountSource::GgufTensors));
    assert_eq!(found.size.params, 7_000_000);
    assert_eq!(found.size_label.as_deref(), Some("7B"));
    // The name says 7B: a disagreement with the (tiny) tensor sum.
    assert!(
        found
            .disagreements
            .iter()
            .any(|d| d.source == CountSource::Name)
    );

    let config = config_fixture("mixtral-8x7b-v0.1.json");
    let found = detect_model_size_from_path(&config).unwrap();
    assert_eq!(found.size.params, 46_702_792_704);
    assert_eq!(found.size.category, SizeCategory::Large);

    // A failing file is the error.
    let bad = dir.path().join("bad.gguf");
    fs::write(&bad, b"GGUF\x09\0\0\0").unwrap();
    let err = detect_model_size_from_path(&bad).unwrap_err();
    assert!(matches!(err, FilesError::Gguf { .. }));
    assert!(err.to_string().contains("bad.gguf"), "{err}");
}

#[test]
fn pickles_are_never_opened() {
    let dir = ModelDir::new();
    let bin = dir.path().join("pytorch_model.bin");
    fs::write(&bin, b"\x80\x04 pickle").unwrap();
    let err = detect_model_size_from_path(&bin).unwrap_err();
    assert!(matches!(err, FilesError::Pickled { .. }));
    assert!(
        err.to_string().contains("pickled weights are not read"),
        "{err}"
    );

    let found = detect_model_size_from_path(dir.path()).unwrap();
    assert_eq!(found.not_read, [bin]);
    assert_eq!(found.chosen, None);
}

#[test]
fn the_name_is_the_last_resort() {
    let root = tempfile::tempdir().unwrap();
    // A Hugging Face cache snapshot: the directory is a hash, its
    // grandparent names the model.
    let snapshot = root
        .path()
        .join("models--Qwen--Qwen2.5-0.5B")
        .join("snapshots")
        .join("0123456789abcdef0123456789abcdef01234567");
    fs::create_dir_all(&snapshot).unwrap();
    let found = detect_model_size_from_path(&snapshot).unwrap();
    assert_eq!(found.chosen, Some(CountSource::Name));
    assert_eq!(found.size.params, 500_000_000);
    assert_eq!(found.size.source, SizeSource::Name);

    let err = detect_model_size_from_path(&root.path().join("missing")).unwrap_err();
    assert!(matches!(err, FilesError::Io { .. }));
}

#[test]
fn invalid_json_names_the_file() {
    let dir = ModelDir::new();
    let path = dir.path().join("config.json");
    fs::write(&path, "{\"model_type\": ").unwrap();
    let err = detect_model_size_from_path(&path).unwrap_err();
    assert!(matches!(err, FilesError::Json { .. }));
    assert!(
        err.to_string().contains("config.json: not valid JSON"),
        "{err}"
    );
}

/// A model directory with a fixed name inside a temporary directory: the
/// random name of a bare temporary directory can spell a size (`.tmpX7b`),
/// which the name source would then report.
struct ModelDir {
    _root: tempfile::TempDir,
    path: std::path::PathBuf,
}

impl ModelDir {
    fn new() -> ModelDir {
        let root = tempfile::tempdir().unwrap();
        // The name fallback also reads up to four parents: fix those too.
        let path = root.path().join("p4/p3/p2/p1/model");
        fs::create_dir_all(&path).unwrap();
        ModelDir { _root: root, path }
    }

    fn path(&self) -> &std::path::Path {
        &self.path
    }
}
