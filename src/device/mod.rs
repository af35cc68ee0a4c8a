//! Devices: the CPU (always there), every CUDA GPU and every wgpu adapter.
//!
//! Device contexts are created at first use and live for the rest of the process; a
//! [`Device`] is a small copyable handle that names one of them.

pub(crate) mod cpu;
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) mod pool;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::{Error, Result};
use std::fmt;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The CPU keeps no buffer pool to count.
fn no_pool(device: &Device) -> crate::Error {
    crate::Error::Unsupported(format!("{device}: memory usage is counted by GPU buffer pools; the CPU has none"))
}

/// A device resolved to its backend: the CPU, or an opened GPU context. Matching on it needs
/// no arm for a backend that is not built.
pub(crate) enum Backend {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Arc<cuda::CudaDevice>),
    #[cfg(feature = "wgpu")]
    Wgpu(Arc<wgpu::WgpuDevice>),
}

/// `Err(NoDevice)` for a device whose backend was left out of the build.
#[cfg(not(all(feature = "cuda", feature = "wgpu")))]
fn not_built(device: Device, feature: &str) -> crate::Error {
    crate::Error::NoDevice(format!("{device}: kiln was built without the `{feature}` feature"))
}

#[cfg(feature = "cuda")]
fn cuda_backend(i: usize) -> Result<Backend> {
    Ok(Backend::Cuda(cuda::CudaDevice::get(i)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(i: usize) -> Result<Backend> {
    Err(not_built(Device::Cuda(i), "cuda"))
}

#[cfg(feature = "wgpu")]
fn wgpu_backend(i: usize) -> Result<Backend> {
    Ok(Backend::Wgpu(wgpu::WgpuDevice::get(i)?))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_backend(i: usize) -> Result<Backend> {
    Err(not_built(Device::Wgpu(i), "wgpu"))
}

/// Where a tensor lives and its ops run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Device {
    /// The host, with rayon. Every op's reference implementation.
    Cpu,
    /// A CUDA GPU, by driver ordinal.
    Cuda(usize),
    /// A wgpu adapter, by its index in the list [`Device::all`] enumerates (Vulkan, Metal, DX12).
    Wgpu(usize),
}

/// What kind of hardware a device is, for choosing among them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    /// A GPU driven through CUDA.
    CudaGpu,
    /// A discrete GPU behind wgpu.
    DiscreteGpu,
    /// An integrated GPU behind wgpu.
    IntegratedGpu,
    /// A GPU of unknown or virtual kind behind wgpu.
    OtherGpu,
    /// A software rasteriser such as Mesa's lavapipe: correct, but slower than the CPU backend.
    SoftwareAdapter,
}

/// Device memory held through a GPU's buffer pool, as [`Device::memory_usage`] reports it:
/// the bytes of every buffer on loan to a tensor or a quantized weight (sizes as the pool
/// rounds them), not the idle buffers the pool keeps for reuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryUsage {
    /// Bytes on loan now.
    pub live_bytes: usize,
    /// The most bytes on loan at once since the device was opened or
    /// [`Device::reset_peak_memory`] was last called.
    pub peak_bytes: usize,
}

impl From<(usize, usize)> for MemoryUsage {
    /// From a pool's `(live, peak)`.
    fn from((live_bytes, peak_bytes): (usize, usize)) -> Self {
        MemoryUsage { live_bytes, peak_bytes }
    }
}

/// What a device is, as [`Device::info`] reports it.
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    pub device: Device,
    pub kind: DeviceKind,
    pub name: String,
    /// Total memory in bytes, where the backend reports it.
    pub memory_bytes: Option<u64>,
    /// CUDA compute capability (major, minor).
    pub compute_capability: Option<(u32, u32)>,
    /// Backend-specific facts: driver, wgpu backend, limits, features such as f16 and subgroups.
    pub details: Vec<(String, String)>,
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
            Device::Wgpu(i) => write!(f, "wgpu:{i}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = Error;

    /// Parses `cpu`, `cuda`, `cuda:N`, `wgpu`, `wgpu:N` (as [`Device`]'s `Display` writes
    /// them). Whether the device exists is not checked here: [`Device::info`] tells.
    fn from_str(s: &str) -> Result<Device> {
        let bad = || Error::InvalidArgument(format!("unknown device {s:?}; write cpu, cuda:N or wgpu:N"));
        let index = |n: Option<&str>| n.map_or(Ok(0), |n| n.parse::<usize>().map_err(|_| bad()));
        let (kind, n) = match s.split_once(':') {
            Some((k, n)) => (k, Some(n)),
            None => (s, None),
        };
        match kind.to_ascii_lowercase().as_str() {
            "cpu" if n.is_none() => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(index(n)?)),
            "wgpu" => Ok(Device::Wgpu(index(n)?)),
            _ => Err(bad()),
        }
    }
}

