//! CUDA launchers for quantized weights (`kernels/quant.cu`): dequantize, and the products,
//! whose kernel [`select`] picks: the GEMV for few token rows, else a GEMM engine.

use super::{Direction, GEMV_MAX_TOKENS, QProblem, QTensor};
use crate::device::cuda::launch::{dtype_code, grid_stride, grid_x, to_i32};
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::kernels::kernel_params;
use crate::ops::matmul::cuda::GemmEngine;
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

kernel_params! {
    /// The weight's format and the place of its NF4 state, as every quant kernel takes it
    /// (`struct QuantParams` in `kernels/quant.cuh`).
    pub(crate) struct QuantParams {
        absmax_offset: u64,
        nested_offset: u64,
        code_offset: u64,
        format: i32,
        offset: f32,
    }
}

impl QuantParams {
    pub(crate) fn of(w: &QTensor) -> QuantParams {
        let l = w.nf4_layout();
        QuantParams {
            absmax_offset: l.absmax_offset as u64,
            nested_offset: l.nested_offset as u64,
            code_offset: l.code_offset as u64,
            format: w.format.code() as i32,
            offset: l.offset,
        }
    }
}

kernel_params! {
    /// The sizes of a product through W (`struct QuantProductParams` in `kernels/quant.cuh`).
    pub(crate) struct QuantProductParams {
        m: i32,
        n: i32,
        k: i32,
        cols: i32,
        direction: i32,
        out_kind: i32,
    }
}

impl QuantProductParams {
    fn of(p: &QProblem, w: &QTensor, out_dtype: DType) -> Result<QuantProductParams> {
        Ok(QuantProductParams {
            m: to_i32("tokens", p.tokens)?,
            n: to_i32("n", p.n)?,
            k: to_i32("k", p.k)?,
            cols: to_i32("in", w.cols)?,
            direction: (p.direction == Direction::InputGrad) as i32,
            out_kind: dtype_code(out_dtype)?,
        })
    }
}

/// The kernels of a product through a quantized weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QuantKernel {
    /// `quant_gemv_{dtype}`: x·Wᵀ for up to [`GEMV_MAX_TOKENS`] rows, a warp per W row.
    Gemv,
    /// `quant_gemm_simt_{dtype}` or `quant_gemm_mma_{dtype}_{fwd,bwd}`.
    Gemm(GemmEngine),
}

/// The GEMM engine for x (of dtype `xd`) times W reduced over `k` on a GPU of compute
/// capability `cc`. The tensor-core engine rounds decoded weights to x's half type: f16 only
/// when they fit.
pub(crate) fn gemm_engine(cc: (u32, u32), xd: DType, w: &QTensor, k: usize) -> GemmEngine {
    let fits = xd == DType::BF16 || (xd == DType::F16 && w.max_abs_bound() <= 65504.0);
    if fits && cc.0 >= 8 && k.is_multiple_of(8) { GemmEngine::Mma } else { GemmEngine::Simt }
}

/// The kernel of a product.
pub(crate) fn select(cc: (u32, u32), p: &QProblem, xd: DType, w: &QTensor) -> QuantKernel {
    if p.tokens <= GEMV_MAX_TOKENS && p.direction == Direction::Forward {
        QuantKernel::Gemv
    } else {
        QuantKernel::Gemm(gemm_engine(cc, xd, w, p.k))
    }
}

impl QuantKernel {
    fn name(self, xd: DType, direction: Direction) -> String {
        match self {
            QuantKernel::Gemv => format!("quant_gemv_{xd}"),
            QuantKernel::Gemm(GemmEngine::Simt) => format!("quant_gemm_simt_{xd}"),
            QuantKernel::Gemm(GemmEngine::Mma) => {
                let dir = if direction == Direction::Forward { "fwd" } else { "bwd" };
                format!("quant_gemm_mma_{xd}_{dir}")
            }
        }
    }

    fn config(self, p: &QProblem) -> Result<LaunchConfig> {
        match self {
            // A warp per output row, 8 per block.
            QuantKernel::Gemv => Ok(LaunchConfig {
                grid_dim: (grid_x("out rows / 8", p.n.div_ceil(8))?, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            }),
            QuantKernel::Gemm(engine) => engine.config(p.tokens, p.n, 1),
        }
    }
}

pub(crate) fn dequantize(dev: &Arc<CudaDevice>, w: &QTensor, buf: &CudaBuffer, dtype: DType) -> Result<Tensor> {
    let out = Tensor::empty(&[w.rows, w.cols], dtype, &w.device())?;
    let n = (w.rows * w.cols) as u64;
    let kind = dtype_code(dtype)?;
    let q = QuantParams::of(w);
    let f = dev.function(&crate::kernels::cuda::QUANT, "dequantize")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(buf.get()).arg(out.cuda_buffer()?).arg(&kind).arg(&n).arg(&q);
    // SAFETY: the buffer holds the weight's state as QuantParams describes; out holds n
    // elements.
    unsafe { launch.launch(grid_stride(n as usize)) }.map_err(|e| CudaDevice::launch_err("dequantize", e))?;
    Ok(out)
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
    let kernel = select(dev.cc, p, x.dtype(), w);
    let name = kernel.name(x.dtype(), p.direction);
    let shape = QuantProductParams::of(p, w, x.dtype())?;
    let q = QuantParams::of(w);
    let f = dev.function(&crate::kernels::cuda::QUANT, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    match kernel {
        QuantKernel::Gemv => launch.arg(wbuf.get()).arg(xbuf.get()),
        QuantKernel::Gemm(_) => launch.arg(xbuf.get()).arg(wbuf.get()),
    };
    launch.arg(out.cuda_buffer()?).arg(&shape).arg(&q);
    // SAFETY: x holds tokens·k elements, out tokens·n, the weight buffer its state as
    // QuantParams describes; on the tensor-core engine rows of x are 16-byte aligned (k a
    // multiple of 8, checked by `select`).
    unsafe { launch.launch(kernel.config(p)?) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernel_source() {
        assert_mirrored::<QuantParams>(crate::kernels::cuda::QUANT.source, Lang::Cuda);
        assert_mirrored::<QuantProductParams>(crate::kernels::cuda::QUANT.source, Lang::Cuda);
    }

    #[test]
    fn block_sizes_match_the_kernels() {
        use crate::ops::quant::formats::GgmlBlock;
        for (name, bytes) in [
            ("BLOCK_Q8_0_BYTES", super::super::BlockQ8_0::BYTES),
            ("BLOCK_Q4_0_BYTES", super::super::BlockQ4_0::BYTES),
            ("BLOCK_Q4_1_BYTES", super::super::BlockQ4_1::BYTES),
        ] {
            let define = format!("#define {name} {bytes}");
            assert!(crate::kernels::cuda::QUANT.source.contains(&define), "kernels/quant.cuh lacks `{define}`");
        }
    }
}
