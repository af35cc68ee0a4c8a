//! NVRTC: compiling the kernel programs for a GPU's architecture, with a disk cache keyed by
//! content hash. Needs libnvrtc, not a GPU, so the compile check runs anywhere.

use crate::kernels::KernelSource;
use crate::{Error, Result};
use cudarc::nvrtc::sys as nsys;
use std::ffi::{CStr, CString, c_char, c_int};
use std::path::PathBuf;

/// Whether libnvrtc can be loaded (needed to compile kernels).
pub fn nvrtc_present() -> bool {
    // SAFETY: only probes whether the shared library can be opened.
    unsafe { nsys::is_culib_present() }
}

/// `sm_XY`, the real architecture of a compute capability: the arch the compile check builds
/// for is the one that runs.
pub fn arch_for((major, minor): (u32, u32)) -> String {
    format!("sm_{major}{minor}")
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
pub(super) enum ImageKind {
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
    pub(super) kind: ImageKind,
}

fn options_for(target: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={target}"),
        "--std=c++17".to_string(),
        "--ptxas-options=-v".to_string(),
        "--define-macro=KILN_NVRTC=1".to_string(),
    ]
}

/// Compiles one kernel program for `target` (`sm_80`, `sm_90`, or a virtual
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
pub(super) fn compile_cached(source: &KernelSource, target: &str) -> Result<Compiled> {
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
        let _ = crate::fs::write_file(path, &compiled.image);
    }
    Ok(compiled)
}
