//! Exact parameter counts from a model's local files.
//!
//! Three sources, most reliable first:
//! - `config.json`: the architecture's fields give the exact count
//!   ([`config_param_count`]);
//! - safetensors headers, single or sharded through
//!   `model.safetensors.index.json`: the sum of tensor sizes, corrected for
//!   packed 4-bit/8-bit storage ([`count_tensors`]);
//! - a GGUF header: `general.parameter_count`, else the sum of its tensors'
//!   element counts ([`read_gguf_header`]).
//!
//! [`detect_model_size_from_path`] reads whichever of these a file or
//! directory has, reports each count and any disagreement between them, and
//! picks the most reliable, falling back to the name. Only headers are read,
//! never tensor data, and pickled checkpoints (`.bin`, `.pt`) are never
//! opened: loading them can run code.

mod config;
mod gguf;
mod safetensors;

use std::fs::File;
use std::io::{self, BufReader};
use std::path::{Path, PathBuf};

use serde_json::Value;

pub use config::{
    ConfigCount, ConfigError, SUPPORTED_MODEL_TYPES, config_param_count, config_param_count_str,
};
pub use gguf::{GgufError, GgufHeader, GgufValue, MAX_KEPT_STRING_LEN, read_gguf_header};
pub use safetensors::{
    MAX_HEADER_LEN, PackedLayout, QuantHints, SafetensorsCount, SafetensorsError, TensorEntry,
    count_tensors, read_safetensors_header,
};

use crate::detect::{ModelSize, SizeSource, detect_model_size};

/// Two counts disagree when they differ by more than this fraction of the
/// chosen count (`tables/detect.toml`, `[files]`).
pub use crate::tables::DISAGREEMENT_FRACTION;

/// File extensions of pickled checkpoints, which are never opened.
const PICKLE_EXTENSIONS: &[&str] = &["bin", "pt", "pth", "ckpt", "pkl", "pickle"];

/// Why a model file gave no count. Every variant names the file; where
/// there is a cause (an I/O error, a parser's or a format's complaint) it is
/// the `source()`, not part of the message, so print the whole chain
/// ([`crate::report::chain_message`]).
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The file or directory could not be read.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: io::Error,
    },
    /// A JSON file is not a regular file, or is larger than the small-file
    /// cap (`max_small_file_bytes` in `tables/defaults.toml`).
    #[error(transparent)]
    Read(#[from] crate::safe_io::ReadError),
    /// A JSON file does not parse.
    #[error("{}: not valid JSON", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's error (it gives the line and column).
        source: serde_json::Error,
    },
    /// `config.json` gave no count.
    #[error("{}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ConfigError,
    },
    /// A safetensors header (or index) gave no count.
    #[error("{}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// Why.
        source: SafetensorsError,
    },
    /// A safetensors index is malformed.
    #[error("{}: field {field:?} {problem}", path.display())]
    Index {
        /// The index file.
        path: PathBuf,
        /// The field at fault.
        field: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
    /// A GGUF header could not be read.
    #[error("{}", path.display())]
    Gguf {
        /// The file.
        path: PathBuf,
        /// Why.
        source: GgufError,
    },
    /// A pickled checkpoint: never opened.
    #[error(
        "{}: pickled weights are not read (loading them can run code); use safetensors, GGUF or config.json",
        path.display()
    )]
    Pickled {
        /// The file.
        path: PathBuf,
    },
    /// A file of a kind this module does not read.
    #[error(
        "{}: not a model file this reads (config.json, *.safetensors, *.safetensors.index.json, *.gguf)",
        path.display()
    )]
    UnsupportedFile {
        /// The file.
        path: PathBuf,
    },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> FilesError + '_ {
    move |source| FilesError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Opens a file and returns it with its length.
fn open(path: &Path) -> Result<(File, u64), FilesError> {
    let file = File::open(path).map_err(io_error(path))?;
    let len = file.metadata().map_err(io_error(path))?.len();
    Ok((file, len))
}

/// Reads and parses a small JSON file with the one bounded reader
/// ([`crate::safe_io::read_small`]): a regular file under the small-file cap.
fn read_json(path: &Path) -> Result<Value, FilesError> {
    let text = crate::safe_io::read_small(path)?;
    serde_json::from_slice(&text).map_err(|source| FilesError::Json {
        path: path.to_owned(),
        source,
    })
}

