//! CUDA backend: one context and one stream per GPU, kernels compiled by NVRTC at first use
//! for the GPU's own architecture and cached in memory and on disk, pooled device buffers.
//!
//! cudarc loads libcuda and libnvrtc at run time; it panics when they are missing, so every
//! entry point checks for the library first and returns an error instead.

use super::pool::{Pool, Pooled};
use super::{Device, DeviceInfo, DeviceKind};
use crate::{Error, Result};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DriverError, result as dres, sys as dsys,
};
use cudarc::nvrtc::{Ptx, sys as nsys};
use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

/// A CUDA C++ source file from `kernels/`, embedded in the crate.
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File stem, e.g. `matmul`.
    pub name: &'static str,
    pub source: &'static str,
    /// Whether it uses Hopper-only instructions (`wgmma`) and so must also build for `sm_90a`.
    pub needs_sm90a: bool,
}

/// Every CUDA source of the crate; the compile check builds each of them for each real arch.
pub const KERNELS: &[KernelSource] = &[
    crate::ops::matmul::cuda::SOURCE,
    crate::ops::elementwise::cuda::SOURCE,
    crate::ops::quant::cuda::SOURCE,
    crate::ops::optim::cuda::SOURCE,
    crate::ops::lora::cuda::SOURCE,
    crate::ops::attention::cuda::SOURCE,
];

fn driver_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { dsys::is_culib_present() }
}

/// Whether libnvrtc can be loaded (needed to compile kernels).
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { nsys::is_culib_present() }
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

/// `sm_XY` for a compute capability; Hopper gets `sm_90a` so its kernels may use `wgmma`.
pub fn arch_for((major, minor): (u32, u32)) -> String {
    if (major, minor) == (9, 0) { "sm_90a".to_string() } else { format!("sm_{major}{minor}") }
}

fn nvrtc_err(what: &str, r: nsys::nvrtcResult) -> Error {
    Error::Cuda(format!("NVRTC {what}: {r:?}"))
}

fn check(what: &str, r: nsys::nvrtcResult) -> Result<()> {
    if r == nsys::nvrtcResult::NVRTC_SUCCESS { Ok(()) } else { Err(nvrtc_err(what, r)) }
}

fn require_nvrtc() -> Result<()> {
    if nvrtc_present() {
        Ok(())
    } else {
        Err(Error::Unsupported(
            "libnvrtc could not be loaded: install the CUDA toolkit's NVRTC (or the \
             nvidia-cuda-nvrtc wheel) and put its lib folder on LD_LIBRARY_PATH"
                .to_string(),
        ))
    }
}

/// NVRTC's version (major, minor).
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    let (mut a, mut b): (c_int, c_int) = (0, 0);
    // SAFETY: two out-pointers to live ints.
    check("version", unsafe { nsys::nvrtcVersion(&mut a, &mut b) })?;
    Ok((a, b))
}

/// The real architectures (as 80, 90, ...) this NVRTC compiles for.
pub fn supported_archs() -> Result<Vec<u32>> {
    require_nvrtc()?;
    let mut n: c_int = 0;
    // SAFETY: out-pointers sized from NVRTC's own count.
    check("arch count", unsafe { nsys::nvrtcGetNumSupportedArchs(&mut n) })?;
    let mut archs = vec![0 as c_int; n.max(0) as usize];
    check("arch list", unsafe { nsys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) })?;
    Ok(archs.into_iter().map(|a| a as u32).collect())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ImageKind {
    Cubin,
    Ptx,
}

/// What NVRTC produced for one source and target.
#[derive(Debug, Clone)]
pub struct Compiled {
    /// CUBIN for a real arch (`sm_XY`), PTX text for a virtual one (`compute_XY`).
    pub image: Vec<u8>,
    /// NVRTC's log, including ptxas' register, shared-memory and spill report.
    pub log: String,
    kind: ImageKind,
}

fn options_for(target: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={target}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        "--define-macro=KILN_NVRTC=1".to_string(),
    ]
}

