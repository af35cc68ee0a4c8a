//! `Tensor`: device storage, a shape and a dtype. Contiguous and row-major; immutable once
//! made, so clones share storage and ops return new tensors.

#[cfg(feature = "cuda")]
use crate::device::cuda::{CudaBuffer, CudaDevice};
#[cfg(feature = "wgpu")]
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::device::{Backend, Device};
use crate::dtype::{DType, Element, Scalar};
use crate::{Error, Result};
use half::{bf16, f16};
use rayon::prelude::*;
use std::fmt;
use std::sync::Arc;

/// Runs `$body` with `$v` bound to the host storage's float elements (`&[f32]`, `&[f16]` or
/// `&[bf16]`, each a [`StorageElement`]): the split by dtype, written once. Also with a
/// mutable storage and `$v` a mutable slice. Integer storage makes the enclosing function
/// return `Err(DType)`: the float ops check their operands' dtypes first, and this is the
/// guard behind that check.
macro_rules! with_elems {
    ($storage:expr, $v:ident => $body:expr) => {
        match $storage {
            $crate::tensor::CpuStorage::F32($v) => $body,
            $crate::tensor::CpuStorage::F16($v) => $body,
            $crate::tensor::CpuStorage::BF16($v) => $body,
            $crate::tensor::CpuStorage::U32(_) | $crate::tensor::CpuStorage::I32(_) => {
                return Err($crate::tensor::not_float("a float operation"));
            }
        }
    };
}
pub(crate) use with_elems;

/// Runs `$body` with `$v` bound to the host storage's elements of any dtype, floats and
/// integers: for code that moves bytes.
macro_rules! with_scalars {
    ($storage:expr, $v:ident => $body:expr) => {
        match $storage {
            $crate::tensor::CpuStorage::F32($v) => $body,
            $crate::tensor::CpuStorage::F16($v) => $body,
            $crate::tensor::CpuStorage::BF16($v) => $body,
            $crate::tensor::CpuStorage::U32($v) => $body,
            $crate::tensor::CpuStorage::I32($v) => $body,
        }
    };
}

/// The error a float op gives for an integer operand.
pub(crate) fn not_float(op: &str) -> Error {
    Error::DType(format!("{op} needs f32, f16 or bf16 tensors, but an operand holds integers (u32 or i32)"))
}

/// An element type as host storage holds it.
pub(crate) trait StorageElement: Element {
    /// Host storage holding `v`.
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    /// The elements of host storage of this dtype; `None` for another dtype.
    fn slice_of(s: &CpuStorage) -> Option<&[Self]>;
}

macro_rules! storage_element {
    ($ty:ty, $variant:ident) => {
        impl StorageElement for $ty {
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
            fn slice_of(s: &CpuStorage) -> Option<&[Self]> {
                match s {
                    CpuStorage::$variant(v) => Some(v),
                    _ => None,
                }
            }
        }
    };
}
storage_element!(f32, F32);
storage_element!(f16, F16);
storage_element!(bf16, BF16);

/// `len` copies of `value` in a new host vector; `Err(OutOfMemory)` naming the size when
/// the host cannot hold it, where `vec!` would abort the process. Every host buffer sized by
/// the operands' shapes goes through here or [`try_collect`].
pub(crate) fn try_vec<T: Clone>(len: usize, value: T) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|_| host_oom::<T>(len))?;
    v.resize(len, value);
    Ok(v)
}

/// `len` zeros in a new host vector, from zeroed memory (as `vec![0; len]`, whose large
/// buffers cost no write pass), or `Err(OutOfMemory)` instead of an abort.
pub(crate) fn try_zeros<T: bytemuck::Zeroable>(len: usize) -> Result<Vec<T>> {
    let layout = std::alloc::Layout::array::<T>(len).map_err(|_| host_oom::<T>(len))?;
    if layout.size() == 0 {
        return Ok(std::iter::repeat_with(T::zeroed).take(len).collect());
    }
    // SAFETY: a non-zero size; all-zero bytes are a valid T (Zeroable); the vector takes the
    // allocation with the layout it was made with.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout) as *mut T;
        if ptr.is_null() {
            return Err(host_oom::<T>(len));
        }
        Ok(Vec::from_raw_parts(ptr, len, len))
    }
}

