//! CUDA launchers for the loss family (`kernels/loss.cu`).

use super::LossParams;
use crate::device::cuda::launch::grid_stride;
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// One 256-thread block per row, grid-stride over rows past 65535.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.clamp(1, 1 << 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The fused row pass of `cross_entropy`: `(state [n, 3], dlogits)`.
pub(crate) fn rows(
    dev: &Arc<CudaDevice>,
    logits: &Tensor,
    x: &CudaBuffer,
    targets: &CudaBuffer,
    scale: f32,
) -> Result<(Tensor, Tensor)> {
    let (n, vocab) = (logits.shape()[0], logits.shape()[1]);
    let state = Tensor::empty(&[n, 3], DType::F32, &logits.device())?;
    let g = Tensor::empty(logits.shape(), logits.dtype(), &logits.device())?;
    let params = LossParams::new(n, vocab, 0, true, scale, 0.0)?;
    let name = format!("ce_rows_{}", logits.dtype());
    let f = dev.function(&crate::kernels::cuda::LOSS, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(targets.get()).arg(g.cuda_buffer()?).arg(state.cuda_buffer()?).arg(&params);
    // SAFETY: x and g hold n·vocab elements of the dtype the name says, targets n int32 in
    // 0..vocab or -100 (checked on the host), state 3n f32.
    unsafe { launch.launch(per_row(n)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok((state, g))
}

/// Folds a chunk of f32 logits into `state`.
pub(crate) fn lse(
    dev: &Arc<CudaDevice>,
    logits: &Tensor,
    x: &CudaBuffer,
    targets: &CudaBuffer,
    state: &mut Tensor,
    c0: usize,
    fresh: bool,
) -> Result<()> {
    let (n, cols) = (logits.shape()[0], logits.shape()[1]);
    let params = LossParams::new(n, cols, c0, fresh, 0.0, 0.0)?;
    let f = dev.function(&crate::kernels::cuda::LOSS, "ce_lse")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(targets.get()).arg(state.cuda_buffer()?).arg(&params);
    // SAFETY: x holds n·cols f32, targets n int32, state 3n f32.
    unsafe { launch.launch(per_row(n)) }.map_err(|e| CudaDevice::launch_err("ce_lse", e))?;
    Ok(())
}

/// The gradient of a chunk of f32 logits, as `out_dtype`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn grad(
    dev: &Arc<CudaDevice>,
    logits: &Tensor,
    x: &CudaBuffer,
    targets: &CudaBuffer,
    state: &CudaBuffer,
    c0: usize,
    scale: f32,
    out_dtype: DType,
) -> Result<Tensor> {
    let (n, cols) = (logits.shape()[0], logits.shape()[1]);
    let g = Tensor::empty(logits.shape(), out_dtype, &logits.device())?;
    let params = LossParams::new(n, cols, c0, false, scale, 0.0)?;
    let name = format!("ce_grad_{out_dtype}");
    let f = dev.function(&crate::kernels::cuda::LOSS, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(targets.get()).arg(state.get()).arg(g.cuda_buffer()?).arg(&params);
    // SAFETY: x holds n·cols f32, g n·cols of out_dtype, targets n int32, state 3n f32.
    unsafe { launch.launch(grid_stride(n * cols)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(g)
}

/// The mean loss from the statistics, an f32 `[]`.
pub(crate) fn finish(
    dev: &Arc<CudaDevice>,
    state_t: &Tensor,
    state: &CudaBuffer,
    targets: &CudaBuffer,
    inv_count: f32,
) -> Result<Tensor> {
    let n = state_t.shape()[0];
    let loss = Tensor::empty(&[], DType::F32, &state_t.device())?;
    let params = LossParams::new(n, 0, 0, false, 0.0, inv_count)?;
    let f = dev.function(&crate::kernels::cuda::LOSS, "ce_finish")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(state.get()).arg(targets.get()).arg(loss.cuda_buffer()?).arg(&params);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: state holds 3n f32, targets n int32, loss one f32.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("ce_finish", e))?;
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernel_source() {
        assert_mirrored::<LossParams>(crate::kernels::cuda::LOSS.source, Lang::Cuda);
    }
}
