//! GGUF files, ggml's model format as llama.cpp and gguf-py write it (versions 2 and 3,
//! little-endian): the metadata, the tensor infos, and each tensor as a kiln [`Tensor`]
//! (f32, f16, bf16) or a [`QTensor`] (ggml's Q8_0 and Q4_0 blocks, kept quantized), on any
//! device. The file is memory-mapped, not read into a copy; everything in it is checked when
//! it is opened, and a corrupt or hostile file is an `Err` naming what is wrong and at which
//! byte, never a panic or an allocation the file's size does not justify.
//!
//! ```no_run
//! use kiln::io::{GgufFile, GgufTensor};
//! use kiln::{DType, Device};
//! # fn main() -> kiln::Result<()> {
//! let file = GgufFile::open("model.gguf")?;
//! let layers = file.get_u32("llama.block_count")?;
//! let tokens: &[String] = file.get_str_array("tokenizer.ggml.tokens")?;
//! let device = Device::best();
//! let norm = file.tensor("output_norm.weight", &device)?; // f32, [576]
//! let q = file.qtensor("blk.0.attn_q.weight", &device)?; // q8_0 or q4_0, [out, in]
//! match file.load("token_embd.weight", &device)? {
//!     GgufTensor::Dense(t) => println!("{:?}", t.shape()),
//!     GgufTensor::Quantized(w) => println!("{:?}", w.dequantize(DType::BF16)?.shape()),
//! }
//! # let _ = (layers, tokens, norm, q);
//! # Ok(()) }
//! ```
//!
//! Shapes: ggml lists a tensor's dimensions fastest-varying first (`ne[0]` is the length of
//! a row), so kiln's row-major shape is that list reversed: a weight GGUF lists as
//! `[in, out]` is the `[out, in]` tensor kiln and PyTorch use.

use crate::ops::quant::{QTensor, QuantFormat};
use crate::{DType, Device, Error, Result, Tensor};
use memmap2::Mmap;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

/// The data alignment of a file without `general.alignment`.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;

/// ggml's `GGML_MAX_DIMS`: a tensor has one to four dimensions.
const MAX_DIMS: u32 = 4;

/// Arrays of arrays deeper than this are refused (the reader recurses once per level).
const MAX_ARRAY_NESTING: usize = 8;

/// The key of the data alignment.
const ALIGNMENT_KEY: &str = "general.alignment";

// ---------------------------------------------------------------------------------------
// ggml tensor types

macro_rules! ggml_types {
    ($($variant:ident = $id:literal, $name:literal, $block:expr, $bytes:expr;)*) => {
        /// A ggml tensor type, as GGUF files name it by number (ggml's `ggml_type`).
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum GgmlType {
            $($variant,)*
        }

        impl GgmlType {
            /// Every type ggml defines today.
            pub const ALL: &'static [GgmlType] = &[$(GgmlType::$variant,)*];

            /// The type of number `id`; `None` for a number ggml does not define (or no
            /// longer does).
            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $($id => Some(GgmlType::$variant),)*
                    _ => None,
                }
            }

            /// The type's number in a GGUF file.
            pub fn id(self) -> u32 {
                match self {
                    $(GgmlType::$variant => $id,)*
                }
            }

            /// ggml's name of the type (`"f32"`, `"q8_0"`, `"q4_K"`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $(GgmlType::$variant => $name,)*
                }
            }

            /// Elements per block (1 for the plain types).
            pub fn block_size(self) -> u64 {
                match self {
                    $(GgmlType::$variant => $block,)*
                }
            }

            /// Bytes per block.
            pub fn type_size(self) -> u64 {
                match self {
                    $(GgmlType::$variant => $bytes,)*
                }
            }
        }
    };
}

/// ggml's `QK_K`, the super-block of the K-quants.
const QK_K: u64 = 256;