/// The items of a parallel iterator of known length in a new host vector, allocated as
/// [`try_vec`] does.
pub(crate) fn try_collect<T: Send>(iter: impl IndexedParallelIterator<Item = T>) -> Result<Vec<T>> {
    let mut v = Vec::new();
    v.try_reserve_exact(iter.len()).map_err(|_| host_oom::<T>(iter.len()))?;
    v.par_extend(iter);
    Ok(v)
}

fn host_oom<T>(len: usize) -> Error {
    let bytes = (len as u128) * std::mem::size_of::<T>() as u128;
    Error::OutOfMemory(format!("host allocation of {len} elements ({bytes} bytes) failed"))
}

/// Host storage, typed.
pub(crate) enum CpuStorage {
    F32(Vec<f32>),
    F16(Vec<f16>),
    BF16(Vec<bf16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
}

/// Runs `$body` with the type `$t` standing for the float element type of `$dtype`: the
/// split by dtype of code that makes storage, written once. An integer dtype makes the
/// enclosing function return `Err(DType)`, as [`with_elems`] does.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $t = f32;
                $body
            }
            $crate::DType::F16 => {
                type $t = half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            $crate::DType::U32 | $crate::DType::I32 => {
                return Err($crate::tensor::not_float("a float operation"));
            }
        }
    };
}
pub(crate) use with_dtype;

