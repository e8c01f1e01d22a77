//! `train merge`: a run's adapter merged into a base model, written as a
//! Hugging Face model directory tensor by tensor.
//!
//! Two bases:
//!
//! - [`MergeBase::Original`] (the default): the base as stored (a local
//!   directory's safetensors in their own dtype, or the embedded model's
//!   seeded `f32` weights). Each adapted weight becomes `W + s · B A`,
//!   computed in `f32` and cast back to `W`'s dtype; every other tensor is
//!   copied byte for byte. This is what PEFT's `merge_and_unload` gives on
//!   a 16-bit base.
//! - [`MergeBase::Quantized`]: the NF4 base the adapter was trained against,
//!   dequantized, plus `s · B A`.
//!
//! Only one output tensor is dense at a time: the safetensors writer asks
//! for each tensor's bytes as it writes them, and they are computed then.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use safetensors::Dtype;
use serde_json::{Map, Value};

use super::model::{
    BaseWeights, ModelError, build, load_adapter, lora_config, open_base, read_adapter,
};
use super::spec::{RunSpec, Weights};
use crate::qlora::lora::peft_key;
use crate::qlora::{LlamaConfig, WeightSource};
use crate::safe_io::{commit_staged, write_atomic};

/// The merged weights' file in the output directory.
pub const MERGED_WEIGHTS: &str = "model.safetensors";

/// Files a loader of the merged model needs beside the weights, copied from
/// a local base when it has them: the tokenizer (all the files it may come
/// as) and the generation defaults.
const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "generation_config.json",
];

/// Which base the adapter is merged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MergeBase {
    /// The base as stored, in its dtype (what PEFT's `merge_and_unload`
    /// gives on a 16-bit base).
    #[default]
    Original,
    /// The NF4-dequantized base the adapter was trained against.
    Quantized,
}

/// The dtype of the merged weights, when not the base's own.
///
/// ```
/// use qlora_scale::train::merge::MergeDtype;
/// assert_eq!("bf16".parse::<MergeDtype>(), Ok(MergeDtype::Bf16));
/// assert!("int8".parse::<MergeDtype>().is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
    /// IEEE single precision.
    F32,
}

impl std::str::FromStr for MergeDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "bf16" => Ok(MergeDtype::Bf16),
            "f16" => Ok(MergeDtype::F16),
            "f32" => Ok(MergeDtype::F32),
            other => Err(format!("{other:?} is not a dtype: bf16, f16 or f32")),
        }
    }
}

impl MergeDtype {
    fn st(self) -> Dtype {
        match self {
            MergeDtype::Bf16 => Dtype::BF16,
            MergeDtype::F16 => Dtype::F16,
            MergeDtype::F32 => Dtype::F32,
        }
    }
}

/// How to merge.
#[derive(Debug, Clone, Copy, Default)]
pub struct MergeOptions {
    /// The base.
    pub base: MergeBase,
    /// The weights' dtype; `None` keeps the base's.
    pub dtype: Option<MergeDtype>,
}

/// How far the merge has come: `done` of `total` tensors, the last `name`.
#[derive(Debug, Clone, Copy)]
pub struct MergeProgress<'a> {
    /// Tensors written.
    pub done: usize,
    /// Tensors in all.
    pub total: usize,
    /// The tensor just written.
    pub name: &'a str,
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    /// The weights file.
    pub weights: PathBuf,
    /// Tensors written.
    pub tensors: usize,
    /// Of which adapted (`W + s · B A`).
    pub merged: usize,
    /// The dtype recorded in `config.json` (`bfloat16`, ...).
    pub torch_dtype: &'static str,
}