ggml_types! {
    F32 = 0, "f32", 1, 4;
    F16 = 1, "f16", 1, 2;
    Q4_0 = 2, "q4_0", 32, 2 + 16;
    Q4_1 = 3, "q4_1", 32, 2 + 2 + 16;
    Q5_0 = 6, "q5_0", 32, 2 + 4 + 16;
    Q5_1 = 7, "q5_1", 32, 2 + 2 + 4 + 16;
    Q8_0 = 8, "q8_0", 32, 2 + 32;
    Q8_1 = 9, "q8_1", 32, 4 + 4 + 32;
    Q2_K = 10, "q2_K", QK_K, 2 + 2 + QK_K / 16 + QK_K / 4;
    Q3_K = 11, "q3_K", QK_K, 2 + QK_K / 4 + QK_K / 8 + 12;
    Q4_K = 12, "q4_K", QK_K, 2 + 2 + QK_K / 2 + 12;
    Q5_K = 13, "q5_K", QK_K, 2 + 2 + QK_K / 2 + QK_K / 8 + 12;
    Q6_K = 14, "q6_K", QK_K, 2 + QK_K / 2 + QK_K / 4 + QK_K / 16;
    Q8_K = 15, "q8_K", QK_K, 4 + QK_K + QK_K / 8;
    IQ2_XXS = 16, "iq2_xxs", QK_K, 2 + QK_K / 4;
    IQ2_XS = 17, "iq2_xs", QK_K, 2 + QK_K / 4 + QK_K / 32;
    IQ3_XXS = 18, "iq3_xxs", QK_K, 2 + QK_K / 4 + QK_K / 8;
    IQ1_S = 19, "iq1_s", QK_K, 2 + QK_K / 8 + QK_K / 16;
    IQ4_NL = 20, "iq4_nl", 32, 2 + 16;
    IQ3_S = 21, "iq3_s", QK_K, 2 + QK_K / 4 + QK_K / 8 + QK_K / 32 + 4;
    IQ2_S = 22, "iq2_s", QK_K, 2 + QK_K / 4 + QK_K / 16;
    IQ4_XS = 23, "iq4_xs", QK_K, 2 + 2 + QK_K / 2 + QK_K / 64;
    I8 = 24, "i8", 1, 1;
    I16 = 25, "i16", 1, 2;
    I32 = 26, "i32", 1, 4;
    I64 = 27, "i64", 1, 8;
    F64 = 28, "f64", 1, 8;
    IQ1_M = 29, "iq1_m", QK_K, QK_K / 8 + QK_K / 16 + QK_K / 32;
    BF16 = 30, "bf16", 1, 2;
    TQ1_0 = 34, "tq1_0", QK_K, 2 + 4 * 13;
    TQ2_0 = 35, "tq2_0", QK_K, 2 + 64;
    MXFP4 = 39, "mxfp4", 32, 1 + 16;
    NVFP4 = 40, "nvfp4", 64, 4 + 32;
    Q1_0 = 41, "q1_0", 128, 2 + 16;
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How kiln holds a tensor of a ggml type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Holding {
    Dense(DType),
    Quantized(QuantFormat),
}

/// The kiln form of each ggml type kiln reads; `None` for the rest.
fn holding(t: GgmlType) -> Option<Holding> {
    match t {
        GgmlType::F32 => Some(Holding::Dense(DType::F32)),
        GgmlType::F16 => Some(Holding::Dense(DType::F16)),
        GgmlType::BF16 => Some(Holding::Dense(DType::BF16)),
        GgmlType::I32 => Some(Holding::Dense(DType::I32)),
        GgmlType::Q8_0 => Some(Holding::Quantized(QuantFormat::Q8_0)),
        GgmlType::Q4_0 => Some(Holding::Quantized(QuantFormat::Q4_0)),
        GgmlType::Q4_1 => Some(Holding::Quantized(QuantFormat::Q4_1)),
        _ => None,
    }
}

/// The ggml types kiln reads, for error messages.
fn readable_types() -> String {
    let names: Vec<&str> = GgmlType::ALL.iter().filter(|t| holding(**t).is_some()).map(|t| t.name()).collect();
    names.join(", ")
}

// ---------------------------------------------------------------------------------------
// Metadata values

/// The type of a metadata value, numbered as GGUF numbers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GgufValueType {
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    F32,
    Bool,
    String,
    Array,
    U64,
    I64,
    F64,
}

impl GgufValueType {
    /// The type of number `id` in a file; `None` for a number GGUF does not define.
    pub fn from_id(id: u32) -> Option<GgufValueType> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }

    /// The fewest bytes one value of the type takes in a file: what an array's length is
    /// checked against before anything is allocated for it.
    fn min_bytes(self) -> u64 {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            // The length.
            String => 8,
            // The element type and the length.
            Array => 12,
        }
    }
}

impl fmt::Display for GgufValueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A metadata array: its elements, all of one type (an array of arrays holds arrays each of
/// its own element type, as gguf-py writes them).
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    Array(Vec<GgufArray>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl GgufValue {
    pub fn value_type(&self) -> GgufValueType {
        use GgufValue as V;
        use GgufValueType as T;
        match self {
            V::U8(_) => T::U8,
            V::I8(_) => T::I8,
            V::U16(_) => T::U16,
            V::I16(_) => T::I16,
            V::U32(_) => T::U32,
            V::I32(_) => T::I32,
            V::F32(_) => T::F32,
            V::Bool(_) => T::Bool,
            V::String(_) => T::String,
            V::Array(_) => T::Array,
            V::U64(_) => T::U64,
            V::I64(_) => T::I64,
            V::F64(_) => T::F64,
        }
    }

    /// The value's type as error messages name it: `u32`, `array of string`, ...
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::Array(a) => a.type_name(),
            other => other.value_type().name().to_string(),
        }
    }
}

