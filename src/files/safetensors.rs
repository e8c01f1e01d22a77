//! Parameter counts from safetensors headers, corrected for packed
//! quantized storage.
//!
//! A safetensors file is an 8-byte little-endian header length, a JSON
//! header mapping tensor names to `{dtype, shape, data_offsets}`, then the
//! tensor bytes. Everything a count needs is in the header, so the header is
//! parsed here directly rather than through the `safetensors` crate, whose
//! API wants the whole file (or a memory map of it): we read exactly
//! `8 + header_len` bytes and never touch tensor data.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{self, Read};

use serde_json::Value;

/// The largest header accepted (`tables/detect.toml`, `[files]`), the limit
/// the reference `safetensors` implementation enforces (100 MB). Real
/// headers are a few MB at most.
pub const MAX_HEADER_LEN: u64 = crate::tables::MAX_SAFETENSORS_HEADER_BYTES;

/// The default bit width of packed weights when the config does not say.
const DEFAULT_BITS: u32 = 4;

/// Why a safetensors header gave no count. Wrapped with the file's path in
/// [`FilesError::Safetensors`](crate::files::FilesError::Safetensors).
#[derive(Debug, thiserror::Error)]
pub enum SafetensorsError {
    /// The file ends before the header does.
    #[error("truncated: {needed} header bytes needed, the file has {len}")]
    Truncated {
        /// Bytes the header needs (8 + its declared length).
        needed: u64,
        /// The file's length.
        len: u64,
    },
    /// The declared header length is larger than [`MAX_HEADER_LEN`].
    #[error("header length {len} is over the {MAX_HEADER_LEN}-byte limit: not a safetensors file")]
    HeaderTooLarge {
        /// The declared length.
        len: u64,
    },
    /// The header is not a JSON object; the parser's error is the source.
    #[error("the header is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// A tensor entry is malformed.
    #[error("tensor {name:?}: {problem}")]
    InvalidTensor {
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Element counts overflow 64 bits.
    #[error("tensor {name:?}: element count overflows 64 bits")]
    Overflow {
        /// The tensor whose count overflowed.
        name: String,
    },
    /// A key appears twice in the header (JSON parsers would silently keep
    /// one of the entries).
    #[error("key {name:?} appears more than once in the header")]
    DuplicateKey {
        /// The repeated key.
        name: String,
    },
    /// A tensor's dtype is not one safetensors defines.
    #[error("tensor {name:?}: unknown dtype {dtype:?}")]
    UnknownDtype {
        /// The tensor.
        name: String,
        /// The dtype as written.
        dtype: String,
    },
    /// A tensor's shape in its dtype does not fill its `data_offsets`.
    #[error(
        "tensor {name:?}: shape × dtype ({elements} {dtype} elements) does not match the {span} bytes its data_offsets span"
    )]
    SizeMismatch {
        /// The tensor.
        name: String,
        /// Its dtype.
        dtype: String,
        /// The product of its shape.
        elements: u64,
        /// `end - start` of its `data_offsets`.
        span: u64,
    },
    /// Two tensors share bytes of the data section.
    #[error("tensors {first:?} and {second:?} overlap in the data section")]
    Overlap {
        /// The tensor that starts first.
        first: String,
        /// The tensor that starts inside it.
        second: String,
    },
    /// A read failed.
    #[error("read failed")]
    Io(#[from] io::Error),
}

/// One tensor's header entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorEntry {
    /// The tensor's name (`model.layers.0.self_attn.q_proj.weight`).
    pub name: String,
    /// Its dtype as written (`F16`, `BF16`, `I32`, `U8`, ...).
    pub dtype: String,
    /// The product of its shape (1 for a scalar).
    pub elements: u64,
}

