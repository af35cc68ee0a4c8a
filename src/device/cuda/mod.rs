//! CUDA backend: one context and one stream per GPU, kernels compiled by NVRTC at first use
//! for the GPU's own architecture and cached in memory and on disk (`nvrtc.rs`), pooled
//! device buffers, and the helpers every launcher uses (`launch.rs`).
//!
//! cudarc loads libcuda and libnvrtc at run time; it panics when they are missing, so every
//! entry point checks for the library first and returns an error instead.

pub(crate) mod launch;
mod nvrtc;

pub use nvrtc::{Compiled, arch_for, compile, nvrtc_present, nvrtc_version, supported_archs};

use super::pool::{Pool, Pooled};
use super::{Device, DeviceInfo, DeviceKind};
use crate::kernels::KernelSource;
use crate::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError, result as dres, sys as dsys,
};
use cudarc::nvrtc::Ptx;
use nvrtc::{ImageKind, compile_cached};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { dsys::is_culib_present() }
}

/// Number of CUDA GPUs; 0 when there is no driver or it reports an error.
pub(crate) fn device_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT.get_or_init(|| {
        if !driver_present() {
            return 0;
        }
        CudaContext::device_count().map(|n| n.max(0) as usize).unwrap_or(0)
    })
}

fn driver_err(what: &str, e: DriverError) -> Error {
    if e.0 == dsys::CUresult::CUDA_ERROR_OUT_OF_MEMORY {
        Error::OutOfMemory(format!("{what}: {e:?}"))
    } else {
        Error::Cuda(format!("{what}: {e:?}"))
    }
}

pub(crate) type CudaBuffer = Pooled<CudaSlice<u8>>;

/// One GPU: its context, the stream all kiln work is queued on, loaded modules and buffers.
pub(crate) struct CudaDevice {
    ordinal: usize,
    ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    /// Compute capability (major, minor).
    pub(crate) cc: (u32, u32),
    modules: Mutex<HashMap<&'static str, Arc<CudaModule>>>,
    pool: Arc<Pool<CudaSlice<u8>>>,
}

impl CudaDevice {
    /// The device with this ordinal, created at first use.
    pub(crate) fn get(ordinal: usize) -> Result<Arc<CudaDevice>> {
        static DEVICES: OnceLock<Mutex<HashMap<usize, Arc<CudaDevice>>>> = OnceLock::new();
        let n = device_count();
        if ordinal >= n {
            return Err(Error::NoDevice(format!("cuda:{ordinal} requested, {n} CUDA device(s) present")));
        }
        let map = DEVICES.get_or_init(Default::default);
        let mut map = map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = map.get(&ordinal) {
            return Ok(d.clone());
        }
        let ctx = CudaContext::new(ordinal).map_err(|e| driver_err("creating context", e))?;
        let (major, minor) = ctx.compute_capability().map_err(|e| driver_err("compute capability", e))?;
        let total = ctx.total_mem().map_err(|e| driver_err("total memory", e))?;
        let stream = ctx.default_stream();
        let dev = Arc::new(CudaDevice {
            ordinal,
            ctx,
            stream,
            cc: (major as u32, minor as u32),
            modules: Mutex::new(HashMap::new()),
            pool: Pool::new(total / 4),
        });
        map.insert(ordinal, dev.clone());
        Ok(dev)
    }

