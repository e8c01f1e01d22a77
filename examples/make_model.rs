//! Writes a local Llama-shaped Hugging Face model directory that
//! `train --model DIR` loads: `config.json`, `model.safetensors` (seeded
//! random weights, bf16 by default as published checkpoints are),
//! `tokenizer.json` (a byte-level BPE trained on the shipped corpus) and
//! `tokenizer_config.json`. Benchmarks and the memory calibration use it to
//! get models of a known size without a download.
//!
//! ```text
//! cargo run --release --example make_model -- --out /tmp/m100 \
//!     --layers 12 --hidden 768 --intermediate 2048 --heads 12 --kv-heads 4 --vocab 32000
//! ```
//! The defaults are the ~95M-parameter model of `benches/qlora_support`.

use std::path::PathBuf;

use anyhow::Context as _;
use candle_core::{DType, Device};
use clap::Parser;
use qlora_scale::qlora::LlamaConfig;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, TokenizerBuilder};

#[derive(Parser)]
#[command(about = "Write a seeded Llama-shaped model directory for train --model")]
struct Args {
    /// Directory to write (created; existing files are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Decoder blocks.
    #[arg(long, default_value_t = 12)]
    layers: usize,
    /// Model width.
    #[arg(long, default_value_t = 768)]
    hidden: usize,
    /// SwiGLU width.
    #[arg(long, default_value_t = 2048)]
    intermediate: usize,
    /// Query heads.
    #[arg(long, default_value_t = 12)]
    heads: usize,
    /// Key/value heads.
    #[arg(long, default_value_t = 4)]
    kv_heads: usize,
    /// Vocabulary size of the model (the tokenizer gets at most this many
    /// tokens; the corpus bounds how many merges it learns).
    #[arg(long, default_value_t = 32_000)]
    vocab: usize,
    /// Tie `lm_head` to the embeddings.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    tie: bool,
    /// Storage type of the weights: bf16, f16 or f32.
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Seed of the weights.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let dtype = match a.dtype.as_str() {
        "bf16" => DType::BF16,
        "f16" => DType::F16,
        "f32" => DType::F32,
        other => anyhow::bail!("--dtype {other}: expected bf16, f16 or f32"),
    };
    anyhow::ensure!(
        a.heads > 0 && a.hidden % a.heads == 0 && a.heads % a.kv_heads.max(1) == 0,
        "--hidden {} must divide into --heads {}, and --heads into --kv-heads {}",
        a.hidden,
        a.heads,
        a.kv_heads
    );
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let mut cfg = LlamaConfig::tiny(a.layers, a.hidden, a.intermediate, a.vocab);
    cfg.num_attention_heads = a.heads;
    cfg.num_key_value_heads = Some(a.kv_heads);
    cfg.tie_word_embeddings = a.tie;
    let mut json = serde_json::to_value(&cfg)?;
    json["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
    json["torch_dtype"] = serde_json::json!(match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    std::fs::write(a.out.join("config.json"), serde_json::to_vec_pretty(&json)?)?;

    let weights = cfg.random_weights(a.seed, dtype, &Device::Cpu)?;
    let params: usize = weights.values().map(|t| t.elem_count()).sum();
    candle_core::safetensors::save(&weights, a.out.join("model.safetensors"))?;
    drop(weights);

    // A byte-level BPE learned from the shipped corpus.
    let corpus = a.out.join("corpus.txt");
    let mut text = String::new();
    for line in include_str!("../data/default/train.jsonl").lines() {
        let v: serde_json::Value = serde_json::from_str(line)?;
        if let Some(t) = v["text"].as_str() {
            text.push_str(t);
            text.push('\n');
        }
    }
    std::fs::write(&corpus, text)?;
    let specials = ["<s>", "</s>", "<pad>"];
    let mut trainer = BpeTrainerBuilder::new()
        .show_progress(false)
        .vocab_size(a.vocab.min(32_000))
        .min_frequency(2)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(
            specials
                .iter()
                .map(|s| AddedToken::from(s.to_string(), true))
                .collect(),
        )
        .build();
    let mut tok = TokenizerBuilder::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::default()))
        .with_post_processor(Some(ByteLevel::default()))
        .with_decoder(Some(ByteLevel::default()))
        .build()
        .map_err(|e| anyhow::anyhow!("building the tokenizer: {e}"))?;
    tok.train_from_files(&mut trainer, vec![corpus.to_string_lossy().into_owned()])
        .map_err(|e| anyhow::anyhow!("training the tokenizer: {e}"))?;
    std::fs::remove_file(&corpus)?;
    let vocab = tok.get_vocab_size(true);
    anyhow::ensure!(
        vocab <= a.vocab,
        "the tokenizer has {vocab} tokens, more than --vocab {}",
        a.vocab
    );
    tok.save(a.out.join("tokenizer.json"), false)
        .map_err(|e| anyhow::anyhow!("writing tokenizer.json: {e}"))?;
    std::fs::write(
        a.out.join("tokenizer_config.json"),
        r#"{"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}"#,
    )?;
    println!(
        "{}\t{params} parameters\t{vocab} tokens in tokenizer.json",
        a.out.display()
    );
    Ok(())
}
