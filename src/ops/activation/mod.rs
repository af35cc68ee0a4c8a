//! Activations of a transformer's MLP, forward and backward: SwiGLU fused (`silu(g) ⊙ u`)
//! and GELU with the tanh approximation, as `torch.nn.functional.gelu(x,
//! approximate='tanh')` defines it.
//!
//! Every op is elementwise over tensors of one shape, dtype (f32, f16 or bf16) and device;
//! each element is computed in f32 and rounded once to the dtype. The formulas, the same
//! on every backend (`kernels/activation.cu`, `shaders/activation_map.wgsl`):
//!
//! - `s = sigmoid(v)` and `1 − s` as `1/(1 + e)` and `e/(1 + e)` with `e = exp(−|v|)`, the
//!   pair swapped for v < 0: e never overflows, so both keep their relative accuracy in
//!   the tails (where torch's `x / (1 + exp(−x))` rounds to 0 once exp overflows) and
//!   `1 − s` never cancels.
//! - swiglu: `y = (g · s) · u` with `s = sigmoid(g)`; backward: `du = dy · (g · s)`,
//!   `dg = (dy · u) · (s · (1 + g · (1 − s)))` (torch's silu_backward times u).
//! - gelu: with `z = √(2/π) · (x + 0.044715 · x³)`, torch's `½ · x · (1 + tanh(z))` is
//!   computed as the equal `x · sigmoid(2z)`, which keeps its relative accuracy where
//!   `1 + tanh(z)` cancels (x below about −3). Backward, `s = sigmoid(2z)`:
//!   `dx = dy · (s + 2x · s(1 − s) · √(2/π) · (1 + 3 · 0.044715 · x²))`, torch's
//!   `½(1 + tanh z) + ½x(1 − tanh² z) · z'` rewritten the same way.
//!
//! Finite inputs saturate as the limits do, x³ overflowing included: far below zero the
//! outputs and gradients are 0, far above y = x (swiglu: x · u) and the slopes 1
//! (gelu_backward excepted where x² overflows, |x| > 1.8e19: 0 · ∞ gives NaN there).
//! Infinite inputs give NaN where the formulas meet ∞/∞ or 0 · ∞ (silu and gelu of −∞,
//! the backwards at ±∞), as torch's formulas do. NaN propagates on the CPU and CUDA (WGSL
//! lets an implementation assume no NaN).
//!
//! The CPU code works in chunks converted to f32, with a polynomial exp ([`exp`]) written
//! branch-free so the loops vectorise.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::norm::float_dtype;
use crate::ops::{Operands, SharedMut, Unfilled, convert, operands};
use crate::tensor::{StorageElement, with_elems};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

/// √(2/π), torch's kBeta (`M_SQRT2 · M_2_SQRTPI · 0.5`) in f32.
pub(crate) const GELU_BETA: f32 = 0.797_884_6;
/// torch's kKappa.
pub(crate) const GELU_KAPPA: f32 = 0.044_715;

/// The activation ops, as the kernels are named.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// (g, u) → y
    Swiglu,
    /// (dy, g, u) → (dg, du)
    SwigluBackward,
    /// x → y
    Gelu,
    /// (dy, x) → dx
    GeluBackward,
}

impl Act {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Act::Swiglu => "swiglu",
            Act::SwigluBackward => "swiglu_backward",
            Act::Gelu => "gelu",
            Act::GeluBackward => "gelu_backward",
        }
    }
}

/// `silu(g) ⊙ u` = `g · sigmoid(g) · u`, the gated unit of Llama's MLP, fused.
///
/// g and u share a shape, a dtype (f32, f16 or bf16) and a device; y takes them. Errors:
/// `Shape`, `DType` or `DeviceMismatch` when they differ, `DType` for a non-float dtype.
pub fn swiglu(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    let [y] = run::<2, 1>(Act::Swiglu, [g, u])?;
    Ok(y)
}

/// The backward of [`swiglu`]: `(dg, du)` for the output gradient dy, with the forward's g
/// and u. All three share a shape, dtype and device (errors as [`swiglu`]); dg and du take
/// them.
pub fn swiglu_backward(dy: &Tensor, g: &Tensor, u: &Tensor) -> Result<(Tensor, Tensor)> {
    let [dg, du] = run::<3, 2>(Act::SwigluBackward, [dy, g, u])?;
    Ok((dg, du))
}

/// GELU, tanh approximation: `½ · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`, as
/// `torch.nn.functional.gelu(x, approximate='tanh')`. Any shape; f32, f16 or bf16
/// (`DType` otherwise).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    let [y] = run::<1, 1>(Act::Gelu, [x])?;
    Ok(y)
}

/// The backward of [`gelu`]: dx for the output gradient dy and the forward's x, which share
/// a shape, dtype and device (`Shape`, `DType`, `DeviceMismatch` otherwise).
pub fn gelu_backward(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    let [dx] = run::<2, 1>(Act::GeluBackward, [dy, x])?;
    Ok(dx)
}

