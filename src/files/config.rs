//! Exact parameter counts from a model's `config.json`.
//!
//! Each supported `model_type` maps to the module layout its Hugging Face
//! `transformers` implementation builds, counted tensor by tensor: embeddings
//! (tied input/output embeddings counted once), attention and MLP weights,
//! norms, and biases where that architecture has them. The formulas are
//! checked against the totals the model cards and the Hub publish (see the
//! fixtures under `tests/fixtures/configs/`).
//!
//! The `model_type` strings and field names below are the `config.json`
//! format itself, not tunable data, which is why they live in code rather
//! than in `tables/`.

use std::ops::{Add, Mul};

use serde_json::{Map, Value};

/// The `model_type` values [`config_param_count`] understands.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &[
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
    "RefinedWeb",
    "RefinedWebModel",
];

/// Why a `config.json` gave no parameter count. Wrapped with the file's path
/// in [`FilesError::Config`](crate::files::FilesError::Config).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The text is not valid JSON; the parser's error (with its line and
    /// column) is the source.
    #[error("not valid JSON")]
    Json(#[source] serde_json::Error),
    /// The top level is not a JSON object.
    #[error("the top level is not a JSON object")]
    NotAnObject,
    /// No `model_type` field.
    #[error("no \"model_type\" field, so the architecture is unknown")]
    NoModelType,
    /// A `model_type` no formula exists for.
    #[error(
        "unsupported model_type {model_type:?}: exact counts are known for {}",
        SUPPORTED_MODEL_TYPES.join(", ")
    )]
    UnsupportedModelType {
        /// The `model_type` the file names.
        model_type: String,
    },
    /// A field the architecture needs is absent (or `null`).
    #[error("{model_type}: missing field {field:?}")]
    MissingField {
        /// The file's `model_type`.
        model_type: String,
        /// The field (the first of its accepted spellings).
        field: &'static str,
    },
    /// A field has the wrong type or an impossible value.
    #[error("{model_type}: field {field:?} must be {expected}")]
    InvalidField {
        /// The file's `model_type`.
        model_type: String,
        /// The field.
        field: &'static str,
        /// What it must be.
        expected: &'static str,
    },
    /// The count does not fit in a `u64`: the fields are absurd.
    #[error("{model_type}: the parameter count overflows 64 bits")]
    Overflow {
        /// The file's `model_type`.
        model_type: String,
    },
}

/// The parameter count a `config.json` describes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ConfigCount {
    /// The file's `model_type`.
    pub model_type: String,
    /// Total parameters, tied embeddings counted once.
    pub params: u64,
    /// Whether the output projection shares the input embedding's weights.
    pub tied_embeddings: bool,
    /// Routed experts per MoE layer; `None` for dense models.
    pub experts: Option<u64>,
}

/// Counts the parameters of the model a parsed `config.json` describes.
///
/// ```
/// use qlora_scale::files::config_param_count;
/// let config = serde_json::json!({
///     "model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
///     "intermediate_size": 11008, "num_hidden_layers": 32,
///     "num_attention_heads": 32, "num_key_value_heads": 32,
///     "tie_word_embeddings": false
/// });
/// // Llama-2-7B, as its model card gives it.
/// assert_eq!(config_param_count(&config).unwrap().params, 6_738_415_616);
/// ```
pub fn config_param_count(config: &Value) -> Result<ConfigCount, ConfigError> {
    let obj = config.as_object().ok_or(ConfigError::NotAnObject)?;
    let model_type = match obj.get("model_type") {
        Some(Value::String(s)) => s.as_str(),
        _ => return Err(ConfigError::NoModelType),
    };
    let f = Fields { obj, model_type };
    let (total, tied, experts) = match model_type {
        "llama" => llama_like(&f, Variant::Llama)?,
        "mistral" => llama_like(&f, Variant::Mistral)?,
        "qwen2" => llama_like(&f, Variant::Qwen2)?,
        "qwen3" => llama_like(&f, Variant::Qwen3)?,
        "gemma" => llama_like(&f, Variant::Gemma)?,
        "gemma2" => llama_like(&f, Variant::Gemma2)?,
        "gemma3_text" => llama_like(&f, Variant::Gemma3)?,
        "mixtral" => mixtral(&f)?,
        "qwen2_moe" => qwen_moe(&f, true)?,
        "qwen3_moe" => qwen_moe(&f, false)?,
        "phi" => phi(&f)?,
        "phi3" => phi3(&f)?,
        "gpt2" => gpt2(&f)?,
        "gpt_neox" => gpt_neox(&f)?,
        "falcon" | "RefinedWeb" | "RefinedWebModel" => falcon(&f)?,
        other => {
            return Err(ConfigError::UnsupportedModelType {
                model_type: other.to_owned(),
            });
        }
    };
    let params = total.0.ok_or_else(|| ConfigError::Overflow {
        model_type: model_type.to_owned(),
    })?;
    Ok(ConfigCount {
        model_type: model_type.to_owned(),
        params,
        tied_embeddings: tied,
        experts,
    })
}