impl GgufArray {
    pub fn element_type(&self) -> GgufValueType {
        use GgufArray as A;
        use GgufValueType as T;
        match self {
            A::U8(_) => T::U8,
            A::I8(_) => T::I8,
            A::U16(_) => T::U16,
            A::I16(_) => T::I16,
            A::U32(_) => T::U32,
            A::I32(_) => T::I32,
            A::F32(_) => T::F32,
            A::Bool(_) => T::Bool,
            A::String(_) => T::String,
            A::Array(_) => T::Array,
            A::U64(_) => T::U64,
            A::I64(_) => T::I64,
            A::F64(_) => T::F64,
        }
    }

    pub fn len(&self) -> usize {
        use GgufArray as A;
        match self {
            A::U8(v) => v.len(),
            A::I8(v) => v.len(),
            A::U16(v) => v.len(),
            A::I16(v) => v.len(),
            A::U32(v) => v.len(),
            A::I32(v) => v.len(),
            A::F32(v) => v.len(),
            A::Bool(v) => v.len(),
            A::String(v) => v.len(),
            A::Array(v) => v.len(),
            A::U64(v) => v.len(),
            A::I64(v) => v.len(),
            A::F64(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `array of <element type>`.
    pub fn type_name(&self) -> String {
        format!("array of {}", self.element_type())
    }
}

// ---------------------------------------------------------------------------------------
// Tensor infos

/// A tensor as the file describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    offset: u64,
    n_bytes: u64,
    /// Where the info starts in the file, for messages.
    info_at: u64,
}

impl GgufTensorInfo {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The dimensions as the file lists them, fastest-varying first (ggml's `ne`).
    pub fn dims(&self) -> &[u64] {
        &self.dims
    }

    /// kiln's row-major shape: the dimensions reversed.
    pub fn shape(&self) -> Vec<usize> {
        // `open` checked that the element count fits in usize, so each dimension does.
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    pub fn ggml_type(&self) -> GgmlType {
        self.ggml_type
    }

    /// Where the tensor's data starts, from the start of the data section
    /// ([`GgufFile::data_offset`]).
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Elements: the product of the dimensions.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Bytes of data the shape and type take (without the padding after them).
    pub fn n_bytes(&self) -> u64 {
        self.n_bytes
    }

    fn describe(&self) -> String {
        format!("tensor {:?} ({}, dims {:?})", self.name, self.ggml_type, self.dims)
    }
}

/// A tensor of a GGUF file in the form kiln holds its type in.
#[derive(Debug, Clone)]
pub enum GgufTensor {
    /// f32, f16 and bf16 tensors.
    Dense(Tensor),
    /// ggml's quantized blocks, kept as they are.
    Quantized(QTensor),
}

// ---------------------------------------------------------------------------------------
// The file

/// A GGUF file, memory-mapped and checked once; its tensors go to a device on demand.
///
/// The file must not change while it is open: like every memory-mapped reader, this one
/// sees a write to the file, and a file cut short under it ends the process (SIGBUS).
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    by_name: HashMap<String, usize>,
    alignment: u64,
    data_offset: u64,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "GgufFile({}, v{}, {} metadata keys, {} tensors)",
            self.path.display(),
            self.version,
            self.metadata.len(),
            self.tensors.len()
        )
    }
}

impl GgufFile {
    /// Maps `path` and reads its header, metadata and tensor infos.
    ///
    /// Errors, each naming the file, what is wrong and the byte it is at:
    /// - `Io`: the file cannot be opened or mapped; it is not GGUF (the magic is not
    ///   `GGUF`); it ends inside the header, a key, a value or a tensor info; a count or a
    ///   length (tensors, keys, a string, an array) larger than the bytes left could hold; an
    ///   unknown value type or ggml type; a bool that is not 0 or 1; a string that is not
    ///   UTF-8; a key or a tensor name twice; arrays nested deeper than 8; a
    ///   `general.alignment` that is not a u32 power of two; a tensor with no dimensions, more
    ///   than 4, a zero dimension, more elements than fit in an i64 or in memory, or rows
    ///   that are not whole blocks of its type; a tensor offset that is not a multiple of the
    ///   alignment, that is not where the tensors before it end (so their byte count does
    ///   not match their shape and type), or whose data runs past the end of the file.
    /// - `Unsupported`: a GGUF version other than 2 and 3 (version 1 included, and
    ///   big-endian files).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let named = |e: Error| match e {
            Error::Io(m) => Error::Io(format!("{}: {m}", path.display())),
            Error::Unsupported(m) => Error::Unsupported(format!("{}: {m}", path.display())),
            other => other,
        };
        let file = std::fs::File::open(path).map_err(|e| Error::Io(format!("opening {}: {e}", path.display())))?;
        let len = file.metadata().map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?.len();
        if len == 0 {
            return Err(named(Error::Io("the file is empty (0 bytes), not GGUF".into())));
        }
        // SAFETY: the map is only read, and `GgufFile`'s contract is that the file does not
        // change while it is open (see the type's docs).
        let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io(format!("mapping {}: {e}", path.display())))?;
        let parsed = parse(&map).map_err(named)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            map,
            version: parsed.version,
            metadata: parsed.metadata,
            by_name: parsed.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect(),
            tensors: parsed.tensors,
            alignment: parsed.alignment,
            data_offset: parsed.data_offset,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version: 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Every metadata value, by key.
    pub fn metadata(&self) -> &BTreeMap<String, GgufValue> {
        &self.metadata
    }

    /// The data alignment: `general.alignment`, or 32 when the file has none.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Where the data section starts in the file.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// The tensors in the order the file lists them.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The value of `key`, if the file has it.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    fn typed<'a, T>(&'a self, key: &str, expected: &str, pick: impl Fn(&'a GgufValue) -> Option<T>) -> Result<T> {
        let value = self.metadata.get(key).ok_or_else(|| {
            Error::InvalidArgument(format!("{}: no metadata key {key:?} (expected {expected})", self.path.display()))
        })?;
        pick(value).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: metadata key {key:?} is of type {}, expected {expected}",
                self.path.display(),
                value.type_name()
            ))
        })
    }

    /// The array at `key`: `Err(InvalidArgument)` naming the key when it is missing or not
    /// an array.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray> {
        self.typed(key, "array", |v| match v {
            GgufValue::Array(a) => Some(a),
            _ => None,
        })
    }

    /// The string at `key`. Errors as [`GgufFile::get_u32`].
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.typed(key, "string", |v| match v {
            GgufValue::String(s) => Some(s.as_str()),
            _ => None,
        })
    }
}

