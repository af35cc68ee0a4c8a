//! CUDA launcher for token selection (`kernels/sampling.cu`).

use super::{Plan, SampleParams, exp2_table_on};
use crate::device::cuda::launch::grid_x;
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

pub(crate) fn sample(
    dev: &Arc<CudaDevice>,
    logits: &Tensor,
    x: &CudaBuffer,
    rows: usize,
    vocab: usize,
    plan: &Plan,
) -> Result<Tensor> {
    let params = SampleParams::new(plan, rows, vocab)?;
    let table = exp2_table_on(&logits.device())?;
    let ids = Tensor::empty(&[rows], DType::U32, &logits.device())?;
    let name = format!("sample_{}", logits.dtype());
    let f = dev.function(&crate::kernels::cuda::SAMPLING, &name)?;
    let cfg = LaunchConfig { grid_dim: (grid_x("rows", rows)?, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.get()).arg(ids.cuda_buffer()?).arg(table.cuda_buffer()?).arg(&params);
    // SAFETY: x holds rows·vocab elements of the dtype the kernel name says, ids holds rows
    // u32 and the table 256 f32.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernels() {
        assert_mirrored::<SampleParams>(crate::kernels::cuda::SAMPLING.source, Lang::Cuda);
    }
}
