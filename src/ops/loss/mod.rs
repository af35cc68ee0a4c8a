//! Cross-entropy over a vocabulary, with its gradient, and the fused LM head + cross-entropy
//! that never holds the whole `[n, vocab]` logits.
//!
//! Conventions are `torch.nn.functional.cross_entropy(logits, targets, reduction="mean",
//! ignore_index=-100)`: the loss is the mean over the rows whose target is not
//! [`IGNORE_INDEX`] of `logsumexp(row) − row[target]`, and the gradient of that mean is
//! `(softmax(row) − onehot(target)) / counted` on counted rows, zero on ignored ones. A batch
//! whose every target is ignored has loss 0 and a zero gradient (torch gives NaN there).
//!
//! Per-row statistics are kept as `(max, Σ exp(x − max), target logit)` in f32 and updated
//! together as columns stream by (an online logsumexp), so a row is read once for the
//! statistics and once more to write its gradient.
//!
//! Kernels: the CPU code here (rayon over rows), `kernels/loss.cu`, `shaders/loss_*.wgsl`.
//! Targets are read back to the host once per call to check their range and count them
//! (n·4 bytes): a bad target is an `Err` when the call returns, never a silent NaN.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::quant::QTensor;
use crate::ops::{MatmulOptions, Operands, SharedMut, operands};
use crate::tensor::{CpuStorage, Storage, StorageElement, try_zeros, with_dtype, with_elems};
use crate::{DType, Element, Error, Result, Tensor};
use rayon::prelude::*;

/// The target value of a row that takes no part in the loss (torch's `ignore_index`).
pub const IGNORE_INDEX: i32 = -100;

/// Vocabulary columns per chunk of [`linear_cross_entropy`] unless the caller says.
pub const DEFAULT_CHUNK_COLUMNS: usize = 4096;

/// What [`cross_entropy_with`] scales its gradient by.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropyOptions {
    /// Multiplies the gradient (not the loss): `1 / accumulation_steps` when gradients of
    /// several micro-batches are summed. Must be finite.
    pub grad_scale: f32,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        CrossEntropyOptions { grad_scale: 1.0 }
    }
}

impl CrossEntropyOptions {
    pub fn grad_scale(self, grad_scale: f32) -> Self {
        CrossEntropyOptions { grad_scale }
    }
}

/// The loss and gradient of [`cross_entropy`].
#[derive(Debug, Clone)]
pub struct CrossEntropy {
    /// The mean loss over counted rows: an f32 tensor of shape `[]` on the logits' device
    /// (read it with `to_vec_f32()?[0]`); 0 when no row is counted.
    pub loss: Tensor,
    /// `[n, vocab]` in the logits' dtype: `grad_scale · (softmax − onehot) / counted`.
    pub dlogits: Tensor,
    /// Rows whose target is not [`IGNORE_INDEX`].
    pub counted: usize,
}

/// Mean cross-entropy of `logits` `[n, vocab]` (f32, f16 or bf16) against `targets` `[n]`
/// (I32: a class in `0..vocab`, or [`IGNORE_INDEX`]), and its gradient. See the module
/// documentation for the conventions; [`cross_entropy_with`] scales the gradient.
///
/// Errors: `DType` when logits are not float or targets not I32; `Shape` when logits are not
/// rank 2 or targets not `[n]`; `InvalidArgument` naming the row and the value of the first
/// target outside `0..vocab` that is not [`IGNORE_INDEX`]; `DeviceMismatch`; `OutOfMemory`.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<CrossEntropy> {
    cross_entropy_with(logits, targets, CrossEntropyOptions::default())
}

/// [`cross_entropy`] with options; also `Err(InvalidArgument)` for a non-finite
/// `grad_scale`.
pub fn cross_entropy_with(logits: &Tensor, targets: &Tensor, options: CrossEntropyOptions) -> Result<CrossEntropy> {
    const OP: &str = "cross_entropy";
    crate::ops::floats(OP, &[logits])?;
    let ops = operands(OP, [logits, targets])?;
    let &[n, vocab] = logits.shape() else {
        return Err(Error::Shape(format!("{OP}: logits must be [n, vocab], got {:?}", logits.shape())));
    };
    let counted = check_targets(OP, targets, n, vocab)?;
    let scale = grad_factor(OP, options.grad_scale, counted)?;
    let device = logits.device();
    if counted == 0 || vocab == 0 {
        return Ok(CrossEntropy {
            loss: Tensor::zeros(&[], DType::F32, &device)?,
            dlogits: Tensor::zeros(&[n, vocab], logits.dtype(), &device)?,
            counted,
        });
    }
    let inv_count = 1.0 / counted as f32;
    let (state, dlogits) = match ops {
        Operands::Cpu([x, t]) => {
            let t = t.as_i32().ok_or_else(|| targets_not_i32(OP))?;
            let mut state = try_zeros::<f32>(3 * n)?;
            let dlogits = with_elems!(x, x => cpu_rows(x, t, vocab, scale, &mut state)?);
            (
                Tensor::from_cpu_storage(CpuStorage::F32(state), &[n, 3], DType::F32),
                Tensor::from_cpu_storage(dlogits, &[n, vocab], logits.dtype()),
            )
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [x, t]) => cuda::rows(dev, logits, x, t, scale)?,
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [x, t]) => {
            let mut state = Tensor::empty(&[n, 3], DType::F32, &device)?;
            wgpu::lse(dev, logits, x, t, &mut state, 0, true)?;
            let dlogits = wgpu::grad(dev, logits, x, t, &state, 0, scale, logits.dtype())?;
            (state, dlogits)
        }
    };
    Ok(CrossEntropy { loss: finish(&state, targets, inv_count)?, dlogits, counted })
}