    pub(crate) fn info(&self) -> Result<DeviceInfo> {
        let name = self.ctx.name().map_err(|e| driver_err("device name", e))?;
        let total = self.ctx.total_mem().map_err(|e| driver_err("total memory", e))?;
        let attr = |a| self.ctx.attribute(a).map(|v| v.to_string()).unwrap_or_default();
        use dsys::CUdevice_attribute as A;
        let details = vec![
            ("arch".to_string(), arch_for(self.cc)),
            ("SMs".to_string(), attr(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)),
            (
                "shared memory per block (opt-in)".to_string(),
                attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN),
            ),
            ("nvrtc".to_string(), nvrtc_version().map(|(a, b)| format!("{a}.{b}")).unwrap_or_default()),
        ];
        Ok(DeviceInfo {
            device: Device::Cuda(self.ordinal),
            kind: DeviceKind::CudaGpu,
            name,
            memory_bytes: Some(total as u64),
            compute_capability: Some(self.cc),
            details,
        })
    }

    /// A device buffer of at least `bytes` bytes, from the pool when one is idle.
    /// Filled with 0xFF when output poisoning is on.
    pub(crate) fn alloc(&self, bytes: usize) -> Result<CudaBuffer> {
        let bucket = Pool::<CudaSlice<u8>>::bucket(bytes);
        let slice = match self.pool.take(bucket) {
            Some(s) => s,
            None => {
                // SAFETY: the bytes are uninitialised; every op writes its whole output
                // (the poisoning tests check it), and uploads fill what they allocate.
                match unsafe { self.stream.alloc::<u8>(bucket) } {
                    Ok(s) => s,
                    Err(_) => {
                        // Idle pooled buffers may be what fills the memory: free and retry once.
                        self.pool.clear();
                        unsafe { self.stream.alloc::<u8>(bucket) }.map_err(|e| {
                            driver_err(&format!("allocating {bucket} bytes on cuda:{}", self.ordinal), e)
                        })?
                    }
                }
            }
        };
        if super::poison_outputs() {
            let (ptr, _guard) = slice.device_ptr(&self.stream);
            // SAFETY: ptr covers `bucket` bytes of this slice; the stream orders the fill.
            unsafe { dres::memset_d8_async(ptr, 0xFF, bucket, self.stream.cu_stream()) }
                .map_err(|e| driver_err("poisoning a buffer", e))?;
        }
        Ok(Pooled::new(slice, bucket, self.pool.clone()))
    }

    /// The pool's `(live, peak)` bytes on loan.
    pub(crate) fn memory_usage(&self) -> (usize, usize) {
        self.pool.usage()
    }

    pub(crate) fn reset_peak_memory(&self) {
        self.pool.reset_peak()
    }

    /// Copies `bytes` to the start of `buf`, which holds at least that many.
    pub(crate) fn write(&self, buf: &mut CudaBuffer, bytes: &[u8]) -> Result<()> {
        if !bytes.is_empty() {
            let mut view = buf.get_mut().slice_mut(0..bytes.len());
            self.stream.memcpy_htod(bytes, &mut view).map_err(|e| driver_err("copying to the device", e))?;
        }
        Ok(())
    }

    /// Copies the first `bytes` bytes of `src` into `dst` on the device.
    pub(crate) fn copy(&self, src: &CudaBuffer, dst: &mut CudaBuffer, bytes: usize) -> Result<()> {
        if bytes > 0 {
            let mut view = dst.get_mut().slice_mut(0..bytes);
            self.stream
                .memcpy_dtod(&src.get().slice(0..bytes), &mut view)
                .map_err(|e| driver_err("device-to-device copy", e))?;
        }
        Ok(())
    }

    /// Copies `bytes` bytes of `src` from `src_off` into `dst` at `dst_off`, on the device.
    pub(crate) fn copy_region(
        &self,
        src: &CudaBuffer,
        src_off: usize,
        dst: &mut CudaBuffer,
        dst_off: usize,
        bytes: usize,
    ) -> Result<()> {
        let mut view = dst.get_mut().slice_mut(dst_off..dst_off + bytes);
        self.stream
            .memcpy_dtod(&src.get().slice(src_off..src_off + bytes), &mut view)
            .map_err(|e| driver_err("device-to-device copy", e))
    }

    pub(crate) fn download(&self, buf: &CudaBuffer, bytes: usize) -> Result<Vec<u8>> {
        if bytes == 0 {
            return Ok(Vec::new());
        }
        self.stream.clone_dtoh(&buf.get().slice(0..bytes)).map_err(|e| driver_err("copying from the device", e))
    }

    pub(crate) fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| driver_err("synchronize", e))
    }

    /// The kernel `name` from `source`, compiled for this GPU at first use.
    pub(crate) fn function(&self, source: &KernelSource, name: &str) -> Result<CudaFunction> {
        let module = {
            let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
            match modules.get(source.name) {
                Some(m) => m.clone(),
                None => {
                    let target = self.compile_target()?;
                    let compiled = compile_cached(source, &target)?;
                    let image = match compiled.kind {
                        ImageKind::Cubin => Ptx::from_binary(compiled.image),
                        ImageKind::Ptx => {
                            Ptx::from_src(String::from_utf8_lossy(&compiled.image).trim_end_matches('\0').to_string())
                        }
                    };
                    let m = self
                        .ctx
                        .load_module(image)
                        .map_err(|e| driver_err(&format!("loading module {}", source.name), e))?;
                    modules.insert(source.name, m.clone());
                    m
                }
            }
        };
        module.load_function(name).map_err(|e| driver_err(&format!("kernel {name} in {}", source.name), e))
    }

    /// The real arch of this GPU when this NVRTC knows it; otherwise PTX for the newest
    /// virtual arch it knows, which the driver compiles on load.
    fn compile_target(&self) -> Result<String> {
        let arch = arch_for(self.cc);
        let base: u32 = self.cc.0 * 10 + self.cc.1;
        let supported = supported_archs()?;
        if supported.contains(&base) {
            return Ok(arch);
        }
        let best = supported
            .iter()
            .copied()
            .filter(|a| *a <= base)
            .max()
            .ok_or_else(|| Error::Unsupported(format!("NVRTC supports no architecture at or below sm_{base}")))?;
        Ok(format!("compute_{best}"))
    }

    pub(crate) fn launch_err(name: &str, e: DriverError) -> Error {
        driver_err(&format!("launching {name}"), e)
    }
}
