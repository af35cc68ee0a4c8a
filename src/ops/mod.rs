//! Ops, one folder per family: `mod.rs` holds the public function with its contract and the
//! CPU implementation; `cuda.rs` and `wgpu.rs` hold the launchers of the GPU kernels.

pub mod activation;
pub mod attention;
pub(crate) mod convert;
pub mod elementwise;
pub mod embedding;
pub(crate) mod hash;
pub mod lora;
pub mod loss;
pub mod matmul;
pub mod norm;
pub mod optim;
pub mod quant;
pub mod rope;
pub mod sampling;

pub use activation::{gelu, gelu_backward, swiglu, swiglu_backward};
pub use elementwise::{add, add_bias, cast, dropout, mul, scale, sum_rows};
pub use embedding::{embedding, embedding_backward, qembedding};
pub use loss::{cross_entropy, cross_entropy_with, linear_cross_entropy};
pub use matmul::{MatmulOptions, matmul, matmul_with};
pub use norm::{add_rms_norm, rms_norm, rms_norm_backward};
pub use quant::{QMatmulOptions, QTensor, QuantFormat, qmatmul, qmatmul_input_grad, qmatmul_with};
pub use rope::{RopeConfig, RopeLayout, RopeScaling, rope, rope_backward};
pub use sampling::{SamplingParams, argmax, sample};

#[cfg(feature = "cuda")]
use crate::device::cuda::{CudaBuffer, CudaDevice};
#[cfg(feature = "wgpu")]
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::tensor::{CpuStorage, Storage};
use crate::{Error, Result, Tensor};
#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::sync::Arc;

/// An op's operands, matched on their storage once: all on the CPU, or all on one GPU, with
/// that GPU's context and their buffers. A launcher takes `(device, buffers)`.
pub(crate) enum Operands<'a, const N: usize> {
    Cpu([&'a CpuStorage; N]),
    #[cfg(feature = "cuda")]
    Cuda(&'a Arc<CudaDevice>, [&'a CudaBuffer; N]),
    #[cfg(feature = "wgpu")]
    Wgpu(&'a Arc<WgpuDevice>, [&'a WgpuBuffer; N]),
}

/// The storage of `tensors`; `Err(DeviceMismatch)` naming `op` unless they share one device.
pub(crate) fn operands<'a, const N: usize>(op: &str, tensors: [&'a Tensor; N]) -> Result<Operands<'a, N>> {
    same_device(op, &tensors)?;
    let mismatch = || Error::DeviceMismatch(format!("{op}: operands on different backends"));
    let Some(first) = tensors.first() else {
        return Err(Error::InvalidArgument(format!("{op}: no operands")));
    };
    /// Each tensor's part, or None when one is on another backend.
    fn each<'a, T, const N: usize>(
        tensors: [&'a Tensor; N],
        part: impl Fn(&'a Storage) -> Option<T>,
    ) -> Option<[T; N]> {
        let parts: Vec<T> = tensors.iter().map(|t| part(t.storage())).collect::<Option<_>>()?;
        parts.try_into().ok()
    }
    match first.storage() {
        Storage::Cpu(_) => each(tensors, Storage::as_cpu).map(Operands::Cpu),
        #[cfg(feature = "cuda")]
        Storage::Cuda { dev, .. } => each(tensors, |s| s.as_cuda().map(|(_, b)| b)).map(|b| Operands::Cuda(dev, b)),
        #[cfg(feature = "wgpu")]
        Storage::Wgpu { dev, .. } => each(tensors, |s| s.as_wgpu().map(|(_, b)| b)).map(|b| Operands::Wgpu(dev, b)),
    }
    .ok_or_else(mismatch)
}

/// `Err(DType)` naming `op` when one of `tensors` holds integers: the float ops' first check.
pub(crate) fn floats(op: &str, tensors: &[&Tensor]) -> Result<()> {
    match tensors.iter().all(|t| t.dtype().is_float()) {
        true => Ok(()),
        false => Err(crate::tensor::not_float(op)),
    }
}

/// `Err(DeviceMismatch)` unless every tensor is on the same device.
pub(crate) fn same_device(op: &str, tensors: &[&Tensor]) -> Result<()> {
    if let Some(first) = tensors.first() {
        for t in &tensors[1..] {
            if t.device() != first.device() {
                return Err(Error::DeviceMismatch(format!(
                    "{op}: operands on {} and {}; move them with to_device first",
                    first.device(),
                    t.device()
                )));
            }
        }
    }
    Ok(())
}

/// A raw pointer that rayon tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
pub(crate) struct SharedMut<T>(pub(crate) *mut T);
// SAFETY: users write only disjoint regions, which the call sites document.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The pointer (a method, so closures capture the whole `Send` wrapper).
    pub(crate) fn ptr(self) -> *mut T {
        self.0
    }
}

/// A host vector of `len` elements that parallel tasks fill through [`Unfilled::ptr`] and
/// [`write_at`] before [`Unfilled::filled`] hands it over: an output the op writes in full
/// needs no zeroing pass first. The allocation is fallible, as `try_vec`'s.
pub(crate) struct Unfilled<T> {
    v: Vec<T>,
    len: usize,
}

impl<T: Copy> Unfilled<T> {
    pub(crate) fn new(len: usize) -> Result<Unfilled<T>> {
        let mut v = Vec::new();
        v.try_reserve_exact(len).map_err(|_| {
            Error::OutOfMemory(format!(
                "host allocation of {len} elements of {} bytes failed",
                std::mem::size_of::<T>()
            ))
        })?;
        Ok(Unfilled { v, len })
    }

    /// Where the elements go.
    pub(crate) fn ptr(&mut self) -> SharedMut<T> {
        SharedMut(self.v.as_mut_ptr())
    }

    /// The vector.
    ///
    /// # Safety
    /// Every element of `0..len` was written through [`Self::ptr`].
    pub(crate) unsafe fn filled(mut self) -> Vec<T> {
        // SAFETY: the capacity is len (reserved in new) and the caller wrote every element.
        unsafe { self.v.set_len(self.len) };
        self.v
    }
}

/// Copies `src` to elements `at..at + src.len()` of `dst`.
///
/// # Safety
/// The range lies within the allocation behind `dst`, and no other task touches it.
pub(crate) unsafe fn write_at<T: Copy>(dst: SharedMut<T>, at: usize, src: &[T]) {
    // SAFETY: the caller's contract; src is a separate live slice.
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst.ptr().add(at), src.len()) }
}

/// Dot product with eight independent partial sums, so it vectorises.
#[inline]
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut s = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (ca, cb) in ca.zip(cb) {
        for i in 0..8 {
            s[i] += ca[i] * cb[i];
        }
    }
    s.iter().sum::<f32>() + tail
}