/// The head of [`linear_cross_entropy`]: the `[vocab, d]` weight whose rows the hidden
/// states are multiplied by (`logits = h · Wᵀ`).
#[derive(Debug, Clone, Copy)]
pub enum Head<'a> {
    /// f32, f16 or bf16, the hidden states' dtype.
    Dense(&'a Tensor),
    /// A frozen quantized weight (any [`crate::ops::QuantFormat`]): each chunk's rows are
    /// dequantized to f32 once per pass and multiply f32 hidden states as a dense band (the
    /// values `qmatmul` decodes, through the dense kernels: a chunk's rows serve `tokens`
    /// products each, so decoding them once and running the faster dense product pays).
    Quantized(&'a QTensor),
}

/// What [`linear_cross_entropy`] computes and how finely it splits the vocabulary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinearCrossEntropyOptions {
    /// Multiplies `dh` and `dw` (not the loss). Must be finite.
    pub grad_scale: f32,
    /// Vocabulary columns per chunk (rounded up to the head's row alignment, 4 for dense
    /// heads): the logits that exist at once are `[n, chunk_columns]` f32. At least 1.
    pub chunk_columns: usize,
    /// Also return the head's gradient `dw` `[vocab, d]` (dense heads only).
    pub head_grad: bool,
}

impl Default for LinearCrossEntropyOptions {
    fn default() -> Self {
        LinearCrossEntropyOptions { grad_scale: 1.0, chunk_columns: DEFAULT_CHUNK_COLUMNS, head_grad: false }
    }
}

impl LinearCrossEntropyOptions {
    pub fn grad_scale(self, grad_scale: f32) -> Self {
        LinearCrossEntropyOptions { grad_scale, ..self }
    }

    pub fn chunk_columns(self, chunk_columns: usize) -> Self {
        LinearCrossEntropyOptions { chunk_columns, ..self }
    }

    /// Also compute the head's gradient.
    pub fn head_grad(self) -> Self {
        LinearCrossEntropyOptions { head_grad: true, ..self }
    }
}

/// The loss and gradients of [`linear_cross_entropy`].
#[derive(Debug, Clone)]
pub struct LinearCrossEntropy {
    /// As [`CrossEntropy::loss`]: an f32 `[]` tensor.
    pub loss: Tensor,
    /// `[n, d]` in `h`'s dtype.
    pub dh: Tensor,
    /// `[vocab, d]` in the head's dtype, when [`LinearCrossEntropyOptions::head_grad`].
    pub dw: Option<Tensor>,
    /// Rows whose target is not [`IGNORE_INDEX`].
    pub counted: usize,
}

