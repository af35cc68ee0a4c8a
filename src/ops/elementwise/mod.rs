//! Elementwise ops and a row-wise reduction: `add`, `mul`, `scale`, `add_bias`, `dropout`,
//! `sum_rows`, `cast`.
//!
//! Half-precision operands are widened to f32, combined, and rounded once on the way out.
//! Kernels: the CPU code here, `kernels/elementwise.cu`, `shaders/elementwise_*.wgsl`.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::hash::mix32;
use crate::ops::{Operands, operands};
use crate::tensor::{CpuStorage, StorageElement, try_collect, with_dtype, with_elems};
use crate::{DType, Element, Error, Result, Tensor};
use rayon::prelude::*;

/// Binary elementwise operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BinaryOp {
    Add,
    Mul,
}

impl BinaryOp {
    pub(crate) fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Mul => "mul",
        }
    }

    fn apply(self, x: f32, y: f32) -> f32 {
        match self {
            BinaryOp::Add => x + y,
            BinaryOp::Mul => x * y,
        }
    }
}

/// `a + b`, elementwise. Same shape, dtype and device; `Err(Shape | DType | DeviceMismatch)`
/// otherwise.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    crate::ops::floats("add", &[a, b])?;
    binary(BinaryOp::Add, a, b)
}

/// `a ⊙ b`, elementwise. Same contract as [`add`].
pub fn mul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    crate::ops::floats("mul", &[a, b])?;
    binary(BinaryOp::Mul, a, b)
}

fn binary(op: BinaryOp, a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let operands = operands(op.name(), [a, b])?;
    if a.shape() != b.shape() {
        return Err(Error::Shape(format!("{}: shapes {:?} and {:?} differ", op.name(), a.shape(), b.shape())));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DType(format!("{}: dtypes {} and {} differ", op.name(), a.dtype(), b.dtype())));
    }
    match operands {
        Operands::Cpu([x, y]) => {
            let differ = || Error::DType(format!("{}: dtypes differ", op.name()));
            let out = with_elems!(x, x => zip_map(x, StorageElement::slice_of(y).ok_or_else(differ)?, op)?);
            Ok(Tensor::from_cpu_storage(out, a.shape(), a.dtype()))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [x, y]) => cuda::binary(dev, op, a, x, y),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [x, y]) => wgpu::binary(dev, op, a, x, y),
    }
}

/// `op` elementwise over x and y.
fn zip_map<T: StorageElement>(x: &[T], y: &[T], op: BinaryOp) -> Result<CpuStorage> {
    let out =
        try_collect(x.par_iter().zip(y.par_iter()).map(|(&x, &y)| T::from_f32(op.apply(x.to_f32(), y.to_f32()))))?;
    Ok(T::into_storage(out))
}

/// `s · a`, elementwise, computed in f32. `Err(InvalidArgument)` when `s` is not finite.
pub fn scale(a: &Tensor, s: f32) -> Result<Tensor> {
    crate::ops::floats("scale", &[a])?;
    if !s.is_finite() {
        return Err(Error::InvalidArgument(format!("scale: factor {s} is not finite")));
    }
    match operands("scale", [a])? {
        Operands::Cpu([x]) => {
            let out = with_elems!(x, x => map(x, |v| v * s)?);
            Ok(Tensor::from_cpu_storage(out, a.shape(), a.dtype()))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [buf]) => cuda::scale(dev, a, buf, s),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [buf]) => wgpu::scale(dev, a, buf, s),
    }
}

fn map<T: StorageElement>(x: &[T], f: impl Fn(f32) -> f32 + Sync) -> Result<CpuStorage> {
    Ok(T::into_storage(try_collect(x.par_iter().map(|&v| T::from_f32(f(v.to_f32()))))?))
}

/// Sum over the last dimension, accumulated in f32: `[.., n]` → `[..]` (a rank-1 input
/// gives shape `[]`, one element). An empty row sums to 0. `Err(Shape)` for a rank-0 input.
pub fn sum_rows(a: &Tensor) -> Result<Tensor> {
    crate::ops::floats("sum_rows", &[a])?;
    let Some((&cols, lead)) = a.shape().split_last() else {
        return Err(Error::Shape("sum_rows needs at least one dimension, got a scalar".into()));
    };
    let rows: usize = lead.iter().product();
    let operands = operands("sum_rows", [a])?;
    if cols == 0 || rows == 0 {
        // Empty rows sum to 0; the output's size alone decides whether it can be had.
        return Tensor::zeros(lead, a.dtype(), &a.device());
    }
    match operands {
        Operands::Cpu([x]) => {
            let out = with_elems!(x, x => row_sums(x, rows, cols)?);
            Ok(Tensor::from_cpu_storage(out, lead, a.dtype()))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [buf]) => cuda::sum_rows(dev, a, buf, rows, cols),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [buf]) => wgpu::sum_rows(dev, a, buf, rows, cols),
    }
}

