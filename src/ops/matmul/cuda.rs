//! CUDA launcher for matmul (`kernels/matmul.cu`): [`select`] picks one of the two GEMM
//! engines of `kernels/gemm.cuh`.

use super::MatmulProblem;
use crate::device::cuda::launch::{dtype_code, grid, to_i32};
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::kernels::kernel_params;
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

kernel_params! {
    /// The scalars of every matmul kernel (`struct MatmulParams` in `kernels/matmul.cu`).
    pub(crate) struct MatmulParams {
        stride_a: u64,
        stride_b: u64,
        m: i32,
        n: i32,
        k: i32,
        lda: i32,
        ldb: i32,
        trans_a: i32,
        trans_b: i32,
        out_kind: i32,
    }
}

impl MatmulParams {
    fn of(p: &MatmulProblem) -> Result<MatmulParams> {
        Ok(MatmulParams {
            stride_a: p.batch_stride_a as u64,
            stride_b: p.batch_stride_b as u64,
            m: to_i32("m", p.m)?,
            n: to_i32("n", p.n)?,
            k: to_i32("k", p.k)?,
            lda: to_i32("lda", p.lda())?,
            ldb: to_i32("ldb", p.ldb())?,
            trans_a: p.trans_a as i32,
            trans_b: p.trans_b as i32,
            out_kind: dtype_code(p.out_dtype)?,
        })
    }
}

/// The two GEMM engines of `kernels/gemm.cuh`, which matmul, the quantized GEMM and the
/// fused LoRA layer share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GemmEngine {
    /// Any shape, dtype and arch: 64×64 tiles of C, 16×16 threads.
    Simt,
    /// Tensor cores (`mma.sync`): f16/bf16 on sm_80+ with 16-byte-aligned rows of A; 128×128
    /// tiles of C, 256 threads.
    Mma,
}

impl GemmEngine {
    /// The engine's part of a kernel name.
    pub(crate) fn name(self) -> &'static str {
        match self {
            GemmEngine::Simt => "simt",
            GemmEngine::Mma => "mma",
        }
    }

    /// The launch covering an `m × n` output, one grid slice per batch.
    pub(crate) fn config(self, m: usize, n: usize, batch: usize) -> Result<LaunchConfig> {
        let (tile, block_dim) = match self {
            GemmEngine::Simt => (64, (16, 16, 1)),
            GemmEngine::Mma => (128, (256, 1, 1)),
        };
        Ok(LaunchConfig {
            grid_dim: (grid("n tiles", n.div_ceil(tile))?, grid("m tiles", m.div_ceil(tile))?, grid("batch", batch)?),
            block_dim,
            shared_mem_bytes: 0,
        })
    }
}

/// The matmul kernel for a problem on a GPU of compute capability `cc`:
/// `matmul_mma_{dtype}_{layout}` for f16/bf16 on sm_80+ when the rows of A and B are
/// 16-byte aligned, `matmul_simt_{dtype}` otherwise.
pub(crate) fn select(cc: (u32, u32), p: &MatmulProblem) -> GemmEngine {
    if p.in_dtype != DType::F32 && cc.0 >= 8 && p.lda().is_multiple_of(8) && p.ldb().is_multiple_of(8) {
        GemmEngine::Mma
    } else {
        GemmEngine::Simt
    }
}

fn kernel_name(engine: GemmEngine, p: &MatmulProblem) -> String {
    match engine {
        GemmEngine::Simt => format!("matmul_simt_{}", p.in_dtype),
        GemmEngine::Mma => {
            let layout = match (p.trans_a, p.trans_b) {
                (false, false) => "nn",
                (false, true) => "nt",
                (true, false) => "tn",
                (true, true) => "tt",
            };
            format!("matmul_mma_{}_{layout}", p.in_dtype)
        }
    }
}

pub(crate) fn matmul(
    dev: &Arc<CudaDevice>,
    p: &MatmulProblem,
    a: &CudaBuffer,
    b: &CudaBuffer,
    out: &Tensor,
) -> Result<()> {
    let engine = select(dev.cc, p);
    let name = kernel_name(engine, p);
    let params = MatmulParams::of(p)?;
    let f = dev.function(&crate::kernels::cuda::MATMUL, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(a.get()).arg(b.get()).arg(out.cuda_buffer()?).arg(&params);
    // SAFETY: the arguments match the kernel's signature; the buffers hold the batch·m·k,
    // batch·k·n and batch·m·n elements the problem describes.
    unsafe { launch.launch(engine.config(p.m, p.n, p.batch)?) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernel_source() {
        assert_mirrored::<MatmulParams>(crate::kernels::cuda::MATMUL.source, Lang::Cuda);
    }
}
