//! `Tensor`: device storage, a shape and a dtype. Contiguous and row-major; immutable once
//! made, so clones share storage and ops return new tensors.

use crate::device::Device;
#[cfg(feature = "cuda")]
use crate::device::cuda::{CudaBuffer, CudaDevice};
#[cfg(feature = "wgpu")]
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::dtype::{DType, Element};
use crate::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::fmt;
use std::sync::Arc;

/// Host storage, typed.
pub(crate) enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
}

impl CpuStorage {
    /// `len` elements, NaN when output poisoning is on and zero otherwise.
    pub(crate) fn alloc(dtype: DType, len: usize) -> Result<CpuStorage> {
        let v = if crate::device::poison_outputs() { f32::NAN } else { 0.0 };
        Self::filled(dtype, len, |_| v)
    }

    /// `len` elements with element `i` set to `f(i)` (rounded to `dtype`). A host allocation
    /// that fails is `Err(OutOfMemory)`, not an abort.
    pub(crate) fn filled(dtype: DType, len: usize, f: impl Fn(usize) -> f32 + Sync + Send) -> Result<CpuStorage> {
        fn build<T: Element>(len: usize, f: impl Fn(usize) -> f32 + Sync + Send) -> Result<Vec<T>> {
            let mut v = Vec::new();
            v.try_reserve_exact(len)
                .map_err(|_| Error::OutOfMemory(format!("host allocation of {len} elements of {} failed", T::DTYPE)))?;
            v.par_extend((0..len).into_par_iter().map(|i| T::from_f32(f(i))));
            Ok(v)
        }
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(build(len, f)?),
            DType::F16 => CpuStorage::F16(build(len, f)?),
            DType::BF16 => CpuStorage::BF16(build(len, f)?),
        })
    }

    pub(crate) fn from_f32(dtype: DType, data: &[f32]) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(data.to_vec()),
            DType::F16 => CpuStorage::F16(data.par_iter().map(|&x| f16::from_f32(x)).collect()),
            DType::BF16 => CpuStorage::BF16(data.par_iter().map(|&x| bf16::from_f32(x)).collect()),
        }
    }

    /// Takes an f32 vector, rounding it when `dtype` is a half type.
    pub(crate) fn from_f32_vec(dtype: DType, data: Vec<f32>) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(data),
            _ => Self::from_f32(dtype, &data),
        }
    }

    fn from_bytes(dtype: DType, bytes: &[u8]) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(bytemuck::pod_collect_to_vec(bytes)),
            DType::F16 => CpuStorage::F16(bytemuck::pod_collect_to_vec(bytes)),
            DType::BF16 => CpuStorage::BF16(bytemuck::pod_collect_to_vec(bytes)),
        }
    }

    fn as_bytes(&self) -> &[u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice(v),
            CpuStorage::F16(v) => bytemuck::cast_slice(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice(v),
        }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        match self {
            CpuStorage::F32(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::F16(v) => bytemuck::cast_slice_mut(v),
            CpuStorage::BF16(v) => bytemuck::cast_slice_mut(v),
        }
    }

    pub(crate) fn to_f32_vec(&self) -> Vec<f32> {
        match self {
            CpuStorage::F32(v) => v.clone(),
            CpuStorage::F16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
            CpuStorage::BF16(v) => v.par_iter().map(|x| x.to_f32()).collect(),
        }
    }
}

/// Where a tensor's bytes are.
pub(crate) enum Storage {
    Cpu(CpuStorage),
    #[cfg(feature = "cuda")]
    Cuda {
        dev: Arc<CudaDevice>,
        buf: CudaBuffer,
    },
    #[cfg(feature = "wgpu")]
    Wgpu {
        dev: Arc<WgpuDevice>,
        buf: WgpuBuffer,
    },
}

/// An n-dimensional array on one device. See the crate docs for a tour.
#[derive(Clone)]
pub struct Tensor {
    storage: Arc<Storage>,
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
}

impl fmt::Debug for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {}, {})", self.shape, self.dtype, self.device)
    }
}