/// Counts the parameters a `config.json` file describes.
///
/// ```no_run
/// use qlora_scale::files::count_config_file;
/// let count = count_config_file("models/Mistral-7B-v0.1/config.json".as_ref())?;
/// assert_eq!(count.params, 7_241_732_096);
/// # Ok::<(), qlora_scale::files::FilesError>(())
/// ```
pub fn count_config_file(path: &Path) -> Result<ConfigCount, FilesError> {
    let value = read_json(path)?;
    config_param_count(&value).map_err(|source| FilesError::Config {
        path: path.to_owned(),
        source,
    })
}

/// Reads the tensor entries of one safetensors file's header.
pub fn read_safetensors_file(path: &Path) -> Result<Vec<TensorEntry>, FilesError> {
    let (file, len) = open(path)?;
    read_safetensors_header(BufReader::new(file), len).map_err(|source| FilesError::Safetensors {
        path: path.to_owned(),
        source,
    })
}

/// Counts the parameters in one safetensors file from its header.
pub fn count_safetensors_file(
    path: &Path,
    hints: &QuantHints,
) -> Result<SafetensorsCount, FilesError> {
    let tensors = read_safetensors_file(path)?;
    count_tensors(&tensors, hints).map_err(|source| FilesError::Safetensors {
        path: path.to_owned(),
        source,
    })
}

/// A sharded checkpoint's index (`model.safetensors.index.json`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SafetensorsIndex {
    /// `metadata.total_size`: bytes of tensor data over all shards.
    pub total_size_bytes: Option<u64>,
    /// The shard file names, each once, in order of first mention.
    pub shards: Vec<String>,
}

/// Reads a safetensors index. Shard names must be plain file names (no
/// directories), so an index cannot point outside its own directory.
pub fn read_safetensors_index(path: &Path) -> Result<SafetensorsIndex, FilesError> {
    let value = read_json(path)?;
    let bad = |field, problem| FilesError::Index {
        path: path.to_owned(),
        field,
        problem,
    };
    let total_size_bytes = match value.pointer("/metadata/total_size") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| {
                    v.as_f64()
                        .filter(|f| *f >= 0.0 && f.fract() == 0.0)
                        .map(|f| f as u64)
                })
                .ok_or_else(|| bad("metadata.total_size", "is not a byte count"))?,
        ),
    };
    let map = value
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| bad("weight_map", "is missing or not an object"))?;
    let mut shards: Vec<String> = Vec::new();
    for file in map.values() {
        let file = file
            .as_str()
            .ok_or_else(|| bad("weight_map", "has a shard name that is not a string"))?;
        let plain = !file.is_empty()
            && file != "."
            && file != ".."
            && !file.contains(['/', '\\'])
            && !file.contains('\0');
        if !plain {
            return Err(bad(
                "weight_map",
                "names a shard outside the index's directory",
            ));
        }
        if !shards.iter().any(|s| s == file) {
            shards.push(file.to_owned());
        }
    }
    if shards.is_empty() {
        return Err(bad("weight_map", "lists no shards"));
    }
    Ok(SafetensorsIndex {
        total_size_bytes,
        shards,
    })
}

/// Counts the parameters of a sharded checkpoint: every shard's header,
/// counted together (a packed weight's companions may sit in another shard).
pub fn count_safetensors_index(
    path: &Path,
    hints: &QuantHints,
) -> Result<(SafetensorsCount, SafetensorsIndex), FilesError> {
    let index = read_safetensors_index(path)?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut tensors = Vec::new();
    for shard in &index.shards {
        tensors.extend(read_safetensors_file(&dir.join(shard))?);
    }
    let count = count_tensors(&tensors, hints).map_err(|source| FilesError::Safetensors {
        path: path.to_owned(),
        source,
    })?;
    Ok((count, index))
}

/// Reads a GGUF file's header.
pub fn read_gguf_file(path: &Path) -> Result<GgufHeader, FilesError> {
    let (file, len) = open(path)?;
    read_gguf_header(BufReader::new(file), len).map_err(|source| FilesError::Gguf {
        path: path.to_owned(),
        source,
    })
}