/// One adapted weight's low-rank update: `scale · B A`.
struct Delta {
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Delta {
    fn to_f32(&self) -> candle_core::Result<Tensor> {
        self.b
            .to_dtype(DType::F32)?
            .matmul(&self.a.to_dtype(DType::F32)?)?
            .affine(self.scale, 0.0)
    }
}

/// The adapter of `adapter_dir` as updates by base tensor name, each checked
/// against the architecture's shape.
fn deltas(
    spec: &RunSpec,
    config: &LlamaConfig,
    adapter_dir: &Path,
) -> Result<HashMap<String, Delta>, ModelError> {
    let (mut tensors, path) = read_adapter(adapter_dir)?;
    let n = config.num_hidden_layers;
    let lora = lora_config(spec, n);
    let mut out = HashMap::new();
    if lora.rank == 0 {
        return Ok(out);
    }
    for l in (0..n).filter(|&l| lora.adapts_layer(l, n)) {
        for proj in config
            .projections()
            .iter()
            .filter(|p| lora.targets_projection(p))
        {
            let (o, i) = config.projection_dims(proj);
            let mut take = |m: char, shape: [usize; 2]| {
                let key = peft_key(l, proj.path, m);
                let bad = |message| ModelError::Adapter {
                    path: path.clone(),
                    message,
                };
                let x = tensors
                    .remove(&key)
                    .ok_or_else(|| bad(format!("no tensor {key}")))?;
                if x.dims() != shape {
                    let msg = format!("{key}: shape {:?}, the model needs {shape:?}", x.dims());
                    return Err(bad(msg));
                }
                Ok(x)
            };
            let a = take('A', [lora.rank, i])?;
            let b = take('B', [o, lora.rank])?;
            let name = format!("model.layers.{l}.{}.weight", proj.path);
            let scale = lora.scale();
            out.insert(name, Delta { a, b, scale });
        }
    }
    Ok(out)
}

/// A tensor to write: its name, dtype and shape, its bytes computed when
/// the writer asks.
struct Entry {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// Computes one output tensor's bytes.
type Produce<'a> = dyn Fn(&Entry) -> Result<Vec<u8>, ModelError> + 'a;

/// The state the lazy views share while the file is written: the first
/// error (the writer's `View::data` cannot fail) and the progress.
struct Writer<'a, 'p> {
    produce: &'a Produce<'a>,
    error: RefCell<Option<ModelError>>,
    done: Cell<usize>,
    total: usize,
    progress: RefCell<&'a mut (dyn FnMut(MergeProgress<'_>) + 'p)>,
}

struct LazyTensor<'w, 'a, 'p> {
    entry: Entry,
    writer: &'w Writer<'a, 'p>,
}

impl safetensors::View for LazyTensor<'_, '_, '_> {
    fn dtype(&self) -> Dtype {
        self.entry.dtype
    }

    fn shape(&self) -> &[usize] {
        &self.entry.shape
    }

    fn data(&self) -> Cow<'_, [u8]> {
        let w = self.writer;
        if w.error.borrow().is_some() {
            // The file is discarded: write nothing more.
            return Cow::Borrowed(&[]);
        }
        let bytes = (w.produce)(&self.entry).and_then(|b| {
            if b.len() == self.data_len() {
                Ok(b)
            } else {
                Err(ModelError::Inconsistent {
                    path: PathBuf::from(&self.entry.name),
                    message: format!("{} bytes made, {} expected", b.len(), self.data_len()),
                })
            }
        });
        match bytes {
            Ok(b) => {
                w.done.set(w.done.get() + 1);
                (w.progress.borrow_mut())(MergeProgress {
                    done: w.done.get(),
                    total: w.total,
                    name: &self.entry.name,
                });
                Cow::Owned(b)
            }
            Err(e) => {
                *w.error.borrow_mut() = Some(ModelError::MergeTensor {
                    name: self.entry.name.clone(),
                    source: Box::new(e),
                });
                Cow::Borrowed(&[])
            }
        }
    }

    fn data_len(&self) -> usize {
        self.entry.shape.iter().product::<usize>() * self.entry.dtype.bitsize() / 8
    }
}

/// Writes `entries` to `path` as safetensors, each tensor's bytes made by
/// `produce` when it is written; through a staging file, renamed into
/// place only when every tensor was made.
fn write_lazily(
    path: &Path,
    entries: Vec<Entry>,
    produce: &Produce<'_>,
    progress: &mut dyn FnMut(MergeProgress<'_>),
) -> Result<(), ModelError> {
    let write_err = |e: Box<dyn std::error::Error + Send + Sync>| ModelError::Write {
        path: path.to_path_buf(),
        source: e,
    };
    let writer = Writer {
        produce,
        error: RefCell::new(None),
        done: Cell::new(0),
        total: entries.len(),
        progress: RefCell::new(progress),
    };
    let views = entries.into_iter().map(|entry| {
        let name = entry.name.clone();
        let writer = &writer;
        (name, LazyTensor { entry, writer })
    });
    let staged = path.with_extension("safetensors.partial");
    // transformers checks this metadata when it loads a safetensors file.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| write_err(e.into()))?;
    }
    let written = safetensors::serialize_to_file(views, Some(meta), &staged);
    if let Some(e) = writer.error.into_inner() {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    written.map_err(|e| write_err(e.into()))?;
    commit_staged(&staged, path).map_err(|e| write_err(e.into()))
}

/// A candle tensor's bytes as safetensors stores them (little-endian).
fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => candle_core::bail!("cannot write a {other:?} tensor"),
    })
}

