//! Tensors in and out of safetensors files (Hugging Face's format).

use crate::{DType, Device, Error, Result, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
    }
}

/// Writes `tensors` (copied to the host) and `metadata` to `path`, through a temporary
/// file and a rename, so a crash never leaves half a file.
pub(crate) fn save(path: &Path, tensors: &[(String, &Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, &Tensor)> =
        tensors.iter().map(|(n, t)| Ok((n.clone(), t.to_bytes()?, *t))).collect::<Result<_>>()?;
    let views = bytes
        .iter()
        .map(|(n, b, t)| {
            safetensors::tensor::TensorView::new(st_dtype(t.dtype()), t.shape().to_vec(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| Error::Io(format!("tensor {n}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    let data = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Io(format!("serializing: {e}")))?;
    crate::fs::write_atomically(path, &data).map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
}

/// A parsed safetensors file.
pub(crate) struct Loaded {
    bytes: Vec<u8>,
}

impl Loaded {
    pub(crate) fn open(path: &Path) -> Result<Loaded> {
        let bytes = std::fs::read(path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
        SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::Io(format!("{} is not a valid safetensors file: {e}", path.display())))?;
        Ok(Loaded { bytes })
    }

    fn parsed(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| Error::Io(format!("invalid safetensors file: {e}")))
    }

    pub(crate) fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes)
            .map_err(|e| Error::Io(format!("invalid safetensors header: {e}")))?;
        Ok(meta.metadata().clone().unwrap_or_default().into_iter().collect())
    }

    pub(crate) fn contains(&self, name: &str) -> Result<bool> {
        Ok(self.parsed()?.names().contains(&name))
    }

    /// Every tensor name in the file.
    pub(crate) fn names(&self) -> Result<Vec<String>> {
        Ok(self.parsed()?.names().into_iter().map(str::to_string).collect())
    }

    /// Tensor `name` in whatever float dtype the file holds, on `device`.
    pub(crate) fn tensor_any(&self, name: &str, device: &Device) -> Result<Tensor> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|e| Error::Io(format!("tensor {name}: {e}")))?;
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            other => return Err(Error::DType(format!("tensor {name} is {other:?}; kiln reads f32, f16 and bf16"))),
        };
        self.tensor(name, dtype, None, device)
    }

    /// Tensor `name`, which must have `dtype` and `shape` (when given), on `device`.
    pub(crate) fn tensor(&self, name: &str, dtype: DType, shape: Option<&[usize]>, device: &Device) -> Result<Tensor> {
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
        let data = view.data();
        match dtype {
            DType::F32 => Tensor::from_slice(&bytemuck::pod_collect_to_vec::<u8, f32>(data), view.shape(), device),
            DType::F16 => {
                Tensor::from_slice(&bytemuck::pod_collect_to_vec::<u8, half::f16>(data), view.shape(), device)
            }
            DType::BF16 => {
                Tensor::from_slice(&bytemuck::pod_collect_to_vec::<u8, half::bf16>(data), view.shape(), device)
            }
        }
    }
}