/// `cross_entropy(h · Wᵀ, targets)` and its gradients `dh` (and `dW`), with the vocabulary
/// processed in chunks so the `[n, vocab]` logits never exist: a first pass computes each
/// chunk's logits with the crate's matmul (or qmatmul) and folds them into each row's online
/// logsumexp; a second pass computes each chunk's logits again, forms its gradient
/// `grad_scale · (softmax − onehot) / counted` and accumulates `dh += g · W_chunk` (f32) and
/// `dW_chunk = gᵀ · h`. On the CPU, f32 hidden states without `head_grad` take one pass
/// instead (an online softmax carried into the gradient's product: two products per chunk
/// where the two passes take three). Memory beyond the inputs and outputs: one chunk of f32 logits, its
/// gradient, a copy of the chunk's rows of W (f32 for a quantized head) and a few `[n, d]`
/// f32 accumulators.
///
/// `h` is `[n, d]` (f32, f16 or bf16); a dense head is `[vocab, d]` of `h`'s dtype, a
/// quantized one `[vocab, d]`; `targets` as [`cross_entropy`]. On a dense head the logits and
/// `dh`'s chunks are f32 products of `h`'s dtype, and the gradient chunk is rounded to that
/// dtype before the backward products, as an unfused bf16 step rounds dlogits.
///
/// Errors: as [`cross_entropy`], plus `Shape` when `h` is not `[n, d]` or the head not
/// `[vocab, d]`; `DType` when a dense head's dtype differs from `h`'s; `InvalidArgument` for
/// `chunk_columns` of 0, or `head_grad` on a quantized head (it is frozen).
pub fn linear_cross_entropy(
    h: &Tensor,
    head: Head<'_>,
    targets: &Tensor,
    options: LinearCrossEntropyOptions,
) -> Result<LinearCrossEntropy> {
    const OP: &str = "linear_cross_entropy";
    crate::ops::floats(OP, &[h])?;
    crate::ops::same_device(OP, &[h, targets])?;
    let &[n, d] = h.shape() else {
        return Err(Error::Shape(format!("{OP}: h must be [n, d], got {:?}", h.shape())));
    };
    let (vocab, align) = match head {
        Head::Dense(w) => {
            crate::ops::floats(OP, &[w])?;
            crate::ops::same_device(OP, &[h, w])?;
            let &[vocab, wd] = w.shape() else {
                return Err(Error::Shape(format!("{OP}: the head must be [vocab, d], got {:?}", w.shape())));
            };
            if wd != d {
                return Err(Error::Shape(format!("{OP}: h {:?} and head {:?} differ in d", h.shape(), w.shape())));
            }
            if w.dtype() != h.dtype() {
                return Err(Error::DType(format!("{OP}: h is {} but the head is {}", h.dtype(), w.dtype())));
            }
            (vocab, 4)
        }
        Head::Quantized(w) => {
            if w.device() != h.device() {
                return Err(Error::DeviceMismatch(format!(
                    "{OP}: h on {} and the quantized head on {}",
                    h.device(),
                    w.device()
                )));
            }
            let [vocab, wd] = w.shape();
            if wd != d {
                return Err(Error::Shape(format!(
                    "{OP}: h {:?} and the {} head {:?} differ in d",
                    h.shape(),
                    w.format(),
                    w.shape()
                )));
            }
            if options.head_grad {
                return Err(Error::InvalidArgument(format!(
                    "{OP}: head_grad on a quantized head: a quantized weight is frozen (train an adapter instead)"
                )));
            }
            (vocab, w.row_band_alignment())
        }
    };
    if options.chunk_columns == 0 {
        return Err(Error::InvalidArgument(format!("{OP}: chunk_columns must be at least 1")));
    }
    let counted = check_targets(OP, targets, n, vocab)?;
    let scale = grad_factor(OP, options.grad_scale, counted)?;
    let device = h.device();
    let dw_dtype = match head {
        Head::Dense(w) => w.dtype(),
        Head::Quantized(_) => h.dtype(),
    };
    let zero_dw = || -> Result<Option<Tensor>> {
        match options.head_grad {
            true => Ok(Some(Tensor::zeros(&[vocab, d], dw_dtype, &device)?)),
            false => Ok(None),
        }
    };
    if counted == 0 || vocab == 0 || d == 0 {
        let loss = if counted == 0 || vocab == 0 {
            Tensor::zeros(&[], DType::F32, &device)?
        } else {
            // d = 0: every logit is 0, so each counted row's loss is ln(vocab).
            Tensor::full(&[], (vocab as f64).ln() as f32, DType::F32, &device)?
        };
        return Ok(LinearCrossEntropy {
            loss,
            dh: Tensor::zeros(&[n, d], h.dtype(), &device)?,
            dw: zero_dw()?,
            counted,
        });
    }
    let chunk = options.chunk_columns.min(vocab).div_ceil(align) * align;
    let plan = Plan { n, d, vocab, chunk, scale, inv_count: 1.0 / counted as f32, head_grad: options.head_grad };
    if device.is_cpu()
        && let Head::Dense(w) = head
    {
        return cpu_dense_linear(h, w, targets, &plan, counted);
    }
    chunked_linear(h, head, targets, &plan, counted)
}

/// The sizes and factors of one [`linear_cross_entropy`] call.
struct Plan {
    n: usize,
    d: usize,
    vocab: usize,
    chunk: usize,
    scale: f32,
    inv_count: f32,
    head_grad: bool,
}

impl Plan {
    /// `(first column, columns)` of each chunk.
    fn chunks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..self.vocab).step_by(self.chunk).map(|c0| (c0, self.chunk.min(self.vocab - c0)))
    }
}

