//! WGSL launcher for the attention forward (`shaders/attention_fwd.wgsl`).

use super::{AttentionOutput, AttnShape};
use crate::device::wgpu::{fits_u32, grid_2d, wgsl_input};
use crate::tensor::RawBuffer;
use crate::{DType, Error, Result, Tensor};

const SHADER: &str = include_str!("../../../shaders/attention_fwd.wgsl");

pub(crate) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, s: &AttnShape, lens: &[usize]) -> Result<AttentionOutput> {
    let dev = q.wgpu_device()?.clone();
    let device = q.device();
    let native = q.dtype() == DType::F16 && dev.shader_f16;
    let key = format!("attention_fwd_{}{}", q.dtype(), if native { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let enable = if native { "enable f16;\n" } else { "" };
        format!(
            "{enable}{}{}{}{SHADER}",
            wgsl_input("q", 0, q.dtype(), native),
            wgsl_input("k", 1, q.dtype(), native),
            wgsl_input("v", 2, q.dtype(), native)
        )
    })?;
    let rows = s.batch * s.heads * s.q_len;
    let lens32: Vec<u32> = lens.iter().map(|&l| l.min(u32::MAX as usize) as u32).collect();
    let lens_buf = RawBuffer::new(bytemuck::cast_slice(&lens32).to_vec(), &device)?;
    let lens_ref = match &lens_buf {
        RawBuffer::Wgpu { buf, .. } => buf.get(),
        _ => return Err(Error::DeviceMismatch("expected a wgpu buffer".into())),
    };
    let o = Tensor::empty(q.shape(), DType::F32, &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let (gx, gy) = grid_2d(rows.div_ceil(64));
    fits_u32("attention elements", q.elem_count().max(k.elem_count()))?;
    let params = [
        fits_u32("q_len", s.q_len)?,
        fits_u32("kv_len", s.kv_len)?,
        fits_u32("heads", s.heads)?,
        fits_u32("kv_heads", s.kv_heads)?,
        fits_u32("head dim", s.dim)?,
        s.scale.to_bits(),
        s.causal as u32,
        fits_u32("rows", rows)?,
        gx,
    ];
    let buffers =
        [q.wgpu_buffer()?, k.wgpu_buffer()?, v.wgpu_buffer()?, lens_ref, o.wgpu_buffer()?, lse.wgpu_buffer()?];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
    Ok(AttentionOutput { o: o.to_dtype(q.dtype())?, lse })
}