/// Checks the operands (one shape, one float dtype, one device) and runs `act` on their
/// backend.
fn run<const I: usize, const O: usize>(act: Act, inputs: [&Tensor; I]) -> Result<[Tensor; O]> {
    let op = act.name();
    crate::ops::floats(op, &inputs)?;
    let ops = operands(op, inputs)?;
    let first = inputs[0];
    float_dtype(op, "the input", first.dtype())?;
    for t in &inputs[1..] {
        if t.shape() != first.shape() {
            return Err(Error::Shape(format!("{op}: shapes {:?} and {:?} differ", first.shape(), t.shape())));
        }
        if t.dtype() != first.dtype() {
            return Err(Error::DType(format!("{op}: dtypes {} and {} differ", first.dtype(), t.dtype())));
        }
    }
    let outputs = || -> Result<[Tensor; O]> {
        let v =
            (0..O).map(|_| Tensor::empty(first.shape(), first.dtype(), &first.device())).collect::<Result<Vec<_>>>()?;
        v.try_into().map_err(|_| Error::InvalidArgument(format!("{op}: output count")))
    };
    if first.elem_count() == 0 {
        return outputs();
    }
    match ops {
        Operands::Cpu(storages) => {
            let differ = || Error::DType(format!("{op}: dtypes differ"));
            let outs = with_elems!(storages[0], first_slice => {
                let mut slices = [first_slice.as_slice(); I];
                for (k, s) in storages.iter().enumerate().skip(1) {
                    slices[k] = StorageElement::slice_of(s).ok_or_else(differ)?;
                }
                cpu_pointwise::<_, I, O>(act, slices)?.map(StorageElement::into_storage)
            });
            Ok(outs.map(|s| Tensor::from_cpu_storage(s, first.shape(), first.dtype())))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, bufs) => {
            let outs = outputs()?;
            cuda::run(dev, act, first, &bufs, &outs)?;
            Ok(outs)
        }
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, bufs) => {
            let outs = outputs()?;
            wgpu::run(dev, act, first, &bufs, &outs)?;
            Ok(outs)
        }
    }
}

/// ln 2 in two parts: the high part has 9 significant bits, so n · LN2_HI is exact for the
/// |n| ≤ 150 that [`exp`] meets (Cody and Waite's reduction).
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 · 2²³: adding it rounds an f32 of magnitude below 2²² to an integer, to nearest even.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// 2^k for k in [−126, 127], built from its exponent bits.
#[inline(always)]
fn pow2(k: i32) -> f32 {
    f32::from_bits((k.wrapping_add(127) as u32) << 23)
}

/// e^x in f32 within about 2 ulp over the whole range, without branches, so a loop of it
/// vectorises: x = n·ln 2 + r with |r| ≤ ln 2 / 2, e^r by its Taylor series to r⁷
/// (truncation below 0.1 ulp), times 2^n applied in two halves so results near overflow
/// and in the subnormal range come out right. exp(−∞) = 0, exp(+∞) = +∞, NaN stays NaN
/// (clamp keeps it).
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    let x = x.clamp(-104.0, 89.0);
    let t = x * std::f32::consts::LOG2_E + ROUND_MAGIC;
    let n = t - ROUND_MAGIC;
    let k = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = (x - n * LN2_HI) - n * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let h = k >> 1;
    p * pow2(h) * pow2(k.wrapping_sub(h))
}

/// (sigmoid(v), 1 − sigmoid(v)) = (1/(1 + e^−v), e^−v/(1 + e^−v)), from e = e^−|v|, which
/// never overflows: each within a few ulp over the whole range, the tails that round to
/// f32's subnormals included, and 1 − sigmoid without cancellation. The branch is a select.
#[inline(always)]
pub(crate) fn sigmoid_pair(v: f32) -> (f32, f32) {
    let e = exp(-v.abs());
    let r = 1.0 / (1.0 + e);
    let er = e * r;
    if v >= 0.0 { (r, er) } else { (er, r) }
}

#[inline(always)]
pub(crate) fn swiglu_f32(g: f32, u: f32) -> f32 {
    (g * sigmoid_pair(g).0) * u
}

/// (dg, du).
#[inline(always)]
pub(crate) fn swiglu_backward_f32(dy: f32, g: f32, u: f32) -> (f32, f32) {
    let (s, one_minus_s) = sigmoid_pair(g);
    ((dy * u) * (s * (1.0 + g * one_minus_s)), dy * (g * s))
}

#[inline(always)]
fn gelu_z2(x: f32) -> f32 {
    2.0 * (GELU_BETA * (x + GELU_KAPPA * (x * x * x)))
}

#[inline(always)]
pub(crate) fn gelu_f32(x: f32) -> f32 {
    x * sigmoid_pair(gelu_z2(x)).0
}