/// Parses `config.json` text and counts its parameters.
///
/// ```
/// use qlora_scale::files::{config_param_count_str, ConfigError};
/// let err = config_param_count_str(r#"{"model_type": "mamba"}"#).unwrap_err();
/// assert!(matches!(err, ConfigError::UnsupportedModelType { .. }));
/// ```
pub fn config_param_count_str(text: &str) -> Result<ConfigCount, ConfigError> {
    let value: Value = serde_json::from_str(text).map_err(ConfigError::Json)?;
    config_param_count(&value)
}

/// A `u64` whose arithmetic turns overflow into `None` instead of wrapping
/// or panicking, so absurd fields give an error, not a wrong count.
#[derive(Clone, Copy, Debug)]
struct Count(Option<u64>);

impl Add for Count {
    type Output = Count;
    fn add(self, rhs: Count) -> Count {
        Count(self.0.zip(rhs.0).and_then(|(a, b)| a.checked_add(b)))
    }
}

impl Mul for Count {
    type Output = Count;
    fn mul(self, rhs: Count) -> Count {
        Count(self.0.zip(rhs.0).and_then(|(a, b)| a.checked_mul(b)))
    }
}

fn n(value: u64) -> Count {
    Count(Some(value))
}

/// `value` when `on`, else 0: an optional bias or weight.
fn when(on: bool, value: Count) -> Count {
    if on { value } else { n(0) }
}

/// Typed access to a config's fields, errors naming the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    model_type: &'a str,
}

impl Fields<'_> {
    fn get(&self, names: &[&'static str]) -> Option<(&'static str, &Value)> {
        names.iter().find_map(|&name| match self.obj.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some((name, v)),
        })
    }

    fn invalid(&self, field: &'static str, expected: &'static str) -> ConfigError {
        ConfigError::InvalidField {
            model_type: self.model_type.to_owned(),
            field,
            expected,
        }
    }

    /// An optional positive integer under any of `names`.
    fn opt_pos(&self, names: &[&'static str]) -> Result<Option<u64>, ConfigError> {
        match self.get(names) {
            None => Ok(None),
            Some((name, v)) => match v.as_u64() {
                Some(x) if x > 0 => Ok(Some(x)),
                _ => Err(self.invalid(name, "a positive integer")),
            },
        }
    }

    /// A required positive integer under any of `names`.
    fn pos(&self, names: &[&'static str]) -> Result<u64, ConfigError> {
        self.opt_pos(names)?
            .ok_or_else(|| ConfigError::MissingField {
                model_type: self.model_type.to_owned(),
                field: names[0],
            })
    }

    /// An optional non-negative integer (0 allowed).
    fn opt_u64(&self, name: &'static str) -> Result<Option<u64>, ConfigError> {
        match self.get(&[name]) {
            None => Ok(None),
            Some((name, v)) => v
                .as_u64()
                .map(Some)
                .ok_or_else(|| self.invalid(name, "a non-negative integer")),
        }
    }

    fn flag(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(&[name]) {
            None => Ok(default),
            Some((name, v)) => v
                .as_bool()
                .ok_or_else(|| self.invalid(name, "true or false")),
        }
    }

    fn tied(&self, default: bool) -> Result<bool, ConfigError> {
        self.flag("tie_word_embeddings", default)
    }

    /// `head_dim` if given, else `hidden / heads` (which must divide).
    fn head_dim(&self, hidden: u64, heads: u64, default: Option<u64>) -> Result<u64, ConfigError> {
        if let Some(d) = self.opt_pos(&["head_dim"])? {
            return Ok(d);
        }
        if let Some(d) = default {
            return Ok(d);
        }
        if !hidden.is_multiple_of(heads) {
            return Err(self.invalid(
                "num_attention_heads",
                "a divisor of hidden_size (or give head_dim)",
            ));
        }
        Ok(hidden / heads)
    }
}

/// `(total, tied embeddings, experts)`.
type Counted = (Count, bool, Option<u64>);

/// The Llama-shaped decoders: RMSNorm, rotary positions, separate q/k/v/o
/// projections, gated (SwiGLU/GeGLU) MLP.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma,
    Gemma2,
    Gemma3,
}

