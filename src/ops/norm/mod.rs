//! RMSNorm over the last dimension, `y = w ⊙ x / √(mean(x²) + eps)`, its backward, and the
//! fused residual add of llm.c (`h = x + r; y = norm(h)`).
//!
//! Dtypes: x (and r, h, y, dy, dx) share one dtype, f32, f16 or bf16; the weight w may have
//! another (f32 norm weights beside bf16 activations, as GGUF files store them), and dw
//! takes w's dtype. Statistics are f32: Σx² is accumulated in f32, `rstd = 1/√(Σx²/d +
//! eps)` is returned as an f32 tensor of x's leading dimensions, and each output is
//! computed in f32 as `(x · rstd) · w` and rounded once.
//!
//! The backward, with `x̂ = x · rstd` and `g = dy ⊙ w`:
//! `dx = rstd · (g − x̂ · mean(g ⊙ x̂))` per row, `dw = Σ_rows dy ⊙ x̂`. The sum over rows is
//! deterministic on every backend: rows are split into groups fixed by the row count alone
//! (see [`dw_groups`]), each group's partial sum runs over its rows in order, and the
//! partials are added in group order. No float atomics.
//!
//! Kernels: the CPU code here (rayon over rows; each row converted to f32 once, inner loops
//! in eight lanes so they vectorise); CUDA `kernels/norm.cu` (a block per row, warp
//! shuffles); WGSL `shaders/norm_*.wgsl` (a workgroup per row, a workgroup-memory tree).

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::{Operands, Unfilled, convert, operands};
use crate::tensor::{CpuStorage, StorageElement, try_collect, try_vec, with_elems};
use crate::{DType, Error, Result, Tensor};
use rayon::prelude::*;

/// What [`rms_norm`] returns.
#[derive(Debug, Clone)]
pub struct RmsNormOutput {
    /// The normalised rows, x's shape and dtype.
    pub y: Tensor,
    /// `1/√(mean(x²) + eps)` per row: f32, shape x's leading dimensions (`[]` for a rank-1
    /// x). The backward takes it.
    pub rstd: Tensor,
}

/// What [`add_rms_norm`] returns.
#[derive(Debug, Clone)]
pub struct AddRmsNormOutput {
    /// `x + residual`, rounded to x's dtype: the residual stream after the add.
    pub h: Tensor,
    /// The norm of the stored h, x's shape and dtype.
    pub y: Tensor,
    /// As [`RmsNormOutput::rstd`], of h.
    pub rstd: Tensor,
}

/// What [`rms_norm_backward`] returns.
#[derive(Debug, Clone)]
pub struct RmsNormGrads {
    /// The gradient of x: x's shape and dtype.
    pub dx: Tensor,
    /// The gradient of w: `[d]` in w's dtype, summed over every row in a fixed order.
    pub dw: Tensor,
}

/// `Err(DType)` naming `op` and `what` unless `dtype` is a float dtype.
pub(crate) fn float_dtype(op: &str, what: &str, dtype: DType) -> Result<()> {
    match dtype.is_float() {
        true => Ok(()),
        false => Err(Error::DType(format!("{op}: {what} is {dtype}; it takes f32, f16 or bf16"))),
    }
}

/// The sizes of one norm: rows of d elements, x's leading dimensions.
struct Rows {
    rows: usize,
    d: usize,
}

/// Checks x, w and eps; the rows of x.
fn check_forward(op: &str, x: &Tensor, w: &Tensor, eps: f32) -> Result<Rows> {
    if !(eps.is_finite() && eps > 0.0) {
        return Err(Error::InvalidArgument(format!("{op}: eps must be finite and > 0, got {eps}")));
    }
    let Some((&d, lead)) = x.shape().split_last() else {
        return Err(Error::Shape(format!("{op}: x must be [.., d], got a rank-0 tensor")));
    };
    if w.shape() != [d] {
        return Err(Error::Shape(format!(
            "{op}: w {:?} must be [{d}], the last dimension of x {:?}",
            w.shape(),
            x.shape()
        )));
    }
    float_dtype(op, "x", x.dtype())?;
    float_dtype(op, "w", w.dtype())?;
    Ok(Rows { rows: lead.iter().product(), d })
}

