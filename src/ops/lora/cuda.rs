//! CUDA launchers for the batched multi-adapter LoRA (`kernels/lora.cu`).

use super::AdapterSet;
use crate::device::cuda::CudaDevice;
use crate::device::cuda::KernelSource;
use crate::tensor::RawBuffer;
use crate::{DType, Error, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

pub(crate) const SOURCE: KernelSource = KernelSource {
    name: "lora",
    source: concat!(include_str!("../../../kernels/common.cuh"), include_str!("../../../kernels/lora.cu")),
    needs_sm90a: false,
};

pub(crate) fn batched(x: &Tensor, y: &Tensor, set: &AdapterSet, adapters: &[i32]) -> Result<Tensor> {
    let dev = x.cuda_device()?.clone();
    let device = x.device();
    let tokens = x.shape()[0];
    let rmax = set.max_rank();
    let table = RawBuffer::new(bytemuck::cast_slice(&set.table).to_vec(), &device)?;
    let rows = RawBuffer::new(bytemuck::cast_slice(adapters).to_vec(), &device)?;
    let v = Tensor::empty(&[tokens, rmax], DType::F32, &device)?;
    let out = Tensor::empty(y.shape(), DType::F32, &device)?;
    let (inp, outn, rmax_i) = (set.inp as i32, set.out as i32, rmax as i32);
    let grid_y = u32::try_from(rmax.div_ceil(8)).map_err(|_| Error::Unsupported("rank too large".into()))?;
    let f = dev.function(&SOURCE, "lora_shrink")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch
        .arg(x.cuda_buffer()?)
        .arg(set.a.cuda_buffer()?)
        .arg(table.cuda_slice()?)
        .arg(rows.cuda_slice()?)
        .arg(v.cuda_buffer()?);
    launch.arg(&inp).arg(&rmax_i);
    let cfg = LaunchConfig { grid_dim: (tokens as u32, grid_y, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: x is [tokens, in], v [tokens, rmax]; the table and rows describe the packed set.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("lora_shrink", e))?;

    let tokens64 = tokens as u64;
    let f = dev.function(&SOURCE, "lora_expand")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(v.cuda_buffer()?).arg(set.b.cuda_buffer()?).arg(table.cuda_slice()?).arg(rows.cuda_slice()?);
    launch.arg(y.cuda_buffer()?).arg(out.cuda_buffer()?).arg(&tokens64).arg(&outn).arg(&rmax_i);
    let n = tokens * set.out;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: y and out are [tokens, out]; v as above.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("lora_expand", e))?;
    Ok(out)
}
