//! CUDA launcher for matmul (`kernels/matmul.cu`): the tensor-core kernel for f16/bf16 on
//! sm_80+ when rows are 16-byte aligned, the SIMT kernel otherwise.

use super::MatmulProblem;
use crate::device::cuda::launch::{dtype_code, grid, to_i32};
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Whether the tensor-core kernel takes this problem.
pub(crate) fn uses_tensor_cores(cc: (u32, u32), p: &MatmulProblem) -> bool {
    p.in_dtype != DType::F32 && cc.0 >= 8 && p.lda().is_multiple_of(8) && p.ldb().is_multiple_of(8)
}

pub(crate) fn matmul(
    dev: &Arc<CudaDevice>,
    p: &MatmulProblem,
    a: &CudaBuffer,
    b: &CudaBuffer,
    out: &Tensor,
) -> Result<()> {
    let c = out.cuda_buffer()?;
    let kind = dtype_code(p.out_dtype);
    let (m, n, k) = (to_i32("m", p.m)?, to_i32("n", p.n)?, to_i32("k", p.k)?);
    let (lda, ldb) = (to_i32("lda", p.lda())?, to_i32("ldb", p.ldb())?);
    let (stride_a, stride_b) = (p.batch_stride_a as u64, p.batch_stride_b as u64);
    let batch = grid("batch", p.batch)?;
    if uses_tensor_cores(dev.cc, p) {
        let layout = match (p.trans_a, p.trans_b) {
            (false, false) => "nn",
            (false, true) => "nt",
            (true, false) => "tn",
            (true, true) => "tt",
        };
        let name = format!("matmul_mma_{}_{layout}", p.in_dtype);
        let f = dev.function(&crate::kernels::cuda::MATMUL, &name)?;
        let cfg = LaunchConfig {
            grid_dim: (grid("n tiles", p.n.div_ceil(128))?, grid("m tiles", p.m.div_ceil(128))?, batch),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut launch = dev.stream.launch_builder(&f);
        launch.arg(a.get()).arg(b.get()).arg(c).arg(&kind).arg(&m).arg(&n).arg(&k);
        launch.arg(&lda).arg(&ldb).arg(&stride_a).arg(&stride_b);
        // SAFETY: the argument list matches the kernel's signature; buffers hold the
        // batch·m·k, batch·k·n and batch·m·n elements the problem describes.
        unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    } else {
        let name = format!("matmul_simt_{}", p.in_dtype);
        let f = dev.function(&crate::kernels::cuda::MATMUL, &name)?;
        let cfg = LaunchConfig {
            grid_dim: (grid("n tiles", p.n.div_ceil(64))?, grid("m tiles", p.m.div_ceil(64))?, batch),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        };
        let (trans_a, trans_b) = (p.trans_a as i32, p.trans_b as i32);
        let mut launch = dev.stream.launch_builder(&f);
        launch.arg(a.get()).arg(b.get()).arg(c).arg(&kind).arg(&m).arg(&n).arg(&k);
        launch.arg(&lda).arg(&ldb).arg(&stride_a).arg(&stride_b).arg(&trans_a).arg(&trans_b);
        // SAFETY: as above.
        unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    }
    Ok(())
}