/// x's leading dimensions: the shape of rstd.
fn lead(x: &Tensor) -> &[usize] {
    &x.shape()[..x.rank() - 1]
}

/// RMSNorm over the last dimension: `y = w ⊙ x / √(mean(x²) + eps)`, with the per-row
/// `rstd` the backward needs.
///
/// x `[.., d]` in f32, f16 or bf16; w `[d]` in any of them; y takes x's dtype. A row of d = 0
/// has mean square 0 (an empty sum), so its rstd is `1/√eps`; zero rows give empty outputs.
/// NaN or infinite elements propagate to their row.
///
/// Errors: `InvalidArgument` when eps is not finite or not > 0; `Shape` for a rank-0 x or a
/// w that is not `[d]`; `DType` for a non-float dtype; `DeviceMismatch` when x and w are on
/// different devices.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> Result<RmsNormOutput> {
    crate::ops::floats("rms_norm", &[x, w])?;
    let ops = operands("rms_norm", [x, w])?;
    let Rows { rows, d } = check_forward("rms_norm", x, w, eps)?;
    if rows == 0 || d == 0 {
        return Ok(RmsNormOutput {
            y: Tensor::empty(x.shape(), x.dtype(), &x.device())?,
            rstd: empty_rows_rstd(x, eps)?,
        });
    }
    match ops {
        Operands::Cpu([xs, ws]) => {
            let w32 = ws.to_f32_vec()?;
            let (y, _, rstd) = with_elems!(xs, xv => cpu_forward(xv, None, &w32, rows, d, eps)?);
            Ok(RmsNormOutput {
                y: Tensor::from_cpu_storage(y, x.shape(), x.dtype()),
                rstd: Tensor::from_cpu_storage(CpuStorage::F32(rstd), lead(x), DType::F32),
            })
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [xb, wb]) => {
            let (y, _, rstd) = cuda::forward(dev, x, xb, None, w, wb, rows, d, eps)?;
            Ok(RmsNormOutput { y, rstd })
        }
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [xb, wb]) => {
            let (y, _, rstd) = wgpu::forward(dev, x, xb, None, w, wb, rows, d, eps)?;
            Ok(RmsNormOutput { y, rstd })
        }
    }
}

/// The fused residual add and norm of a transformer block: `h = x + residual` (rounded to
/// x's dtype and returned, the stream the next block adds to) and `y = rms_norm(h, w, eps)`
/// of that stored h, in one pass over memory.
///
/// residual has x's shape and dtype; the rest is as [`rms_norm`]. For the backward, call
/// [`rms_norm_backward`] with h as x, then add the gradient arriving along the residual
/// stream to its dx: that sum is the gradient of both x and residual.
///
/// Errors: as [`rms_norm`], and `Shape` or `DType` when residual differs from x in shape or
/// dtype.
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, w: &Tensor, eps: f32) -> Result<AddRmsNormOutput> {
    crate::ops::floats("add_rms_norm", &[x, residual, w])?;
    let ops = operands("add_rms_norm", [x, residual, w])?;
    let Rows { rows, d } = check_forward("add_rms_norm", x, w, eps)?;
    if residual.shape() != x.shape() {
        return Err(Error::Shape(format!(
            "add_rms_norm: residual {:?} must have x's shape {:?}",
            residual.shape(),
            x.shape()
        )));
    }
    if residual.dtype() != x.dtype() {
        return Err(Error::DType(format!("add_rms_norm: x is {} but residual is {}", x.dtype(), residual.dtype())));
    }
    if rows == 0 || d == 0 {
        let empty = || Tensor::empty(x.shape(), x.dtype(), &x.device());
        return Ok(AddRmsNormOutput { h: empty()?, y: empty()?, rstd: empty_rows_rstd(x, eps)? });
    }
    let (y, h, rstd) = match ops {
        Operands::Cpu([xs, rs, ws]) => {
            let w32 = ws.to_f32_vec()?;
            let differ = || Error::DType("add_rms_norm: x and residual storage differ".into());
            let (y, h, rstd) = with_elems!(xs, xv => {
                let rv = StorageElement::slice_of(rs).ok_or_else(differ)?;
                cpu_forward(xv, Some(rv), &w32, rows, d, eps)?
            });
            let h = h.ok_or_else(|| Error::InvalidArgument("add_rms_norm: no h was produced".into()))?;
            (
                Tensor::from_cpu_storage(y, x.shape(), x.dtype()),
                Tensor::from_cpu_storage(h, x.shape(), x.dtype()),
                Tensor::from_cpu_storage(CpuStorage::F32(rstd), lead(x), DType::F32),
            )
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [xb, rb, wb]) => {
            let (y, h, rstd) = cuda::forward(dev, x, xb, Some(rb), w, wb, rows, d, eps)?;
            (y, h.ok_or_else(|| Error::Cuda("add_rms_norm: no h was produced".into()))?, rstd)
        }
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [xb, rb, wb]) => {
            let (y, h, rstd) = wgpu::forward(dev, x, xb, Some(rb), w, wb, rows, d, eps)?;
            (y, h.ok_or_else(|| Error::Wgpu("add_rms_norm: no h was produced".into()))?, rstd)
        }
    };
    Ok(AddRmsNormOutput { h, y, rstd })
}