fn elem_count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("shape {shape:?} has more elements than fit in usize")))
}

fn byte_count(shape: &[usize], dtype: DType) -> Result<usize> {
    elem_count(shape)?
        .checked_mul(dtype.size_in_bytes())
        .ok_or_else(|| Error::Shape(format!("shape {shape:?} has more bytes than fit in usize")))
}

impl Tensor {
    /// A tensor holding `data` (row-major) with `shape`, on `device`.
    /// `Err(Shape)` when the shape's element count is not `data.len()`.
    pub fn from_slice<T: Element>(data: &[T], shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = elem_count(shape)?;
        if n != data.len() {
            return Err(Error::Shape(format!("shape {shape:?} holds {n} elements but {} were given", data.len())));
        }
        let host = match T::DTYPE {
            DType::F32 => CpuStorage::F32(bytemuck::cast_slice(data).to_vec()),
            DType::F16 => CpuStorage::F16(bytemuck::cast_slice(data).to_vec()),
            DType::BF16 => CpuStorage::BF16(bytemuck::cast_slice(data).to_vec()),
        };
        Self::from_host(host, shape, T::DTYPE, device)
    }

    /// A tensor of `dtype` from f32 values, each rounded to the nearest representable value.
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = elem_count(shape)?;
        if n != data.len() {
            return Err(Error::Shape(format!("shape {shape:?} holds {n} elements but {} were given", data.len())));
        }
        Self::from_host(CpuStorage::from_f32(dtype, data), shape, dtype, device)
    }

    fn from_host(host: CpuStorage, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Self::materialize(shape, dtype, device, || Ok(host))
    }

    /// A tensor whose elements `make_host` produces on the host. The device buffer is taken
    /// first, so a size the device cannot hold fails before any host memory is filled.
    fn materialize(
        shape: &[usize],
        dtype: DType,
        device: &Device,
        make_host: impl FnOnce() -> Result<CpuStorage>,
    ) -> Result<Tensor> {
        let bytes = byte_count(shape, dtype)?;
        let storage = match *device {
            Device::Cpu => Storage::Cpu(make_host()?),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let dev = CudaDevice::get(i)?;
                let mut buf = dev.alloc(bytes)?;
                dev.write(&mut buf, make_host()?.as_bytes())?;
                Storage::Cuda { dev, buf }
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(i) => {
                let dev = WgpuDevice::get(i)?;
                let buf = dev.alloc(bytes)?;
                dev.write(&buf, make_host()?.as_bytes())?;
                Storage::Wgpu { dev, buf }
            }
            #[allow(unreachable_patterns)]
            other => {
                let _ = (bytes, make_host);
                return Err(Error::NoDevice(format!("{other}: backend not built")));
            }
        };
        Ok(Tensor { storage: Arc::new(storage), shape: shape.to_vec(), dtype, device: *device })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Self::full(shape, 0.0, dtype, device)
    }

    /// A tensor with every element `value` (rounded to `dtype`).
    pub fn full(shape: &[usize], value: f32, dtype: DType, device: &Device) -> Result<Tensor> {
        let n = elem_count(shape)?;
        Self::materialize(shape, dtype, device, || CpuStorage::filled(dtype, n, |_| value))
    }

    /// Uniform values in `[low, high)` from `seed`. Element `i` depends only on `seed` and `i`,
    /// so the same call gives the same values on every device.
    pub fn rand(shape: &[usize], low: f32, high: f32, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
        if !(low.is_finite() && high.is_finite() && low <= high) {
            return Err(Error::InvalidArgument(format!("rand range [{low}, {high}) is not a finite interval")));
        }
        let n = elem_count(shape)?;
        Self::materialize(shape, dtype, device, || {
            CpuStorage::filled(dtype, n, |i| low + (high - low) * unit_uniform(seed, 2 * i as u64))
        })
    }

    /// Normal values with `mean` and `std` from `seed` (Box-Muller over the same counter-based
    /// generator as [`Tensor::rand`]): the same values on every device.
    pub fn randn(shape: &[usize], mean: f32, std: f32, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
        if !(mean.is_finite() && std.is_finite() && std >= 0.0) {
            return Err(Error::InvalidArgument(format!("randn needs finite mean and std >= 0, got {mean}, {std}")));
        }
        let n = elem_count(shape)?;
        Self::materialize(shape, dtype, device, || {
            CpuStorage::filled(dtype, n, |i| {
                let u1 = 1.0 - unit_uniform(seed, 2 * i as u64); // (0, 1]
                let u2 = unit_uniform(seed, 2 * i as u64 + 1);
                let z = (-2.0 * (u1 as f64).ln()).sqrt() * (std::f64::consts::TAU * u2 as f64).cos();
                mean + std * z as f32
            })
        })
    }

    /// An output tensor whose contents the caller will write in full (NaN-filled when output
    /// poisoning is on).
    pub(crate) fn empty(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let bytes = byte_count(shape, dtype)?;
        let storage = match *device {
            Device::Cpu => Storage::Cpu(CpuStorage::alloc(dtype, elem_count(shape)?)?),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let dev = CudaDevice::get(i)?;
                let buf = dev.alloc(bytes)?;
                Storage::Cuda { dev, buf }
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(i) => {
                let dev = WgpuDevice::get(i)?;
                let buf = dev.alloc(bytes)?;
                Storage::Wgpu { dev, buf }
            }
            #[allow(unreachable_patterns)]
            other => {
                let _ = bytes;
                return Err(Error::NoDevice(format!("{other}: backend not built")));
            }
        };
        Ok(Tensor { storage: Arc::new(storage), shape: shape.to_vec(), dtype, device: *device })
    }

    pub(crate) fn from_cpu_storage(host: CpuStorage, shape: &[usize], dtype: DType) -> Tensor {
        Tensor { storage: Arc::new(Storage::Cpu(host)), shape: shape.to_vec(), dtype, device: Device::Cpu }
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Mutable access to the storage for an op that updates this tensor in place. Storage
    /// shared with another tensor is copied first, so no other tensor sees the change.
    pub(crate) fn storage_mut(&mut self) -> Result<&mut Storage> {
        if Arc::get_mut(&mut self.storage).is_none() {
            *self = self.copy()?;
        }
        Arc::get_mut(&mut self.storage)
            .ok_or_else(|| Error::InvalidArgument("tensor storage is shared while being updated".into()))
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes the elements take (not counting pool rounding).
    pub fn size_in_bytes(&self) -> usize {
        self.elem_count() * self.dtype.size_in_bytes()
    }

    /// The same elements under another shape with the same element count; shares storage.
    pub fn reshape(&self, shape: &[usize]) -> Result<Tensor> {
        if elem_count(shape)? != self.elem_count() {
            return Err(Error::Shape(format!(
                "cannot reshape {:?} ({} elements) to {shape:?}",
                self.shape,
                self.elem_count()
            )));
        }
        Ok(Tensor { shape: shape.to_vec(), ..self.clone() })
    }

    /// The raw little-endian bytes of the elements, copied to the host.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let n = self.size_in_bytes();
        match self.storage() {
            Storage::Cpu(s) => Ok(s.as_bytes()[..n].to_vec()),
            #[cfg(feature = "cuda")]
            Storage::Cuda { dev, buf } => dev.download(buf, n),
            #[cfg(feature = "wgpu")]
            Storage::Wgpu { dev, buf } => dev.download(buf, n),
        }
    }

    /// The elements as `T`, which must be the tensor's dtype (`Err(DType)` otherwise; use
    /// [`Tensor::to_vec_f32`] to convert).
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType(format!(
                "to_vec::<{}> on a {} tensor; use to_vec_f32 or to_dtype first",
                T::DTYPE,
                self.dtype
            )));
        }
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes()?))
    }

    /// The elements converted to f32 (exact for every dtype).
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        match self.storage() {
            Storage::Cpu(s) => Ok(s.to_f32_vec()),
            #[allow(unreachable_patterns)]
            _ => Ok(CpuStorage::from_bytes(self.dtype, &self.to_bytes()?).to_f32_vec()),
        }
    }

    /// A copy on `device` (this tensor when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if *device == self.device {
            return Ok(self.clone());
        }
        let host = match self.storage() {
            Storage::Cpu(s) => CpuStorage::from_bytes(self.dtype, s.as_bytes()),
            #[allow(unreachable_patterns)]
            _ => CpuStorage::from_bytes(self.dtype, &self.to_bytes()?),
        };
        Self::from_host(host, &self.shape, self.dtype, device)
    }

    /// A copy in new storage on the same device (a device-to-device copy on GPUs).
    pub fn copy(&self) -> Result<Tensor> {
        let bytes = self.size_in_bytes();
        let storage = match self.storage() {
            Storage::Cpu(s) => Storage::Cpu(CpuStorage::from_bytes(self.dtype, &s.as_bytes()[..bytes])),
            #[cfg(feature = "cuda")]
            Storage::Cuda { dev, buf } => {
                let mut dst = dev.alloc(bytes)?;
                dev.copy(buf, &mut dst, bytes)?;
                Storage::Cuda { dev: dev.clone(), buf: dst }
            }
            #[cfg(feature = "wgpu")]
            Storage::Wgpu { dev, buf } => {
                let dst = dev.alloc(bytes)?;
                dev.copy(buf, &dst, bytes)?;
                Storage::Wgpu { dev: dev.clone(), buf: dst }
            }
        };
        Ok(Tensor { storage: Arc::new(storage), ..self.clone() })
    }

    /// Copies `len` elements of `src` starting at element `src_at` over this tensor's
    /// elements from `dst_at`, in place (storage shared with another tensor is copied first).
    /// Both tensors share a device and a dtype; the caller checks the ranges.
    pub(crate) fn write_region(&mut self, dst_at: usize, src: &Tensor, src_at: usize, len: usize) -> Result<()> {
        let es = self.dtype.size_in_bytes();
        debug_assert!(src.dtype == self.dtype && dst_at + len <= self.elem_count() && src_at + len <= src.elem_count());
        let (dst_off, src_off, bytes) = (dst_at * es, src_at * es, len * es);
        if bytes == 0 {
            return Ok(());
        }
        let src_storage = src.storage.clone();
        match (self.storage_mut()?, &*src_storage) {
            (Storage::Cpu(d), Storage::Cpu(s)) => {
                d.as_bytes_mut()[dst_off..dst_off + bytes].copy_from_slice(&s.as_bytes()[src_off..src_off + bytes]);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            (Storage::Cuda { dev, buf }, Storage::Cuda { buf: sb, .. }) => {
                dev.copy_region(sb, src_off, buf, dst_off, bytes)
            }
            #[cfg(feature = "wgpu")]
            (Storage::Wgpu { dev, buf }, Storage::Wgpu { buf: sb, .. }) => {
                dev.copy_region(sb, src_off, buf, dst_off, bytes)
            }
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch("write_region: tensors on different backends".into())),
        }
    }

    /// The elements converted to `dtype` (rounding to nearest even), on the same device.
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        crate::ops::cast(self, dtype)
    }
}