/// How packed (quantized) weights are stored, as detected from dtypes and
/// tensor names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PackedLayout {
    /// GPTQ or AWQ: `qweight` int32 words each holding `32 / bits` values,
    /// with `qzeros`, `scales`, `g_idx` companions (not parameters).
    GptqAwq,
    /// bitsandbytes 4-bit: `weight` uint8, two values a byte, with
    /// `weight.absmax` / `weight.quant_state.*` companions.
    Bnb4,
    /// bitsandbytes 8-bit: `weight` int8 with an `SCB` companion.
    Bnb8,
    /// MLX: `weight` uint32 words holding `32 / bits` values, with `scales`
    /// and `biases` companions.
    Mlx,
    /// compressed-tensors packed integers: `weight_packed` int32 words with
    /// `weight_scale` / `weight_zero_point` / `weight_shape` companions.
    CompressedTensors,
    /// FP8 weights with `weight_scale` / `weight_scale_inv` companions.
    Fp8Scaled,
}

/// Bit widths of packed weights, from the model's config: `quantization_config.bits`
/// (GPTQ, AWQ, compressed-tensors) or MLX's `quantization.bits` with its
/// per-module overrides.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QuantHints {
    /// The bit width for every packed module not overridden.
    pub bits: Option<u32>,
    /// Per-module bit widths (MLX `quantization."model.layers.0.mlp.gate"`).
    pub module_bits: HashMap<String, u32>,
}

impl QuantHints {
    /// Reads the bit widths a `config.json` declares.
    ///
    /// ```
    /// use qlora_scale::files::QuantHints;
    /// let config = serde_json::json!({"quantization": {"group_size": 64, "bits": 8}});
    /// assert_eq!(QuantHints::from_config(&config).bits, Some(8));
    /// ```
    pub fn from_config(config: &Value) -> QuantHints {
        let mut hints = QuantHints::default();
        let bits_of = |v: &Value| {
            v.as_u64()
                .and_then(|b| u32::try_from(b).ok())
                .filter(|b| (1..=32).contains(b))
        };
        if let Some(q) = config.get("quantization_config") {
            hints.bits = q.get("bits").or_else(|| q.get("w_bit")).and_then(bits_of);
            if hints.bits.is_none() {
                // compressed-tensors: config_groups.<group>.weights.num_bits
                hints.bits = q
                    .get("config_groups")
                    .and_then(Value::as_object)
                    .and_then(|groups| {
                        groups
                            .values()
                            .find_map(|g| g.pointer("/weights/num_bits").and_then(bits_of))
                    });
            }
        }
        if let Some(Value::Object(q)) = config.get("quantization") {
            if let Some(b) = q.get("bits").and_then(bits_of) {
                hints.bits = Some(b);
            }
            for (module, v) in q {
                if let Some(b) = v.get("bits").and_then(bits_of) {
                    hints.module_bits.insert(module.clone(), b);
                }
            }
        }
        hints
    }

    fn bits_for(&self, module: &str) -> u32 {
        self.module_bits
            .get(module)
            .copied()
            .or(self.bits)
            .unwrap_or(DEFAULT_BITS)
    }
}

/// The parameter count the tensors of one or more headers describe.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct SafetensorsCount {
    /// Parameters: packed values unpacked, quantization companions left out.
    pub params: u64,
    /// The plain sum of stored element counts, before any correction.
    pub stored_elements: u64,
    /// Number of tensors.
    pub tensors: u64,
    /// Packed layouts found (empty: plain storage).
    pub layouts: BTreeSet<PackedLayout>,
    /// Parameters in `lm_head.weight`, when stored: a checkpoint of a model
    /// with tied embeddings that stores both copies counts them twice.
    pub lm_head_params: u64,
}