/// rstd of rows with no elements: `1/√eps` (the mean square of an empty row is 0), computed
/// once on the host so every device gives the same bits.
fn empty_rows_rstd(x: &Tensor, eps: f32) -> Result<Tensor> {
    Tensor::full(lead(x), 1.0 / eps.sqrt(), DType::F32, &x.device())
}

/// The backward of [`rms_norm`]: `dx = rstd · (g − x̂ · mean(g ⊙ x̂))` per row and
/// `dw = Σ_rows dy ⊙ x̂`, with `x̂ = x · rstd` and `g = dy ⊙ w`, in f32.
///
/// dy and x `[.., d]` share a dtype; w `[d]` is the forward's weight (any float dtype); rstd
/// is the forward's, f32 of x's leading dimensions. dx takes x's dtype and dw w's. dw is
/// summed in an order fixed by the shapes alone, so the same inputs give the same bits on
/// every run. Zero rows give an empty dx and a zero dw.
///
/// Errors: `Shape` when dy differs from x, w is not `[d]` or rstd is not x's leading
/// dimensions (or x is rank 0); `DType` when dy and x differ, rstd is not f32 or a dtype is
/// not a float; `DeviceMismatch` across devices.
pub fn rms_norm_backward(dy: &Tensor, x: &Tensor, w: &Tensor, rstd: &Tensor) -> Result<RmsNormGrads> {
    let op = "rms_norm_backward";
    crate::ops::floats(op, &[dy, x, w, rstd])?;
    let ops = operands(op, [dy, x, w, rstd])?;
    let Some((&d, lead_dims)) = x.shape().split_last() else {
        return Err(Error::Shape(format!("{op}: x must be [.., d], got a rank-0 tensor")));
    };
    if dy.shape() != x.shape() {
        return Err(Error::Shape(format!("{op}: dy {:?} must have x's shape {:?}", dy.shape(), x.shape())));
    }
    if w.shape() != [d] {
        return Err(Error::Shape(format!(
            "{op}: w {:?} must be [{d}], the last dimension of x {:?}",
            w.shape(),
            x.shape()
        )));
    }
    if rstd.shape() != lead_dims {
        return Err(Error::Shape(format!(
            "{op}: rstd {:?} must be x's leading dimensions {lead_dims:?} (x {:?})",
            rstd.shape(),
            x.shape()
        )));
    }
    float_dtype(op, "x", x.dtype())?;
    float_dtype(op, "w", w.dtype())?;
    if dy.dtype() != x.dtype() {
        return Err(Error::DType(format!("{op}: dy is {} but x is {}", dy.dtype(), x.dtype())));
    }
    if rstd.dtype() != DType::F32 {
        return Err(Error::DType(format!("{op}: rstd must be f32 (as rms_norm returns it), got {}", rstd.dtype())));
    }
    let rows: usize = lead_dims.iter().product();
    if rows == 0 || d == 0 {
        return Ok(RmsNormGrads {
            dx: Tensor::empty(x.shape(), x.dtype(), &x.device())?,
            dw: Tensor::zeros(w.shape(), w.dtype(), &x.device())?,
        });
    }
    match ops {
        Operands::Cpu([dys, xs, ws, rs]) => {
            let w32 = ws.to_f32_vec()?;
            let rstd32 = rs.to_f32_vec()?;
            let differ = || Error::DType(format!("{op}: dy and x storage differ"));
            let (dx, dw) = with_elems!(xs, xv => {
                let dyv = StorageElement::slice_of(dys).ok_or_else(differ)?;
                cpu_backward(dyv, xv, &w32, &rstd32, rows, d)?
            });
            Ok(RmsNormGrads {
                dx: Tensor::from_cpu_storage(dx, x.shape(), x.dtype()),
                dw: Tensor::from_cpu_storage(CpuStorage::from_f32_vec(w.dtype(), dw)?, w.shape(), w.dtype()),
            })
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [dyb, xb, wb, rb]) => {
            let (dx, dw) = cuda::backward(dev, x, dyb, xb, w, wb, rb, rows, d)?;
            Ok(RmsNormGrads { dx, dw })
        }
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [dyb, xb, wb, rb]) => {
            let (dx, dw) = wgpu::backward(dev, x, dyb, xb, w, wb, rb, rows, d)?;
            Ok(RmsNormGrads { dx, dw })
        }
    }
}