/// SplitMix64 of (seed, counter) mapped to [0, 1) with 24 random bits.
fn unit_uniform(seed: u64, counter: u64) -> f32 {
    let mut z = seed.wrapping_mul(0x9E3779B97F4A7C15) ^ counter.wrapping_add(0x632BE59BD9B4E019);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}

#[cfg(feature = "wgpu")]
impl Tensor {
    /// The wgpu device a tensor lives on.
    pub(crate) fn wgpu_device(&self) -> Result<&Arc<WgpuDevice>> {
        match self.storage() {
            Storage::Wgpu { dev, .. } => Ok(dev),
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch(format!("expected a wgpu tensor, found one on {}", self.device))),
        }
    }

    /// The wgpu buffer behind a tensor on a wgpu device.
    pub(crate) fn wgpu_buffer(&self) -> Result<&::wgpu::Buffer> {
        match self.storage() {
            Storage::Wgpu { buf, .. } => Ok(buf.get()),
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch(format!("expected a wgpu tensor, found one on {}", self.device))),
        }
    }
}

#[cfg(feature = "cuda")]
impl Tensor {
    /// The CUDA device a tensor lives on.
    pub(crate) fn cuda_device(&self) -> Result<&Arc<CudaDevice>> {
        match self.storage() {
            Storage::Cuda { dev, .. } => Ok(dev),
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch(format!("expected a CUDA tensor, found one on {}", self.device))),
        }
    }

    /// The CUDA buffer behind a tensor on a CUDA device.
    pub(crate) fn cuda_buffer(&self) -> Result<&cudarc::driver::CudaSlice<u8>> {
        match self.storage() {
            Storage::Cuda { buf, .. } => Ok(buf.get()),
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch(format!("expected a CUDA tensor, found one on {}", self.device))),
        }
    }
}

