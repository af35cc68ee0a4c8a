//! Ops, one folder per family: `mod.rs` holds the public function with its contract and the
//! CPU implementation; `cuda.rs` and `wgpu.rs` hold the launchers of the GPU kernels.

pub mod attention;
pub mod elementwise;
pub(crate) mod hash;
pub mod lora;
pub mod matmul;
pub mod optim;
pub mod quant;

pub use elementwise::{add, add_bias, cast, dropout, mul, scale, sum_rows};
pub use matmul::{MatmulOptions, matmul, matmul_with};
pub use quant::{QMatmulOptions, QTensor, QuantFormat, qmatmul, qmatmul_input_grad, qmatmul_with};

use crate::{Error, Result, Tensor};

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

/// Dot product with eight independent partial sums, so it vectorises.
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