/// Where a parameter count came from, most reliable first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CountSource {
    /// The architecture fields of `config.json`.
    Config,
    /// The tensor shapes in safetensors headers.
    Safetensors,
    /// A GGUF file's `general.parameter_count`.
    GgufMetadata,
    /// The sum of a GGUF file's tensor element counts.
    GgufTensors,
    /// The file or directory name ([`detect_model_size`]).
    Name,
}

impl CountSource {
    /// Human-readable description.
    ///
    /// ```
    /// use qlora_scale::files::CountSource;
    /// assert_eq!(CountSource::Config.describe(), "config.json");
    /// ```
    pub const fn describe(self) -> &'static str {
        match self {
            CountSource::Config => "config.json",
            CountSource::Safetensors => "safetensors headers",
            CountSource::GgufMetadata => "GGUF general.parameter_count",
            CountSource::GgufTensors => "GGUF tensor sum",
            CountSource::Name => "name",
        }
    }
}

/// One source's count.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SourceCount {
    /// Which source.
    pub source: CountSource,
    /// The file it was read from (for [`CountSource::Name`], the path whose
    /// name was read).
    pub path: PathBuf,
    /// Its parameter count.
    pub params: u64,
}

/// A source whose count differs from the chosen one by more than
/// [`DISAGREEMENT_FRACTION`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Disagreement {
    /// The source that disagrees.
    pub source: CountSource,
    /// Its count.
    pub params: u64,
    /// The chosen source.
    pub chosen: CountSource,
    /// The chosen count.
    pub chosen_params: u64,
    /// `|params - chosen_params| / chosen_params`.
    pub fraction: f64,
}

/// What a model's local files say about its size.
#[derive(Debug, serde::Serialize)]
pub struct FileSize {
    /// The chosen size: [`SizeSource::Files`] when a file gave it, else
    /// the name's result.
    pub size: ModelSize,
    /// The source of the chosen count; `None` when nothing gave one.
    pub chosen: Option<CountSource>,
    /// Every count found, most reliable source first.
    pub counts: Vec<SourceCount>,
    /// Counts that differ from the chosen one by more than
    /// [`DISAGREEMENT_FRACTION`].
    pub disagreements: Vec<Disagreement>,
    /// The GGUF `general.size_label`, when present.
    pub size_label: Option<String>,
    /// Packed layouts found in safetensors headers.
    pub packed_layouts: Vec<PackedLayout>,
    /// The sharded index's `metadata.total_size` (bytes), when present.
    pub total_size_bytes: Option<u64>,
    /// Parameters of a stored `lm_head.weight` left out of the safetensors
    /// count because `config.json` ties it to the embedding.
    pub tied_duplicate_removed: u64,
    /// Pickled checkpoints found and not opened.
    pub not_read: Vec<PathBuf>,
    /// Files that were read but gave no count, and why (a directory's other
    /// sources still count). Serialised as each error's whole chain.
    #[serde(serialize_with = "serialize_errors")]
    pub problems: Vec<FilesError>,
}

fn serialize_errors<S: serde::Serializer>(errors: &[FilesError], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(errors.iter().map(|e| crate::report::chain_message(e)))
}

