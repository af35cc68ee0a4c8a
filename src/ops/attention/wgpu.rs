//! WGSL launchers for attention (`shaders/attention_*.wgsl`): one invocation per row for
//! the forward and the backward, per (row, split) then per row for decoding.

use super::decode::DecodeShape;
use super::{AttentionGrads, AttentionOutput, AttnShape, BackwardInputs, KvCache};
use crate::device::wgpu::WgpuDevice;
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input};
use crate::kernels::{kernel_params, wgsl};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// The forward's and the backward's scalars (`struct AttentionParams` in
    /// `shaders/attention_common.wgsl`).
    struct AttentionParams {
        q_len: u32,
        kv_len: u32,
        heads: u32,
        kv_heads: u32,
        dim: u32,
        scale: f32,
        causal: u32,
        rows: u32,
        groups_x: u32,
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
}

impl AttentionParams {
    /// The call's scalars for a dispatch over `rows` rows, 64 per workgroup; returns the
    /// workgroups too.
    fn over(s: &AttnShape, rows: usize) -> Result<(AttentionParams, (u32, u32, u32))> {
        fits_u32("attention elements", s.batch * s.q_len.max(s.kv_len) * s.heads.max(s.kv_heads) * s.dim)?;
        let (gx, gy) = grid_2d(rows.div_ceil(64));
        let params = AttentionParams {
            q_len: fits_u32("q_len", s.q_len)?,
            kv_len: fits_u32("kv_len", s.kv_len)?,
            heads: fits_u32("heads", s.heads)?,
            kv_heads: fits_u32("kv_heads", s.kv_heads)?,
            dim: fits_u32("head dim", s.dim)?,
            scale: s.scale,
            causal: s.causal as u32,
            rows: fits_u32("rows", rows)?,
            groups_x: gx,
            ..Default::default()
        };
        Ok((params, (gx, gy, 1)))
    }
}

kernel_params! {
    /// `struct DecodeSplitParams` in `shaders/attention_decode_split.wgsl`.
    struct DecodeSplitParams {
        q_len: u32,
        capacity: u32,
        heads: u32,
        kv_heads: u32,
        dim: u32,
        scale: f32,
        split_count: u32,
        batch: u32,
        items: u32,
        groups_x: u32,
        pad0: u32,
        pad1: u32,
    }
}

kernel_params! {
    /// `struct DecodeMergeParams` in `shaders/attention_decode_merge.wgsl`.
    struct DecodeMergeParams {
        q_len: u32,
        heads: u32,
        dim: u32,
        split_count: u32,
        rows: u32,
        groups_x: u32,
        pad0: u32,
        pad1: u32,
    }
}

