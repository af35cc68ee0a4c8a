//! WGSL launchers for the loss family (`shaders/loss_lse.wgsl`, `shaders/loss_grad.wgsl`,
//! `shaders/loss_finish.wgsl`). The row statistics and the gradient are two dispatches: a
//! 16-bit gradient's words may span two rows, so the gradient is a map over words.

use super::LossParams;
use crate::device::wgpu::launch::{grid_2d, wgsl_input, wgsl_output_words};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::wgsl;
use crate::tensor::Storage;
use crate::{DType, Error, Result, Tensor};
use std::sync::Arc;

/// Folds logits `[n, cols]` (any float dtype; columns `c0..`) into `state`.
pub(crate) fn lse(
    dev: &Arc<WgpuDevice>,
    logits: &Tensor,
    x: &WgpuBuffer,
    targets: &WgpuBuffer,
    state: &mut Tensor,
    c0: usize,
    fresh: bool,
) -> Result<()> {
    let (n, cols) = (logits.shape()[0], logits.shape()[1]);
    let key = format!("loss_lse_{}", logits.dtype());
    let pipeline = dev.pipeline(&key, || {
        format!("{}{}{}", params_struct(), wgsl_input("x", 0, logits.dtype(), false), wgsl::LOSS_LSE)
    })?;
    let (gx, gy) = grid_2d(n);
    let params = LossParams { groups_x: gx, ..LossParams::new(n, cols, c0, fresh, 0.0, 0.0)? };
    dev.dispatch(&pipeline, &[x.get(), targets.get(), state.wgpu_buffer()?], &params, (gx, gy, 1))
}

/// `scale · (softmax − onehot)` of logits `[n, cols]` (columns `c0..`), as `out_dtype`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn grad(
    dev: &Arc<WgpuDevice>,
    logits: &Tensor,
    x: &WgpuBuffer,
    targets: &WgpuBuffer,
    state: &Tensor,
    c0: usize,
    scale: f32,
    out_dtype: DType,
) -> Result<Tensor> {
    let (n, cols) = (logits.shape()[0], logits.shape()[1]);
    let key = format!("loss_grad_{}_{out_dtype}", logits.dtype());
    let pipeline = dev.pipeline(&key, || {
        format!(
            "{}{}{}{}",
            params_struct(),
            wgsl_input("x", 0, logits.dtype(), false),
            wgsl_output_words(3, out_dtype),
            wgsl::LOSS_GRAD
        )
    })?;
    let g = Tensor::empty(logits.shape(), out_dtype, &logits.device())?;
    let words = (n * cols).div_ceil(4 / out_dtype.size_in_bytes());
    let (gx, gy) = grid_2d(words.div_ceil(256));
    let params = LossParams { groups_x: gx, ..LossParams::new(n, cols, c0, false, scale, 0.0)? };
    let buffers = [x.get(), targets.get(), state.wgpu_buffer()?, g.wgpu_buffer()?];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
    Ok(g)
}

/// The mean loss from the statistics, an f32 `[]`.
pub(crate) fn finish(
    dev: &Arc<WgpuDevice>,
    state_t: &Tensor,
    state: &WgpuBuffer,
    targets: &WgpuBuffer,
    inv_count: f32,
) -> Result<Tensor> {
    let n = state_t.shape()[0];
    let pipeline = dev.pipeline("loss_finish", || params_struct() + wgsl::LOSS_FINISH)?;
    let loss = Tensor::empty(&[], DType::F32, &state_t.device())?;
    let params = LossParams::new(n, 0, 0, false, 0.0, inv_count)?;
    dev.dispatch(&pipeline, &[state.get(), targets.get(), loss.wgpu_buffer()?], &params, (1, 1, 1))?;
    Ok(loss)
}

/// Copies `len` elements of `src` from element `src_at` over `dst` from `dst_at`, moving
/// whole 4-byte words as WebGPU copies must: both offsets are multiples of 4 bytes (the
/// callers' chunks start on rows that make them so), and the length is rounded up. The bytes
/// past the region come from inside `src`'s pooled buffer and land in `dst` where a later
/// copy overwrites them or past `dst`'s elements, inside its buffer.
pub(crate) fn copy_elems(dst: &Tensor, dst_at: usize, src: &Tensor, src_at: usize, len: usize) -> Result<()> {
    let es = dst.dtype().size_in_bytes();
    let (Storage::Wgpu { dev, buf: d }, Storage::Wgpu { buf: s, .. }) = (dst.storage(), src.storage()) else {
        return Err(Error::DeviceMismatch("copy between wgpu tensors: an operand is elsewhere".into()));
    };
    if len == 0 {
        return Ok(());
    }
    dev.copy_region(s, src_at * es, d, dst_at * es, (len * es).div_ceil(4) * 4)
}

/// `struct LossParams` for the shaders, generated from the Rust struct.
fn params_struct() -> String {
    crate::kernels::wgsl_struct::<LossParams>("LossParams")
}