fn extension(path: &Path) -> String {
    path.extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default()
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn is_pickle(path: &Path) -> bool {
    PICKLE_EXTENSIONS.contains(&extension(path).as_str())
}

/// Counts gathered from files, before one is chosen.
#[derive(Default)]
struct Gathered {
    counts: Vec<SourceCount>,
    size_label: Option<String>,
    packed_layouts: Vec<PackedLayout>,
    total_size_bytes: Option<u64>,
    tied_duplicate_removed: u64,
    not_read: Vec<PathBuf>,
    problems: Vec<FilesError>,
    /// From `config.json`: whether embeddings are tied.
    tied: bool,
}

impl Gathered {
    fn add_safetensors(&mut self, path: &Path, mut count: SafetensorsCount) {
        if self.tied && count.lm_head_params > 0 {
            self.tied_duplicate_removed = count.lm_head_params;
            count.params -= count.lm_head_params;
        }
        self.packed_layouts = count.layouts.iter().copied().collect();
        if count.params == 0 {
            return;
        }
        self.counts.push(SourceCount {
            source: CountSource::Safetensors,
            path: path.to_owned(),
            params: count.params,
        });
    }

    fn add_gguf(&mut self, path: &Path, header: &GgufHeader, split_tensor_sum: Option<u64>) {
        if let Some(p) = header.parameter_count() {
            self.counts.push(SourceCount {
                source: CountSource::GgufMetadata,
                path: path.to_owned(),
                params: p,
            });
        }
        let tensors = split_tensor_sum.unwrap_or(header.tensor_elements);
        if tensors > 0 {
            self.counts.push(SourceCount {
                source: CountSource::GgufTensors,
                path: path.to_owned(),
                params: tensors,
            });
        }
        self.size_label = header.size_label().map(str::to_owned);
    }

    /// Reads a GGUF file; for the first file of a split model without
    /// `general.parameter_count`, sums the tensors of every split.
    fn read_gguf(&mut self, path: &Path) -> Result<(), FilesError> {
        let header = read_gguf_file(path)?;
        let splits = header.split_count();
        let mut split_sum = None;
        if splits > 1 && header.parameter_count().is_none() {
            let mut sum = header.tensor_elements;
            for other in split_siblings(path, splits) {
                let h = read_gguf_file(&other)?;
                sum = sum.saturating_add(h.tensor_elements);
            }
            split_sum = Some(sum);
        }
        self.add_gguf(path, &header, split_sum);
        Ok(())
    }
}

/// The other files of a split GGUF (`name-00001-of-00003.gguf`).
fn split_siblings(first: &Path, splits: u64) -> Vec<PathBuf> {
    let name = file_name(first);
    let suffix = format!("-00001-of-{splits:05}.gguf");
    let Some(stem) = name.strip_suffix(&suffix) else {
        return Vec::new();
    };
    let dir = first.parent().unwrap_or(Path::new(""));
    (2..=splits.min(9999))
        .map(|i| dir.join(format!("{stem}-{i:05}-of-{splits:05}.gguf")))
        .collect()
}

/// Detects a model's size from a local file or directory.
///
/// A directory: `config.json`, the safetensors checkpoint (the index's
/// shards, else `model.safetensors`, else `consolidated.safetensors`, else
/// every `*.safetensors` but adapters) and the first `*.gguf` (projectors
/// skipped) are each read when present; one that fails is listed in
/// [`FileSize::problems`] and the others still count. A file: read by its
/// kind, and a failure is the error. Either way the name is the last
/// resort, and pickled checkpoints are never opened.
///
/// The count chosen is the most reliable present: `config.json`, then
/// safetensors, then GGUF metadata, then the GGUF tensor sum, then the name.
///
/// ```
/// use qlora_scale::files::{detect_model_size_from_path, CountSource};
/// use qlora_scale::SizeSource;
/// let dir = tempfile::tempdir()?;
/// std::fs::write(dir.path().join("config.json"), r#"{
///     "model_type": "gpt2", "vocab_size": 50257, "n_embd": 768,
///     "n_layer": 12, "n_positions": 1024, "n_head": 12
/// }"#)?;
/// let found = detect_model_size_from_path(dir.path())?;
/// assert_eq!(found.size.params, 124_439_808);
/// assert_eq!(found.size.source, SizeSource::Files);
/// assert_eq!(found.chosen, Some(CountSource::Config));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn detect_model_size_from_path(path: &Path) -> Result<FileSize, FilesError> {
    detect_model_size_from_path_with(path, None)
}

/// [`detect_model_size_from_path`], given the content of the directory's
/// `config.json` when the caller has read it already (`train` reads it once
/// for the architecture and the size).
pub fn detect_model_size_from_path_with(
    path: &Path,
    config: Option<&Value>,
) -> Result<FileSize, FilesError> {
    let meta = std::fs::metadata(path).map_err(io_error(path))?;
    let mut g = Gathered::default();
    if meta.is_dir() {
        gather_dir(path, config, &mut g)?;
    } else {
        gather_file(path, &mut g)?;
    }
    Ok(choose(path, g))
}