/// The shared dimensions of a Llama-shaped decoder.
struct Decoder {
    vocab: u64,
    hidden: u64,
    layers: u64,
    heads: u64,
    kv_heads: u64,
    head_dim: u64,
    tied: bool,
}

impl Decoder {
    fn read(
        f: &Fields,
        head_dim_default: Option<u64>,
        tied_default: bool,
    ) -> Result<Self, ConfigError> {
        let hidden = f.pos(&["hidden_size"])?;
        let heads = f.pos(&["num_attention_heads"])?;
        Ok(Decoder {
            vocab: f.pos(&["vocab_size"])?,
            hidden,
            layers: f.pos(&["num_hidden_layers"])?,
            heads,
            kv_heads: f.opt_pos(&["num_key_value_heads"])?.unwrap_or(heads),
            head_dim: f.head_dim(hidden, heads, head_dim_default)?,
            tied: f.tied(tied_default)?,
        })
    }

    /// q, k, v and o projections, optional q/k/v and o biases, optional
    /// per-head q/k RMSNorms.
    fn attention(&self, qkv_bias: bool, o_bias: bool, qk_norm: bool) -> Count {
        let h = n(self.hidden);
        let q = n(self.heads) * n(self.head_dim);
        let kv = n(self.kv_heads) * n(self.head_dim);
        let weights = h * q + n(2) * h * kv + q * h;
        weights
            + when(qkv_bias, q + n(2) * kv)
            + when(o_bias, h)
            + when(qk_norm, n(2) * n(self.head_dim))
    }

    /// Input embedding, the output projection unless tied, final norm.
    fn embeddings_and_final_norm(&self) -> Count {
        let table = n(self.vocab) * n(self.hidden);
        table + when(!self.tied, table) + n(self.hidden)
    }
}

/// A gated MLP (gate, up, down), with optional biases.
fn gated_mlp(hidden: u64, intermediate: u64, bias: bool) -> Count {
    n(3) * n(hidden) * n(intermediate) + when(bias, n(2) * n(intermediate) + n(hidden))
}

fn llama_like(f: &Fields, variant: Variant) -> Result<Counted, ConfigError> {
    use Variant::*;
    let gemma = matches!(variant, Gemma | Gemma2 | Gemma3);
    // GemmaConfig's defaults: head_dim 256 (not hidden / heads), tied
    // embeddings.
    let d = Decoder::read(f, gemma.then_some(256), gemma)?;
    let intermediate = f.pos(&["intermediate_size"])?;
    let (qkv_bias, o_bias) = match variant {
        // Qwen2 always has q/k/v biases and never an o bias.
        Qwen2 => (true, false),
        Mistral => (false, false),
        _ => {
            let b = f.flag("attention_bias", false)?;
            (b, b)
        }
    };
    let mlp_bias = variant == Llama && f.flag("mlp_bias", false)?;
    let qk_norm = matches!(variant, Qwen3 | Gemma3);
    let norms = if matches!(variant, Gemma2 | Gemma3) {
        4
    } else {
        2
    };
    let layer = d.attention(qkv_bias, o_bias, qk_norm)
        + gated_mlp(d.hidden, intermediate, mlp_bias)
        + n(norms) * n(d.hidden);
    Ok((
        n(d.layers) * layer + d.embeddings_and_final_norm(),
        d.tied,
        None,
    ))
}

fn mixtral(f: &Fields) -> Result<Counted, ConfigError> {
    let d = Decoder::read(f, None, false)?;
    let intermediate = f.pos(&["intermediate_size"])?;
    let experts = f.pos(&["num_local_experts"])?;
    let router = n(d.hidden) * n(experts);
    let layer = d.attention(false, false, false)
        + router
        + n(experts) * gated_mlp(d.hidden, intermediate, false)
        + n(2) * n(d.hidden);
    Ok((
        n(d.layers) * layer + d.embeddings_and_final_norm(),
        d.tied,
        Some(experts),
    ))
}

