//! kiln: a small tensor runtime with hand-written kernels for adapting pre-trained
//! transformers, on the CPU (rayon, the reference), CUDA (NVRTC-compiled CUDA C++ with
//! inline PTX) and WGSL (wgpu).
//!
//! ```no_run
//! use kiln::{Device, DType, Tensor, ops};
//! # fn main() -> kiln::Result<()> {
//! let device = Device::best();
//! let a = Tensor::randn(&[256, 512], 0.0, 1.0, 1, DType::BF16, &device)?;
//! let w = Tensor::randn(&[128, 512], 0.0, 0.02, 2, DType::BF16, &device)?;
//! // y = a · wᵀ with f32 output, accumulated in f32.
//! let y = ops::matmul_with(&a, &w, ops::MatmulOptions::nt().out_dtype(DType::F32))?;
//! let host: Vec<f32> = y.to_vec()?;
//! # Ok(()) }
//! ```
//!
//! Every op runs on every backend; a missing kernel is an [`Error::Unsupported`], never a
//! silent copy to the CPU. Bad input is an `Err`, never a panic.

mod device;
mod dtype;
mod error;
mod fs;
pub mod ops;
mod tensor;

pub use device::{Device, DeviceInfo, DeviceKind, set_poison_outputs};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use tensor::Tensor;

/// NVRTC access for tools: the embedded kernel sources and a compiler entry point, used by
/// the compile check that builds every kernel for every supported architecture.
#[cfg(feature = "cuda")]
pub mod cuda {
    pub use crate::device::cuda::{
        Compiled, KERNELS, KernelSource, arch_for, compile, nvrtc_present, nvrtc_version, supported_archs,
    };
}