/// Reads a safetensors header from `reader` (positioned at the file's
/// start) without reading any tensor data. `file_len` bounds the header
/// length before anything is allocated.
///
/// ```
/// use qlora_scale::files::read_safetensors_header;
/// let json = br#"{"w":{"dtype":"F16","shape":[2,3],"data_offsets":[0,12]}}"#;
/// let mut file = (json.len() as u64).to_le_bytes().to_vec();
/// file.extend_from_slice(json);
/// file.extend_from_slice(&[0; 12]);
/// let tensors = read_safetensors_header(&file[..], file.len() as u64).unwrap();
/// assert_eq!(tensors[0].elements, 6);
/// ```
pub fn read_safetensors_header<R: Read>(
    mut reader: R,
    file_len: u64,
) -> Result<Vec<TensorEntry>, SafetensorsError> {
    let mut len_bytes = [0u8; 8];
    read_exact(&mut reader, &mut len_bytes, 8, file_len)?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_LEN {
        return Err(SafetensorsError::HeaderTooLarge { len: header_len });
    }
    let needed = 8 + header_len;
    if needed > file_len {
        return Err(SafetensorsError::Truncated {
            needed,
            len: file_len,
        });
    }
    // Bounded by MAX_HEADER_LEN and by the file's length; read through
    // `take` so a reader shorter than `file_len` claims allocates only what
    // it really holds.
    let mut header = Vec::new();
    reader.take(header_len).read_to_end(&mut header)?;
    if header.len() as u64 != header_len {
        return Err(SafetensorsError::Truncated {
            needed,
            len: file_len,
        });
    }
    parse_header(&header, file_len - needed)
}

fn read_exact<R: Read>(
    reader: &mut R,
    buf: &mut [u8],
    needed: u64,
    len: u64,
) -> Result<(), SafetensorsError> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => SafetensorsError::Truncated { needed, len },
        _ => SafetensorsError::Io(e),
    })
}

/// The header as written: every key in file order, duplicates kept (a
/// `Map` would keep only the last), `__metadata__` as `None`.
struct RawHeader(Vec<(String, Option<RawEntry>)>);

/// One tensor's entry, each field left as JSON so that a wrong type is an
/// error naming the tensor.
#[derive(serde::Deserialize)]
struct RawEntry {
    #[serde(default)]
    dtype: Option<Value>,
    #[serde(default)]
    shape: Option<Value>,
    #[serde(default)]
    data_offsets: Option<Value>,
}

impl<'de> serde::Deserialize<'de> for RawHeader {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = RawHeader;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object of tensor entries")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<RawHeader, A::Error> {
                let mut entries = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let entry = if key == "__metadata__" {
                        map.next_value::<serde::de::IgnoredAny>()?;
                        None
                    } else {
                        Some(map.next_value::<RawEntry>()?)
                    };
                    entries.push((key, entry));
                }
                Ok(RawHeader(entries))
            }
        }
        d.deserialize_map(Entries)
    }
}

/// Parses header JSON; `data_len` is the length of the data section.
///
/// Every tensor must have a known dtype, a shape whose size in that dtype
/// is exactly the span of its `data_offsets`, and offsets within the data
/// section; no two tensors may share bytes, and no key may appear twice.
/// Linear in the header's size but for one sort of the tensors by offset.
fn parse_header(header: &[u8], data_len: u64) -> Result<Vec<TensorEntry>, SafetensorsError> {
    let RawHeader(entries) = serde_json::from_slice(header).map_err(SafetensorsError::Json)?;
    let mut seen = HashSet::with_capacity(entries.len());
    for (name, _) in &entries {
        if !seen.insert(name.as_str()) {
            return Err(SafetensorsError::DuplicateKey { name: name.clone() });
        }
    }
    drop(seen);
    let mut tensors = Vec::with_capacity(entries.len());
    // (start, end, index into `tensors`) of every tensor that holds bytes.
    let mut spans: Vec<(u64, u64, usize)> = Vec::with_capacity(entries.len());
    for (name, entry) in entries {
        let Some(entry) = entry else {
            continue;
        };
        let invalid = |problem| SafetensorsError::InvalidTensor {
            name: name.clone(),
            problem,
        };
        let dtype = entry
            .dtype
            .as_ref()
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("no \"dtype\" string"))?
            .to_owned();
        let shape = entry
            .shape
            .as_ref()
            .and_then(Value::as_array)
            .ok_or_else(|| invalid("no \"shape\" array"))?;
        let mut elements: u64 = 1;
        for dim in shape {
            let dim = dim.as_u64().ok_or_else(|| {
                invalid("shape has a dimension that is not a non-negative integer")
            })?;
            elements = elements
                .checked_mul(dim)
                .ok_or_else(|| SafetensorsError::Overflow { name: name.clone() })?;
        }
        let Some(bits) = storage_bits(&dtype) else {
            return Err(SafetensorsError::UnknownDtype { name, dtype });
        };
        let (start, end) = match entry
            .data_offsets
            .as_ref()
            .and_then(Value::as_array)
            .map(Vec::as_slice)
        {
            Some([begin, end]) => match (begin.as_u64(), end.as_u64()) {
                (Some(b), Some(e)) if b <= e && e <= data_len => (b, e),
                (Some(b), Some(e)) if b > e => {
                    return Err(invalid("data_offsets end before they begin"));
                }
                (Some(_), Some(_)) => {
                    return Err(invalid(
                        "data_offsets lie outside the file (truncated download?)",
                    ));
                }
                _ => return Err(invalid("data_offsets are not integers")),
            },
            _ => return Err(invalid("no \"data_offsets\" pair")),
        };
        // Sub-byte dtypes (F4, F6_*) pack their elements: the tensor's
        // bits must fill whole bytes.
        let size_bits = elements
            .checked_mul(bits)
            .ok_or_else(|| SafetensorsError::Overflow { name: name.clone() })?;
        if size_bits % 8 != 0 || size_bits / 8 != end - start {
            return Err(SafetensorsError::SizeMismatch {
                name,
                dtype,
                elements,
                span: end - start,
            });
        }
        if start < end {
            spans.push((start, end, tensors.len()));
        }
        tensors.push(TensorEntry {
            name,
            dtype,
            elements,
        });
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
        // Sorted by start and none overlaps the one before: the previous
        // end is the furthest so far.
        if start < end {
            return Err(SafetensorsError::Overlap {
                first: tensors[a].name.clone(),
                second: tensors[b].name.clone(),
            });
        }
    }
    Ok(tensors)
}