/// The size of a model named by `name`: from its files when `name` is an
/// existing local file or directory whose files give a count, else from the
/// name. Problems reading the files (the result then falls back to other
/// files or the name) are returned beside it, for the caller to report.
///
/// ```
/// use qlora_scale::files::detect_model_size_local;
/// use qlora_scale::SizeSource;
/// let (size, problems) = detect_model_size_local(std::path::Path::new("Qwen/Qwen2.5-0.5B"));
/// assert_eq!(size.source, SizeSource::Name);
/// assert!(problems.is_empty());
/// ```
pub fn detect_model_size_local(name: &Path) -> (ModelSize, Vec<FilesError>) {
    if !name.exists() {
        return (detect_model_size(name), Vec::new());
    }
    match detect_model_size_from_path(name) {
        Ok(found) => (found.size, found.problems),
        Err(e) => (detect_model_size(name), vec![e]),
    }
}

/// Counts the `config.json` at `path` whose content is `value`.
fn config_into(path: &Path, value: &Value, g: &mut Gathered) -> Result<QuantHints, FilesError> {
    let hints = QuantHints::from_config(value);
    let count = config_param_count(value).map_err(|source| FilesError::Config {
        path: path.to_owned(),
        source,
    })?;
    g.tied = count.tied_embeddings;
    g.counts.push(SourceCount {
        source: CountSource::Config,
        path: path.to_owned(),
        params: count.params,
    });
    Ok(hints)
}

/// Quantization hints and tying from a `config.json` beside a weights file,
/// when there is one that parses (it is not itself counted).
fn sibling_hints(path: &Path, g: &mut Gathered) -> QuantHints {
    let config = path.parent().unwrap_or(Path::new("")).join("config.json");
    match read_json(&config) {
        Ok(value) => {
            g.tied = config_param_count(&value).is_ok_and(|c| c.tied_embeddings);
            QuantHints::from_config(&value)
        }
        Err(_) => QuantHints::default(),
    }
}

fn gather_file(path: &Path, g: &mut Gathered) -> Result<(), FilesError> {
    let name = file_name(path).to_ascii_lowercase();
    if is_pickle(path) {
        return Err(FilesError::Pickled {
            path: path.to_owned(),
        });
    }
    if name.ends_with(".safetensors.index.json") {
        let hints = sibling_hints(path, g);
        let (count, index) = count_safetensors_index(path, &hints)?;
        g.total_size_bytes = index.total_size_bytes;
        g.add_safetensors(path, count);
    } else if name.ends_with(".json") {
        config_into(path, &read_json(path)?, g)?;
    } else if name.ends_with(".safetensors") {
        let hints = sibling_hints(path, g);
        let count = count_safetensors_file(path, &hints)?;
        g.add_safetensors(path, count);
    } else if name.ends_with(".gguf") {
        g.read_gguf(path)?;
    } else {
        return Err(FilesError::UnsupportedFile {
            path: path.to_owned(),
        });
    }
    Ok(())
}