macro_rules! scalar_getters {
    ($($fn:ident, $variant:ident, $t:ty;)*) => {
        impl GgufFile {
            $(
                #[doc = concat!("The ", stringify!($t), " at `key`. `Err(InvalidArgument)` naming the key when")]
                #[doc = "it is missing, or naming the key, the type asked for and the type the file holds"]
                #[doc = "when the value is of another type (no conversions)."]
                pub fn $fn(&self, key: &str) -> Result<$t> {
                    self.typed(key, GgufValueType::$variant.name(), |v| match v {
                        GgufValue::$variant(x) => Some(*x),
                        _ => None,
                    })
                }
            )*
        }
    };
}

scalar_getters! {
    get_u8, U8, u8;
    get_i8, I8, i8;
    get_u16, U16, u16;
    get_i16, I16, i16;
    get_u32, U32, u32;
    get_i32, I32, i32;
    get_f32, F32, f32;
    get_bool, Bool, bool;
    get_u64, U64, u64;
    get_i64, I64, i64;
    get_f64, F64, f64;
}

macro_rules! array_getters {
    ($($fn:ident, $variant:ident, $t:ty;)*) => {
        impl GgufFile {
            $(
                #[doc = concat!("The array of ", stringify!($t), " at `key`. Errors as [`GgufFile::get_u32`].")]
                pub fn $fn(&self, key: &str) -> Result<&[$t]> {
                    let expected = format!("array of {}", GgufValueType::$variant);
                    self.typed(key, &expected, |v| match v {
                        GgufValue::Array(GgufArray::$variant(x)) => Some(x.as_slice()),
                        _ => None,
                    })
                }
            )*
        }
    };
}

array_getters! {
    get_str_array, String, String;
    get_u32_array, U32, u32;
    get_i32_array, I32, i32;
    get_f32_array, F32, f32;
}

