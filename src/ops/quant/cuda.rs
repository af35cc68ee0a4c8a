//! CUDA launchers for quantized weights (`kernels/quant.cu`): dequantize, GEMV for few token
//! rows, GEMM (tensor cores for f16/bf16 activations on sm_80+, SIMT otherwise).

use super::{Direction, QProblem, QTensor};
use crate::device::cuda::launch::{dtype_code, grid, to_i32};
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchArgs, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// The format and NF4 state arguments every quant kernel takes last (`QDESC_PARAMS`).
pub(crate) struct QArgs {
    format: i32,
    absmax_off: u64,
    nested_off: u64,
    code_off: u64,
    offset: f32,
}

impl QArgs {
    pub(crate) fn of(w: &QTensor) -> QArgs {
        let l = w.nf4_layout();
        QArgs {
            format: w.format.code() as i32,
            absmax_off: l.absmax_offset as u64,
            nested_off: l.nested_offset as u64,
            code_off: l.code_offset as u64,
            offset: l.offset,
        }
    }

    pub(crate) fn push<'a>(&'a self, launch: &mut LaunchArgs<'a>) {
        launch.arg(&self.format).arg(&self.absmax_off).arg(&self.nested_off).arg(&self.code_off).arg(&self.offset);
    }
}

pub(crate) fn dequantize(dev: &Arc<CudaDevice>, w: &QTensor, buf: &CudaBuffer, dtype: DType) -> Result<Tensor> {
    let out = Tensor::empty(&[w.rows, w.cols], dtype, &w.device())?;
    let n = (w.rows * w.cols) as u64;
    let kind = dtype_code(dtype);
    let q = QArgs::of(w);
    let f = dev.function(&crate::kernels::cuda::QUANT, "dequantize")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(buf.get()).arg(out.cuda_buffer()?).arg(&kind).arg(&n);
    q.push(&mut launch);
    let cfg = LaunchConfig {
        grid_dim: ((n as usize).div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the buffer holds the weight's state as QArgs describes; out holds n elements.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("dequantize", e))?;
    Ok(out)
}

/// Whether the tensor-core GEMM takes x (its dtype) times W reduced over k. It rounds decoded
/// weights to x's half type: f16 only when they fit.
pub(crate) fn uses_tensor_cores(dev: &CudaDevice, xd: DType, w: &QTensor, k: usize) -> bool {
    let fits = xd == DType::BF16 || (xd == DType::F16 && w.max_abs_bound() <= 65504.0);
    fits && dev.cc.0 >= 8 && k.is_multiple_of(8)
}

pub(crate) fn product(
    dev: &Arc<CudaDevice>,
    p: &QProblem,
    x: &Tensor,
    xbuf: &CudaBuffer,
    w: &QTensor,
    wbuf: &CudaBuffer,
    out: &Tensor,
) -> Result<()> {
    let kind = dtype_code(x.dtype());
    let q = QArgs::of(w);
    let y = out.cuda_buffer()?;
    let (m, n, k, cols) = (to_i32("tokens", p.tokens)?, to_i32("n", p.n)?, to_i32("k", p.k)?, to_i32("in", w.cols)?);
    let xd = x.dtype();
    if p.tokens <= super::GEMV_MAX_TOKENS && p.direction == Direction::Forward {
        let name = format!("quant_gemv_{xd}");
        let f = dev.function(&crate::kernels::cuda::QUANT, &name)?;
        let rows = to_i32("out", w.rows)?;
        let mut launch = dev.stream.launch_builder(&f);
        launch.arg(wbuf.get()).arg(xbuf.get()).arg(y).arg(&kind).arg(&rows).arg(&cols).arg(&m);
        q.push(&mut launch);
        let cfg =
            LaunchConfig { grid_dim: (w.rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: x holds tokens·in elements, y tokens·out, the weight buffer its state.
        unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
        return Ok(());
    }
    if uses_tensor_cores(dev, xd, w, p.k) {
        let dir = if p.direction == Direction::Forward { "fwd" } else { "bwd" };
        let name = format!("quant_gemm_mma_{xd}_{dir}");
        let f = dev.function(&crate::kernels::cuda::QUANT, &name)?;
        let mut launch = dev.stream.launch_builder(&f);
        launch.arg(xbuf.get()).arg(wbuf.get()).arg(y).arg(&kind).arg(&m).arg(&n).arg(&k).arg(&cols);
        q.push(&mut launch);
        let cfg = LaunchConfig {
            grid_dim: (grid("n tiles", p.n.div_ceil(128))?, grid("token tiles", p.tokens.div_ceil(128))?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above; rows of x are 16-byte aligned (k a multiple of 8).
        unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    } else {
        let name = format!("quant_gemm_simt_{xd}");
        let f = dev.function(&crate::kernels::cuda::QUANT, &name)?;
        let direction = (p.direction == Direction::InputGrad) as i32;
        let mut launch = dev.stream.launch_builder(&f);
        launch.arg(xbuf.get()).arg(wbuf.get()).arg(y).arg(&kind).arg(&m).arg(&n).arg(&k).arg(&cols).arg(&direction);
        q.push(&mut launch);
        let cfg = LaunchConfig {
            grid_dim: (grid("n tiles", p.n.div_ceil(64))?, grid("token tiles", p.tokens.div_ceil(64))?, 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    }
    Ok(())
}