/// The device-generic driver: each chunk's logits and products through the crate's matmul
/// or qmatmul, the per-chunk statistics and gradient through this family's kernels.
fn chunked_linear(
    h: &Tensor,
    head: Head<'_>,
    targets: &Tensor,
    plan: &Plan,
    counted: usize,
) -> Result<LinearCrossEntropy> {
    let device = h.device();
    let (n, d) = (plan.n, plan.d);
    // Quantized products write x's dtype: f32 hidden states give f32 logits and dh.
    let h_for_head = match head {
        Head::Dense(_) => h.clone(),
        Head::Quantized(_) => h.to_dtype(DType::F32)?,
    };
    // A chunk's rows of the head, dense: a quantized head's rows dequantized to f32.
    let band = |c0: usize, cols: usize| -> Result<Tensor> {
        match head {
            Head::Dense(w) => rows_of(w, c0, cols),
            Head::Quantized(w) => w.row_band(c0, c0 + cols)?.dequantize(DType::F32),
        }
    };
    let logits_of =
        |band: &Tensor| crate::ops::matmul_with(&h_for_head, band, MatmulOptions::nt().out_dtype(DType::F32));
    if device.is_cpu() && !plan.head_grad && h_for_head.dtype() == DType::F32 {
        return cpu_single_pass(&h_for_head, &band, targets, plan, counted);
    }
    let mut state = Tensor::empty(&[n, 3], DType::F32, &device)?;
    for (c0, cols) in plan.chunks() {
        let logits = logits_of(&band(c0, cols)?)?;
        lse_chunk(&logits, targets, &mut state, c0, c0 == 0)?;
    }
    let loss = finish(&state, targets, plan.inv_count)?;
    let mut dh: Option<Tensor> = None;
    let mut dw = match plan.head_grad {
        true => Some(Tensor::empty(&[plan.vocab, d], h.dtype(), &device)?),
        false => None,
    };
    let g_dtype = match head {
        Head::Dense(w) => w.dtype(),
        Head::Quantized(_) => DType::F32,
    };
    for (c0, cols) in plan.chunks() {
        let b = band(c0, cols)?;
        let logits = logits_of(&b)?;
        let g = grad_chunk(&logits, targets, &state, c0, plan.scale, g_dtype)?;
        drop(logits);
        let part = crate::ops::matmul_with(&g, &b, MatmulOptions::default().out_dtype(DType::F32))?;
        dh = Some(match dh {
            Some(acc) => crate::ops::add(&acc, &part)?,
            None => part,
        });
        if let Some(dw) = dw.as_mut() {
            let chunk_grad = crate::ops::matmul_with(&g, h, MatmulOptions::tn())?;
            copy_into(dw, c0 * d, &chunk_grad, 0, cols * d)?;
        }
    }
    let dh = match dh {
        Some(acc) => acc.to_dtype(h.dtype())?,
        None => Tensor::zeros(&[n, d], h.dtype(), &device)?,
    };
    Ok(LinearCrossEntropy { loss, dh, dw, counted })
}