impl GgufFile {
    /// The info of tensor `name`: `Err(InvalidArgument)` when the file has none of that name.
    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i]).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "{}: no tensor named {name:?} (the file has {} tensors)",
                self.path.display(),
                self.tensors.len()
            ))
        })
    }

    /// The bytes of tensor `name` as the file stores them, whatever its type.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8]> {
        Ok(self.bytes_of(self.tensor_info(name)?))
    }

    fn bytes_of(&self, info: &GgufTensorInfo) -> &[u8] {
        // `open` checked that the range lies inside the file.
        let start = (self.data_offset + info.offset) as usize;
        &self.map[start..start + info.n_bytes as usize]
    }

    fn holding_of(&self, info: &GgufTensorInfo) -> Result<Holding> {
        holding(info.ggml_type).ok_or_else(|| {
            Error::Unsupported(format!(
                "{}: {} is of a type kiln does not read (it reads {})",
                self.path.display(),
                info.describe(),
                readable_types()
            ))
        })
    }

    /// Tensor `name` in the form kiln holds its type in, on `device`: f32, f16 and bf16 as a
    /// [`Tensor`] of the row-major shape (the file's dims reversed), the ggml block formats
    /// kiln has as a [`QTensor`].
    ///
    /// Errors: `InvalidArgument` when there is no such tensor; `Unsupported` naming the
    /// tensor and its type for a type kiln does not read (the K-quants, the i-quants,
    /// q5_0, i8, i16, ...); as [`GgufFile::qtensor`] for a quantized tensor;
    /// `OutOfMemory` from the device.
    pub fn load(&self, name: &str, device: &Device) -> Result<GgufTensor> {
        let info = self.tensor_info(name)?;
        match self.holding_of(info)? {
            Holding::Dense(dtype) => self.dense(info, dtype, device).map(GgufTensor::Dense),
            Holding::Quantized(format) => self.quantized(info, format, device).map(GgufTensor::Quantized),
        }
    }

    /// [`GgufFile::load`] with the rows (outermost index) taken in `order`: row i of the
    /// result is row `order[i]` of the file. The rows of every type kiln reads are whole
    /// blocks, so this reorders without decoding (the model loader undoes llama.cpp's q/k
    /// permutation with it). `Err(Shape)` unless `order` is a permutation of the rows.
    pub fn load_rows(&self, name: &str, order: &[usize], device: &Device) -> Result<GgufTensor> {
        let info = self.tensor_info(name)?;
        let holding = self.holding_of(info)?;
        let shape = info.shape();
        let rows = shape.first().copied().unwrap_or(1);
        let mut seen = vec![false; rows];
        let is_permutation =
            order.len() == rows && order.iter().all(|&r| r < rows && !std::mem::replace(&mut seen[r], true));
        if !is_permutation {
            return Err(Error::Shape(format!(
                "{}: {} has {rows} rows; the row order given is not a permutation of them",
                self.path.display(),
                info.describe()
            )));
        }
        let bytes = self.bytes_of(info);
        let row_bytes = bytes.len() / rows.max(1);
        let mut reordered = crate::tensor::try_vec(bytes.len(), 0u8)?;
        for (dst, &src) in reordered.chunks_exact_mut(row_bytes.max(1)).zip(order) {
            dst.copy_from_slice(&bytes[src * row_bytes..(src + 1) * row_bytes]);
        }
        let context = |e: Error| e.context(&format!("{}: {}", self.path.display(), info.describe()));
        match holding {
            Holding::Dense(dtype) => {
                Tensor::from_le_bytes(&reordered, &shape, dtype, device).map(GgufTensor::Dense).map_err(context)
            }
            // A quantized tensor must be [out, in]: `quantized` gives the error otherwise.
            Holding::Quantized(format) if shape.len() != 2 => {
                self.quantized(info, format, device).map(GgufTensor::Quantized)
            }
            Holding::Quantized(format) => QTensor::from_ggml_blocks(format, &reordered, &shape, device)
                .map(GgufTensor::Quantized)
                .map_err(context),
        }
    }

    /// Dense tensor `name` (f32, f16, bf16 or i32) on `device`, in the file's dtype and the
    /// row-major shape (the file's dims reversed).
    ///
    /// Errors as [`GgufFile::load`], and `DType` for a quantized tensor (load those with
    /// [`GgufFile::qtensor`]; [`QTensor::dequantize`] makes them dense).
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let info = self.tensor_info(name)?;
        match self.holding_of(info)? {
            Holding::Dense(dtype) => self.dense(info, dtype, device),
            Holding::Quantized(format) => Err(Error::DType(format!(
                "{}: {} is quantized ({format}): load it with qtensor, and dequantize that for dense values",
                self.path.display(),
                info.describe()
            ))),
        }
    }

    /// Quantized tensor `name` as an `[out, in]` [`QTensor`] on `device`, its blocks as the
    /// file stores them.
    ///
    /// Errors as [`GgufFile::load`]; `DType` for a dense tensor (load those with
    /// [`GgufFile::tensor`]); `Shape` for a quantized tensor that does not have two
    /// dimensions; `InvalidArgument` for a block whose scale is not finite.
    pub fn qtensor(&self, name: &str, device: &Device) -> Result<QTensor> {
        let info = self.tensor_info(name)?;
        match self.holding_of(info)? {
            Holding::Quantized(format) => self.quantized(info, format, device),
            Holding::Dense(dtype) => Err(Error::DType(format!(
                "{}: {} is dense ({dtype}), not quantized: load it with tensor",
                self.path.display(),
                info.describe()
            ))),
        }
    }

    fn dense(&self, info: &GgufTensorInfo, dtype: DType, device: &Device) -> Result<Tensor> {
        let bytes = self.bytes_of(info);
        let shape = info.shape();
        Tensor::from_le_bytes(bytes, &shape, dtype, device)
    }

    fn quantized(&self, info: &GgufTensorInfo, format: QuantFormat, device: &Device) -> Result<QTensor> {
        let shape = info.shape();
        if shape.len() != 2 {
            return Err(Error::Shape(format!(
                "{}: {} has shape {shape:?}; a quantized weight is [out, in]",
                self.path.display(),
                info.describe()
            )));
        }
        QTensor::from_ggml_blocks(format, self.bytes_of(info), &shape, device)
            .map_err(|e| e.context(&format!("{}: {}", self.path.display(), info.describe())))
    }
}

