//! GGUF files written: version 3, little-endian, as gguf-py's `GGUFWriter` lays them out
//! (header, metadata, tensor infos, padding to the alignment, then each tensor's data padded
//! to the alignment), read back by [`GgufFile`](super::GgufFile) and by llama.cpp.
//!
//! ```no_run
//! use kiln::io::{GgmlType, GgufValue, GgufWriter};
//! use kiln::{DType, Device, Tensor};
//! # fn main() -> kiln::Result<()> {
//! let w = Tensor::randn(&[64, 128], 0.0, 1.0, 1, DType::F32, &Device::Cpu)?;
//! let mut gguf = GgufWriter::new();
//! gguf.add_metadata("general.architecture", GgufValue::String("llama".into()))?;
//! gguf.add_tensor("blk.0.ffn_up.weight", &w, GgmlType::Q8_0)?; // listed as [128, 64]
//! gguf.write("model.gguf")?;
//! # Ok(()) }
//! ```
//!
//! Shapes are kiln's row-major ones (`[out, in]`); the file lists them reversed, `ne[0]`
//! first, as ggml does.

use super::gguf::{GGUF_DEFAULT_ALIGNMENT, GgmlType, GgufArray, GgufValue};
use crate::ops::quant::{QTensor, QuantFormat};
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::HashSet;
use std::io::Write;
use std::path::Path;

const ALIGNMENT_KEY: &str = "general.alignment";

/// A tensor waiting to be written: its data already in its ggml type's bytes.
struct Pending {
    name: String,
    /// ggml's order: fastest-varying first.
    dims: Vec<u64>,
    ggml_type: GgmlType,
    bytes: Vec<u8>,
}

/// A GGUF file being put together in memory, written whole by [`GgufWriter::write`].
#[derive(Default)]
pub struct GgufWriter {
    metadata: Vec<(String, GgufValue)>,
    keys: HashSet<String>,
    tensors: Vec<Pending>,
    names: HashSet<String>,
}

impl GgufWriter {
    pub fn new() -> GgufWriter {
        GgufWriter::default()
    }