/// How dw's sum over rows is split, on every backend: `(groups, rows_per_group)`. Group g
/// sums rows `g·rows_per_group ..` (fewer in the last) in order; the groups' partial sums
/// are then added in group order. Fixed by the row count alone, so the order, and so the
/// bits, are the same on every run. At most [`MAX_DW_GROUPS`] groups (a bounded partial
/// buffer and a short final sum), and rows_per_group ≥ [`MIN_DW_ROWS_PER_GROUP`] so the
/// partials stay small beside the rows they sum.
pub(crate) fn dw_groups(rows: usize) -> (usize, usize) {
    let per_group = rows.div_ceil(MAX_DW_GROUPS).max(MIN_DW_ROWS_PER_GROUP);
    (rows.div_ceil(per_group).max(1), per_group)
}

/// Most partial sums of dw (see [`dw_groups`]).
pub(crate) const MAX_DW_GROUPS: usize = 1024;
/// Fewest rows one partial sum of dw covers (see [`dw_groups`]).
pub(crate) const MIN_DW_ROWS_PER_GROUP: usize = 8;

/// Σ v² in eight lanes (so it vectorises), lanes added pairwise at the end.
fn sum_squares(v: &[f32]) -> f32 {
    let mut s = [0f32; 8];
    let chunks = v.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().map(|x| x * x).sum();
    for c in chunks {
        for i in 0..8 {
            s[i] += c[i] * c[i];
        }
    }
    ((s[0] + s[4]) + (s[1] + s[5])) + ((s[2] + s[6]) + (s[3] + s[7])) + tail
}

/// `1/√(ss/d + eps)` in f32, the same operations as the kernels.
fn rstd_of(ss: f32, d: usize, eps: f32) -> f32 {
    1.0 / (ss / d as f32 + eps).sqrt()
}

type ForwardOut = (CpuStorage, Option<CpuStorage>, Vec<f32>);