#[inline(always)]
pub(crate) fn gelu_backward_f32(dy: f32, x: f32) -> f32 {
    let (s, one_minus_s) = sigmoid_pair(gelu_z2(x));
    dy * (s + ((2.0 * x) * (s * one_minus_s)) * (GELU_BETA * (1.0 + (3.0 * GELU_KAPPA) * (x * x))))
}

/// Elements per CPU task and per f32 scratch run.
const CHUNK: usize = 4096;

/// `act` over the inputs on the CPU: chunks converted to f32, the formula over each in a
/// loop without branches (it vectorises), the results rounded back.
fn cpu_pointwise<T: StorageElement, const I: usize, const O: usize>(
    act: Act,
    inputs: [&[T]; I],
) -> Result<[Vec<T>; O]> {
    let n = inputs[0].len();
    let mut outs: Vec<Unfilled<T>> = (0..O).map(|_| Unfilled::new(n)).collect::<Result<_>>()?;
    let ptrs: Vec<SharedMut<T>> = outs.iter_mut().map(|o| o.ptr()).collect();
    let zero = T::from_f32(0.0);
    (0..n.div_ceil(CHUNK)).into_par_iter().for_each_init(
        || (vec![[0f32; CHUNK]; I], vec![[0f32; CHUNK]; O], vec![zero; CHUNK]),
        |(ins, res, out), c| {
            let span = c * CHUNK..((c + 1) * CHUNK).min(n);
            let len = span.len();
            for k in 0..I {
                if T::DTYPE != crate::DType::F32 {
                    convert::to_f32::<T>(&inputs[k][span.clone()], &mut ins[k][..len]);
                }
            }
            // The inputs as f32: the slices themselves for f32, else the converted runs.
            let mut views: [&[f32]; I] = [&[]; I];
            for k in 0..I {
                views[k] = if T::DTYPE == crate::DType::F32 {
                    bytemuck::cast_slice(&inputs[k][span.clone()])
                } else {
                    &ins[k][..len]
                };
            }
            let ins = views;
            apply(act, &ins, res, len);
            for (k, &ptr) in ptrs.iter().enumerate() {
                // SAFETY: chunk c's span of each output is written by this task alone.
                unsafe { convert::store(ptr, span.start, &res[k][..len], out) };
            }
        },
    );
    // SAFETY: the chunks cover 0..n and each wrote its span of every output.
    let outs: Vec<Vec<T>> = outs.into_iter().map(|o| unsafe { o.filled() }).collect();
    outs.try_into().map_err(|_| Error::InvalidArgument("activation: output count".into()))
}

/// The formula of `act` over runs of `len` inputs into `res`.
#[inline(always)]
fn apply_run(act: Act, ins: &[&[f32]], res: &mut [[f32; CHUNK]], len: usize) {
    match act {
        Act::Swiglu => {
            let (g, u) = (&ins[0][..len], &ins[1][..len]);
            for ((y, &g), &u) in res[0][..len].iter_mut().zip(g).zip(u) {
                *y = swiglu_f32(g, u);
            }
        }
        Act::SwigluBackward => {
            let (dy, g, u) = (&ins[0][..len], &ins[1][..len], &ins[2][..len]);
            let (dg, du) = res.split_at_mut(1);
            for ((((dg, du), &dy), &g), &u) in dg[0][..len].iter_mut().zip(&mut du[0][..len]).zip(dy).zip(g).zip(u) {
                (*dg, *du) = swiglu_backward_f32(dy, g, u);
            }
        }
        Act::Gelu => {
            for (y, &x) in res[0][..len].iter_mut().zip(&ins[0][..len]) {
                *y = gelu_f32(x);
            }
        }
        Act::GeluBackward => {
            let (dy, x) = (&ins[0][..len], &ins[1][..len]);
            for ((dx, &dy), &x) in res[0][..len].iter_mut().zip(dy).zip(x) {
                *dx = gelu_backward_f32(dy, x);
            }
        }
    }
}

/// [`apply_run`] with 8-wide vectors where the CPU has AVX2 (the same operations, so the
/// same results), else with the baseline's 4-wide ones.
fn apply(act: Act, ins: &[&[f32]], res: &mut [[f32; CHUNK]], len: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2.
        return unsafe { apply_avx2(act, ins, res, len) };
    }
    apply_run(act, ins, res, len)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn apply_avx2(act: Act, ins: &[&[f32]], res: &mut [[f32; CHUNK]], len: usize) {
    apply_run(act, ins, res, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The polynomial exp against f64 over its whole range, normal and subnormal results.
    #[test]
    fn exp_is_within_two_ulp() {
        let mut worst = 0f64;
        let mut x = -103.9f32;
        while x < 88.7 {
            let got = exp(x) as f64;
            let want = (x as f64).exp();
            // ulps of the f32 result, subnormals counted at the smallest spacing.
            let ulp = (want.abs() * f32::EPSILON as f64).max(2f64.powi(-149));
            worst = worst.max((got - want).abs() / ulp);
            x += 0.0137;
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert_eq!(exp(0.0), 1.0);
    }
}