/// The CPU's single pass for f32 hidden states without a head gradient: per chunk, its
/// logits, then per row the running max m, the running sum l of `exp(z − m)` and the
/// accumulator `U = Σ exp(z − m)·W_j`, rescaled by `exp(m_old − m_new)` when the max moves
/// (online softmax, applied to the gradient's product as well); at the end
/// `dh = scale·(U/l − W_target)` and the loss `mean(m + ln l − z_target)`. Two products per
/// chunk where the two passes take three.
fn cpu_single_pass(
    h: &Tensor,
    band: &dyn Fn(usize, usize) -> Result<Tensor>,
    targets: &Tensor,
    plan: &Plan,
    counted: usize,
) -> Result<LinearCrossEntropy> {
    use crate::ops::matmul::{MatmulProblem, cpu_matmul_into};
    let (n, d) = (plan.n, plan.d);
    let hv = h.to_vec::<f32>()?;
    let t: Vec<i32> = targets.to_vec()?;
    let mut max = vec![f32::NEG_INFINITY; n];
    let mut sum = try_zeros::<f32>(n)?;
    let mut target_logit = try_zeros::<f32>(n)?;
    let mut acc = try_zeros::<f32>(n * d)?;
    let mut target_row = try_zeros::<f32>(n * d)?;
    for (c0, cols) in plan.chunks() {
        let w = band(c0, cols)?.to_vec::<f32>()?;
        let mut z = try_zeros::<f32>(n * cols)?;
        cpu_matmul_into(&MatmulProblem::unbatched(n, cols, d, true, DType::F32), &hv, &w, &mut z, false);
        z.par_chunks_mut(cols)
            .zip(acc.par_chunks_mut(d))
            .zip(target_row.par_chunks_mut(d))
            .zip(max.par_iter_mut().zip(sum.par_iter_mut()).zip(target_logit.par_iter_mut()))
            .enumerate()
            .for_each(|(r, (((z, acc), w_t), ((m, l), z_t)))| {
                if t[r] == IGNORE_INDEX {
                    z.fill(0.0);
                    return;
                }
                let target = t[r] as usize;
                if (c0..c0 + cols).contains(&target) {
                    *z_t = z[target - c0];
                    w_t.copy_from_slice(&w[(target - c0) * d..(target - c0 + 1) * d]);
                }
                let m_new = z.iter().fold(*m, |a, &b| a.max(b));
                let correction = if *m == f32::NEG_INFINITY { 0.0 } else { exp_nonpositive(*m - m_new) };
                let mut chunk_sum = 0f32;
                for x in z.iter_mut() {
                    *x = exp_nonpositive(*x - m_new);
                    chunk_sum += *x;
                }
                *l = *l * correction + chunk_sum;
                if correction != 1.0 {
                    acc.iter_mut().for_each(|a| *a *= correction);
                }
                *m = m_new;
            });
        cpu_matmul_into(&MatmulProblem::unbatched(n, d, cols, false, DType::F32), &z, &w, &mut acc, true);
    }
    let total: f64 =
        (0..n).filter(|&r| t[r] != IGNORE_INDEX).map(|r| row_loss(max[r], sum[r], target_logit[r]) as f64).sum();
    acc.par_chunks_mut(d).zip(target_row.par_chunks(d)).enumerate().for_each(|(r, (dh, w_t))| {
        if t[r] == IGNORE_INDEX {
            dh.fill(0.0);
            return;
        }
        let inv_l = 1.0 / sum[r];
        dh.iter_mut().zip(w_t).for_each(|(g, &wt)| *g = plan.scale * (*g * inv_l - wt));
    });
    let device = h.device();
    Ok(LinearCrossEntropy {
        loss: Tensor::from_slice(&[(total * plan.inv_count as f64) as f32], &[], &device)?,
        dh: Tensor::from_slice(&acc, &[n, d], &device)?,
        dw: None,
        counted,
    })
}

/// Rows `r0..r0 + rows` of a `[rows, d]` tensor as a tensor of their own.
fn rows_of(w: &Tensor, r0: usize, rows: usize) -> Result<Tensor> {
    let d = w.shape()[1];
    let mut out = Tensor::empty(&[rows, d], w.dtype(), &w.device())?;
    copy_into(&mut out, 0, w, r0 * d, rows * d)?;
    Ok(out)
}

/// Copies `len` elements of `src` from `src_at` over `dst` from `dst_at`; on wgpu in whole
/// words (see `wgpu::copy_elems`: both offsets fall on 4-byte boundaries here).
fn copy_into(dst: &mut Tensor, dst_at: usize, src: &Tensor, src_at: usize, len: usize) -> Result<()> {
    #[cfg(feature = "wgpu")]
    if matches!(dst.device(), crate::Device::Wgpu(_)) {
        return wgpu::copy_elems(dst, dst_at, src, src_at, len);
    }
    dst.write_region(dst_at, src, src_at, len)
}

/// Folds a chunk of f32 logits `[n, cols]` (columns `c0..`) into the per-row statistics.
fn lse_chunk(logits: &Tensor, targets: &Tensor, state: &mut Tensor, c0: usize, fresh: bool) -> Result<()> {
    let cols = logits.shape()[1];
    let mismatch = || Error::DeviceMismatch("cross-entropy state on another backend".into());
    match operands("cross-entropy statistics", [logits, targets])? {
        Operands::Cpu([x, t]) => {
            let t = t.as_i32().ok_or_else(|| targets_not_i32("cross-entropy"))?;
            let Storage::Cpu(CpuStorage::F32(st)) = state.storage_mut()? else {
                return Err(mismatch());
            };
            with_elems!(x, x => cpu_lse(x, t, cols, c0, fresh, st));
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [x, t]) => cuda::lse(dev, logits, x, t, state, c0, fresh),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [x, t]) => wgpu::lse(dev, logits, x, t, state, c0, fresh),
    }
}

