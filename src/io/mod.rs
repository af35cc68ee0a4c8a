//! Tensors in and out of safetensors files (Hugging Face's format), on any device, through
//! the `safetensors` crate; GGUF files (ggml's format) read through [`GgufFile`] and written by
//! [`GgufWriter`].
//!
//! ```no_run
//! use kiln::{DType, Device, Tensor, io};
//! # fn main() -> kiln::Result<()> {
//! let w = Tensor::randn(&[4, 8], 0.0, 1.0, 1, DType::BF16, &Device::best())?;
//! let meta = [("step".to_string(), "10".to_string())].into_iter().collect();
//! io::save("weights.safetensors", &[("layer.weight", &w)], &meta)?;
//! let file = io::SafetensorsFile::open("weights.safetensors")?;
//! let back = file.tensor("layer.weight", &Device::Cpu)?; // bf16, [4, 8]
//! assert_eq!(file.metadata()?["step"], "10");
//! # let _ = back;
//! # Ok(()) }
//! ```

pub mod gguf;
pub mod gguf_write;

pub use gguf::{GgmlType, GgufArray, GgufFile, GgufTensor, GgufTensorInfo, GgufValue, GgufValueType};
pub use gguf_write::GgufWriter;

use crate::{DType, Device, Error, Result, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::U32 => Dtype::U32,
        DType::I32 => Dtype::I32,
    }
}

fn kiln_dtype(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::F16 => Some(DType::F16),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::U32 => Some(DType::U32),
        Dtype::I32 => Some(DType::I32),
        _ => None,
    }
}

/// Writes `tensors` (copied to the host from whatever device they are on) and `metadata`
/// to `path`, through a temporary file and a rename, so a crash never leaves half a file.
/// `Err(InvalidArgument)` for two tensors of one name.
pub fn save(path: impl AsRef<Path>, tensors: &[(&str, &Tensor)], metadata: &HashMap<String, String>) -> Result<()> {
    let path = path.as_ref();
    let data = to_bytes(tensors, metadata).map_err(|e| match e {
        Error::Io(m) => Error::Io(format!("{}: {m}", path.display())),
        other => other,
    })?;
    crate::fs::write_file(path, &data).map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}

/// The bytes of a safetensors file holding `tensors` and `metadata`; the same tensors and
/// metadata always give the same bytes (the header's keys sorted). `Err(InvalidArgument)`
/// for two tensors of one name.
pub fn to_bytes(tensors: &[(&str, &Tensor)], metadata: &HashMap<String, String>) -> Result<Vec<u8>> {
    let mut names: Vec<&str> = tensors.iter().map(|(n, _)| *n).collect();
    names.sort_unstable();
    if let Some(pair) = names.windows(2).find(|w| w[0] == w[1]) {
        return Err(Error::InvalidArgument(format!("two tensors named {:?}", pair[0])));
    }
    let bytes: Vec<(&str, Vec<u8>, &Tensor)> =
        tensors.iter().map(|(n, t)| Ok((*n, t.to_bytes()?, *t))).collect::<Result<_>>()?;
    let views = bytes
        .iter()
        .map(|(n, b, t)| {
            safetensors::tensor::TensorView::new(st_dtype(t.dtype()), t.shape().to_vec(), b)
                .map(|v| (n.to_string(), v))
                .map_err(|e| Error::Io(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data =
        safetensors::serialize(views, Some(metadata.clone())).map_err(|e| Error::Io(format!("serializing: {e}")))?;
    canonical(data).map_err(|e| Error::Io(format!("serializing: {e}")))
}

/// The same file with its JSON header's keys sorted (the `safetensors` crate writes the
/// metadata in hash order), so the same tensors and metadata always give the same bytes.
fn canonical(data: Vec<u8>) -> std::result::Result<Vec<u8>, String> {
    let len = data.get(..8).map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8]))).ok_or("no header")? as usize;
    let header = data.get(8..8 + len).ok_or("truncated header")?;
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|e| e.to_string())?;
    // serde_json's map is ordered by key; the format pads the header with spaces to 8 bytes.
    let mut sorted = serde_json::to_vec(&value).map_err(|e| e.to_string())?;
    sorted.resize(sorted.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + sorted.len() + data.len() - 8 - len);
    out.extend_from_slice(&(sorted.len() as u64).to_le_bytes());
    out.extend_from_slice(&sorted);
    out.extend_from_slice(&data[8 + len..]);
    Ok(out)
}