/// Qwen2-MoE (q/k/v biases, a shared expert with its sigmoid gate) and
/// Qwen3-MoE (per-head q/k norms, no shared expert). A layer is sparse when
/// it is not in `mlp_only_layers` and `(layer + 1) % decoder_sparse_step == 0`.
fn qwen_moe(f: &Fields, qwen2: bool) -> Result<Counted, ConfigError> {
    let d = Decoder::read(f, None, false)?;
    let experts = f.opt_u64("num_experts")?.unwrap_or(0);
    let step = f.opt_pos(&["decoder_sparse_step"])?.unwrap_or(1);
    let dense_i = f.pos(&["intermediate_size"])?;
    let mut dense_only: Vec<u64> = match f.get(&["mlp_only_layers"]) {
        None => Vec::new(),
        Some((name, Value::Array(items))) => items
            .iter()
            .map(|v| {
                v.as_u64()
                    .ok_or_else(|| f.invalid(name, "a list of layer indices"))
            })
            .collect::<Result<_, _>>()?,
        Some((name, _)) => return Err(f.invalid(name, "a list of layer indices")),
    };
    dense_only.sort_unstable();
    dense_only.dedup();
    let sparse_layers = if experts == 0 {
        0
    } else {
        let by_step = d.layers / step;
        let excluded = dense_only
            .iter()
            .filter(|&&l| l < d.layers && (l + 1) % step == 0)
            .count() as u64;
        by_step - excluded
    };
    let dense_layers = d.layers - sparse_layers;

    let (qkv_bias, o_bias) = if qwen2 {
        (f.flag("qkv_bias", true)?, false)
    } else {
        let b = f.flag("attention_bias", false)?;
        (b, b)
    };
    let common = d.attention(qkv_bias, o_bias, !qwen2) + n(2) * n(d.hidden);
    let dense_mlp = gated_mlp(d.hidden, dense_i, false);
    let sparse_mlp = if sparse_layers == 0 {
        n(0)
    } else {
        let moe_i = f.pos(&["moe_intermediate_size"])?;
        let shared_i = if qwen2 {
            f.opt_u64("shared_expert_intermediate_size")?.unwrap_or(0)
        } else {
            0
        };
        n(d.hidden) * n(experts)
            + n(experts) * gated_mlp(d.hidden, moe_i, false)
            + when(
                shared_i > 0,
                gated_mlp(d.hidden, shared_i, false) + n(d.hidden),
            )
    };
    let layers = n(d.layers) * common + n(dense_layers) * dense_mlp + n(sparse_layers) * sparse_mlp;
    let experts = (experts > 0).then_some(experts);
    Ok((layers + d.embeddings_and_final_norm(), d.tied, experts))
}

/// Phi-1/1.5/2: LayerNorm with bias, biased q/k/v/dense and fc1/fc2, one
/// norm per (parallel) block, biased untied LM head.
fn phi(f: &Fields) -> Result<Counted, ConfigError> {
    let d = Decoder::read(f, None, false)?;
    let intermediate = f.pos(&["intermediate_size"])?;
    let qk_layernorm = f.flag("qk_layernorm", false)?;
    let h = n(d.hidden);
    let q = n(d.heads) * n(d.head_dim);
    let kv = n(d.kv_heads) * n(d.head_dim);
    let attention =
        h * q + q + n(2) * (h * kv + kv) + q * h + h + when(qk_layernorm, n(4) * n(d.head_dim));
    let i = n(intermediate);
    let mlp = h * i + i + i * h + h;
    let layer = attention + mlp + n(2) * h;
    let vocab = n(d.vocab);
    let head = when(!d.tied, vocab * h) + vocab;
    Ok((
        n(d.layers) * layer + vocab * h + n(2) * h + head,
        d.tied,
        None,
    ))
}

/// Phi-3/3.5/4: fused qkv and gate/up projections, RMSNorm, no biases.
fn phi3(f: &Fields) -> Result<Counted, ConfigError> {
    let d = Decoder::read(f, None, false)?;
    let intermediate = f.pos(&["intermediate_size"])?;
    let layer = d.attention(false, false, false)
        + gated_mlp(d.hidden, intermediate, false)
        + n(2) * n(d.hidden);
    Ok((
        n(d.layers) * layer + d.embeddings_and_final_norm(),
        d.tied,
        None,
    ))
}