    /// The data alignment: `general.alignment` when set, else 32.
    pub fn alignment(&self) -> u64 {
        match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            Some((_, GgufValue::U32(a))) => *a as u64,
            _ => GGUF_DEFAULT_ALIGNMENT,
        }
    }

    /// Adds metadata `key`. `Err(InvalidArgument)` for a key already added, an empty key,
    /// an array mixing element types (impossible by construction except inside nested
    /// arrays, which are allowed), or a `general.alignment` that is not a u32 power of two.
    pub fn add_metadata(&mut self, key: &str, value: GgufValue) -> Result<()> {
        if key.is_empty() {
            return Err(Error::InvalidArgument("GGUF metadata keys cannot be empty".into()));
        }
        if self.keys.contains(key) {
            return Err(Error::InvalidArgument(format!("GGUF metadata key {key:?} added twice")));
        }
        if key == ALIGNMENT_KEY && !matches!(value, GgufValue::U32(a) if a.is_power_of_two()) {
            return Err(Error::InvalidArgument(format!(
                "{ALIGNMENT_KEY} must be a u32 power of two, got {} {value:?}",
                value.type_name()
            )));
        }
        self.keys.insert(key.to_string());
        self.metadata.push((key.to_string(), value));
        Ok(())
    }

    /// Adds tensor `name` (any float dtype, any device, 1 to 4 dimensions) stored as
    /// `ggml_type`: F32, F16 or BF16 converted, Q8_0 / Q4_0 / Q4_1 quantized as ggml's
    /// reference quantizers do ([`QTensor::quantize`]) along the last dimension.
    ///
    /// Errors: `InvalidArgument` for a name already added, a non-finite value in a quantized
    /// tensor or one past what the format's scale holds, a value that overflows F16;
    /// `Shape` for 0 or more than 4 dimensions, a zero dimension, or a last dimension that
    /// is not a multiple of the type's block; `Unsupported` for another ggml type; `DType`
    /// for an integer tensor.
    pub fn add_tensor(&mut self, name: &str, tensor: &Tensor, ggml_type: GgmlType) -> Result<()> {
        if !tensor.dtype().is_float() {
            return Err(Error::DType(format!("GGUF tensor {name:?}: {} is not a float dtype", tensor.dtype())));
        }
        let shape = tensor.shape().to_vec();
        self.check_new(name, &shape, ggml_type)?;
        let host = tensor.to_device(&Device::Cpu)?;
        let context = |e: Error| e.context(&format!("GGUF tensor {name:?}"));
        let bytes = match ggml_type {
            GgmlType::F32 => host.to_dtype(DType::F32)?.to_bytes()?,
            GgmlType::BF16 => host.to_dtype(DType::BF16)?.to_bytes()?,
            GgmlType::F16 => {
                let values = host.to_vec_f32()?;
                if let Some(v) = values.iter().find(|v| v.is_finite() && half::f16::from_f32(**v).is_infinite()) {
                    return Err(Error::InvalidArgument(format!(
                        "GGUF tensor {name:?}: {v} overflows f16 (|x| ≤ 65504)"
                    )));
                }
                host.to_dtype(DType::F16)?.to_bytes()?
            }
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => {
                let cols = *shape.last().unwrap_or(&1);
                let rows = shape.iter().product::<usize>() / cols.max(1);
                let flat = host.to_dtype(DType::F32)?.reshape(&[rows, cols])?;
                QTensor::quantize(&flat, quant_format(ggml_type)).map_err(context)?.to_bytes()?
            }
            other => return Err(unsupported(name, other)),
        };
        self.push(name, &shape, ggml_type, bytes);
        Ok(())
    }

    /// Adds tensor `name` of row-major `shape` from its bytes in `ggml_type` as ggml stores
    /// them (little-endian values, or blocks). Errors as [`GgufWriter::add_tensor`], and
    /// `InvalidArgument` when the byte count is not the one the shape and type take or a
    /// Q8_0 / Q4_0 / Q4_1 block's scale is not finite. Any ggml type is accepted; the
    /// blocks of the types kiln does not read are written unchecked.
    pub fn add_raw(&mut self, name: &str, shape: &[usize], ggml_type: GgmlType, bytes: Vec<u8>) -> Result<()> {
        self.check_new(name, shape, ggml_type)?;
        let elements = shape.iter().map(|&d| d as u64).product::<u64>();
        let want = elements / ggml_type.block_size() * ggml_type.type_size();
        if bytes.len() as u64 != want {
            return Err(Error::InvalidArgument(format!(
                "GGUF tensor {name:?} ({ggml_type}, shape {shape:?}) takes {want} bytes, got {}",
                bytes.len()
            )));
        }
        if matches!(ggml_type, GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1) {
            let cols = *shape.last().unwrap_or(&1);
            let rows = shape.iter().product::<usize>() / cols.max(1);
            // The same rule the reader applies: every block's scale finite.
            QTensor::from_ggml_blocks(quant_format(ggml_type), &bytes, &[rows, cols], &Device::Cpu)
                .map_err(|e| e.context(&format!("GGUF tensor {name:?}")))?;
        }
        self.push(name, shape, ggml_type, bytes);
        Ok(())
    }

    fn check_new(&self, name: &str, shape: &[usize], ggml_type: GgmlType) -> Result<()> {
        if self.names.contains(name) {
            return Err(Error::InvalidArgument(format!("GGUF tensor {name:?} added twice")));
        }
        if shape.is_empty() || shape.len() > 4 || shape.contains(&0) {
            return Err(Error::Shape(format!(
                "GGUF tensor {name:?} has shape {shape:?}; ggml tensors have 1 to 4 dimensions, none 0"
            )));
        }
        let row = *shape.last().unwrap_or(&1) as u64;
        if !row.is_multiple_of(ggml_type.block_size()) {
            return Err(Error::Shape(format!(
                "GGUF tensor {name:?} has shape {shape:?}: rows of {row} are not a multiple of {ggml_type}'s block of {}",
                ggml_type.block_size()
            )));
        }
        Ok(())
    }

    fn push(&mut self, name: &str, shape: &[usize], ggml_type: GgmlType, bytes: Vec<u8>) {
        self.names.insert(name.to_string());
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(Pending { name: name.to_string(), dims, ggml_type, bytes });
    }

    /// Writes the file to `path` atomically (a temporary beside it, then a rename), so a
    /// crash leaves the previous file or the new one, never part of one.
    pub fn write(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        crate::fs::write_file_with(path, |w| self.write_to(w))
            .map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut out = Vec::new();
        self.write_to(&mut out).map_err(|e| Error::Io(format!("serializing GGUF: {e}")))?;
        Ok(out)
    }

    fn write_to(&self, w: &mut dyn Write) -> std::io::Result<()> {
        let alignment = self.alignment();
        let mut header = Vec::new();
        header.extend_from_slice(b"GGUF");
        header.extend_from_slice(&3u32.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            put_string(&mut header, key);
            header.extend_from_slice(&type_id(value).to_le_bytes());
            put_value(&mut header, value);
        }
        let mut offset = 0u64;
        for t in &self.tensors {
            put_string(&mut header, &t.name);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            offset += padded(t.bytes.len() as u64, alignment);
        }
        header.resize(padded(header.len() as u64, alignment) as usize, 0);
        w.write_all(&header)?;
        let zeros = vec![0u8; alignment as usize];
        for t in &self.tensors {
            w.write_all(&t.bytes)?;
            let pad = padded(t.bytes.len() as u64, alignment) as usize - t.bytes.len();
            w.write_all(&zeros[..pad])?;
        }
        Ok(())
    }
}