/// The CPU forward over `rows` rows of d: y, h (when a residual is added) and rstd.
fn cpu_forward<T: StorageElement>(
    x: &[T],
    residual: Option<&[T]>,
    w: &[f32],
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<ForwardOut> {
    let mut y = Unfilled::<T>::new(rows * d)?;
    let mut h = match residual {
        Some(_) => Some(Unfilled::<T>::new(rows * d)?),
        None => None,
    };
    let mut rstd = try_vec(rows, 0f32)?;
    let (y_ptr, h_ptr) = (y.ptr(), h.as_mut().map(|h| h.ptr()));
    let zero = T::from_f32(0.0);
    rstd.par_iter_mut().enumerate().for_each_init(
        || (vec![0f32; d], vec![0f32; d], vec![0f32; d], vec![zero; d]),
        |(a, b, c, out), (r, rstd_r)| {
            let span = r * d..(r + 1) * d;
            let v: &[f32] = match (residual, h_ptr) {
                (Some(res), Some(h_ptr)) => {
                    let xa = convert::as_f32(&x[span.clone()], a);
                    let rb = convert::as_f32(&res[span.clone()], b);
                    for ((h, &xj), &rj) in c.iter_mut().zip(xa).zip(rb) {
                        *h = xj + rj;
                    }
                    // SAFETY: row r's span of h is written by this task alone.
                    unsafe { convert::store(h_ptr, r * d, c, out) };
                    if T::DTYPE != crate::DType::F32 {
                        // The norm is of h as stored.
                        convert::to_f32(out, c);
                    }
                    c
                }
                _ => convert::as_f32(&x[span.clone()], a),
            };
            let s = rstd_of(sum_squares(v), d, eps);
            *rstd_r = s;
            for ((yj, &vj), &wj) in b.iter_mut().zip(v).zip(w) {
                *yj = (vj * s) * wj;
            }
            // SAFETY: row r's span of y is written by this task alone.
            unsafe { convert::store(y_ptr, r * d, b, out) };
        },
    );
    // SAFETY: every row of y (and h) was written above.
    let (y, h) = unsafe { (y.filled(), h.map(|h| h.filled())) };
    Ok((T::into_storage(y), h.map(T::into_storage), rstd))
}

/// The CPU backward: dx, and dw in f32 summed as [`dw_groups`] orders it.
fn cpu_backward<T: StorageElement>(
    dy: &[T],
    x: &[T],
    w: &[f32],
    rstd: &[f32],
    rows: usize,
    d: usize,
) -> Result<(CpuStorage, Vec<f32>)> {
    let (groups, per_group) = dw_groups(rows);
    let mut dx = Unfilled::<T>::new(rows * d)?;
    let dx_ptr = dx.ptr();
    let partials: Vec<Result<Vec<f32>>> = try_collect((0..groups).into_par_iter().map(|g| {
        let mut acc = try_vec(d, 0f32)?;
        let (mut dyr, mut xr, mut out) = (try_vec(d, 0f32)?, try_vec(d, 0f32)?, try_vec(d, 0f32)?);
        let mut out_t = try_vec(d, T::from_f32(0.0))?;
        let first = g * per_group;
        for (r, &s) in rstd.iter().enumerate().take(((g + 1) * per_group).min(rows)).skip(first) {
            let span = r * d..(r + 1) * d;
            let dyr = convert::as_f32(&dy[span.clone()], &mut dyr);
            let xr = convert::as_f32(&x[span], &mut xr);
            // mean(g ⊙ x̂) in eight lanes.
            let mut lanes = [0f32; 8];
            let (cd, cx, cw) = (dyr.chunks_exact(8), xr.chunks_exact(8), w.chunks_exact(8));
            let tail: f32 = cd
                .remainder()
                .iter()
                .zip(cx.remainder())
                .zip(cw.remainder())
                .map(|((&dyj, &xj), &wj)| (dyj * wj) * (xj * s))
                .sum();
            for ((cd, cx), cw) in cd.zip(cx).zip(cw) {
                for i in 0..8 {
                    lanes[i] += (cd[i] * cw[i]) * (cx[i] * s);
                }
            }
            let dot = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            let c = (dot + tail) / d as f32;
            for j in 0..d {
                let xh = xr[j] * s;
                out[j] = s * (dyr[j] * w[j] - xh * c);
                acc[j] += dyr[j] * xh;
            }
            // SAFETY: row r's span of dx is written by this group alone.
            unsafe { convert::store(dx_ptr, r * d, &out, &mut out_t) };
        }
        Ok(acc)
    }))?;
    let partials: Vec<Vec<f32>> = partials.into_iter().collect::<Result<_>>()?;
    let mut dw = try_vec(d, 0f32)?;
    dw.par_chunks_mut(256).enumerate().for_each(|(c, out)| {
        for p in &partials {
            for (o, v) in out.iter_mut().zip(&p[c * 256..]) {
                *o += v;
            }
        }
    });
    // SAFETY: every row of dx was written by its group above.
    Ok((T::into_storage(unsafe { dx.filled() }), dw))
}
