//! GGUF headers: the metadata key/value section and tensor infos, read
//! without touching tensor data.
//!
//! Layout (v2 and v3; v1 used 32-bit counts and is refused): magic `GGUF`,
//! `u32` version, `u64` tensor count, `u64` metadata count, the key/value
//! pairs, then per tensor its name, `u32` dimension count, `u64`
//! dimensions, `u32` type and `u64` offset. Files are little-endian; v3
//! also allows big-endian, recognised from the byte-swapped version.
//!
//! Every length read from the file is checked against the bytes left in
//! the file before anything is allocated or skipped, so a corrupt length
//! gives an error, never a huge allocation or a long loop.

use std::collections::BTreeMap;
use std::io::{self, Read};

/// Keys are at most this long (the GGUF specification's limit).
const MAX_KEY_LEN: u64 = 65_535;

/// String values up to this long are kept; longer ones (chat templates are
/// the longest in practice, a few tens of KB) are skipped and only their
/// length is kept.
pub const MAX_KEPT_STRING_LEN: u64 = 1 << 20;

/// Arrays may nest at most this deep.
const MAX_ARRAY_DEPTH: u32 = 8;

/// Tensors may have at most this many dimensions (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// Why a GGUF header could not be read. Wrapped with the file's path in
/// [`FilesError::Gguf`](crate::files::FilesError::Gguf).
#[derive(Debug, thiserror::Error)]
pub enum GgufError {
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (no \"GGUF\" magic)")]
    BadMagic,
    /// A version this reader does not know.
    #[error("unsupported GGUF version {0} (versions 2 and 3 are read)")]
    UnsupportedVersion(u32),
    /// The file ends inside the header.
    #[error("truncated at byte {offset}: reading {what}")]
    Truncated {
        /// Bytes consumed before the read that failed.
        offset: u64,
        /// What was being read.
        what: &'static str,
    },
    /// A length or count larger than the rest of the file could hold.
    #[error("at byte {offset}: {what} of {value} cannot fit in the {left} bytes left in the file")]
    LengthTooLarge {
        /// Where the length was read.
        offset: u64,
        /// What the length counts.
        what: &'static str,
        /// The length read.
        value: u64,
        /// The bytes left in the file.
        left: u64,
    },
    /// A metadata value type code outside the specification.
    #[error("key {key:?}: unknown value type {code}")]
    UnknownValueType {
        /// The key whose value has the bad type.
        key: String,
        /// The type code.
        code: u32,
    },
    /// Arrays nested deeper than any writer produces.
    #[error("key {key:?}: arrays nested more than {MAX_ARRAY_DEPTH} deep")]
    ArrayTooDeep {
        /// The key whose value nests too deep.
        key: String,
    },
    /// A metadata key that is not valid UTF-8.
    #[error("at byte {offset}: key is not valid UTF-8")]
    InvalidKey {
        /// Where the key starts.
        offset: u64,
    },
    /// A tensor with more dimensions than GGML allows.
    #[error("tensor {name:?}: {dims} dimensions (at most {MAX_DIMS})")]
    TooManyDims {
        /// The tensor's name.
        name: String,
        /// Its dimension count.
        dims: u32,
    },
    /// Element counts overflow 64 bits.
    #[error("tensor {name:?}: element count overflows 64 bits")]
    Overflow {
        /// The tensor whose count overflowed.
        name: String,
    },
    /// A read failed for a reason other than the end of the file.
    #[error("read failed")]
    Io(#[from] io::Error),
}

/// A metadata value. Arrays are summarised (type and length): their
/// contents (vocabularies, merges) are skipped, not stored.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(untagged)]
pub enum GgufValue {
    /// Any unsigned integer type.
    Unsigned(u64),
    /// Any signed integer type.
    Signed(i64),
    /// `float32` or `float64`.
    Float(f64),
    /// `bool`.
    Bool(bool),
    /// A string up to [`MAX_KEPT_STRING_LEN`] bytes (lossily decoded).
    Text(String),
    /// A longer string, skipped: its length in bytes.
    LongText {
        /// The string's length in bytes.
        bytes: u64,
    },
    /// An array: its element type code and length.
    Array {
        /// The GGUF type code of the elements.
        element_type: u32,
        /// The number of elements.
        len: u64,
    },
}

impl GgufValue {
    /// The value as an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::Unsigned(v) => Some(v),
            GgufValue::Signed(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as text, when it is a kept string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::Text(s) => Some(s),
            _ => None,
        }
    }
}

/// What a GGUF header says.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Whether the file is big-endian.
    pub big_endian: bool,
    /// Every metadata key and its value (arrays summarised).
    pub metadata: BTreeMap<String, GgufValue>,
    /// Number of tensors.
    pub tensor_count: u64,
    /// The sum of the tensors' element counts (logical elements: quantized
    /// blocks count the values they hold).
    pub tensor_elements: u64,
}

impl GgufHeader {
    /// `general.parameter_count`, when the file records it.
    pub fn parameter_count(&self) -> Option<u64> {
        self.metadata
            .get("general.parameter_count")
            .and_then(GgufValue::as_u64)
            .filter(|&p| p > 0)
    }