impl CpuStorage {
    /// `len` elements, zero, or when output poisoning is on NaN (floats) or all bits set
    /// (integers: `u32::MAX`, −1), so an element an op leaves unwritten shows.
    pub(crate) fn alloc(dtype: DType, len: usize) -> Result<CpuStorage> {
        if crate::device::poison_outputs() {
            return match dtype {
                DType::U32 => Ok(CpuStorage::U32(try_vec(len, u32::MAX)?)),
                DType::I32 => Ok(CpuStorage::I32(try_vec(len, -1)?)),
                _ => Self::filled(dtype, len, |_| f32::NAN),
            };
        }
        // Zeroed pages from the allocator: no pass over memory the op is about to write.
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(try_zeros(len)?),
            DType::F16 => CpuStorage::F16(try_zeros(len)?),
            DType::BF16 => CpuStorage::BF16(try_zeros(len)?),
            DType::U32 => CpuStorage::U32(try_zeros(len)?),
            DType::I32 => CpuStorage::I32(try_zeros(len)?),
        })
    }

    /// `len` copies of `value`: rounded for a float dtype; for an integer dtype, `value`
    /// must be a whole number the type holds.
    fn constant(dtype: DType, len: usize, value: f32) -> Result<CpuStorage> {
        let whole = |lo: f64, hi: f64| {
            let v = value as f64;
            if v.fract() == 0.0 && (lo..=hi).contains(&v) {
                Ok(v)
            } else {
                Err(Error::InvalidArgument(format!("{value} is not a value a {dtype} tensor holds")))
            }
        };
        match dtype {
            DType::U32 => Ok(CpuStorage::U32(try_vec(len, whole(0.0, u32::MAX as f64)? as u32)?)),
            DType::I32 => Ok(CpuStorage::I32(try_vec(len, whole(i32::MIN as f64, i32::MAX as f64)? as i32)?)),
            _ => Self::filled(dtype, len, |_| value),
        }
    }

    /// `len` elements with element `i` set to `f(i)` (rounded to `dtype`). A host allocation
    /// that fails is `Err(OutOfMemory)`, not an abort.
    pub(crate) fn filled(dtype: DType, len: usize, f: impl Fn(usize) -> f32 + Sync + Send) -> Result<CpuStorage> {
        with_dtype!(dtype, T => Ok(T::into_storage(try_collect((0..len).into_par_iter().map(|i| T::from_f32(f(i))))?)))
    }

    pub(crate) fn from_f32(dtype: DType, data: &[f32]) -> Result<CpuStorage> {
        with_dtype!(dtype, T => Ok(T::into_storage(try_collect(data.par_iter().map(|&x| T::from_f32(x)))?)))
    }

    /// Takes an f32 vector, rounding it when `dtype` is a half type.
    pub(crate) fn from_f32_vec(dtype: DType, data: Vec<f32>) -> Result<CpuStorage> {
        match dtype {
            DType::F32 => Ok(CpuStorage::F32(data)),
            _ => Self::from_f32(dtype, &data),
        }
    }

    fn from_bytes(dtype: DType, bytes: &[u8]) -> Result<CpuStorage> {
        fn typed<T: Scalar>(bytes: &[u8]) -> Result<Vec<T>> {
            let mut v: Vec<T> = try_zeros(bytes.len() / std::mem::size_of::<T>())?;
            bytemuck::cast_slice_mut::<T, u8>(&mut v).copy_from_slice(bytes);
            Ok(v)
        }
        Ok(match dtype {
            DType::F32 => CpuStorage::F32(typed(bytes)?),
            DType::F16 => CpuStorage::F16(typed(bytes)?),
            DType::BF16 => CpuStorage::BF16(typed(bytes)?),
            DType::U32 => CpuStorage::U32(typed(bytes)?),
            DType::I32 => CpuStorage::I32(typed(bytes)?),
        })
    }

    fn as_bytes(&self) -> &[u8] {
        with_scalars!(self, v => bytemuck::cast_slice(v))
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        with_scalars!(self, v => bytemuck::cast_slice_mut(v))
    }

    pub(crate) fn to_f32_vec(&self) -> Result<Vec<f32>> {
        with_elems!(self, v => try_collect(v.par_iter().map(|x| x.to_f32())))
    }

    /// The elements of integer storage, when it holds `u32`.
    pub(crate) fn as_u32(&self) -> Option<&[u32]> {
        match self {
            CpuStorage::U32(v) => Some(v),
            _ => None,
        }
    }

    /// The elements of integer storage, when it holds `i32`.
    pub(crate) fn as_i32(&self) -> Option<&[i32]> {
        match self {
            CpuStorage::I32(v) => Some(v),
            _ => None,
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

impl Storage {
    /// The host storage, when the tensor is on the CPU.
    pub(crate) fn as_cpu(&self) -> Option<&CpuStorage> {
        match self {
            Storage::Cpu(s) => Some(s),
            // Unreachable in a CPU-only build; the one place that says so.
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The host storage, mutably, when the tensor is on the CPU.
    pub(crate) fn as_cpu_mut(&mut self) -> Option<&mut CpuStorage> {
        match self {
            Storage::Cpu(s) => Some(s),
            #[allow(unreachable_patterns)]
            _ => None,
        }
    }

    /// The device and buffer, when the tensor is on a CUDA GPU.
    #[cfg(feature = "cuda")]
    pub(crate) fn as_cuda(&self) -> Option<(&Arc<CudaDevice>, &CudaBuffer)> {
        match self {
            Storage::Cuda { dev, buf } => Some((dev, buf)),
            _ => None,
        }
    }

    /// The device and buffer, when the tensor is on a wgpu adapter.
    #[cfg(feature = "wgpu")]
    pub(crate) fn as_wgpu(&self) -> Option<(&Arc<WgpuDevice>, &WgpuBuffer)> {
        match self {
            Storage::Wgpu { dev, buf } => Some((dev, buf)),
            _ => None,
        }
    }
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

/// The elements of `shape`. A shape is valid when the product of its non-zero dimensions
/// fits in usize (whatever their order), so every partial product of a valid shape does too;
/// a zero dimension makes it empty.
fn elem_count(shape: &[usize]) -> Result<usize> {
    let nonzero = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("shape {shape:?} has more elements than fit in usize")))?;
    Ok(if shape.contains(&0) { 0 } else { nonzero })
}

fn byte_count(shape: &[usize], dtype: DType) -> Result<usize> {
    elem_count(shape)?
        .checked_mul(dtype.size_in_bytes())
        .ok_or_else(|| Error::Shape(format!("shape {shape:?} has more bytes than fit in usize")))
}

impl Tensor {
    /// A tensor holding `data` (row-major) with `shape`, on `device`: floats, or integers
    /// (`u32` ids and positions, `i32` targets).
    /// `Err(Shape)` when the shape's element count is not `data.len()`.
    pub fn from_slice<T: Scalar>(data: &[T], shape: &[usize], device: &Device) -> Result<Tensor> {
        let n = elem_count(shape)?;
        if n != data.len() {
            return Err(Error::Shape(format!("shape {shape:?} holds {n} elements but {} were given", data.len())));
        }
        Self::from_host(CpuStorage::from_bytes(T::DTYPE, bytemuck::cast_slice(data))?, shape, T::DTYPE, device)
    }

    /// A tensor of float `dtype` from f32 values, each rounded to the nearest representable
    /// value. `Err(DType)` for an integer dtype (use [`Tensor::from_slice`]).
    pub fn from_f32(data: &[f32], shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let n = elem_count(shape)?;
        if n != data.len() {
            return Err(Error::Shape(format!("shape {shape:?} holds {n} elements but {} were given", data.len())));
        }
        Self::from_host(CpuStorage::from_f32(dtype, data)?, shape, dtype, device)
    }

    /// A tensor of `dtype` from its little-endian bytes; `Err(Shape)` unless their count is
    /// what `shape` holds.
    pub(crate) fn from_le_bytes(bytes: &[u8], shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let want = byte_count(shape, dtype)?;
        if bytes.len() != want {
            return Err(Error::Shape(format!(
                "{} bytes given for a {dtype} tensor of shape {shape:?}, which takes {want}",
                bytes.len()
            )));
        }
        Self::from_host(CpuStorage::from_bytes(dtype, bytes)?, shape, dtype, device)
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
        // Checked for every device, so a size past usize fails the same way everywhere.
        let bytes = byte_count(shape, dtype)?;
        #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
        let _ = bytes;
        let storage = match device.backend()? {
            Backend::Cpu => Storage::Cpu(make_host()?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => {
                let mut buf = dev.alloc(bytes)?;
                dev.write(&mut buf, make_host()?.as_bytes())?;
                Storage::Cuda { dev, buf }
            }
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(dev) => {
                let buf = dev.alloc(bytes)?;
                dev.write(&buf, make_host()?.as_bytes())?;
                Storage::Wgpu { dev, buf }
            }
        };
        Ok(Tensor { storage: Arc::new(storage), shape: shape.to_vec(), dtype, device: *device })
    }

    /// A tensor of zeros, of any dtype.
    pub fn zeros(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        Self::full(shape, 0.0, dtype, device)
    }

    /// A tensor with every element `value`: rounded to a float `dtype`; for an integer dtype
    /// `value` must be a whole number in its range (`Err(InvalidArgument)` otherwise).
    pub fn full(shape: &[usize], value: f32, dtype: DType, device: &Device) -> Result<Tensor> {
        let n = elem_count(shape)?;
        Self::materialize(shape, dtype, device, || CpuStorage::constant(dtype, n, value))
    }

    /// Uniform values in `[low, high)` from `seed`. Element `i` depends only on `seed` and `i`,
    /// so the same call gives the same values on every device. Float dtypes only.
    pub fn rand(shape: &[usize], low: f32, high: f32, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
        if !dtype.is_float() {
            return Err(not_float("rand"));
        }
        if !(low.is_finite() && high.is_finite() && low <= high) {
            return Err(Error::InvalidArgument(format!("rand range [{low}, {high}) is not a finite interval")));
        }
        let n = elem_count(shape)?;
        Self::materialize(shape, dtype, device, || {
            CpuStorage::filled(dtype, n, |i| low + (high - low) * unit_uniform(seed, 2 * i as u64))
        })
    }

    /// Normal values with `mean` and `std` from `seed` (Box-Muller over the same counter-based
    /// generator as [`Tensor::rand`]): the same values on every device. Float dtypes only.
    pub fn randn(shape: &[usize], mean: f32, std: f32, seed: u64, dtype: DType, device: &Device) -> Result<Tensor> {
        if !dtype.is_float() {
            return Err(not_float("randn"));
        }
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
        #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
        let _ = bytes;
        let storage = match device.backend()? {
            Backend::Cpu => Storage::Cpu(CpuStorage::alloc(dtype, elem_count(shape)?)?),
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => {
                let buf = dev.alloc(bytes)?;
                Storage::Cuda { dev, buf }
            }
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(dev) => {
                let buf = dev.alloc(bytes)?;
                Storage::Wgpu { dev, buf }
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
    /// [`Tensor::to_vec_f32`] to convert floats).
    pub fn to_vec<T: Scalar>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType(format!(
                "to_vec::<{}> on a {} tensor; use to_vec_f32 or to_dtype first",
                T::DTYPE,
                self.dtype
            )));
        }
        Ok(bytemuck::pod_collect_to_vec(&self.to_bytes()?))
    }

    /// The elements converted to f32 (exact for every float dtype). `Err(DType)` for an
    /// integer tensor, which f32 cannot hold exactly past 2²⁴: read it with `to_vec::<u32>()`
    /// or `to_vec::<i32>()`.
    pub fn to_vec_f32(&self) -> Result<Vec<f32>> {
        if !self.dtype.is_float() {
            return Err(not_float("to_vec_f32"));
        }
        match self.storage().as_cpu() {
            Some(s) => s.to_f32_vec(),
            None => CpuStorage::from_bytes(self.dtype, &self.to_bytes()?)?.to_f32_vec(),
        }
    }

    /// A copy on `device` (this tensor when it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        if *device == self.device {
            return Ok(self.clone());
        }
        let host = match self.storage().as_cpu() {
            Some(s) => CpuStorage::from_bytes(self.dtype, s.as_bytes())?,
            None => CpuStorage::from_bytes(self.dtype, &self.to_bytes()?)?,
        };
        Self::from_host(host, &self.shape, self.dtype, device)
    }

    /// A copy in new storage on the same device (a device-to-device copy on GPUs).
    pub fn copy(&self) -> Result<Tensor> {
        let bytes = self.size_in_bytes();
        let storage = match self.storage() {
            Storage::Cpu(s) => Storage::Cpu(CpuStorage::from_bytes(self.dtype, &s.as_bytes()[..bytes])?),
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
        let mismatch = || Error::DeviceMismatch("write_region: tensors on different backends".into());
        match self.storage_mut()? {
            Storage::Cpu(d) => {
                let s = src_storage.as_cpu().ok_or_else(mismatch)?;
                d.as_bytes_mut()[dst_off..dst_off + bytes].copy_from_slice(&s.as_bytes()[src_off..src_off + bytes]);
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Storage::Cuda { dev, buf } => {
                let (_, sb) = src_storage.as_cuda().ok_or_else(mismatch)?;
                dev.copy_region(sb, src_off, buf, dst_off, bytes)
            }
            #[cfg(feature = "wgpu")]
            Storage::Wgpu { dev, buf } => {
                let (_, sb) = src_storage.as_wgpu().ok_or_else(mismatch)?;
                dev.copy_region(sb, src_off, buf, dst_off, bytes)
            }
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
    /// The wgpu buffer behind a tensor on a wgpu device.
    pub(crate) fn wgpu_buffer(&self) -> Result<&::wgpu::Buffer> {
        match self.storage() {
            Storage::Wgpu { buf, .. } => Ok(buf.get()),
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
            _ => Err(Error::DeviceMismatch(format!("expected a CUDA tensor, found one on {}", self.device))),
        }
    }

    /// The CUDA buffer behind a tensor on a CUDA device.
    pub(crate) fn cuda_buffer(&self) -> Result<&cudarc::driver::CudaSlice<u8>> {
        match self.storage() {
            Storage::Cuda { buf, .. } => Ok(buf.get()),
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
        match device.backend()? {
            Backend::Cpu => Ok(RawBuffer::Cpu(bytes)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => {
                let mut buf = dev.alloc(bytes.len())?;
                dev.write(&mut buf, &bytes)?;
                Ok(RawBuffer::Cuda { dev, buf, len: bytes.len() })
            }
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(dev) => {
                let buf = dev.alloc(bytes.len())?;
                dev.write(&buf, &bytes)?;
                Ok(RawBuffer::Wgpu { dev, buf, len: bytes.len() })
            }
        }
    }

    /// The bytes, when they are on the CPU.
    pub(crate) fn as_cpu(&self) -> Option<&[u8]> {
        match self {
            RawBuffer::Cpu(v) => Some(v),
            // Unreachable in a CPU-only build.
            #[allow(unreachable_patterns)]
            _ => None,
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

    /// The pooled buffer, when the bytes are on a CUDA GPU.
    #[cfg(feature = "cuda")]
    pub(crate) fn as_cuda(&self) -> Option<&CudaBuffer> {
        match self {
            RawBuffer::Cuda { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// The pooled buffer, when the bytes are on a wgpu adapter.
    #[cfg(feature = "wgpu")]
    pub(crate) fn as_wgpu(&self) -> Option<&WgpuBuffer> {
        match self {
            RawBuffer::Wgpu { buf, .. } => Some(buf),
            _ => None,
        }
    }

    /// The CUDA buffer behind raw bytes on a CUDA device.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda_slice(&self) -> Result<&cudarc::driver::CudaSlice<u8>> {
        match self {
            RawBuffer::Cuda { buf, .. } => Ok(buf.get()),
            _ => Err(Error::DeviceMismatch("expected bytes on a CUDA device".into())),
        }
    }

    /// The wgpu buffer behind raw bytes on a wgpu device.
    #[cfg(feature = "wgpu")]
    pub(crate) fn wgpu_buffer(&self) -> Result<&::wgpu::Buffer> {
        match self {
            RawBuffer::Wgpu { buf, .. } => Ok(buf.get()),
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
