//! kiln: a small tensor runtime with hand-written kernels for adapting pre-trained
//! transformers, on the CPU (rayon, the reference), CUDA (NVRTC-compiled CUDA C++ with
//! inline PTX) and WGSL (wgpu).
//!
//! ```no_run
//! use kiln::{DType, Device, Tensor, ops};
//! # fn main() -> kiln::Result<()> {
//! let device = Device::best(); // CUDA GPU > discrete/integrated wgpu GPU > CPU
//! for d in Device::all() {
//!     println!("{d}: {}", d.info()?.name);
//! }
//! // Seeded values are a function of (seed, index): the same on every device.
//! let x = Tensor::randn(&[512, 4096], 0.0, 1.0, 1, DType::BF16, &device)?;
//! let w = Tensor::randn(&[1024, 4096], 0.0, 0.02, 2, DType::BF16, &device)?;
//! // y = x · wᵀ, accumulated in f32, written as f32.
//! let y = ops::matmul_with(&x, &w, ops::MatmulOptions::nt().out_dtype(DType::F32))?;
//! // Backward of that layer: dx = dy · w, dw = dyᵀ · x.
//! let dx = ops::matmul(&y.to_dtype(DType::BF16)?, &w)?;
//! let dw = ops::matmul_with(&y, &x.to_dtype(DType::F32)?, ops::MatmulOptions::tn())?;
//! assert_eq!((dx.shape(), dw.shape()), (&[512, 4096][..], &[1024, 4096][..]));
//! let host: Vec<f32> = ops::sum_rows(&y)?.to_vec()?;
//! let on_cpu = y.to_device(&Device::Cpu)?;
//! # let _ = (host, on_cpu);
//!
//! // A frozen 4-bit base: forward and the input gradient without dequantizing W whole.
//! let w4 = ops::QTensor::quantize(&w, ops::QuantFormat::Nf4DoubleQuant)?;
//! let y4 = ops::qmatmul(&x, &w4)?; // [512, 1024]
//! let dx4 = ops::qmatmul_input_grad(&y4, &w4)?; // [512, 4096]
//!
//! // A fused AdamW step with f32 master weights and a bf16 working copy.
//! let mut w_bf16 = w.clone();
//! let mut opt = kiln::train::AdamW::new(&[("proj", &w)], ops::optim::AdamWHyper::default())?;
//! let grad = Tensor::randn(&[1024, 4096], 0.0, 1e-3, 3, DType::BF16, &device)?;
//! let report = opt.step(&[&grad], &mut [&mut w_bf16])?;
//! opt.save(std::env::temp_dir().join("opt.safetensors"))?;
//! # let _ = (dx4, report);
//! # Ok(()) }
//! ```
//!
//! Every op runs on every backend; a missing kernel is an [`Error::Unsupported`], never a
//! silent copy to the CPU. Bad input is an `Err`, never a panic.

mod device;
mod dtype;
mod error;
mod fs;
pub mod io;
mod kernels;
pub mod model;
pub mod ops;
mod tensor;
pub mod train;

pub use device::{Device, DeviceInfo, DeviceKind, set_poison_outputs};
pub use dtype::{DType, Element, Scalar};
pub use error::{Error, Result};
pub use io::{GgufFile, GgufTensor, GgufValue};
pub use tensor::Tensor;

/// NVRTC access for tools: the embedded kernel sources and a compiler entry point, used by
/// the compile check that builds every kernel for every supported architecture.
#[cfg(feature = "cuda")]
pub mod cuda {
    pub use crate::device::cuda::{Compiled, arch_for, compile, nvrtc_present, nvrtc_version, supported_archs};
    pub use crate::kernels::KernelSource;
    pub use crate::kernels::cuda::ALL as KERNELS;
}
