//! WGSL launchers for the batched multi-adapter LoRA (`shaders/lora_shrink.wgsl`,
//! `shaders/lora_expand.wgsl`).

use super::AdapterSet;
use crate::device::wgpu::{fits_u32, grid_2d};
use crate::tensor::RawBuffer;
use crate::{DType, Result, Tensor};

const SHRINK: &str = include_str!("../../../shaders/lora_shrink.wgsl");
const EXPAND: &str = include_str!("../../../shaders/lora_expand.wgsl");

pub(crate) fn batched(x: &Tensor, y: &Tensor, set: &AdapterSet, adapters: &[i32]) -> Result<Tensor> {
    let dev = x.wgpu_device()?.clone();
    let device = x.device();
    let tokens = x.shape()[0];
    let rmax = set.max_rank();
    let table = RawBuffer::new(bytemuck::cast_slice(&set.table).to_vec(), &device)?;
    let rows = RawBuffer::new(bytemuck::cast_slice(adapters).to_vec(), &device)?;
    let v = Tensor::empty(&[tokens, rmax], DType::F32, &device)?;
    let out = Tensor::empty(y.shape(), DType::F32, &device)?;
    let dims =
        [fits_u32("tokens", tokens)?, fits_u32("in", set.inp)?, fits_u32("out", set.out)?, fits_u32("rank", rmax)?];

    let (gx, gy) = grid_2d(tokens * rmax);
    let pipeline = dev.pipeline("lora_shrink", || SHRINK.to_string())?;
    let params = [dims[0], dims[1], dims[2], dims[3], gx];
    let buffers = [x.wgpu_buffer()?, set.a.wgpu_buffer()?, table.wgpu_buffer()?, rows.wgpu_buffer()?, v.wgpu_buffer()?];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;

    let (gx, gy) = grid_2d((tokens * set.out).div_ceil(64));
    let pipeline = dev.pipeline("lora_expand", || EXPAND.to_string())?;
    let params = [dims[0], dims[1], dims[2], dims[3], gx];
    let buffers = [
        v.wgpu_buffer()?,
        set.b.wgpu_buffer()?,
        table.wgpu_buffer()?,
        rows.wgpu_buffer()?,
        y.wgpu_buffer()?,
        out.wgpu_buffer()?,
    ];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
    Ok(out)
}