/// Compiles one kernel source for `target` (`sm_80`, `sm_90`, `sm_90a`, or a virtual
/// `compute_XY`). A failure carries NVRTC's log. Needs libnvrtc, not a GPU.
pub fn compile(source: &KernelSource, target: &str) -> Result<Compiled> {
    require_nvrtc()?;
    let options = options_for(target);
    let to_err =
        |log: String| Error::Compile { kernel: format!("kernels/{}.cu", source.name), target: target.to_string(), log };
    let src = CString::new(source.source).map_err(|_| to_err("source contains a NUL byte".into()))?;
    let name = CString::new(format!("{}.cu", source.name)).map_err(|_| to_err("bad name".into()))?;
    let c_opts = options
        .iter()
        .map(|o| CString::new(o.as_str()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| to_err("an option contains a NUL byte".into()))?;
    let c_ptrs: Vec<*const c_char> = c_opts.iter().map(|o| o.as_ptr()).collect();
    let mut prog: nsys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all pointers point into CStrings that outlive the program.
    unsafe {
        check(
            "create program",
            nsys::nvrtcCreateProgram(&mut prog, src.as_ptr(), name.as_ptr(), 0, std::ptr::null(), std::ptr::null()),
        )?;
        let status = nsys::nvrtcCompileProgram(prog, c_ptrs.len() as c_int, c_ptrs.as_ptr());
        let log = program_log(prog);
        let result = if status != nsys::nvrtcResult::NVRTC_SUCCESS {
            Err(to_err(log.unwrap_or_else(|e| e.to_string())))
        } else {
            let kind = if target.starts_with("sm_") { ImageKind::Cubin } else { ImageKind::Ptx };
            image(prog, kind).map(|image| Compiled { image, log: log.unwrap_or_default(), kind })
        };
        nsys::nvrtcDestroyProgram(&mut prog);
        result
    }
}

unsafe fn program_log(prog: nsys::nvrtcProgram) -> Result<String> {
    let mut size = 0usize;
    check("log size", unsafe { nsys::nvrtcGetProgramLogSize(prog, &mut size) })?;
    let mut buf = vec![0 as c_char; size.max(1)];
    check("log", unsafe { nsys::nvrtcGetProgramLog(prog, buf.as_mut_ptr()) })?;
    // SAFETY: NVRTC writes a NUL-terminated string of `size` bytes.
    Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned())
}

unsafe fn image(prog: nsys::nvrtcProgram, kind: ImageKind) -> Result<Vec<u8>> {
    let mut size = 0usize;
    let mut buf;
    unsafe {
        match kind {
            ImageKind::Cubin => {
                check("cubin size", nsys::nvrtcGetCUBINSize(prog, &mut size))?;
                buf = vec![0u8; size];
                check("cubin", nsys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char))?;
            }
            ImageKind::Ptx => {
                check("ptx size", nsys::nvrtcGetPTXSize(prog, &mut size))?;
                buf = vec![0u8; size];
                check("ptx", nsys::nvrtcGetPTX(prog, buf.as_mut_ptr() as *mut c_char))?;
            }
        }
    }
    Ok(buf)
}

/// FNV-1a over 128 bits: a stable content hash for cache file names.
fn fnv1a128(parts: &[&[u8]]) -> u128 {
    let mut h: u128 = 0x6c62272e07bb014262b821756295c58d;
    for part in parts {
        for &b in part.iter().chain(&[0xFFu8]) {
            h ^= b as u128;
            h = h.wrapping_mul(0x0000000001000000000000000000013B);
        }
    }
    h
}

/// Where compiled kernels are kept: `$KILN_CACHE_DIR`, else `$XDG_CACHE_HOME/kiln`, else
/// `~/.cache/kiln`.
fn cache_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
        return Some(PathBuf::from(d));
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(d).join("kiln"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("kiln"))
}

/// [`compile`] behind the disk cache, keyed by a hash of the source, the options, the
/// target and NVRTC's version. The cache is an optimisation: a failure to read or write it
/// only means compiling again.
fn compile_cached(source: &KernelSource, target: &str) -> Result<Compiled> {
    let (vmaj, vmin) = nvrtc_version()?;
    let options = options_for(target).join(" ");
    let version = format!("{vmaj}.{vmin}");
    let key = fnv1a128(&[source.source.as_bytes(), options.as_bytes(), target.as_bytes(), version.as_bytes()]);
    let kind = if target.starts_with("sm_") { ImageKind::Cubin } else { ImageKind::Ptx };
    let ext = if kind == ImageKind::Cubin { "cubin" } else { "ptx" };
    let path = cache_dir().map(|d| d.join(format!("{}-{target}-{key:032x}.{ext}", source.name)));
    if let Some(path) = &path {
        if let Ok(image) = std::fs::read(path) {
            if !image.is_empty() {
                return Ok(Compiled { image, log: String::new(), kind });
            }
        }
    }
    let compiled = compile(source, target)?;
    if let Some(path) = &path {
        let _ = crate::fs::write_atomically(path, &compiled.image);
    }
    Ok(compiled)
}