fn gather_dir(dir: &Path, config: Option<&Value>, g: &mut Gathered) -> Result<(), FilesError> {
    let mut files: Vec<PathBuf> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
        let entry = entry.map_err(io_error(dir))?;
        // Follows symlinks: Hugging Face cache snapshots are links to blobs.
        if entry.path().is_file() {
            files.push(entry.path());
        }
    }
    files.sort();
    let named = |n: &str| files.iter().find(|p| file_name(p) == n).cloned();
    let lower = |p: &PathBuf| file_name(p).to_ascii_lowercase();

    let mut hints = QuantHints::default();
    if let Some(path) = named("config.json") {
        let value = match config {
            Some(v) => Ok(v.clone()),
            None => read_json(&path),
        };
        match value {
            Ok(value) => match config_into(&path, &value, g) {
                Ok(h) => hints = h,
                Err(e) => {
                    // Bit widths still help the safetensors count.
                    hints = QuantHints::from_config(&value);
                    g.problems.push(e);
                }
            },
            Err(e) => g.problems.push(e),
        }
    }

    let index = named("model.safetensors.index.json").or_else(|| {
        files
            .iter()
            .find(|p| lower(p).ends_with(".safetensors.index.json"))
            .cloned()
    });
    let safetensors: Vec<PathBuf> = files
        .iter()
        .filter(|p| {
            let n = lower(p);
            n.ends_with(".safetensors") && !n.starts_with("adapter")
        })
        .cloned()
        .collect();
    let result = if let Some(index) = index {
        count_safetensors_index(&index, &hints).map(|(count, idx)| {
            g.total_size_bytes = idx.total_size_bytes;
            g.add_safetensors(&index, count);
        })
    } else {
        let chosen: Vec<PathBuf> = match (
            named("model.safetensors"),
            named("consolidated.safetensors"),
        ) {
            (Some(p), _) | (None, Some(p)) => vec![p],
            (None, None) => safetensors,
        };
        count_unindexed(&chosen, &hints).map(|count| {
            if let Some((first, count)) = chosen.first().zip(count) {
                let path = if chosen.len() == 1 {
                    first.clone()
                } else {
                    dir.to_owned()
                };
                g.add_safetensors(&path, count);
            }
        })
    };
    if let Err(e) = result {
        g.problems.push(e);
    }

    let gguf = files.iter().find(|p| {
        let n = lower(p);
        n.ends_with(".gguf") && !n.starts_with("mmproj")
    });
    if let Some(gguf) = gguf
        && let Err(e) = g.read_gguf(gguf)
    {
        g.problems.push(e);
    }

    g.not_read = files.into_iter().filter(|p| is_pickle(p)).collect();
    Ok(())
}

/// Counts unindexed safetensors files together; `None` when there are none.
fn count_unindexed(
    files: &[PathBuf],
    hints: &QuantHints,
) -> Result<Option<SafetensorsCount>, FilesError> {
    let Some(first) = files.first() else {
        return Ok(None);
    };
    let mut tensors = Vec::new();
    for file in files {
        tensors.extend(read_safetensors_file(file)?);
    }
    count_tensors(&tensors, hints)
        .map(Some)
        .map_err(|source| FilesError::Safetensors {
            path: first.clone(),
            source,
        })
}

/// The name fallback: the path's own name, else the nearest ancestor whose
/// name gives a size (a Hugging Face cache snapshot is named by a hash).
fn name_size(path: &Path) -> (ModelSize, PathBuf) {
    let mut first = None;
    for p in path.ancestors().take(5) {
        if p.as_os_str().is_empty() {
            break;
        }
        let size = detect_model_size(p);
        if size.is_known() {
            return (size, p.to_owned());
        }
        first.get_or_insert((size, p.to_owned()));
    }
    first.unwrap_or_else(|| (detect_model_size(path), path.to_owned()))
}

fn choose(path: &Path, mut g: Gathered) -> FileSize {
    let (name, name_path) = name_size(path);
    if name.is_known() {
        g.counts.push(SourceCount {
            source: CountSource::Name,
            path: name_path,
            params: name.params,
        });
    }
    g.counts.sort_by_key(|c| c.source);
    let best = g.counts.first().map(|c| (c.source, c.params));
    let size = match best {
        Some((CountSource::Name, _)) | None => name,
        Some((_, params)) => ModelSize::from_params(params, SizeSource::Files),
    };
    let disagreements = match best {
        Some((chosen, chosen_params)) => g
            .counts
            .iter()
            .filter(|c| c.source != chosen)
            .filter_map(|c| {
                let fraction =
                    c.params.abs_diff(chosen_params) as f64 / chosen_params.max(1) as f64;
                (fraction > DISAGREEMENT_FRACTION).then_some(Disagreement {
                    source: c.source,
                    params: c.params,
                    chosen,
                    chosen_params,
                    fraction,
                })
            })
            .collect(),
        None => Vec::new(),
    };
    FileSize {
        size,
        chosen: best.map(|(s, _)| s),
        counts: g.counts,
        disagreements,
        size_label: g.size_label,
        packed_layouts: g.packed_layouts,
        total_size_bytes: g.total_size_bytes,
        tied_duplicate_removed: g.tied_duplicate_removed,
        not_read: g.not_read,
        problems: g.problems,
    }
}