/// Bits per element of every safetensors dtype (the reference
/// implementation's list); `None` for a dtype it does not define.
fn storage_bits(dtype: &str) -> Option<u64> {
    match dtype {
        "F4" => Some(4),
        "F6_E2M3" | "F6_E3M2" => Some(6),
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => Some(8),
        "I16" | "U16" | "F16" | "BF16" => Some(16),
        "I32" | "U32" | "F32" => Some(32),
        "I64" | "U64" | "F64" | "C64" => Some(64),
        _ => None,
    }
}

/// Bits per stored element of a dtype, for the dtypes packed weights use.
fn dtype_bits(dtype: &str) -> Option<u64> {
    match dtype {
        "I32" | "U32" | "F32" => Some(32),
        "I16" | "U16" | "F16" | "BF16" => Some(16),
        "I8" | "U8" => Some(8),
        "I64" | "U64" | "F64" => Some(64),
        _ => None,
    }
}

/// Counts parameters over the tensors of one or more headers (every shard
/// of a model together, since a weight and its companions may sit in
/// different shards).
///
/// ```
/// use qlora_scale::files::{count_tensors, QuantHints, TensorEntry, PackedLayout};
/// let t = |name: &str, dtype: &str, elements| TensorEntry {
///     name: name.into(), dtype: dtype.into(), elements,
/// };
/// // A GPTQ 4-bit 4096x4096 projection: 512x4096 int32 words.
/// let tensors = [
///     t("q_proj.qweight", "I32", 512 * 4096),
///     t("q_proj.qzeros", "I32", 32 * 512),
///     t("q_proj.scales", "F16", 32 * 4096),
///     t("q_proj.g_idx", "I32", 4096),
/// ];
/// let count = count_tensors(&tensors, &QuantHints::default()).unwrap();
/// assert_eq!(count.params, 4096 * 4096);
/// assert!(count.layouts.contains(&PackedLayout::GptqAwq));
/// ```
pub fn count_tensors(
    tensors: &[TensorEntry],
    hints: &QuantHints,
) -> Result<SafetensorsCount, SafetensorsError> {
    let dtypes: HashMap<&str, &str> = tensors
        .iter()
        .map(|t| (t.name.as_str(), t.dtype.as_str()))
        .collect();
    let has = |name: &str| dtypes.contains_key(name);
    let dtype_of = |name: &str| dtypes.get(name).copied();

    let mut count = SafetensorsCount::default();
    for t in tensors {
        let overflow = || SafetensorsError::Overflow {
            name: t.name.clone(),
        };
        count.tensors += 1;
        count.stored_elements = count
            .stored_elements
            .checked_add(t.elements)
            .ok_or_else(overflow)?;

        let (module, leaf) = t.name.rsplit_once('.').unwrap_or(("", t.name.as_str()));
        let sibling = |leaf: &str| format!("{module}.{leaf}");
        let unpack = |layout| -> Result<(u64, Option<PackedLayout>), SafetensorsError> {
            let stored_bits =
                dtype_bits(&t.dtype).ok_or_else(|| SafetensorsError::InvalidTensor {
                    name: t.name.clone(),
                    problem: "packed weight with a dtype that cannot hold packed values",
                })?;
            let bits = u64::from(hints.bits_for(module));
            let params = t.elements.checked_mul(stored_bits).ok_or_else(overflow)? / bits;
            Ok((params, Some(layout)))
        };

        let (params, layout) = match leaf {
            "qweight" => unpack(PackedLayout::GptqAwq)?,
            "qzeros" | "g_idx" if has(&sibling("qweight")) => (0, Some(PackedLayout::GptqAwq)),
            "scales" if has(&sibling("qweight")) => (0, Some(PackedLayout::GptqAwq)),
            "scales" | "biases" if dtype_of(&sibling("weight")) == Some("U32") => {
                (0, Some(PackedLayout::Mlx))
            }
            "weight" if t.dtype == "U32" && has(&sibling("scales")) => unpack(PackedLayout::Mlx)?,
            "weight" if t.dtype == "U8" && is_bnb4(&t.name, &has) => (
                t.elements.checked_mul(2).ok_or_else(overflow)?,
                Some(PackedLayout::Bnb4),
            ),
            "SCB" | "weight_format" if has(&sibling("weight")) => (0, Some(PackedLayout::Bnb8)),
            "weight" if t.dtype == "I8" && has(&sibling("SCB")) => {
                (t.elements, Some(PackedLayout::Bnb8))
            }
            "weight_packed" => unpack(PackedLayout::CompressedTensors)?,
            "weight_scale" | "weight_zero_point" | "weight_shape" | "weight_g_idx"
                if has(&sibling("weight_packed")) =>
            {
                (0, Some(PackedLayout::CompressedTensors))
            }
            "weight_scale" | "weight_scale_inv" if has(&sibling("weight")) => {
                (0, Some(PackedLayout::Fp8Scaled))
            }
            // Activation and KV-cache quantization scales: never parameters.
            "input_scale" | "k_scale" | "v_scale" => (0, None),
            _ if is_bnb4_companion(&t.name, &dtype_of) => (0, Some(PackedLayout::Bnb4)),
            _ => (t.elements, None),
        };
        if let Some(layout) = layout {
            count.layouts.insert(layout);
        }
        if t.name == "lm_head.weight" {
            count.lm_head_params = params;
        }
        count.params = count.params.checked_add(params).ok_or_else(overflow)?;
    }
    Ok(count)
}

/// Whether a uint8 `weight` has the companions bitsandbytes 4-bit writes.
fn is_bnb4(weight: &str, has: &impl Fn(&str) -> bool) -> bool {
    [
        "absmax",
        "quant_map",
        "quant_state.bitsandbytes__nf4",
        "quant_state.bitsandbytes__fp4",
    ]
    .iter()
    .any(|c| has(&format!("{weight}.{c}")))
}

/// Whether `name` is a bitsandbytes 4-bit companion (`x.weight.absmax`,
/// `x.weight.quant_state.bitsandbytes__nf4`, ...) of a stored uint8 weight.
///
/// Only the last `.weight.` is tried: no companion's suffix holds another,
/// and trying every one hashed a prefix per occurrence, quadratic in the
/// length of a crafted name.
fn is_bnb4_companion<'a>(name: &str, dtype_of: &impl Fn(&str) -> Option<&'a str>) -> bool {
    name.rfind(".weight.")
        .is_some_and(|i| dtype_of(&name[..i + ".weight".len()]) == Some("U8"))
}
