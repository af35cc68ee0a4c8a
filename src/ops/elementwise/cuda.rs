//! CUDA launchers for the elementwise family (`kernels/elementwise.cu`).

use super::BinaryOp;
use crate::device::cuda::launch::grid_stride;
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

pub(crate) fn binary(
    dev: &Arc<CudaDevice>,
    op: BinaryOp,
    a: &Tensor,
    x: &CudaBuffer,
    y: &CudaBuffer,
) -> Result<Tensor> {
    let out = Tensor::empty(a.shape(), a.dtype(), &a.device())?;
    let n = a.elem_count() as u64;
    let name = format!("{}_{}", op.name(), a.dtype());
    let f = dev.function(&crate::kernels::cuda::ELEMENTWISE, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(y.get()).arg(out.cuda_buffer()?).arg(&n);
    // SAFETY: x, y and out each hold n elements of the dtype the kernel name says.
    unsafe { launch.launch(grid_stride(n as usize)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}

pub(crate) fn scale(dev: &Arc<CudaDevice>, a: &Tensor, x: &CudaBuffer, s: f32) -> Result<Tensor> {
    let out = Tensor::empty(a.shape(), a.dtype(), &a.device())?;
    let n = a.elem_count() as u64;
    let name = format!("scale_{}", a.dtype());
    let f = dev.function(&crate::kernels::cuda::ELEMENTWISE, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(out.cuda_buffer()?).arg(&n).arg(&s);
    // SAFETY: x and out each hold n elements.
    unsafe { launch.launch(grid_stride(n as usize)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}

pub(crate) fn cast(dev: &Arc<CudaDevice>, a: &Tensor, x: &CudaBuffer, dtype: DType) -> Result<Tensor> {
    let out = Tensor::empty(a.shape(), dtype, &a.device())?;
    let n = a.elem_count() as u64;
    let name = format!("cast_{}_{}", a.dtype(), dtype);
    let f = dev.function(&crate::kernels::cuda::ELEMENTWISE, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(out.cuda_buffer()?).arg(&n);
    // SAFETY: x and out each hold n elements of their dtypes.
    unsafe { launch.launch(grid_stride(n as usize)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}

pub(crate) fn sum_rows(dev: &Arc<CudaDevice>, a: &Tensor, x: &CudaBuffer, rows: usize, cols: usize) -> Result<Tensor> {
    let out = Tensor::empty(&a.shape()[..a.rank() - 1], a.dtype(), &a.device())?;
    if rows == 0 {
        return Ok(out);
    }
    let name = format!("sum_rows_{}", a.dtype());
    let f = dev.function(&crate::kernels::cuda::ELEMENTWISE, &name)?;
    let (rows64, cols64) = (rows as u64, cols as u64);
    let cfg =
        LaunchConfig { grid_dim: (rows.clamp(1, 1 << 16) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(out.cuda_buffer()?).arg(&rows64).arg(&cols64);
    // SAFETY: x holds rows·cols elements, out holds rows.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}

pub(crate) fn add_bias(
    dev: &Arc<CudaDevice>,
    a: &Tensor,
    x: &CudaBuffer,
    bias: &CudaBuffer,
    cols: usize,
) -> Result<Tensor> {
    let out = Tensor::empty(a.shape(), a.dtype(), &a.device())?;
    let (n, cols) = (a.elem_count() as u64, cols as u64);
    let name = format!("add_bias_{}", a.dtype());
    let f = dev.function(&crate::kernels::cuda::ELEMENTWISE, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(bias.get()).arg(out.cuda_buffer()?).arg(&n).arg(&cols);
    // SAFETY: x and out hold n elements, bias holds cols.
    unsafe { launch.launch(grid_stride(n as usize)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}

pub(crate) fn dropout(
    dev: &Arc<CudaDevice>,
    a: &Tensor,
    x: &CudaBuffer,
    key: u32,
    threshold: u32,
    scale: f32,
) -> Result<Tensor> {
    let out = Tensor::empty(a.shape(), a.dtype(), &a.device())?;
    let n = a.elem_count() as u64;
    let name = format!("dropout_{}", a.dtype());
    let f = dev.function(&crate::kernels::cuda::ELEMENTWISE, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(out.cuda_buffer()?).arg(&n).arg(&key).arg(&threshold).arg(&scale);
    // SAFETY: x and out hold n elements.
    unsafe { launch.launch(grid_stride(n as usize)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}
