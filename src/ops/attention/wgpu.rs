//! WGSL launchers for attention (`shaders/attention_*.wgsl`).

use super::{AttentionOutput, AttnShape};
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input};
use crate::kernels::wgsl::{
    ATTENTION_BWD_COMMON as BWD_COMMON, ATTENTION_BWD_DKV as BWD_DKV, ATTENTION_BWD_DQ as BWD_DQ,
    ATTENTION_COMMON as COMMON, ATTENTION_DECODE_MERGE as DECODE_MERGE, ATTENTION_DECODE_SPLIT as DECODE_SPLIT,
    ATTENTION_FWD as SHADER,
};
use crate::{DType, Result, Tensor};

/// The `Params` of attention_common.wgsl for a dispatch over `rows` rows.
fn params(s: &AttnShape, rows: usize, groups_x: u32) -> Result<Vec<u32>> {
    fits_u32("attention elements", s.batch * s.q_len.max(s.kv_len) * s.heads.max(s.kv_heads) * s.dim)?;
    Ok(vec![
        fits_u32("q_len", s.q_len)?,
        fits_u32("kv_len", s.kv_len)?,
        fits_u32("heads", s.heads)?,
        fits_u32("kv_heads", s.kv_heads)?,
        fits_u32("head dim", s.dim)?,
        s.scale.to_bits(),
        s.causal as u32,
        fits_u32("rows", rows)?,
        groups_x,
    ])
}