    /// `general.size_label` (`7B`, `8x7B`, `135M`), when present.
    pub fn size_label(&self) -> Option<&str> {
        self.metadata
            .get("general.size_label")
            .and_then(GgufValue::as_str)
    }

    /// `general.architecture` (`llama`, `qwen2`, ...), when present.
    pub fn architecture(&self) -> Option<&str> {
        self.metadata
            .get("general.architecture")
            .and_then(GgufValue::as_str)
    }

    /// `split.count` for a model split over several files (1 otherwise).
    pub fn split_count(&self) -> u64 {
        self.metadata
            .get("split.count")
            .and_then(GgufValue::as_u64)
            .unwrap_or(1)
    }
}

/// Reads a GGUF header from `reader` (positioned at the file's start).
/// `file_len` bounds every length in the header.
///
/// ```
/// use qlora_scale::files::read_gguf_header;
/// let mut file = b"GGUF".to_vec();
/// file.extend(3u32.to_le_bytes()); // version
/// file.extend(0u64.to_le_bytes()); // tensors
/// file.extend(1u64.to_le_bytes()); // metadata pairs
/// let key = b"general.parameter_count";
/// file.extend((key.len() as u64).to_le_bytes());
/// file.extend(key);
/// file.extend(10u32.to_le_bytes()); // uint64
/// file.extend(7_241_732_096u64.to_le_bytes());
/// let header = read_gguf_header(&file[..], file.len() as u64).unwrap();
/// assert_eq!(header.parameter_count(), Some(7_241_732_096));
/// ```
pub fn read_gguf_header<R: Read>(reader: R, file_len: u64) -> Result<GgufHeader, GgufError> {
    let mut r = Reader {
        inner: reader,
        offset: 0,
        len: file_len,
        big_endian: false,
    };
    let mut magic = [0u8; 4];
    r.bytes(&mut magic, "magic")?;
    if &magic != b"GGUF" {
        return Err(GgufError::BadMagic);
    }
    let version_le = r.u32("version")?;
    let version = match version_le {
        2 | 3 => version_le,
        v if matches!(v.swap_bytes(), 2 | 3) => {
            r.big_endian = true;
            v.swap_bytes()
        }
        v => return Err(GgufError::UnsupportedVersion(v)),
    };
    let tensor_count = r.u64("tensor count")?;
    // Each tensor info takes at least 8 + 4 + 4 + 8 bytes.
    r.check_count(tensor_count, 24, "tensor count")?;
    let kv_count = r.u64("metadata count")?;
    // Each pair takes at least 8 (key length) + 4 (type) + 1 byte.
    r.check_count(kv_count, 13, "metadata count")?;

    let mut metadata = BTreeMap::new();
    for _ in 0..kv_count {
        let key_offset = r.offset;
        let key = r.string(MAX_KEY_LEN, "key")?;
        let key =
            String::from_utf8(key).map_err(|_| GgufError::InvalidKey { offset: key_offset })?;
        let code = r.u32("value type")?;
        let value = r.value(code, &key)?;
        metadata.insert(key, value);
    }

    let mut tensor_elements: u64 = 0;
    for _ in 0..tensor_count {
        let name = r.string(MAX_KEY_LEN, "tensor name")?;
        let name = String::from_utf8_lossy(&name).into_owned();
        let dims = r.u32("tensor dimension count")?;
        if dims > MAX_DIMS {
            return Err(GgufError::TooManyDims { name, dims });
        }
        let mut elements: u64 = 1;
        for _ in 0..dims {
            let d = r.u64("tensor dimension")?;
            elements = elements
                .checked_mul(d)
                .ok_or_else(|| GgufError::Overflow { name: name.clone() })?;
        }
        r.u32("tensor type")?;
        r.u64("tensor offset")?;
        tensor_elements = tensor_elements
            .checked_add(elements)
            .ok_or(GgufError::Overflow { name })?;
    }

    Ok(GgufHeader {
        version,
        big_endian: r.big_endian,
        metadata,
        tensor_count,
        tensor_elements,
    })
}

/// A reader that knows how many bytes the file has left.
struct Reader<R> {
    inner: R,
    offset: u64,
    len: u64,
    big_endian: bool,
}

impl<R: Read> Reader<R> {
    fn left(&self) -> u64 {
        self.len.saturating_sub(self.offset)
    }