/// Every tensor of a safetensors file, by name, on `device`.
pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<HashMap<String, Tensor>> {
    let file = SafetensorsFile::open(path)?;
    file.names()?.into_iter().map(|n| Ok((n.clone(), file.tensor(&n, device)?))).collect()
}

/// A safetensors file, read and checked once; its tensors are copied to a device on demand.
pub struct SafetensorsFile {
    bytes: Vec<u8>,
}

impl SafetensorsFile {
    /// Reads `path`. `Err(Io)` naming the file when it cannot be read or is not a valid
    /// safetensors file (a truncated one included).
    pub fn open(path: impl AsRef<Path>) -> Result<SafetensorsFile> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
        Self::from_bytes(bytes, path)
    }

    /// The file `path` already read into `bytes`.
    pub(crate) fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<SafetensorsFile> {
        SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Io(format!("{} is not a valid safetensors file: {e}", path.display())))?;
        Ok(SafetensorsFile { bytes })
    }

    fn parsed(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| Error::Io(format!("invalid safetensors file: {e}")))
    }

    /// The file's `__metadata__` (empty when it has none).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| Error::Io(format!("invalid safetensors header: {e}")))?;
        Ok(meta.metadata().clone().unwrap_or_default().into_iter().collect())
    }

    /// Whether the file holds a tensor `name`.
    pub fn contains(&self, name: &str) -> Result<bool> {
        Ok(self.parsed()?.names().contains(&name))
    }

    /// Every tensor name in the file, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self.parsed()?.names().into_iter().map(str::to_string).collect();
        names.sort();
        Ok(names)
    }

    /// Tensor `name` as stored, whatever its dtype: the dtype's safetensors name (`"U8"`,
    /// `"F32"`, ...), the shape and the little-endian bytes. For state kiln keeps in its own
    /// layout, such as bitsandbytes' packed 4-bit codes.
    pub fn raw(&self, name: &str) -> Result<(String, Vec<usize>, &[u8])> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|e| Error::Io(format!("tensor {name}: {e}")))?;
        Ok((format!("{:?}", view.dtype()), view.shape().to_vec(), view.data()))
    }

    /// Tensor `name` in the dtype the file holds (f32, f16, bf16, u32 or i32), on `device`.
    /// `Err(Io)` when there is no such tensor, `Err(DType)` for another dtype.
    pub fn tensor(&self, name: &str, device: &Device) -> Result<Tensor> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|e| Error::Io(format!("tensor {name}: {e}")))?;
        let dtype = kiln_dtype(view.dtype()).ok_or_else(|| {
            Error::DType(format!("tensor {name} is {:?}; kiln reads f32, f16, bf16, u32 and i32", view.dtype()))
        })?;
        self.checked(name, dtype, None, device)
    }

    /// Tensor `name`, which must have `dtype` and, when given, `shape`; on `device`.
    pub fn checked(&self, name: &str, dtype: DType, shape: Option<&[usize]>, device: &Device) -> Result<Tensor> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|e| Error::Io(format!("tensor {name}: {e}")))?;
        if view.dtype() != st_dtype(dtype) {
            return Err(Error::DType(format!("tensor {name} is {:?}, expected {dtype}", view.dtype())));
        }
        if let Some(shape) = shape {
            if view.shape() != shape {
                return Err(Error::Shape(format!("tensor {name} is {:?}, expected {shape:?}", view.shape())));
            }
        }
        Tensor::from_le_bytes(view.data(), view.shape(), dtype, device)
    }
}