/// `scale · (softmax − onehot)` of a chunk of logits (columns `c0..`), as `out_dtype`.
fn grad_chunk(
    logits: &Tensor,
    targets: &Tensor,
    state: &Tensor,
    c0: usize,
    scale: f32,
    out_dtype: DType,
) -> Result<Tensor> {
    let &[n, cols] = logits.shape() else {
        return Err(Error::Shape("cross-entropy gradient: logits must be [n, cols]".into()));
    };
    match operands("cross-entropy gradient", [logits, targets, state])? {
        Operands::Cpu([x, t, st]) => {
            let t = t.as_i32().ok_or_else(|| targets_not_i32("cross-entropy"))?;
            let st = StorageElement::slice_of(st).ok_or_else(|| Error::DType("cross-entropy state is f32".into()))?;
            let x = x.to_f32_vec()?;
            let g = with_dtype!(out_dtype, O => O::into_storage(cpu_grad::<O>(&x, t, st, cols, c0, scale)?));
            Ok(Tensor::from_cpu_storage(g, &[n, cols], out_dtype))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [x, t, st]) => cuda::grad(dev, logits, x, t, st, c0, scale, out_dtype),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [x, t, _]) => wgpu::grad(dev, logits, x, t, state, c0, scale, out_dtype),
    }
}

/// The mean loss `inv_count · Σ_counted (max + ln Σexp − target logit)` as an f32 `[]`.
fn finish(state: &Tensor, targets: &Tensor, inv_count: f32) -> Result<Tensor> {
    match operands("cross-entropy loss", [state, targets])? {
        Operands::Cpu([st, t]) => {
            let t = t.as_i32().ok_or_else(|| targets_not_i32("cross-entropy"))?;
            let st: &[f32] = StorageElement::slice_of(st).ok_or_else(|| Error::DType("cross-entropy state".into()))?;
            let sum: f64 = (0..t.len())
                .filter(|&r| t[r] != IGNORE_INDEX)
                .map(|r| row_loss(st[3 * r], st[3 * r + 1], st[3 * r + 2]) as f64)
                .sum();
            Ok(Tensor::from_cpu_storage(CpuStorage::F32(vec![(sum * inv_count as f64) as f32]), &[], DType::F32))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [st, t]) => cuda::finish(dev, state, st, t, inv_count),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [st, t]) => wgpu::finish(dev, state, st, t, inv_count),
    }
}

fn row_loss(max: f32, sum: f32, target_logit: f32) -> f32 {
    max + sum.ln() - target_logit
}

fn targets_not_i32(op: &str) -> Error {
    Error::DType(format!("{op}: targets must be I32 (class indices, {IGNORE_INDEX} for ignored rows)"))
}

/// Checks the targets' dtype, shape and range on the host; returns how many are counted.
fn check_targets(op: &str, targets: &Tensor, n: usize, vocab: usize) -> Result<usize> {
    if targets.dtype() != DType::I32 {
        return Err(Error::DType(format!("{op}: targets are {}; they must be I32 class indices", targets.dtype())));
    }
    if targets.shape() != [n] {
        return Err(Error::Shape(format!("{op}: targets {:?} must be [{n}], one per row", targets.shape())));
    }
    let host: Vec<i32> = targets.to_vec()?;
    let mut counted = 0;
    for (row, &t) in host.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        if t < 0 || t as usize >= vocab {
            return Err(Error::InvalidArgument(format!(
                "{op}: target {t} at row {row} is outside 0..{vocab} and is not the ignore index {IGNORE_INDEX}"
            )));
        }
        counted += 1;
    }
    Ok(counted)
}

/// The gradient's factor `grad_scale / counted` (0 when nothing is counted).
fn grad_factor(op: &str, grad_scale: f32, counted: usize) -> Result<f32> {
    if !grad_scale.is_finite() {
        return Err(Error::InvalidArgument(format!("{op}: grad_scale {grad_scale} is not finite")));
    }
    Ok(if counted == 0 { 0.0 } else { (grad_scale as f64 / counted as f64) as f32 })
}

// ---------------------------------------------------------------------------------------
// CPU

