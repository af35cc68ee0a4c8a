//! CUDA launchers for the activations (`kernels/activation.cu`).

use super::Act;
use crate::device::cuda::launch::grid_stride;
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::{Result, Tensor};
use cudarc::driver::PushKernelArg;
use std::sync::Arc;

/// One grid-stride launch of `act`'s kernel: the inputs, then the outputs, then n.
pub(crate) fn run(
    dev: &Arc<CudaDevice>,
    act: Act,
    like: &Tensor,
    inputs: &[&CudaBuffer],
    outputs: &[Tensor],
) -> Result<()> {
    let n = like.elem_count() as u64;
    let name = format!("{}_{}", act.name(), like.dtype());
    let f = dev.function(&crate::kernels::cuda::ACTIVATION, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    for b in inputs {
        launch.arg(b.get());
    }
    for o in outputs {
        launch.arg(o.cuda_buffer()?);
    }
    launch.arg(&n);
    // SAFETY: every input and output holds n elements of like's dtype, which the kernel
    // name carries; the counts of each match the kernel's signature for `act`.
    unsafe { launch.launch(grid_stride(n as usize)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(())
}