fn padded(n: u64, alignment: u64) -> u64 {
    n.div_ceil(alignment) * alignment
}

fn quant_format(t: GgmlType) -> QuantFormat {
    match t {
        GgmlType::Q4_0 => QuantFormat::Q4_0,
        GgmlType::Q4_1 => QuantFormat::Q4_1,
        _ => QuantFormat::Q8_0,
    }
}

fn unsupported(name: &str, t: GgmlType) -> Error {
    Error::Unsupported(format!(
        "GGUF tensor {name:?}: kiln writes f32, f16, bf16, q8_0, q4_0 and q4_1 tensors, not {t}"
    ))
}

fn type_id(value: &GgufValue) -> u32 {
    value_type_id(value.value_type())
}

fn value_type_id(t: super::GgufValueType) -> u32 {
    use super::GgufValueType as T;
    match t {
        T::U8 => 0,
        T::I8 => 1,
        T::U16 => 2,
        T::I16 => 3,
        T::U32 => 4,
        T::I32 => 5,
        T::F32 => 6,
        T::Bool => 7,
        T::String => 8,
        T::Array => 9,
        T::U64 => 10,
        T::I64 => 11,
        T::F64 => 12,
    }
}

fn put_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &GgufValue) {
    match value {
        GgufValue::U8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        GgufValue::Bool(v) => out.push(*v as u8),
        GgufValue::String(s) => put_string(out, s),
        GgufValue::Array(a) => put_array(out, a),
    }
}

fn put_array(out: &mut Vec<u8>, a: &GgufArray) {
    out.extend_from_slice(&value_type_id(a.element_type()).to_le_bytes());
    out.extend_from_slice(&(a.len() as u64).to_le_bytes());
    macro_rules! numbers {
        ($v:expr) => {
            for x in $v {
                out.extend_from_slice(&x.to_le_bytes());
            }
        };
    }
    match a {
        GgufArray::U8(v) => out.extend_from_slice(v),
        GgufArray::I8(v) => numbers!(v),
        GgufArray::U16(v) => numbers!(v),
        GgufArray::I16(v) => numbers!(v),
        GgufArray::U32(v) => numbers!(v),
        GgufArray::I32(v) => numbers!(v),
        GgufArray::F32(v) => numbers!(v),
        GgufArray::U64(v) => numbers!(v),
        GgufArray::I64(v) => numbers!(v),
        GgufArray::F64(v) => numbers!(v),
        GgufArray::Bool(v) => out.extend(v.iter().map(|&b| b as u8)),
        GgufArray::String(v) => v.iter().for_each(|s| put_string(out, s)),
        GgufArray::Array(v) => v.iter().for_each(|inner| put_array(out, inner)),
    }
}