fn row_sums<T: StorageElement>(x: &[T], rows: usize, cols: usize) -> Result<CpuStorage> {
    let sums = try_collect(
        (0..rows).into_par_iter().map(|r| T::from_f32(x[r * cols..(r + 1) * cols].iter().map(|v| v.to_f32()).sum())),
    )?;
    Ok(T::into_storage(sums))
}

/// The elements converted to `dtype`, rounding to nearest even (f32 → f16 overflows to ±inf
/// as IEEE conversion does). Casting to the same dtype returns the tensor itself.
pub fn cast(a: &Tensor, dtype: DType) -> Result<Tensor> {
    crate::ops::floats("cast", &[a])?;
    if !dtype.is_float() {
        return Err(crate::tensor::not_float("cast"));
    }
    if a.dtype() == dtype {
        return Ok(a.clone());
    }
    match operands("cast", [a])? {
        Operands::Cpu([x]) => {
            // Through f32, which holds every f16 and bf16 value exactly: one rounding.
            let out = with_elems!(x, x => with_dtype!(dtype, U => U::into_storage(
                try_collect(x.par_iter().map(|v| U::from_f32(v.to_f32())))?
            )));
            Ok(Tensor::from_cpu_storage(out, a.shape(), dtype))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [buf]) => cuda::cast(dev, a, buf, dtype),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [buf]) => wgpu::cast(dev, a, buf, dtype),
    }
}

/// `x + bias` with `bias` `[n]` added to every row of `x` `[.., n]`, computed in f32. Same
/// dtype and device; `Err(Shape)` when `bias` is not `[n]` or x has no dimension.
pub fn add_bias(x: &Tensor, bias: &Tensor) -> Result<Tensor> {
    crate::ops::floats("add_bias", &[x, bias])?;
    let operands = operands("add_bias", [x, bias])?;
    let Some(&cols) = x.shape().last() else {
        return Err(Error::Shape("add_bias: x must be [.., n], got a rank-0 tensor".into()));
    };
    if bias.shape() != [cols] {
        return Err(Error::Shape(format!("add_bias: bias {:?} must be [{cols}] for x {:?}", bias.shape(), x.shape())));
    }
    if x.dtype() != bias.dtype() {
        return Err(Error::DType(format!("add_bias: x is {} but bias is {}", x.dtype(), bias.dtype())));
    }
    if x.elem_count() == 0 {
        return Tensor::empty(x.shape(), x.dtype(), &x.device());
    }
    match operands {
        Operands::Cpu([xs, bs]) => {
            let (xv, bv) = (xs.to_f32_vec()?, bs.to_f32_vec()?);
            let out = try_collect(xv.par_iter().enumerate().map(|(i, v)| v + bv[i % cols]))?;
            Ok(Tensor::from_cpu_storage(CpuStorage::from_f32_vec(x.dtype(), out)?, x.shape(), x.dtype()))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [buf, b]) => cuda::add_bias(dev, x, buf, b, cols),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [buf, b]) => wgpu::add_bias(dev, x, buf, b, cols),
    }
}

/// The dropout mask's key for a seed.
fn dropout_key(seed: u64) -> u32 {
    mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ 0x2545_f491))
}

/// Whether element `i` survives: murmur3's finaliser of (i · golden ratio) ^ key below the
/// threshold. The same on every backend (32-bit integer arithmetic).
fn keeps(key: u32, i: usize, threshold: u32) -> bool {
    mix32((i as u32).wrapping_mul(0x9e37_79b1) ^ key) < threshold
}

/// Inverted dropout: each element is zeroed with probability `p` and the rest scaled by
/// `1 / (1 − p)`, from a mask that depends only on `seed` and the element's index. The
/// same call on a gradient is dropout's backward (the same mask, the same scale). `p` in
/// [0, 1), else `Err(InvalidArgument)`; `p = 0` returns `x`.
pub fn dropout(x: &Tensor, p: f32, seed: u64) -> Result<Tensor> {
    crate::ops::floats("dropout", &[x])?;
    if !(0.0..1.0).contains(&p) {
        return Err(Error::InvalidArgument(format!("dropout probability must be in [0, 1), got {p}")));
    }
    if p == 0.0 || x.elem_count() == 0 {
        return Ok(x.clone());
    }
    let key = dropout_key(seed);
    let threshold = ((1.0 - p as f64) * 4294967296.0).min(u32::MAX as f64) as u32;
    let scale = 1.0 / (1.0 - p);
    match operands("dropout", [x])? {
        Operands::Cpu([xs]) => {
            let xv = xs.to_f32_vec()?;
            let out = try_collect(
                xv.par_iter().enumerate().map(|(i, v)| if keeps(key, i, threshold) { v * scale } else { 0.0 }),
            )?;
            Ok(Tensor::from_cpu_storage(CpuStorage::from_f32_vec(x.dtype(), out)?, x.shape(), x.dtype()))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [buf]) => cuda::dropout(dev, x, buf, key, threshold, scale),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [buf]) => wgpu::dropout(dev, x, buf, key, threshold, scale),
    }
}