/// Untyped bytes on a device: the storage of quantized weights, whose layout the owning
/// type knows.
pub(crate) enum RawBuffer {
    Cpu(Vec<u8>),
    #[cfg(feature = "cuda")]
    Cuda {
        dev: Arc<CudaDevice>,
        buf: CudaBuffer,
        len: usize,
    },
    #[cfg(feature = "wgpu")]
    Wgpu {
        dev: Arc<WgpuDevice>,
        buf: WgpuBuffer,
        len: usize,
    },
}

impl RawBuffer {
    pub(crate) fn new(bytes: Vec<u8>, device: &Device) -> Result<RawBuffer> {
        match *device {
            Device::Cpu => Ok(RawBuffer::Cpu(bytes)),
            #[cfg(feature = "cuda")]
            Device::Cuda(i) => {
                let dev = CudaDevice::get(i)?;
                let mut buf = dev.alloc(bytes.len())?;
                dev.write(&mut buf, &bytes)?;
                Ok(RawBuffer::Cuda { dev, buf, len: bytes.len() })
            }
            #[cfg(feature = "wgpu")]
            Device::Wgpu(i) => {
                let dev = WgpuDevice::get(i)?;
                let buf = dev.alloc(bytes.len())?;
                dev.write(&buf, &bytes)?;
                Ok(RawBuffer::Wgpu { dev, buf, len: bytes.len() })
            }
            #[allow(unreachable_patterns)]
            other => Err(Error::NoDevice(format!("{other}: backend not built"))),
        }
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            RawBuffer::Cpu(v) => v.len(),
            #[cfg(feature = "cuda")]
            RawBuffer::Cuda { len, .. } => *len,
            #[cfg(feature = "wgpu")]
            RawBuffer::Wgpu { len, .. } => *len,
        }
    }

    /// The CUDA buffer behind raw bytes on a CUDA device.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_slice(&self) -> Result<&cudarc::driver::CudaSlice<u8>> {
        match self {
            RawBuffer::Cuda { buf, .. } => Ok(buf.get()),
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch("expected bytes on a CUDA device".into())),
        }
    }

    /// The wgpu buffer behind raw bytes on a wgpu device.
    #[cfg(feature = "wgpu")]
    pub(crate) fn wgpu_buffer(&self) -> Result<&::wgpu::Buffer> {
        match self {
            RawBuffer::Wgpu { buf, .. } => Ok(buf.get()),
            #[allow(unreachable_patterns)]
            _ => Err(Error::DeviceMismatch("expected bytes on a wgpu device".into())),
        }
    }

    /// The bytes, copied to the host.
    pub(crate) fn to_vec(&self) -> Result<Vec<u8>> {
        match self {
            RawBuffer::Cpu(v) => Ok(v.clone()),
            #[cfg(feature = "cuda")]
            RawBuffer::Cuda { dev, buf, len } => dev.download(buf, *len),
            #[cfg(feature = "wgpu")]
            RawBuffer::Wgpu { dev, buf, len } => dev.download(buf, *len),
        }
    }
}