pub(crate) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, s: &AttnShape, lens: &[usize]) -> Result<AttentionOutput> {
    let dev = q.wgpu_device()?.clone();
    let device = q.device();
    let native = q.dtype() == DType::F16 && dev.shader_f16;
    let key = format!("attention_fwd_{}{}", q.dtype(), if native { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let enable = if native { "enable f16;\n" } else { "" };
        format!(
            "{enable}{}{}{}{COMMON}{SHADER}",
            wgsl_input("q", 0, q.dtype(), native),
            wgsl_input("k", 1, q.dtype(), native),
            wgsl_input("v", 2, q.dtype(), native)
        )
    })?;
    let rows = s.batch * s.heads * s.q_len;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let lens_ref = lens_buf.wgpu_buffer()?;
    let o = Tensor::empty(q.shape(), DType::F32, &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let (gx, gy) = grid_2d(rows.div_ceil(64));
    let buffers =
        [q.wgpu_buffer()?, k.wgpu_buffer()?, v.wgpu_buffer()?, lens_ref, o.wgpu_buffer()?, lse.wgpu_buffer()?];
    dev.dispatch(&pipeline, &buffers, &params(s, rows, gx)?, (gx, gy, 1))?;
    Ok(AttentionOutput { o: o.to_dtype(q.dtype())?, lse })
}

pub(crate) fn backward(
    inputs: &super::BackwardInputs<'_>,
    s: &AttnShape,
    lens: &[usize],
) -> Result<super::AttentionGrads> {
    let super::BackwardInputs { q, k, v, d_o, lse, dvec } = *inputs;
    let dev = q.wgpu_device()?.clone();
    let device = q.device();
    let dtype = q.dtype();
    // dO in f32 whatever its dtype: no precision lost before the products.
    let d_o = d_o.to_dtype(DType::F32)?;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let lens_ref = lens_buf.wgpu_buffer()?;
    let loads = || {
        ["q", "k", "v"].iter().enumerate().map(|(i, n)| wgsl_input(n, i as u32, dtype, false)).collect::<String>()
            + &wgsl_input("g", 3, DType::F32, false)
    };
    let inputs = [
        q.wgpu_buffer()?,
        k.wgpu_buffer()?,
        v.wgpu_buffer()?,
        d_o.wgpu_buffer()?,
        lse.wgpu_buffer()?,
        dvec.wgpu_buffer()?,
        lens_ref,
    ];

    let dq = Tensor::empty(q.shape(), DType::F32, &device)?;
    let rows = s.batch * s.q_len * s.heads;
    let (gx, gy) = grid_2d(rows.div_ceil(64));
    let pipeline =
        dev.pipeline(&format!("attention_bwd_dq_{dtype}"), || format!("{}{COMMON}{BWD_COMMON}{BWD_DQ}", loads()))?;
    let mut buffers = inputs.to_vec();
    buffers.push(dq.wgpu_buffer()?);
    dev.dispatch(&pipeline, &buffers, &params(s, rows, gx)?, (gx, gy, 1))?;

    let dk = Tensor::empty(k.shape(), DType::F32, &device)?;
    let dv = Tensor::empty(v.shape(), DType::F32, &device)?;
    let rows = s.batch * s.kv_len * s.kv_heads;
    let (gx, gy) = grid_2d(rows.div_ceil(64));
    let pipeline =
        dev.pipeline(&format!("attention_bwd_dkv_{dtype}"), || format!("{}{COMMON}{BWD_COMMON}{BWD_DKV}", loads()))?;
    let mut buffers = inputs.to_vec();
    buffers.extend([dk.wgpu_buffer()?, dv.wgpu_buffer()?]);
    dev.dispatch(&pipeline, &buffers, &params(s, rows, gx)?, (gx, gy, 1))?;
    Ok(super::AttentionGrads { dq, dk, dv })
}

/// Decoding against a KV cache: the split shader, then the merge.
pub(crate) fn decode(
    q: &Tensor,
    cache: &super::KvCache,
    s: &super::decode::DecodeShape,
    lens: &[usize],
    q_lens: &[usize],
) -> Result<AttentionOutput> {
    let dev = q.wgpu_device()?.clone();
    let device = q.device();
    let native = q.dtype() == DType::F16 && dev.shader_f16;
    let key = format!("attention_decode_split_{}{}_{}", q.dtype(), if native { "_native" } else { "" }, s.split);
    let pipeline = dev.pipeline(&key, || {
        let enable = if native { "enable f16;\n" } else { "" };
        format!(
            "{enable}{}{}{}const SPLIT: u32 = {}u;\n{DECODE_SPLIT}",
            wgsl_input("q", 0, q.dtype(), native),
            wgsl_input("k", 1, q.dtype(), native),
            wgsl_input("v", 2, q.dtype(), native),
            s.split
        )
    })?;
    let rows = s.batch * s.heads * s.q_len;
    let items = rows * s.splits;
    fits_u32("decode partials", items * s.dim)?;
    fits_u32("KV cache elements", s.batch * s.capacity * s.kv_heads * s.dim)?;
    let both: Vec<usize> = lens.iter().chain(q_lens).copied().collect();
    let lens_buf = super::lens_buffer(&both, &device)?;
    let part_ml = Tensor::empty(&[items * 2], DType::F32, &device)?;
    let part_acc = Tensor::empty(&[items * s.dim], DType::F32, &device)?;
    let (gx, gy) = grid_2d(items.div_ceil(64));
    let params = [
        fits_u32("q_len", s.q_len)?,
        fits_u32("cache capacity", s.capacity)?,
        fits_u32("heads", s.heads)?,
        fits_u32("kv_heads", s.kv_heads)?,
        fits_u32("head dim", s.dim)?,
        s.scale.to_bits(),
        fits_u32("splits", s.splits)?,
        fits_u32("batch", s.batch)?,
        fits_u32("items", items)?,
        gx,
    ];
    let buffers = [
        q.wgpu_buffer()?,
        cache.k().wgpu_buffer()?,
        cache.v().wgpu_buffer()?,
        lens_buf.wgpu_buffer()?,
        part_ml.wgpu_buffer()?,
        part_acc.wgpu_buffer()?,
    ];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;

    let pipeline = dev.pipeline("attention_decode_merge", || DECODE_MERGE.to_string())?;
    let o = Tensor::empty(q.shape(), DType::F32, &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let (gx, gy) = grid_2d(rows.div_ceil(64));
    let params = [s.q_len as u32, s.heads as u32, s.dim as u32, s.splits as u32, rows as u32, gx];
    let buffers = [part_ml.wgpu_buffer()?, part_acc.wgpu_buffer()?, o.wgpu_buffer()?, lse.wgpu_buffer()?];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
    Ok(AttentionOutput { o: o.to_dtype(q.dtype())?, lse })
}
