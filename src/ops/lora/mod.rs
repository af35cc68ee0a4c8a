//! LoRA: a frozen weight W [out, in] plus a low-rank delta s·B·A, with A [r, in] and
//! B [out, r], and s = alpha / r (alpha / √r for rsLoRA).
//!
//! `merge` folds the delta into a dense W and `unmerge` takes it out again, for serving
//! one adapter at the speed of the base model. Both run on every backend: they are the
//! product B·A (matmul, f32 accumulation) scaled and added to W, rounded once to W's dtype.

use crate::ops::{MatmulOptions, add, matmul, matmul_with, scale as scale_op};
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

/// The frozen base weight of a LoRA layer, `[out, in]`.
#[derive(Debug, Clone, Copy)]
pub enum BaseWeight<'a> {
    Dense(&'a Tensor),
    Quantized(&'a crate::ops::QTensor),
}

impl BaseWeight<'_> {
    fn shape(&self) -> [usize; 2] {
        match self {
            BaseWeight::Dense(w) => [w.shape().first().copied().unwrap_or(0), w.shape().get(1).copied().unwrap_or(0)],
            BaseWeight::Quantized(q) => q.shape(),
        }
    }

    fn device(&self) -> crate::Device {
        match self {
            BaseWeight::Dense(w) => w.device(),
            BaseWeight::Quantized(q) => q.device(),
        }
    }

    /// x·Wᵀ as f32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => matmul_with(x, w, MatmulOptions::nt().out_dtype(DType::F32)),
            BaseWeight::Quantized(q) => crate::ops::qmatmul(&x.to_dtype(DType::F32)?, q),
        }
    }

    /// dy·W as f32.
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => matmul_with(dy, w, MatmulOptions::default().out_dtype(DType::F32)),
            BaseWeight::Quantized(q) => crate::ops::qmatmul_input_grad(&dy.to_dtype(DType::F32)?, q),
        }
    }
}

/// One LoRA layer as the forward and backward passes see it.
#[derive(Debug, Clone, Copy)]
pub struct LoraLinear<'a> {
    /// W, `[out, in]`, frozen.
    pub base: BaseWeight<'a>,
    /// An optional bias `[out]`, frozen.
    pub bias: Option<&'a Tensor>,
    /// A `[r, in]` and B `[out, r]`.
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    /// s = alpha / r (alpha / √r for rsLoRA).
    pub scale: f32,
    /// Dropout on the LoRA branch's input: probability and seed. The backward pass must get
    /// the same pair, so it applies the same mask.
    pub dropout: Option<(f32, u64)>,
}

impl LoraLinear<'_> {
    fn drop(&self, t: &Tensor) -> Result<Tensor> {
        match self.dropout {
            Some((p, seed)) => crate::ops::dropout(t, p, seed),
            None => Ok(t.clone()),
        }
    }
}

/// What the forward pass returns: the output and x·Aᵀ, kept for the backward pass.
#[derive(Debug, Clone)]
pub struct LoraOutput {
    /// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, `[tokens, out]` in x's dtype.
    pub y: Tensor,
    /// `x·Aᵀ`, `[tokens, r]`, f32.
    pub xa: Tensor,
}

/// The gradients of a LoRA layer with W frozen.
#[derive(Debug, Clone)]
pub struct LoraGrads {
    /// `dy·W + s·(dy·B)·A`, `[tokens, in]`, f32.
    pub dx: Tensor,
    /// `s·(dy·B)ᵀ·x`, `[r, in]`, f32.
    pub da: Tensor,
    /// `s·dyᵀ·(x·Aᵀ)`, `[out, r]`, f32.
    pub db: Tensor,
}

