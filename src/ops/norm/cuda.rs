//! CUDA launchers for RMSNorm (`kernels/norm.cu`).

use super::dw_groups;
use crate::device::cuda::launch::grid_x;
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::kernels::kernel_params;
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

kernel_params! {
    /// The sizes of one launch (`struct NormParams` in `kernels/norm.cu`).
    pub(crate) struct NormParams {
        rows: u64,
        d: u64,
        /// Rows each block of the backward sums into its partial dw.
        rows_per_group: u64,
        eps: f32,
        /// Whether the backward's dw accumulator is in shared memory (d floats fit).
        use_shared: i32,
    }
}

/// Most dynamic shared memory the backward takes: the 48 KiB a launch has without opting
/// in, less the kernel's static 33-float scratch and some slack.
const SHARED_LIMIT: usize = 48 * 1024 - 256;

/// Threads per block for rows of d: about eight elements per thread, a power of two from
/// one warp to 1024.
fn threads_for(d: usize) -> u32 {
    d.div_ceil(8).next_power_of_two().clamp(32, 1024) as u32
}

/// y, h (with a residual) and rstd.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    xb: &CudaBuffer,
    residual: Option<&CudaBuffer>,
    w: &Tensor,
    wb: &CudaBuffer,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(Tensor, Option<Tensor>, Tensor)> {
    let device = x.device();
    let y = Tensor::empty(x.shape(), x.dtype(), &device)?;
    let h = residual.map(|_| Tensor::empty(x.shape(), x.dtype(), &device)).transpose()?;
    let rstd = Tensor::empty(super::lead(x), DType::F32, &device)?;
    let name = format!("{}rms_norm_{}_{}", if residual.is_some() { "add_" } else { "" }, x.dtype(), w.dtype());
    let f = dev.function(&crate::kernels::cuda::NORM, &name)?;
    let params = NormParams { rows: rows as u64, d: d as u64, rows_per_group: 1, eps, use_shared: 0 };
    let cfg = LaunchConfig {
        grid_dim: (grid_x("rms_norm rows", rows.min(1 << 20))?, 1, 1),
        block_dim: (threads_for(d), 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(xb.get());
    if let Some(r) = residual {
        launch.arg(r.get());
    }
    launch.arg(wb.get()).arg(y.cuda_buffer()?);
    if let Some(h) = &h {
        launch.arg(h.cuda_buffer()?);
    }
    launch.arg(rstd.cuda_buffer()?).arg(&params);
    // SAFETY: x, r, y and h hold rows·d elements of x's dtype, w holds d of its own, rstd
    // holds rows f32; the kernel name carries both dtypes.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok((y, h, rstd))
}

/// dx and dw.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    dyb: &CudaBuffer,
    xb: &CudaBuffer,
    w: &Tensor,
    wb: &CudaBuffer,
    rstdb: &CudaBuffer,
    rows: usize,
    d: usize,
) -> Result<(Tensor, Tensor)> {
    let device = x.device();
    let (groups, per_group) = dw_groups(rows);
    let dx = Tensor::empty(x.shape(), x.dtype(), &device)?;
    let partials = Tensor::empty(&[groups, d], DType::F32, &device)?;
    let dw = Tensor::empty(w.shape(), w.dtype(), &device)?;
    let use_shared = d * 4 <= SHARED_LIMIT;
    let params = NormParams {
        rows: rows as u64,
        d: d as u64,
        rows_per_group: per_group as u64,
        eps: 0.0,
        use_shared: use_shared as i32,
    };
    let name = format!("rms_norm_bwd_{}_{}", x.dtype(), w.dtype());
    let f = dev.function(&crate::kernels::cuda::NORM, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (grid_x("rms_norm_backward row groups", groups)?, 1, 1),
        block_dim: (threads_for(d), 1, 1),
        shared_mem_bytes: if use_shared { (d * 4) as u32 } else { 0 },
    };
    let mut launch = dev.stream.launch_builder(&f);
    launch
        .arg(dyb.get())
        .arg(xb.get())
        .arg(wb.get())
        .arg(rstdb.get())
        .arg(dx.cuda_buffer()?)
        .arg(partials.cuda_buffer()?)
        .arg(&params);
    // SAFETY: dy, x and dx hold rows·d elements of x's dtype, w holds d of its own, rstd
    // rows f32, partials groups·d f32 (one row per block of the grid).
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;

    let name = format!("rms_norm_dw_{}", w.dtype());
    let f = dev.function(&crate::kernels::cuda::NORM, &name)?;
    let (groups64, d64) = (groups as u64, d as u64);
    let cfg = LaunchConfig {
        grid_dim: (d.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(partials.cuda_buffer()?).arg(dw.cuda_buffer()?).arg(&groups64).arg(&d64);
    // SAFETY: partials holds groups·d f32, dw d elements of w's dtype.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok((dx, dw))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernel_source() {
        assert_mirrored::<NormParams>(crate::kernels::cuda::NORM.source, Lang::Cuda);
    }
}