impl Device {
    /// The CPU, every CUDA GPU and every wgpu adapter present, in that order.
    /// Never panics: a machine without a CUDA driver or Vulkan gives just the CPU.
    pub fn all() -> Vec<Device> {
        let mut all = vec![Device::Cpu];
        all.extend(Self::cuda_devices());
        all.extend(Self::wgpu_devices());
        all
    }

    /// Every CUDA GPU present; empty when there is no driver.
    pub fn cuda_devices() -> Vec<Device> {
        #[cfg(feature = "cuda")]
        {
            (0..cuda::device_count()).map(Device::Cuda).collect()
        }
        #[cfg(not(feature = "cuda"))]
        {
            Vec::new()
        }
    }

    /// Every wgpu adapter present (software ones included); empty when there is none.
    pub fn wgpu_devices() -> Vec<Device> {
        #[cfg(feature = "wgpu")]
        {
            (0..wgpu::adapter_count()).map(Device::Wgpu).collect()
        }
        #[cfg(not(feature = "wgpu"))]
        {
            Vec::new()
        }
    }

    /// The fastest kind present: a CUDA GPU, else a discrete, integrated or other GPU behind
    /// wgpu, else the CPU. Software adapters lose to the CPU backend and are never picked.
    pub fn best() -> Device {
        let rank = |kind: DeviceKind| match kind {
            DeviceKind::CudaGpu => 0,
            DeviceKind::DiscreteGpu => 1,
            DeviceKind::IntegratedGpu => 2,
            DeviceKind::OtherGpu => 3,
            DeviceKind::Cpu => 4,
            DeviceKind::SoftwareAdapter => 5,
        };
        Self::all()
            .into_iter()
            .filter_map(|d| d.info().ok().map(|i| (rank(i.kind), d)))
            .min_by_key(|(r, _)| *r)
            .map(|(_, d)| d)
            .unwrap_or(Device::Cpu)
    }

    /// The backend behind the device, its GPU context opened at first use.
    pub(crate) fn backend(&self) -> Result<Backend> {
        match *self {
            Device::Cpu => Ok(Backend::Cpu),
            Device::Cuda(i) => cuda_backend(i),
            Device::Wgpu(i) => wgpu_backend(i),
        }
    }

    /// Name, memory and capabilities of the device.
    pub fn info(&self) -> Result<DeviceInfo> {
        // A wgpu adapter describes itself without opening a device.
        #[cfg(feature = "wgpu")]
        if let Device::Wgpu(i) = *self {
            return wgpu::info(i);
        }
        match self.backend()? {
            Backend::Cpu => Ok(cpu::info()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => dev.info(),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(dev) => wgpu::info(dev.index),
        }
    }

    /// Whether this is a CPU device.
    pub fn is_cpu(&self) -> bool {
        matches!(self, Device::Cpu)
    }

    /// Live and peak bytes held through the device's buffer pool. `Err(Unsupported)` on the
    /// CPU, whose tensors come from the process heap.
    pub fn memory_usage(&self) -> Result<MemoryUsage> {
        match self.backend()? {
            Backend::Cpu => Err(no_pool(self)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => Ok(MemoryUsage::from(dev.memory_usage())),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(dev) => Ok(MemoryUsage::from(dev.memory_usage())),
        }
    }

    /// Starts a new peak for [`Device::memory_usage`] from the bytes on loan now.
    /// `Err(Unsupported)` on the CPU.
    pub fn reset_peak_memory(&self) -> Result<()> {
        match self.backend()? {
            Backend::Cpu => Err(no_pool(self)),
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => {
                dev.reset_peak_memory();
                Ok(())
            }
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(dev) => {
                dev.reset_peak_memory();
                Ok(())
            }
        }
    }

    /// Wait until all work queued on the device has finished. Timing code calls this.
    pub fn synchronize(&self) -> Result<()> {
        match self.backend()? {
            Backend::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Backend::Cuda(dev) => dev.synchronize(),
            #[cfg(feature = "wgpu")]
            Backend::Wgpu(dev) => dev.synchronize(),
        }
    }
}

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// When on, every output buffer an op allocates is filled with NaN bytes (0xFF) before the
/// kernel runs, so an element a kernel forgets to write shows up as NaN. Tests turn it on;
/// it costs a fill per allocation, so it is off by default.
pub fn set_poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::Relaxed);
}

pub(crate) fn poison_outputs() -> bool {
    POISON_OUTPUTS.load(Ordering::Relaxed)
}