/// GPT-2: learned positions, Conv1D layers with biases, LayerNorm with bias,
/// LM head tied to the token embedding.
fn gpt2(f: &Fields) -> Result<Counted, ConfigError> {
    let e = n(f.pos(&["n_embd", "hidden_size"])?);
    let layers = n(f.pos(&["n_layer", "num_hidden_layers"])?);
    let positions = n(f.pos(&["n_positions", "max_position_embeddings"])?);
    let vocab = n(f.pos(&["vocab_size"])?);
    let inner = match f.opt_pos(&["n_inner"])? {
        Some(i) => n(i),
        None => n(4) * e,
    };
    let tied = f.tied(true)?;
    let attention = e * n(3) * e + n(3) * e + e * e + e;
    let mlp = e * inner + inner + inner * e + e;
    let layer = n(2) * n(2) * e + attention + mlp;
    let embeddings = vocab * e + positions * e + when(!tied, vocab * e);
    Ok((layers * layer + embeddings + n(2) * e, tied, None))
}

/// GPT-NeoX (Pythia and friends): fused biased qkv, LayerNorms with bias,
/// untied `embed_out` by default.
fn gpt_neox(f: &Fields) -> Result<Counted, ConfigError> {
    let h = n(f.pos(&["hidden_size"])?);
    let layers = n(f.pos(&["num_hidden_layers"])?);
    let vocab = n(f.pos(&["vocab_size"])?);
    let i = n(f.pos(&["intermediate_size"])?);
    let bias = f.flag("attention_bias", true)?;
    let tied = f.tied(false)?;
    let attention = h * n(3) * h + when(bias, n(3) * h) + h * h + when(bias, h);
    let mlp = h * i + i + i * h + h;
    let layer = n(4) * h + attention + mlp;
    let embeddings = vocab * h + when(!tied, vocab * h);
    Ok((layers * layer + embeddings + n(2) * h, tied, None))
}

/// Falcon (and the older RefinedWeb configs): fused qkv sized by
/// multi-query or the new decoder architecture's grouped heads, LayerNorms
/// with bias, tied LM head.
fn falcon(f: &Fields) -> Result<Counted, ConfigError> {
    let hidden = f.pos(&["hidden_size", "n_embed"])?;
    let layers = n(f.pos(&["num_hidden_layers", "n_layer"])?);
    let heads = f.pos(&["num_attention_heads", "n_head"])?;
    let vocab = n(f.pos(&["vocab_size"])?);
    let head_dim = f.head_dim(hidden, heads, None)?;
    // The original Falcon-40B code (`RefinedWeb`) always used the grouped
    // heads and two parallel norms that later configs call the new decoder
    // architecture.
    let new_arch = f.flag("new_decoder_architecture", f.model_type == "RefinedWeb")?;
    let multi_query = f.flag("multi_query", true)?;
    let parallel_attn = f.flag("parallel_attn", true)?;
    let bias = f.flag("bias", false)?;
    let tied = f.tied(true)?;
    let ffn = match f.opt_pos(&["ffn_hidden_size"])? {
        Some(i) => n(i),
        None => n(4) * n(hidden),
    };
    let h = n(hidden);
    let qkv_out = if new_arch {
        let kv_heads = f.pos(&["num_kv_heads", "n_head_kv"])?;
        (n(2) * n(kv_heads) + n(heads)) * n(head_dim)
    } else if multi_query {
        h + n(2) * n(head_dim)
    } else {
        n(3) * h
    };
    let attention = h * qkv_out + when(bias, qkv_out) + h * h + when(bias, h);
    let mlp = h * ffn + when(bias, ffn) + ffn * h + when(bias, h);
    let layer_norms = if new_arch {
        match f.opt_pos(&["num_ln_in_parallel_attn"])? {
            Some(1) => 1,
            _ => 2,
        }
    } else if parallel_attn {
        1
    } else {
        2
    };
    let layer = attention + mlp + n(layer_norms) * n(2) * h;
    let embeddings = vocab * h + when(!tied, vocab * h);
    Ok((layers * layer + embeddings + n(2) * h, tied, None))
}
