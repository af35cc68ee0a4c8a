//! CUDA launchers for the optimizer (`kernels/optim.cu`): one norm launch and one step
//! launch for the whole list of parameters, driven by a table of device pointers.

use super::{ParamSlot, StepConstants, StepReport};
use crate::device::cuda::CudaDevice;
use crate::device::cuda::launch::{dtype_code, grid_stride};
use crate::kernels::kernel_params;
use crate::{Error, Result, Tensor};
use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
use std::sync::Arc;

/// Elements per block, as `CHUNK` in the kernel.
const CHUNK: usize = 8192;

kernel_params! {
    /// One parameter tensor of a step, a row of the table the kernels walk (`struct
    /// OptimSlot` in `kernels/optim.cu`).
    pub(crate) struct OptimSlot {
        master: u64,
        m: u64,
        v: u64,
        grad: u64,
        /// Device pointers of the optional parts; 0 where absent.
        working: u64,
        anchor: u64,
        fisher: u64,
        /// Elements.
        n: u64,
        /// The first block of the tensor's chunks.
        first_chunk: u64,
        /// Dtype codes of the gradient and the working copy.
        grad_kind: i32,
        working_kind: i32,
        has_working: i32,
        has_anchor: i32,
        has_fisher: i32,
        /// Round the bf16 working copy stochastically, with `key`.
        stochastic: i32,
        key: u32,
        pad0: u32,
    }
}

fn ptr(dev: &CudaDevice, t: &Tensor) -> Result<u64> {
    let (p, _sync) = t.cuda_buffer()?.device_ptr(&dev.stream);
    Ok(p)
}

pub(crate) fn step(dev: &Arc<CudaDevice>, slots: &mut [ParamSlot<'_>], c: &StepConstants) -> Result<StepReport> {
    let mut table: Vec<OptimSlot> = Vec::with_capacity(slots.len());
    let mut chunks = 0usize;
    for (j, s) in slots.iter().enumerate() {
        let n = s.master.elem_count();
        let opt = |t: Option<&Tensor>| t.map(|t| ptr(dev, t)).transpose().map(|p| p.unwrap_or(0));
        let working = s.working.as_deref();
        table.push(OptimSlot {
            master: ptr(dev, s.master)?,
            m: ptr(dev, s.m)?,
            v: ptr(dev, s.v)?,
            grad: ptr(dev, s.grad)?,
            working: opt(working)?,
            anchor: opt(s.anchor)?,
            fisher: opt(s.fisher)?,
            n: n as u64,
            first_chunk: chunks as u64,
            grad_kind: dtype_code(s.grad.dtype())?,
            working_kind: working.map(|w| dtype_code(w.dtype())).transpose()?.unwrap_or(0),
            has_working: working.is_some() as i32,
            has_anchor: s.anchor.is_some() as i32,
            has_fisher: s.fisher.is_some() as i32,
            stochastic: (c.sr_key.is_some() && working.is_some()) as i32,
            key: c.slot_key(j),
            pad0: 0,
        });
        chunks += n.div_ceil(CHUNK).max(1);
    }
    let table_buf = {
        let bytes: &[u8] = bytemuck::cast_slice(&table);
        let mut buf = dev.alloc(bytes.len())?;
        dev.write(&mut buf, bytes)?;
        buf
    };
    let count = i32::try_from(slots.len()).map_err(|_| Error::InvalidArgument("too many parameters".into()))?;
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(chunks).map_err(|_| Error::Unsupported("too many elements".into()))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // Per-block partial sums and flags, then one block folding them in a fixed order.
    let partials = dev.alloc(8 * chunks)?;
    let flags = dev.alloc(4 * chunks)?;
    let result = dev.alloc(16)?;
    let (result_ptr, _sync) = result.get().device_ptr(&dev.stream);
    let (sumsq_ptr, flag_ptr) = (result_ptr, result_ptr + 8);

    let f = dev.function(&crate::kernels::cuda::OPTIM, "grad_sq_norm")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(table_buf.get()).arg(&count).arg(partials.get()).arg(flags.get());
    // SAFETY: the table describes live tensors of the stated sizes and dtypes; partials
    // and flags hold one entry per block.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("grad_sq_norm", e))?;

    let blocks = chunks as u64;
    let f = dev.function(&crate::kernels::cuda::OPTIM, "norm_finish")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(partials.get()).arg(flags.get()).arg(&blocks).arg(&sumsq_ptr).arg(&flag_ptr);
    let one = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: partials and flags hold `blocks` entries; the result holds an f64 and a u32.
    unsafe { launch.launch(one) }.map_err(|e| CudaDevice::launch_err("norm_finish", e))?;

    let f = dev.function(&crate::kernels::cuda::OPTIM, "adamw_step")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(table_buf.get()).arg(&count).arg(&sumsq_ptr).arg(&flag_ptr).arg(&c.adamw);
    // SAFETY: as above; master, m, v and working are owned by this step (storage_mut).
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("adamw_step", e))?;

    let bytes = dev.download(&result, 16)?;
    let sumsq = f64::from_le_bytes(bytes[0..8].try_into().unwrap_or([0; 8]));
    let skipped = u32::from_le_bytes(bytes[8..12].try_into().unwrap_or([0; 4])) != 0;
    let norm = sumsq.sqrt() as f32;
    Ok(StepReport { grad_norm: norm, clip_scale: if skipped { 1.0 } else { c.clip(norm) }, skipped })
}

pub(crate) fn fisher_accumulate(
    dev: &Arc<CudaDevice>,
    fisher: &mut Tensor,
    grad: &Tensor,
    inv_count: f32,
) -> Result<()> {
    let n = fisher.elem_count() as u64;
    let kind = dtype_code(grad.dtype())?;
    let f = dev.function(&crate::kernels::cuda::OPTIM, "fisher_accumulate")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(fisher.cuda_buffer()?).arg(grad.cuda_buffer()?).arg(&kind).arg(&n).arg(&inv_count);
    // SAFETY: both hold n elements; fisher is owned by this call.
    unsafe { launch.launch(grid_stride(n as usize)) }.map_err(|e| CudaDevice::launch_err("fisher_accumulate", e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernel_source() {
        assert_mirrored::<OptimSlot>(crate::kernels::cuda::OPTIM.source, Lang::Cuda);
        assert_mirrored::<super::super::AdamWParams>(crate::kernels::cuda::OPTIM.source, Lang::Cuda);
    }
}