fn candle_dtype(d: Dtype) -> Result<DType, ModelError> {
    Ok(DType::try_from(d)?)
}

/// `W + delta` in `f32` (`f64` for an `f64` base), cast to `out`.
fn add_delta(w: &Tensor, delta: &Delta, out: Dtype) -> Result<Vec<u8>, ModelError> {
    let compute = if w.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let sum = (w.to_dtype(compute)? + delta.to_f32()?.to_dtype(compute)?)?;
    Ok(tensor_bytes(&sum.to_dtype(candle_dtype(out)?)?)?)
}

/// The stored dtype and shape of every tensor of the base.
fn base_entries(base: &BaseWeights) -> Vec<Entry> {
    match base {
        BaseWeights::Random(w) => w
            .tensor_names()
            .into_iter()
            .map(|name| {
                let shape = w.shape(&name).unwrap_or_default().to_vec();
                Entry {
                    name,
                    dtype: Dtype::F32,
                    shape,
                }
            })
            .collect(),
        BaseWeights::Files(w) => w
            .tensor_names()
            .into_iter()
            .filter_map(|name| {
                let (dtype, shape) = w.tensor_info(&name)?;
                Some(Entry { name, dtype, shape })
            })
            .collect(),
    }
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::BF16 | Dtype::F16 | Dtype::F32 | Dtype::F64)
}

/// The dtype the base is stored in: its embedding's.
fn base_dtype(base: &BaseWeights) -> Dtype {
    match base {
        BaseWeights::Random(_) => Dtype::F32,
        BaseWeights::Files(w) => w
            .tensor_info("model.embed_tokens.weight")
            .map_or(Dtype::F32, |(d, _)| d),
    }
}

/// Merges the adapter in `adapter_dir` (a run's output directory) into the
/// base of `spec` and writes `model.safetensors`, `config.json` and, for a
/// local base, its tokenizer files to `out`. `progress` hears of every
/// tensor written.
pub fn merge(
    spec: &RunSpec,
    adapter_dir: &Path,
    out: &Path,
    options: MergeOptions,
    progress: &mut dyn FnMut(MergeProgress<'_>),
) -> Result<MergeSummary, ModelError> {
    let (config, base) = open_base(spec)?;
    let stored = base_dtype(&base);
    let dtype = options.dtype.map_or(stored, MergeDtype::st);
    let path = out.join(MERGED_WEIGHTS);
    let (tensors, merged) = match options.base {
        MergeBase::Original => {
            let deltas = deltas(spec, &config, adapter_dir)?;
            let mut entries = base_entries(&base);
            check_targets(&entries, &deltas, &base)?;
            for e in entries.iter_mut().filter(|e| is_float(e.dtype)) {
                e.dtype = options.dtype.map_or(e.dtype, MergeDtype::st);
            }
            let produce = |e: &Entry| original_tensor(&base, &deltas, e);
            let n = entries.len();
            write_lazily(&path, entries, &produce, progress)?;
            (n, deltas.len())
        }
        MergeBase::Quantized => {
            drop(base);
            let (model, _) = build(spec)?;
            load_adapter(&model, adapter_dir)?;
            let merged = model.trainable_vars().len() / 2;
            let entries: Vec<Entry> = config
                .tensor_shapes()
                .into_iter()
                .map(|(name, shape)| Entry { name, dtype, shape })
                .collect();
            let produce = |e: &Entry| -> Result<Vec<u8>, ModelError> {
                let t = model.merged_tensor(&e.name)?;
                Ok(tensor_bytes(&t.to_dtype(candle_dtype(e.dtype)?)?)?)
            };
            let n = entries.len();
            write_lazily(&path, entries, &produce, progress)?;
            (n, merged)
        }
    };
    let torch_dtype = torch_dtype_name(dtype);
    write_config(spec, &config, out, torch_dtype)?;
    if spec.weights == Weights::LocalDir {
        copy_beside(Path::new(&spec.model), out)?;
    }
    Ok(MergeSummary {
        weights: path,
        tensors,
        merged,
        torch_dtype,
    })
}

/// Every adapted weight is in the base with the adapter's shape.
fn check_targets(
    entries: &[Entry],
    deltas: &HashMap<String, Delta>,
    base: &BaseWeights,
) -> Result<(), ModelError> {
    let shapes: HashMap<&str, &[usize]> = entries
        .iter()
        .map(|e| (e.name.as_str(), e.shape.as_slice()))
        .collect();
    let mut names: Vec<&String> = deltas.keys().collect();
    names.sort();
    for name in names {
        let d = &deltas[name];
        let want = [d.b.dims()[0], d.a.dims()[1]];
        let found = shapes.get(name.as_str());
        if found != Some(&&want[..]) {
            return Err(ModelError::Inconsistent {
                path: match base {
                    BaseWeights::Files(w) => w.dir().to_path_buf(),
                    BaseWeights::Random(_) => PathBuf::from("the embedded model"),
                },
                message: format!(
                    "the adapter changes {name} of shape {want:?}, but the base has {}",
                    found.map_or("no such tensor".to_string(), |s| format!("shape {s:?}"))
                ),
            });
        }
    }
    Ok(())
}

/// One tensor of the original base: `W + s · B A` when adapted, else its
/// stored bytes (converted when another dtype was asked for).
fn original_tensor(
    base: &BaseWeights,
    deltas: &HashMap<String, Delta>,
    e: &Entry,
) -> Result<Vec<u8>, ModelError> {
    if let Some(d) = deltas.get(&e.name) {
        return add_delta(&base.tensor(&e.name)?, d, e.dtype);
    }
    match base {
        BaseWeights::Files(w) => {
            let same = w.tensor_info(&e.name).is_some_and(|(d, _)| d == e.dtype);
            if same {
                return Ok(w.raw_bytes(&e.name)?);
            }
            let t = w.tensor(&e.name)?;
            Ok(tensor_bytes(&t.to_dtype(candle_dtype(e.dtype)?)?)?)
        }
        BaseWeights::Random(w) => {
            let t = w.tensor(&e.name)?;
            Ok(tensor_bytes(&t.to_dtype(candle_dtype(e.dtype)?)?)?)
        }
    }
}

/// `torch_dtype` as transformers spells it.
fn torch_dtype_name(d: Dtype) -> &'static str {
    match d {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        Dtype::F64 => "float64",
        _ => "float32",
    }
}