    fn bytes(&mut self, buf: &mut [u8], what: &'static str) -> Result<(), GgufError> {
        self.inner.read_exact(buf).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => GgufError::Truncated {
                offset: self.offset,
                what,
            },
            _ => GgufError::Io(e),
        })?;
        self.offset += buf.len() as u64;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        let mut b = [0u8; N];
        self.bytes(&mut b, what)?;
        if self.big_endian {
            b.reverse();
        }
        Ok(b)
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// Fails unless `count` items of at least `min_size` bytes fit in what
    /// is left of the file.
    fn check_count(&self, count: u64, min_size: u64, what: &'static str) -> Result<(), GgufError> {
        let left = self.left();
        if count.checked_mul(min_size).is_none_or(|need| need > left) {
            return Err(GgufError::LengthTooLarge {
                offset: self.offset,
                what,
                value: count,
                left,
            });
        }
        Ok(())
    }

    /// Reads a length-prefixed string of at most `max` bytes.
    fn string(&mut self, max: u64, what: &'static str) -> Result<Vec<u8>, GgufError> {
        let len = self.u64(what)?;
        if len > max || len > self.left() {
            return Err(GgufError::LengthTooLarge {
                offset: self.offset,
                what,
                value: len,
                left: self.left(),
            });
        }
        let mut buf = vec![0u8; len as usize];
        self.bytes(&mut buf, what)?;
        Ok(buf)
    }

    /// Skips `n` bytes (already checked against what is left).
    fn skip(&mut self, n: u64, what: &'static str) -> Result<(), GgufError> {
        let copied = io::copy(&mut (&mut self.inner).take(n), &mut io::sink())?;
        if copied < n {
            return Err(GgufError::Truncated {
                offset: self.offset + copied,
                what,
            });
        }
        self.offset += n;
        Ok(())
    }

    /// The fixed size of a scalar type, `None` for strings and arrays.
    fn scalar_size(code: u32) -> Option<u64> {
        match code {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }

    /// Skips an array's contents, nested arrays included (at most
    /// [`MAX_ARRAY_DEPTH`] deep, so a crafted file cannot recurse without end).
    fn skip_array(
        &mut self,
        element_type: u32,
        len: u64,
        key: &str,
        depth: u32,
    ) -> Result<(), GgufError> {
        match (element_type, Self::scalar_size(element_type)) {
            (_, Some(size)) => {
                self.check_count(len, size, "array length")?;
                self.skip(len * size, "array")
            }
            (8, None) => {
                self.check_count(len, 8, "array length")?;
                for _ in 0..len {
                    let n = self.u64("string length")?;
                    if n > self.left() {
                        return Err(GgufError::LengthTooLarge {
                            offset: self.offset,
                            what: "string length",
                            value: n,
                            left: self.left(),
                        });
                    }
                    self.skip(n, "string")?;
                }
                Ok(())
            }
            (9, None) if depth < MAX_ARRAY_DEPTH => {
                // Each nested array takes at least its type and length.
                self.check_count(len, 12, "array length")?;
                for _ in 0..len {
                    let inner_type = self.u32("array element type")?;
                    let inner_len = self.u64("array length")?;
                    self.skip_array(inner_type, inner_len, key, depth + 1)?;
                }
                Ok(())
            }
            (9, None) => Err(GgufError::ArrayTooDeep {
                key: key.to_owned(),
            }),
            (code, None) => Err(GgufError::UnknownValueType {
                key: key.to_owned(),
                code,
            }),
        }
    }

    fn value(&mut self, code: u32, key: &str) -> Result<GgufValue, GgufError> {
        const W: &str = "metadata value";
        Ok(match code {
            0 => GgufValue::Unsigned(u64::from(self.array::<1>(W)?[0])),
            1 => GgufValue::Signed(i64::from(i8::from_le_bytes(self.array(W)?))),
            2 => GgufValue::Unsigned(u64::from(u16::from_le_bytes(self.array(W)?))),
            3 => GgufValue::Signed(i64::from(i16::from_le_bytes(self.array(W)?))),
            4 => GgufValue::Unsigned(u64::from(u32::from_le_bytes(self.array(W)?))),
            5 => GgufValue::Signed(i64::from(i32::from_le_bytes(self.array(W)?))),
            6 => GgufValue::Float(f64::from(f32::from_le_bytes(self.array(W)?))),
            7 => GgufValue::Bool(self.array::<1>(W)?[0] != 0),
            8 => {
                let len = self.u64("string length")?;
                if len > self.left() {
                    return Err(GgufError::LengthTooLarge {
                        offset: self.offset,
                        what: "string length",
                        value: len,
                        left: self.left(),
                    });
                }
                if len > MAX_KEPT_STRING_LEN {
                    self.skip(len, "string")?;
                    GgufValue::LongText { bytes: len }
                } else {
                    let mut buf = vec![0u8; len as usize];
                    self.bytes(&mut buf, "string")?;
                    GgufValue::Text(String::from_utf8_lossy(&buf).into_owned())
                }
            }
            9 => {
                let element_type = self.u32("array element type")?;
                let len = self.u64("array length")?;
                self.skip_array(element_type, len, key, 1)?;
                GgufValue::Array { element_type, len }
            }
            10 => GgufValue::Unsigned(u64::from_le_bytes(self.array(W)?)),
            11 => GgufValue::Signed(i64::from_le_bytes(self.array(W)?)),
            12 => GgufValue::Float(f64::from_le_bytes(self.array(W)?)),
            code => {
                return Err(GgufError::UnknownValueType {
                    key: key.to_owned(),
                    code,
                });
            }
        })
    }
}