// ---------------------------------------------------------------------------------------
// Parsing

struct Parsed {
    version: u32,
    metadata: BTreeMap<String, GgufValue>,
    tensors: Vec<GgufTensorInfo>,
    alignment: u64,
    data_offset: u64,
}

/// A position in the file; every read checks the bytes are there first.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

fn corrupt(message: String) -> Error {
    Error::Io(message)
}

/// A vector for `n` elements, whose count the caller has checked against the bytes left;
/// `Err(OutOfMemory)` rather than an abort when memory is short all the same.
fn try_with_capacity<T>(n: usize, what: &dyn Fn() -> String) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Error::OutOfMemory(format!("{}: {n} elements", what())))?;
    Ok(v)
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        if n > self.remaining() {
            return Err(corrupt(format!(
                "{} at byte {} needs {n} bytes, but the file ends at byte {}",
                what(),
                self.pos,
                self.bytes.len()
            )));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count or length of items of at least `min_bytes` each, checked against the bytes
    /// left, so nothing is allocated for items the file cannot hold.
    fn count(&mut self, min_bytes: u64, what: &dyn Fn() -> String) -> Result<usize> {
        let at = self.pos;
        let n = self.u64(what)?;
        let needs = n.checked_mul(min_bytes);
        match needs {
            Some(needs) if needs <= self.remaining() as u64 => Ok(n as usize),
            _ => Err(corrupt(format!(
                "{} at byte {at} is {n}, but {n} × {min_bytes} bytes do not fit in the {} bytes left in the file",
                what(),
                self.remaining()
            ))),
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let len = self.count(1, &|| format!("the length of {}", what()))?;
        let bytes = self.take(len, what)?;
        let text = std::str::from_utf8(bytes)
            .map_err(|e| corrupt(format!("{} at byte {at} is not UTF-8 ({e} of its {len} bytes)", what())))?;
        let mut out = String::new();
        out.try_reserve_exact(len).map_err(|_| Error::OutOfMemory(format!("{}: {len} bytes", what())))?;
        out.push_str(text);
        Ok(out)
    }

    fn value_type(&mut self, what: &dyn Fn() -> String) -> Result<GgufValueType> {
        let at = self.pos;
        let id = self.u32(what)?;
        GgufValueType::from_id(id).ok_or_else(|| {
            corrupt(format!("{} at byte {at} is {id}, which is no GGUF value type (they are 0 to 12)", what()))
        })
    }

    fn value(&mut self, ty: GgufValueType, key: &str, depth: usize) -> Result<GgufValue> {
        use GgufValueType as T;
        let what = || format!("the value of {key:?}");
        Ok(match ty {
            T::U8 => GgufValue::U8(u8::from_le_bytes(self.array(&what)?)),
            T::I8 => GgufValue::I8(i8::from_le_bytes(self.array(&what)?)),
            T::U16 => GgufValue::U16(u16::from_le_bytes(self.array(&what)?)),
            T::I16 => GgufValue::I16(i16::from_le_bytes(self.array(&what)?)),
            T::U32 => GgufValue::U32(u32::from_le_bytes(self.array(&what)?)),
            T::I32 => GgufValue::I32(i32::from_le_bytes(self.array(&what)?)),
            T::F32 => GgufValue::F32(f32::from_le_bytes(self.array(&what)?)),
            T::U64 => GgufValue::U64(u64::from_le_bytes(self.array(&what)?)),
            T::I64 => GgufValue::I64(i64::from_le_bytes(self.array(&what)?)),
            T::F64 => GgufValue::F64(f64::from_le_bytes(self.array(&what)?)),
            T::Bool => GgufValue::Bool(self.bool(&what)?),
            T::String => GgufValue::String(self.string(&what)?),
            T::Array => GgufValue::Array(self.gguf_array(key, depth)?),
        })
    }

    fn bool(&mut self, what: &dyn Fn() -> String) -> Result<bool> {
        let at = self.pos;
        match self.take(1, what)?[0] {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(corrupt(format!("{} at byte {at} is a bool of {b}, not 0 or 1", what()))),
        }
    }

    /// An array's element type, length and elements; `depth` arrays enclose it.
    fn gguf_array(&mut self, key: &str, depth: usize) -> Result<GgufArray> {
        use GgufValueType as T;
        let at = self.pos;
        if depth >= MAX_ARRAY_NESTING {
            return Err(corrupt(format!(
                "the value of {key:?} at byte {at} nests arrays deeper than {MAX_ARRAY_NESTING} levels"
            )));
        }
        let element = self.value_type(&|| format!("the element type of the array {key:?}"))?;
        let len = self.count(element.min_bytes(), &|| format!("the length of the array {key:?} of {element}"))?;
        let what = || format!("the array {key:?} of {len} {element}");
        macro_rules! numbers {
            ($variant:ident, $t:ty) => {{
                const SIZE: usize = std::mem::size_of::<$t>();
                // `count` checked that len × SIZE bytes are left.
                let bytes = self.take(len * SIZE, &what)?;
                let mut out = try_with_capacity::<$t>(len, &what)?;
                out.extend(bytes.chunks_exact(SIZE).map(|c| <$t>::from_le_bytes(c.try_into().unwrap_or([0; SIZE]))));
                GgufArray::$variant(out)
            }};
        }
        Ok(match element {
            T::U8 => numbers!(U8, u8),
            T::I8 => numbers!(I8, i8),
            T::U16 => numbers!(U16, u16),
            T::I16 => numbers!(I16, i16),
            T::U32 => numbers!(U32, u32),
            T::I32 => numbers!(I32, i32),
            T::F32 => numbers!(F32, f32),
            T::U64 => numbers!(U64, u64),
            T::I64 => numbers!(I64, i64),
            T::F64 => numbers!(F64, f64),
            T::Bool => {
                let mut out = try_with_capacity(len, &what)?;
                for i in 0..len {
                    out.push(self.bool(&|| format!("element {i} of the array {key:?}"))?);
                }
                GgufArray::Bool(out)
            }
            T::String => {
                let mut out = try_with_capacity(len, &what)?;
                for i in 0..len {
                    out.push(self.string(&|| format!("string {i} of the array {key:?}"))?);
                }
                GgufArray::String(out)
            }
            T::Array => {
                let mut out = try_with_capacity(len, &what)?;
                for _ in 0..len {
                    out.push(self.gguf_array(key, depth + 1)?);
                }
                GgufArray::Array(out)
            }
        })
    }
}

fn parse(bytes: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { bytes, pos: 0 };
    let magic: [u8; 4] = c.array(&|| "the magic \"GGUF\"".to_string())?;
    if &magic != b"GGUF" {
        return Err(corrupt(format!(
            "not a GGUF file: it starts with {:?} ({}) at byte 0, not \"GGUF\"",
            String::from_utf8_lossy(&magic),
            magic.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" ")
        )));
    }
    let version = c.u32(&|| "the version".to_string())?;
    if !matches!(version, 2 | 3) {
        let hint = if matches!(version.swap_bytes(), 2 | 3) {
            format!(" (a big-endian GGUF v{}; kiln reads little-endian files)", version.swap_bytes())
        } else {
            String::new()
        };
        return Err(Error::Unsupported(format!("GGUF version {version} at byte 4{hint}: kiln reads versions 2 and 3")));
    }
    // A tensor info takes at least a name length, a dimension count, one dimension, a type
    // and an offset; a key-value pair a key length, a type and one byte of value.
    let n_tensors = c.count(8 + 4 + 8 + 4 + 8, &|| "the tensor count".to_string())?;
    let n_kv = c.count(8 + 4 + 1, &|| "the metadata key count".to_string())?;

    let mut metadata = BTreeMap::new();
    let mut alignment_at = 0;
    for i in 0..n_kv {
        let at = c.pos;
        let key = c.string(&|| format!("metadata key {i}"))?;
        let ty = c.value_type(&|| format!("the type of {key:?}"))?;
        let value = c.value(ty, &key, 0)?;
        if metadata.contains_key(&key) {
            return Err(corrupt(format!("metadata key {key:?} at byte {at} appears a second time")));
        }
        if key == ALIGNMENT_KEY {
            alignment_at = at;
        }
        metadata.insert(key, value);
    }
    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => GGUF_DEFAULT_ALIGNMENT,
        Some(GgufValue::U32(a)) if a.is_power_of_two() => *a as u64,
        Some(other) => {
            let shown = match other {
                GgufValue::String(_) | GgufValue::Array(_) => format!("a {}", other.type_name()),
                scalar => format!("{scalar:?}"),
            };
            return Err(corrupt(format!(
                "{ALIGNMENT_KEY} (at byte {alignment_at}) is {shown}; it must be a u32 power of two (32 when absent)"
            )));
        }
    };

    let mut tensors: Vec<GgufTensorInfo> = try_with_capacity(n_tensors, &|| "the tensor infos".to_string())?;
    let mut by_name: HashMap<String, usize> = HashMap::new();
    by_name.try_reserve(n_tensors).map_err(|_| Error::OutOfMemory(format!("{n_tensors} tensor names")))?;
    for i in 0..n_tensors {
        let info_at = c.pos;
        let name = c.string(&|| format!("the name of tensor {i}"))?;
        let dims_at = c.pos;
        let n_dims = c.u32(&|| format!("the dimension count of tensor {name:?}"))?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(corrupt(format!(
                "tensor {name:?} has {n_dims} dimensions (at byte {dims_at}); ggml tensors have 1 to {MAX_DIMS}"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        let mut elements: u64 = 1;
        for d in 0..n_dims {
            let at = c.pos;
            let dim = c.u64(&|| format!("dimension {d} of tensor {name:?}"))?;
            if dim == 0 {
                return Err(corrupt(format!("tensor {name:?} has a dimension of 0 (dimension {d}, at byte {at})")));
            }
            elements = elements
                .checked_mul(dim)
                .filter(|&n| n <= i64::MAX as u64 && usize::try_from(n).is_ok())
                .ok_or_else(|| {
                    corrupt(format!(
                        "tensor {name:?} has more elements than fit in an i64 or in memory (dimension {d} = {dim}, \
                         at byte {at})"
                    ))
                })?;
            dims.push(dim);
        }
        let type_at = c.pos;
        let id = c.u32(&|| format!("the type of tensor {name:?}"))?;
        let ggml_type = GgmlType::from_id(id).ok_or_else(|| {
            corrupt(format!("tensor {name:?} has the type {id} (at byte {type_at}), which is no ggml type"))
        })?;
        if dims[0] % ggml_type.block_size() != 0 {
            return Err(corrupt(format!(
                "tensor {name:?} ({ggml_type}, dims {dims:?}, info at byte {info_at}) has rows of {} elements, \
                 not a multiple of {ggml_type}'s block of {}",
                dims[0],
                ggml_type.block_size()
            )));
        }
        let n_bytes = (elements / ggml_type.block_size()).checked_mul(ggml_type.type_size()).ok_or_else(|| {
            corrupt(format!(
                "tensor {name:?} ({ggml_type}, dims {dims:?}, info at byte {info_at}) takes more bytes than fit in a u64"
            ))
        })?;
        let offset_at = c.pos;
        let offset = c.u64(&|| format!("the data offset of tensor {name:?}"))?;
        if offset % alignment != 0 {
            return Err(corrupt(format!(
                "tensor {name:?} has the data offset {offset} (at byte {offset_at}), not a multiple of the \
                 alignment {alignment}"
            )));
        }
        if let Some(&first) = by_name.get(&name) {
            return Err(corrupt(format!(
                "tensor {name:?} appears twice: as tensor {first} and as tensor {i} (at byte {info_at})"
            )));
        }
        by_name.insert(name.clone(), i);
        tensors.push(GgufTensorInfo { name, dims, ggml_type, offset, n_bytes, info_at: info_at as u64 });
    }

    let header_end = c.pos as u64;
    let data_offset = header_end.div_ceil(alignment) * alignment;
    // As llama.cpp requires: each tensor starts where the one before it ends, padded to the
    // alignment, so the byte count of every tensor is the one its shape and type give.
    let mut expected: u64 = 0;
    let mut previous: Option<&GgufTensorInfo> = None;
    for t in &tensors {
        if t.offset != expected {
            let before = match previous {
                Some(p) => {
                    format!("{} takes {} bytes, so the next tensor starts at {expected}", p.describe(), p.n_bytes)
                }
                None => "the first tensor starts at 0".to_string(),
            };
            return Err(corrupt(format!(
                "{} (info at byte {}) has the data offset {}, but {before}: the tensors' byte counts do not match \
                 their shapes and types",
                t.describe(),
                t.info_at,
                t.offset
            )));
        }
        let end = data_offset.checked_add(t.offset).and_then(|s| s.checked_add(t.n_bytes));
        if end.is_none_or(|end| end > bytes.len() as u64) {
            return Err(corrupt(format!(
                "{} takes {} bytes from byte {}, past the end of the file at byte {}",
                t.describe(),
                t.n_bytes,
                data_offset.saturating_add(t.offset),
                bytes.len()
            )));
        }
        // Within the file, so no overflow.
        expected = t.offset + t.n_bytes.div_ceil(alignment) * alignment;
        previous = Some(t);
    }
    Ok(Parsed { version, metadata, tensors, alignment, data_offset })
}