/// Removes every `null` (transformers refuses `attention_bias: null` and
/// the like; an absent key takes its default).
fn drop_nulls(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|_, x| !x.is_null());
            m.values_mut().for_each(drop_nulls);
        }
        Value::Array(a) => a.iter_mut().for_each(drop_nulls),
        _ => {}
    }
}

/// The merged model's `config.json`: a local base's own (so keys this crate
/// does not read, such as token ids, survive) with the trained architecture
/// over it, the dtype of the merged weights and no `null`.
fn merged_config(
    spec: &RunSpec,
    config: &LlamaConfig,
    torch_dtype: &str,
) -> Result<Value, ModelError> {
    let mut map = Map::new();
    if spec.weights == Weights::LocalDir {
        let path = Path::new(&spec.model).join("config.json");
        let bytes = crate::safe_io::read_small(&path).map_err(|e| ModelError::Read {
            path: path.clone(),
            source: e.into(),
        })?;
        if let Ok(Value::Object(m)) = serde_json::from_slice(&bytes) {
            map = m;
        }
    }
    if let Ok(Value::Object(trained)) = serde_json::to_value(config) {
        map.extend(trained);
    }
    let model_type = map
        .entry("model_type")
        .or_insert_with(|| "llama".into())
        .as_str()
        .unwrap_or("llama")
        .to_string();
    let arch = match model_type.as_str() {
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        _ => "LlamaForCausalLM",
    };
    map.entry("architectures")
        .or_insert_with(|| Value::from(vec![arch]));
    // Older transformers read `torch_dtype`, newer `dtype`.
    map.insert("torch_dtype".into(), torch_dtype.into());
    map.insert("dtype".into(), torch_dtype.into());
    let mut v = Value::Object(map);
    drop_nulls(&mut v);
    Ok(v)
}

fn write_config(
    spec: &RunSpec,
    config: &LlamaConfig,
    out: &Path,
    torch_dtype: &str,
) -> Result<(), ModelError> {
    let v = merged_config(spec, config, torch_dtype)?;
    super::model::write_json(&out.join("config.json"), &v)
}

/// Copies the [`COPIED_FILES`] that `base` has into `out`, each read with
/// the bounded reader.
fn copy_beside(base: &Path, out: &Path) -> Result<(), ModelError> {
    for f in COPIED_FILES {
        let src = base.join(f);
        let bytes = match crate::safe_io::read_small(&src) {
            Ok(b) => b,
            Err(e) if e.is_not_found() => continue,
            Err(e) => {
                return Err(ModelError::Read {
                    path: src,
                    source: e.into(),
                });
            }
        };
        write_atomic(&out.join(f), &bytes).map_err(|e| ModelError::Write {
            path: out.join(f),
            source: e.into(),
        })?;
    }
    Ok(())
}