fn check_layer(x: &Tensor, l: &LoraLinear<'_>) -> Result<()> {
    let (base, a, b, s) = (&l.base, l.a, l.b, l.scale);
    if x.device() != base.device() {
        return Err(Error::DeviceMismatch(format!("x on {}, W on {}", x.device(), base.device())));
    }
    crate::ops::same_device("lora", &[x, a, b])?;
    let [out, inp] = base.shape();
    let (&[r, a_in], &[b_out, b_r]) = (a.shape(), b.shape()) else {
        return Err(Error::Shape(format!(
            "lora_A must be [r, in] and lora_B [out, r]; got {:?}, {:?}",
            a.shape(),
            b.shape()
        )));
    };
    if x.rank() != 2 || x.shape()[1] != inp || a_in != inp || b_out != out || b_r != r {
        return Err(Error::Shape(format!(
            "lora layer: x {:?}, W [{out}, {inp}], lora_A {:?}, lora_B {:?} do not fit \
             (x [tokens, in], A [r, in], B [out, r])",
            x.shape(),
            a.shape(),
            b.shape()
        )));
    }
    if !s.is_finite() {
        return Err(Error::InvalidArgument(format!("lora scale {s} is not finite")));
    }
    if let Some(bias) = l.bias {
        if bias.shape() != [out] {
            return Err(Error::Shape(format!("lora layer: bias {:?} must be [{out}]", bias.shape())));
        }
    }
    Ok(())
}

/// The LoRA layer's forward pass over dense or quantized W:
/// `y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`, with x `[tokens, in]`; the products accumulate in
/// f32 and y is rounded once to x's dtype. Composed of the matmul, quantized-product and
/// elementwise kernels, so it runs on every backend. `Err` naming the shapes when they do
/// not fit.
pub fn lora_forward(x: &Tensor, layer: &LoraLinear<'_>) -> Result<LoraOutput> {
    check_layer(x, layer)?;
    let xa = matmul_with(&layer.drop(x)?, layer.a, MatmulOptions::nt().out_dtype(DType::F32))?;
    let delta = matmul_with(&xa, &layer.b.to_dtype(DType::F32)?, MatmulOptions::nt())?;
    let mut y = add(&layer.base.forward(x)?, &scale_op(&delta, layer.scale)?)?;
    if let Some(bias) = layer.bias {
        y = crate::ops::add_bias(&y, &bias.to_dtype(DType::F32)?)?;
    }
    Ok(LoraOutput { y: y.to_dtype(x.dtype())?, xa })
}

/// The LoRA layer's backward pass with W (and the bias) frozen, reusing x·Aᵀ from the
/// forward pass: `dx = dy·W + s·drop((dy·B)·A)`, `dA = s·(dy·B)ᵀ·drop(x)`,
/// `dB = s·dyᵀ·(x·Aᵀ)`, all f32. A quantized W goes through the quantized input gradient,
/// never dequantized whole.
pub fn lora_backward(dy: &Tensor, x: &Tensor, xa: &Tensor, layer: &LoraLinear<'_>) -> Result<LoraGrads> {
    check_layer(x, layer)?;
    let [out, _] = layer.base.shape();
    let r = layer.a.shape()[0];
    if dy.shape() != [x.shape()[0], out] || xa.shape() != [x.shape()[0], r] {
        return Err(Error::Shape(format!(
            "lora backward: dy {:?} must be [{}, {out}] and xa {:?} [{}, {r}]",
            dy.shape(),
            x.shape()[0],
            xa.shape(),
            x.shape()[0]
        )));
    }
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let (dy, xa, a, b) = (f32_of(dy)?, f32_of(xa)?, f32_of(layer.a)?, f32_of(layer.b)?);
    let s = layer.scale;
    let dyb = matmul(&dy, &b)?; // [tokens, r]
    let dx = add(&layer.base.input_grad(&dy)?, &layer.drop(&scale_op(&matmul(&dyb, &a)?, s)?)?)?;
    let da = scale_op(&matmul_with(&dyb, &f32_of(&layer.drop(x)?)?, MatmulOptions::tn())?, s)?;
    let db = scale_op(&matmul_with(&dy, &xa, MatmulOptions::tn())?, s)?;
    Ok(LoraGrads { dx, da, db })
}
