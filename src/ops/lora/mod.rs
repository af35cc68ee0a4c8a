//! LoRA: a frozen weight W [out, in] plus a low-rank delta s·B·A, with A [r, in] and
//! B [out, r], and s = alpha / r (alpha / √r for rsLoRA).
//!
//! `merge` folds the delta into a dense W and `unmerge` takes it out again, for serving
//! one adapter at the speed of the base model. Both run on every backend: they are the
//! product B·A (matmul, f32 accumulation) scaled and added to W, rounded once to W's dtype.

use crate::ops::{MatmulOptions, add, matmul_with, scale as scale_op};
use crate::{DType, Error, Result, Tensor};

fn check(w: &Tensor, a: &Tensor, b: &Tensor, s: f32) -> Result<()> {
    crate::ops::same_device("lora merge", &[w, a, b])?;
    let (&[out, inp], &[r, a_in], &[b_out, b_r]) = (w.shape(), a.shape(), b.shape()) else {
        return Err(Error::Shape(format!(
            "lora merge takes W [out, in], A [r, in], B [out, r]; got {:?}, {:?}, {:?}",
            w.shape(),
            a.shape(),
            b.shape()
        )));
    };
    if a_in != inp || b_out != out || b_r != r {
        return Err(Error::Shape(format!(
            "lora_A {:?} and lora_B {:?} do not fit W {:?} (A must be [r, {inp}], B [{out}, r])",
            a.shape(),
            b.shape(),
            w.shape()
        )));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DType(format!("lora_A is {} but lora_B is {}", a.dtype(), b.dtype())));
    }
    if !s.is_finite() {
        return Err(Error::InvalidArgument(format!("lora scale {s} is not finite")));
    }
    Ok(())
}

/// `W + s·B·A` in W's dtype (the delta accumulated in f32). `Err` naming the tensors for
/// shapes that do not fit, A and B of different dtypes, tensors on different devices, or a
/// non-finite scale.
pub fn merge(w: &Tensor, a: &Tensor, b: &Tensor, s: f32) -> Result<Tensor> {
    check(w, a, b, s)?;
    add_delta(w, a, b, s)
}

/// `W − s·B·A`: takes a merged adapter out again (exact up to W's rounding).
pub fn unmerge(w: &Tensor, a: &Tensor, b: &Tensor, s: f32) -> Result<Tensor> {
    check(w, a, b, s)?;
    add_delta(w, a, b, -s)
}

fn add_delta(w: &Tensor, a: &Tensor, b: &Tensor, s: f32) -> Result<Tensor> {
    let delta = matmul_with(b, a, MatmulOptions::default().out_dtype(DType::F32))?;
    let sum = add(&w.to_dtype(DType::F32)?, &scale_op(&delta, s)?)?;
    sum.to_dtype(w.dtype())
}