pub(crate) fn forward(
    dev: &Arc<WgpuDevice>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: &AttnShape,
    lens: &[usize],
) -> Result<AttentionOutput> {
    let device = q.device();
    let native = q.dtype() == DType::F16 && dev.shader_f16;
    let key = format!("attention_fwd_{}{}", q.dtype(), if native { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let enable = if native { "enable f16;\n" } else { "" };
        format!(
            "{enable}{}{}{}{}{}",
            wgsl_input("q", 0, q.dtype(), native),
            wgsl_input("k", 1, q.dtype(), native),
            wgsl_input("v", 2, q.dtype(), native),
            wgsl::ATTENTION_COMMON,
            wgsl::ATTENTION_FWD,
        )
    })?;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let o = Tensor::empty(q.shape(), DType::F32, &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let (params, groups) = AttentionParams::over(s, s.batch * s.heads * s.q_len)?;
    let buffers = [
        q.wgpu_buffer()?,
        k.wgpu_buffer()?,
        v.wgpu_buffer()?,
        lens_buf.wgpu_buffer()?,
        o.wgpu_buffer()?,
        lse.wgpu_buffer()?,
    ];
    dev.dispatch(&pipeline, &buffers, &params, groups)?;
    Ok(AttentionOutput { o: o.to_dtype(q.dtype())?, lse })
}

pub(crate) fn backward(
    dev: &Arc<WgpuDevice>,
    inputs: &BackwardInputs<'_>,
    s: &AttnShape,
    lens: &[usize],
) -> Result<AttentionGrads> {
    let BackwardInputs { q, k, v, d_o, lse, delta } = *inputs;
    let device = q.device();
    let dtype = q.dtype();
    // dO in f32 whatever its dtype: no precision lost before the products.
    let d_o = d_o.to_dtype(DType::F32)?;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let loads = || {
        ["q", "k", "v"].iter().enumerate().map(|(i, n)| wgsl_input(n, i as u32, dtype, false)).collect::<String>()
            + &wgsl_input("g", 3, DType::F32, false)
    };
    let shader = |part: &str| {
        let key = format!("attention_bwd_{part}_{dtype}");
        let body = if part == "dq" { wgsl::ATTENTION_BWD_DQ } else { wgsl::ATTENTION_BWD_DKV };
        dev.pipeline(&key, || format!("{}{}{}{body}", loads(), wgsl::ATTENTION_COMMON, wgsl::ATTENTION_BWD_COMMON))
    };
    let inputs = [
        q.wgpu_buffer()?,
        k.wgpu_buffer()?,
        v.wgpu_buffer()?,
        d_o.wgpu_buffer()?,
        lse.wgpu_buffer()?,
        delta.wgpu_buffer()?,
        lens_buf.wgpu_buffer()?,
    ];

    let dq = Tensor::empty(q.shape(), DType::F32, &device)?;
    let (params, groups) = AttentionParams::over(s, s.batch * s.q_len * s.heads)?;
    let mut buffers = inputs.to_vec();
    buffers.push(dq.wgpu_buffer()?);
    let pipeline = shader("dq")?;
    dev.dispatch(&pipeline, &buffers, &params, groups)?;

    let dk = Tensor::empty(k.shape(), DType::F32, &device)?;
    let dv = Tensor::empty(v.shape(), DType::F32, &device)?;
    let (params, groups) = AttentionParams::over(s, s.batch * s.kv_len * s.kv_heads)?;
    let mut buffers = inputs.to_vec();
    buffers.extend([dk.wgpu_buffer()?, dv.wgpu_buffer()?]);
    let pipeline = shader("dkv")?;
    dev.dispatch(&pipeline, &buffers, &params, groups)?;
    Ok(AttentionGrads { dq, dk, dv })
}

/// Decoding against a KV cache: the split shader, then the merge.
pub(crate) fn decode(
    dev: &Arc<WgpuDevice>,
    q: &Tensor,
    cache: &KvCache,
    s: &DecodeShape,
    lens: &[usize],
    q_lens: &[usize],
) -> Result<AttentionOutput> {
    let device = q.device();
    let native = q.dtype() == DType::F16 && dev.shader_f16;
    let key =
        format!("attention_decode_split_{}{}_{}", q.dtype(), if native { "_native" } else { "" }, s.keys_per_split);
    let pipeline = dev.pipeline(&key, || {
        let enable = if native { "enable f16;\n" } else { "" };
        format!(
            "{enable}{}{}{}const KEYS_PER_SPLIT: u32 = {}u;\n{}",
            wgsl_input("q", 0, q.dtype(), native),
            wgsl_input("k", 1, q.dtype(), native),
            wgsl_input("v", 2, q.dtype(), native),
            s.keys_per_split,
            wgsl::ATTENTION_DECODE_SPLIT,
        )
    })?;
    let rows = s.batch * s.heads * s.q_len;
    let items = rows * s.split_count;
    fits_u32("decode partials", items * s.dim)?;
    fits_u32("KV cache elements", s.batch * s.capacity * s.kv_heads * s.dim)?;
    let both: Vec<usize> = lens.iter().chain(q_lens).copied().collect();
    let lens_buf = super::lens_buffer(&both, &device)?;
    let part_ml = Tensor::empty(&[items * 2], DType::F32, &device)?;
    let part_acc = Tensor::empty(&[items * s.dim], DType::F32, &device)?;
    let (gx, gy) = grid_2d(items.div_ceil(64));
    let params = DecodeSplitParams {
        q_len: fits_u32("q_len", s.q_len)?,
        capacity: fits_u32("cache capacity", s.capacity)?,
        heads: fits_u32("heads", s.heads)?,
        kv_heads: fits_u32("kv_heads", s.kv_heads)?,
        dim: fits_u32("head dim", s.dim)?,
        scale: s.scale,
        split_count: fits_u32("splits", s.split_count)?,
        batch: fits_u32("batch", s.batch)?,
        items: fits_u32("items", items)?,
        groups_x: gx,
        ..Default::default()
    };
    let buffers = [
        q.wgpu_buffer()?,
        cache.k().wgpu_buffer()?,
        cache.v().wgpu_buffer()?,
        lens_buf.wgpu_buffer()?,
        part_ml.wgpu_buffer()?,
        part_acc.wgpu_buffer()?,
    ];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;

    let pipeline = dev.pipeline("attention_decode_merge", || wgsl::ATTENTION_DECODE_MERGE.to_string())?;
    let o = Tensor::empty(q.shape(), DType::F32, &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let (gx, gy) = grid_2d(rows.div_ceil(64));
    let merge = DecodeMergeParams {
        q_len: params.q_len,
        heads: params.heads,
        dim: params.dim,
        split_count: params.split_count,
        rows: fits_u32("rows", rows)?,
        groups_x: gx,
        ..Default::default()
    };
    let buffers = [part_ml.wgpu_buffer()?, part_acc.wgpu_buffer()?, o.wgpu_buffer()?, lse.wgpu_buffer()?];
    dev.dispatch(&pipeline, &buffers, &merge, (gx, gy, 1))?;
    Ok(AttentionOutput { o: o.to_dtype(q.dtype())?, lse })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<AttentionParams>(wgsl::ATTENTION_COMMON, Lang::Wgsl);
        assert_mirrored::<DecodeSplitParams>(wgsl::ATTENTION_DECODE_SPLIT, Lang::Wgsl);
        assert_mirrored::<DecodeMergeParams>(wgsl::ATTENTION_DECODE_MERGE, Lang::Wgsl);
    }
}