/// e^x for x ≤ 0 (and NaN), vectorisable: Cody–Waite reduction by ln 2 and Cephes' degree-6
/// polynomial (within 2 ulp of e^x); arguments below −87.3 give 0 instead of a subnormal.
#[inline(always)]
pub(crate) fn exp_nonpositive(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding it rounds to an integer
    let xc = x.max(-87.0);
    let k = (xc * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5e-1;
    let y = p * r * r + r + 1.0;
    let pow2 = f32::from_bits(((k as i32 + 127) as u32) << 23);
    let v = y * pow2;
    if x < -87.0 {
        0.0
    } else if x.is_nan() {
        x
    } else {
        v
    }
}

/// Columns folded into a row's statistics at a time: one max and one rescale per block.
const BLOCK: usize = 256;

/// Folds `x` (one row's columns) into `(max, sum)`.
fn fold_row(x: impl Fn(usize) -> f32, cols: usize, max: &mut f32, sum: &mut f32) {
    let mut buf = [0f32; BLOCK];
    for b0 in (0..cols).step_by(BLOCK) {
        let len = BLOCK.min(cols - b0);
        let vals = &mut buf[..len];
        for (j, v) in vals.iter_mut().enumerate() {
            *v = x(b0 + j);
        }
        let block_max = vals.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        if vals.iter().any(|v| v.is_nan()) {
            *max = f32::NAN;
            *sum = f32::NAN;
            return;
        }
        let new_max = max.max(block_max);
        if new_max == f32::NEG_INFINITY {
            continue;
        }
        let block_sum: f32 = vals.iter().map(|&v| exp_nonpositive(v - new_max)).sum();
        *sum = *sum * exp_nonpositive(*max - new_max) + block_sum;
        *max = new_max;
    }
}

/// The fused row pass of [`cross_entropy`]: statistics, then the gradient, row by row.
fn cpu_rows<T: StorageElement>(x: &[T], t: &[i32], vocab: usize, scale: f32, state: &mut [f32]) -> Result<CpuStorage> {
    let mut g = try_zeros::<T>(x.len())?;
    g.par_chunks_mut(vocab).zip(state.par_chunks_mut(3)).enumerate().for_each(|(r, (g, st))| {
        let row = &x[r * vocab..(r + 1) * vocab];
        let (mut max, mut sum) = (f32::NEG_INFINITY, 0f32);
        fold_row(|j| row[j].to_f32(), vocab, &mut max, &mut sum);
        let target = t[r];
        let target_logit = if target >= 0 { row[target as usize].to_f32() } else { 0.0 };
        st.copy_from_slice(&[max, sum, target_logit]);
        write_grad(|j| row[j].to_f32(), g, max + sum.ln(), target, 0, scale);
    });
    Ok(T::into_storage(g))
}

/// One row of `scale · (softmax − onehot)` over columns `c0..c0 + g.len()`; zero for an
/// ignored row.
fn write_grad<O: Element>(x: impl Fn(usize) -> f32, g: &mut [O], lse: f32, target: i32, c0: usize, scale: f32) {
    if target == IGNORE_INDEX {
        g.iter_mut().for_each(|v| *v = O::from_f32(0.0));
        return;
    }
    for (j, v) in g.iter_mut().enumerate() {
        let onehot = if (c0 + j) as i64 == target as i64 { 1.0 } else { 0.0 };
        *v = O::from_f32((exp_nonpositive(x(j) - lse) - onehot) * scale);
    }
}

/// Folds a chunk `[n, cols]` (columns `c0..`) into the statistics, row by row.
fn cpu_lse<T: Element>(x: &[T], t: &[i32], cols: usize, c0: usize, fresh: bool, state: &mut [f32]) {
    state.par_chunks_mut(3).enumerate().for_each(|(r, st)| {
        if fresh {
            st.copy_from_slice(&[f32::NEG_INFINITY, 0.0, 0.0]);
        }
        let row = &x[r * cols..(r + 1) * cols];
        let (mut max, mut sum) = (st[0], st[1]);
        fold_row(|j| row[j].to_f32(), cols, &mut max, &mut sum);
        st[0] = max;
        st[1] = sum;
        let target = t[r];
        if target >= c0 as i32 && ((target as usize) < c0 + cols) {
            st[2] = row[target as usize - c0].to_f32();
        }
    });
}

fn cpu_grad<O: Element>(x: &[f32], t: &[i32], state: &[f32], cols: usize, c0: usize, scale: f32) -> Result<Vec<O>> {
    let mut g = try_zeros::<O>(x.len())?;
    if cols > 0 {
        g.par_chunks_mut(cols).enumerate().for_each(|(r, g)| {
            let row = &x[r * cols..(r + 1) * cols];
            write_grad(|j| row[j], g, state[3 * r] + state[3 * r + 1].ln(), t[r], c0, scale);
        });
    }
    Ok(g)
}

/// [`linear_cross_entropy`] on the CPU with a dense head: the crate's CPU matmul reads each
/// chunk of W where it lies and accumulates `dh` in place, so no copy of W and no `[n, d]`
/// product exists beside the accumulator.
fn cpu_dense_linear(
    h: &Tensor,
    w: &Tensor,
    targets: &Tensor,
    plan: &Plan,
    counted: usize,
) -> Result<LinearCrossEntropy> {
    use crate::ops::matmul::{MatmulProblem, cpu_matmul_into};
    let (n, d, vocab) = (plan.n, plan.d, plan.vocab);
    let (hs, ws, ts) = match operands("linear_cross_entropy", [h, w, targets])? {
        Operands::Cpu([hs, ws, ts]) => (hs, ws, ts),
        #[allow(unreachable_patterns)] // the only arm in a CPU-only build
        _ => return Err(Error::DeviceMismatch("linear_cross_entropy: expected CPU operands".into())),
    };
    let t = ts.as_i32().ok_or_else(|| targets_not_i32("linear_cross_entropy"))?;
    let differ = || Error::DType("linear_cross_entropy: h and the head differ in dtype".into());
    let mut state = try_vec_state(n)?;
    let mut dh = try_zeros::<f32>(n * d)?;
    let dw: Option<CpuStorage> = with_elems!(hs, hv => {
        let wv = StorageElement::slice_of(ws).ok_or_else(differ)?;
        let logits_of = |c0: usize, cols: usize| -> Result<Vec<f32>> {
            let p = MatmulProblem::unbatched(n, cols, d, true, h.dtype());
            let mut logits = try_zeros::<f32>(n * cols)?;
            cpu_matmul_into(&p, hv, &wv[c0 * d..(c0 + cols) * d], &mut logits, false);
            Ok(logits)
        };
        for (c0, cols) in plan.chunks() {
            cpu_lse(&logits_of(c0, cols)?, t, cols, c0, c0 == 0, &mut state);
        }
        let mut dw_host = if plan.head_grad { Some(zeros_like(hv, vocab * d)?) } else { None };
        for (c0, cols) in plan.chunks() {
            let logits = logits_of(c0, cols)?;
            // Rounded to the head's dtype, as the GPU paths feed their products.
            let g = cpu_grad(&logits, t, &state, cols, c0, plan.scale)?;
            drop(logits);
            cpu_matmul_into(&MatmulProblem::unbatched(n, d, cols, false, h.dtype()), &g, &wv[c0 * d..(c0 + cols) * d], &mut dh, true);
            if let Some(dw_host) = dw_host.as_mut() {
                let p = MatmulProblem { trans_a: true, ..MatmulProblem::unbatched(cols, d, n, false, h.dtype()) };
                let mut part = try_zeros::<f32>(cols * d)?;
                cpu_matmul_into(&p, &g, hv, &mut part, false);
                let dst: &mut [_] = &mut dw_host[c0 * d..(c0 + cols) * d];
                let dst = SharedMut(dst.as_mut_ptr());
                // SAFETY: each task writes its own element of the chunk's rows.
                part.par_iter().enumerate().for_each(|(i, &v)| unsafe { *dst.ptr().add(i) = Element::from_f32(v) });
            }
        }
        dw_host.map(StorageElement::into_storage)
    });
    let loss = finish(&Tensor::from_cpu_storage(CpuStorage::F32(state), &[n, 3], DType::F32), targets, plan.inv_count)?;
    let dh = Tensor::from_cpu_storage(CpuStorage::from_f32_vec(h.dtype(), dh)?, &[n, d], h.dtype());
    let dw = dw.map(|s| Tensor::from_cpu_storage(s, &[vocab, d], w.dtype()));
    Ok(LinearCrossEntropy { loss, dh, dw, counted })
}

/// `len` zeros of `like`'s element type.
fn zeros_like<T: Element>(_like: &[T], len: usize) -> Result<Vec<T>> {
    try_zeros(len)
}

fn try_vec_state(n: usize) -> Result<Vec<f32>> {
    let mut st = try_zeros::<f32>(3 * n)?;
    st.par_chunks_mut(3).for_each(|s| s[0] = f32::NEG_INFINITY);
    Ok(st)
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
crate::kernels::kernel_params! {
    /// Sizes and factors of one loss kernel (`struct LossParams` in `kernels/loss.cu` and
    /// `shaders/loss_*.wgsl`).
    pub(crate) struct LossParams {
        rows: u32,
        cols: u32,
        col0: u32,
        fresh: u32,
        scale: f32,
        inv_count: f32,
        groups_x: u32,
        pad0: u32,
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl LossParams {
    /// `Err(Unsupported)` when a size or an element index passes the kernels' 32 bits.
    fn new(rows: usize, cols: usize, col0: usize, fresh: bool, scale: f32, inv_count: f32) -> Result<LossParams> {
        let size = |what: &str, v: usize| {
            u32::try_from(v).map_err(|_| {
                Error::Unsupported(format!("cross-entropy: {what} = {v} exceeds the kernels' 32-bit sizes"))
            })
        };
        size("elements of a chunk", rows.saturating_mul(cols))?;
        size("vocabulary columns", col0 + cols)?;
        Ok(LossParams {
            rows: size("rows", rows)?,
            cols: size("columns", cols)?,
            col0: size("first column", col0)?,
            fresh: fresh as u32,
            scale,
            inv_count,
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::exp_nonpositive;

    #[test]
    fn exp_is_within_two_ulp_on_the_softmax_domain() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            assert!((got - want).abs() <= 2.0 * f32::EPSILON as f64 * want, "exp({x}) = {got}, want {want}");
            x += 0.0137;
        }
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-1000.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert!(exp_nonpositive(f32::NAN).is_nan());
    }
}
