//! CUDA launchers for attention: forward (`kernels/attention_fwd.cu`), backward
//! (`kernels/attention_bwd.cu`) and decoding (`kernels/attention_decode.cu`). [`select`]
//! picks the forward's and the backward's kernels, [`decode_tier`] the decoding split's.

use super::decode::DecodeShape;
use super::{AttentionGrads, AttentionOutput, AttnShape, BackwardInputs, KvCache};
use crate::device::cuda::CudaDevice;
use crate::device::cuda::launch::{dtype_code, grid, grid_x, to_i32};
use crate::kernels::kernel_params;
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

kernel_params! {
    /// The scalars of every forward and backward kernel (`struct AttentionParams` in
    /// `kernels/attention.cuh`).
    pub(crate) struct AttentionParams {
        rows: u64,
        q_len: i32,
        kv_len: i32,
        heads: i32,
        kv_heads: i32,
        dim: i32,
        scale: f32,
        causal: i32,
        pad0: i32,
    }
}

impl AttentionParams {
    /// The call's scalars, with `rows` rows for the one-row-per-thread kernels.
    fn of(s: &AttnShape, rows: usize) -> Result<AttentionParams> {
        Ok(AttentionParams {
            rows: rows as u64,
            q_len: to_i32("q_len", s.q_len)?,
            kv_len: to_i32("kv_len", s.kv_len)?,
            heads: to_i32("heads", s.heads)?,
            kv_heads: to_i32("kv_heads", s.kv_heads)?,
            dim: to_i32("head dim", s.dim)?,
            scale: s.scale,
            causal: s.causal as i32,
            pad0: 0,
        })
    }
}

kernel_params! {
    /// The decoding split kernel's scalars (`struct DecodeSplitParams` in
    /// `kernels/attention_decode.cu`).
    pub(crate) struct DecodeSplitParams {
        q_len: i32,
        capacity: i32,
        heads: i32,
        kv_heads: i32,
        dim: i32,
        scale: f32,
        keys_per_split: i32,
        split_count: i32,
    }
}

kernel_params! {
    /// The decoding merge kernel's scalars (`struct DecodeMergeParams` in
    /// `kernels/attention_decode.cu`).
    pub(crate) struct DecodeMergeParams {
        rows: u64,
        q_len: i32,
        heads: i32,
        dim: i32,
        split_count: i32,
        out_kind: i32,
        pad0: i32,
    }
}

/// Head dims with tensor-core kernels (f16/bf16, sm_80+).
const MMA_HEAD_DIMS: [usize; 4] = [64, 80, 96, 128];

/// The forward's and the backward's kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AttentionKernel {
    /// One thread per row, any dtype and head dim: `attention_fwd_{dtype}`,
    /// `attention_bwd_{dq,dkv}_{dtype}`.
    Simt,
    /// FlashAttention-2 on tensor cores: `attention_fwd_mma_{dtype}_d{head_dim}`,
    /// `attention_bwd_{dq,dkv}_mma_{dtype}_d{head_dim}`.
    Mma { head_dim: usize },
}

/// The kernel for q of `dtype` with `head_dim` on a GPU of compute capability `cc`.
pub(crate) fn select(cc: (u32, u32), dtype: DType, head_dim: usize) -> AttentionKernel {
    if dtype != DType::F32 && cc.0 >= 8 && MMA_HEAD_DIMS.contains(&head_dim) {
        AttentionKernel::Mma { head_dim }
    } else {
        AttentionKernel::Simt
    }
}

/// The decoding split kernel's head-dim tier (`attention_decode_split_{dtype}_d{tier}`): its
/// lanes hold dims lane + 32e for e < tier / 32.
pub(crate) fn decode_tier(dim: usize) -> usize {
    match dim {
        0..=64 => 64,
        65..=128 => 128,
        _ => 256,
    }
}

/// One-row-per-thread launch: 128 threads per block, grid-stride over `rows`.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (rows.div_ceil(128).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Tensor-core launch: 128 threads per block of 64 rows (queries or keys) of one (batch,
/// head) pair.
fn per_tile(what: &str, len: usize, pairs: usize) -> Result<LaunchConfig> {
    Ok(LaunchConfig {
        grid_dim: (grid_x(what, len.div_ceil(64))?, grid("batch × heads", pairs)?, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    })
}

pub(crate) fn forward(
    dev: &Arc<CudaDevice>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: &AttnShape,
    lens: &[usize],
) -> Result<AttentionOutput> {
    let device = q.device();
    let kernel = select(dev.cc, q.dtype(), s.dim);
    let lens_buf = super::lens_buffer(lens, &device)?;
    // The tensor-core kernel writes o in q's dtype, the other f32 (rounded after).
    let o_dtype = if kernel == AttentionKernel::Simt { DType::F32 } else { q.dtype() };
    let o = Tensor::empty(q.shape(), o_dtype, &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let rows = s.batch * s.heads * s.q_len;
    let (name, cfg) = match kernel {
        AttentionKernel::Simt => (format!("attention_fwd_{}", q.dtype()), per_row(rows)),
        AttentionKernel::Mma { head_dim } => (
            format!("attention_fwd_mma_{}_d{head_dim}", q.dtype()),
            per_tile("query tiles", s.q_len, s.batch * s.heads)?,
        ),
    };
    let params = AttentionParams::of(s, rows)?;
    let f = dev.function(&crate::kernels::cuda::ATTENTION_FWD, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(q.cuda_buffer()?).arg(k.cuda_buffer()?).arg(v.cuda_buffer()?).arg(lens_buf.cuda_slice()?);
    launch.arg(o.cuda_buffer()?).arg(lse.cuda_buffer()?).arg(&params);
    // SAFETY: q is [batch, q_len, heads, dim], k and v [batch, kv_len, kv_heads, dim] (in a
    // half type with dim one of MMA_HEAD_DIMS on the tensor-core kernel, so rows are 16-byte
    // multiples), lens one per sequence, o like q, lse [batch, heads, q_len].
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(AttentionOutput { o: o.to_dtype(q.dtype())?, lse })
}

pub(crate) fn backward(
    dev: &Arc<CudaDevice>,
    inputs: &BackwardInputs<'_>,
    s: &AttnShape,
    lens: &[usize],
) -> Result<AttentionGrads> {
    let BackwardInputs { q, k, v, d_o, lse, delta } = *inputs;
    let device = q.device();
    let kernel = select(dev.cc, q.dtype(), s.dim);
    // dO in f32 for the one-row kernels; in q's half type as a tensor-core operand.
    let d_o = d_o.to_dtype(if kernel == AttentionKernel::Simt { DType::F32 } else { q.dtype() })?;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let dq = Tensor::empty(q.shape(), DType::F32, &device)?;
    let dk = Tensor::empty(k.shape(), DType::F32, &device)?;
    let dv = Tensor::empty(v.shape(), DType::F32, &device)?;
    let (q_rows, kv_rows) = (s.batch * s.q_len * s.heads, s.batch * s.kv_len * s.kv_heads);
    for part in ["dq", "dkv"] {
        let rows = if part == "dq" { q_rows } else { kv_rows };
        let (name, cfg) = match kernel {
            AttentionKernel::Simt => (format!("attention_bwd_{part}_{}", q.dtype()), per_row(rows)),
            AttentionKernel::Mma { head_dim } if part == "dq" => (
                format!("attention_bwd_dq_mma_{}_d{head_dim}", q.dtype()),
                per_tile("query tiles", s.q_len, s.batch * s.heads)?,
            ),
            AttentionKernel::Mma { head_dim } => (
                format!("attention_bwd_dkv_mma_{}_d{head_dim}", q.dtype()),
                per_tile("key tiles", s.kv_len, s.batch * s.kv_heads)?,
            ),
        };
        let params = AttentionParams::of(s, rows)?;
        let f = dev.function(&crate::kernels::cuda::ATTENTION_BWD, &name)?;
        let mut launch = dev.stream.launch_builder(&f);
        launch.arg(q.cuda_buffer()?).arg(k.cuda_buffer()?).arg(v.cuda_buffer()?).arg(d_o.cuda_buffer()?);
        launch.arg(lse.cuda_buffer()?).arg(delta.cuda_buffer()?).arg(lens_buf.cuda_slice()?);
        if part == "dq" {
            launch.arg(dq.cuda_buffer()?);
        } else {
            launch.arg(dk.cuda_buffer()?).arg(dv.cuda_buffer()?);
        }
        launch.arg(&params);
        // SAFETY: q, dO [batch, q_len, heads, dim] and k, v [batch, kv_len, kv_heads, dim]
        // (dO f32, or like q in a half type with dim one of MMA_HEAD_DIMS on the tensor-core
        // kernels); lse [batch, heads, q_len] and D [batch, q_len, heads] f32; the gradients
        // f32 shaped like q, k and v.
        unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    }
    Ok(AttentionGrads { dq, dk, dv })
}

/// Decoding against a KV cache: the split kernel for the head dim's tier, then the merge.
pub(crate) fn decode(
    dev: &Arc<CudaDevice>,
    q: &Tensor,
    cache: &KvCache,
    s: &DecodeShape,
    lens: &[usize],
    q_lens: &[usize],
) -> Result<AttentionOutput> {
    let device = q.device();
    let rows = s.batch * s.heads * s.q_len;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let q_lens_buf = super::lens_buffer(q_lens, &device)?;
    let part_ml = Tensor::empty(&[rows * s.split_count * 2], DType::F32, &device)?;
    let part_acc = Tensor::empty(&[rows * s.split_count * s.dim], DType::F32, &device)?;
    let name = format!("attention_decode_split_{}_d{}", q.dtype(), decode_tier(s.dim));
    let params = DecodeSplitParams {
        q_len: to_i32("q_len", s.q_len)?,
        capacity: to_i32("cache capacity", s.capacity)?,
        heads: to_i32("heads", s.heads)?,
        kv_heads: to_i32("kv_heads", s.kv_heads)?,
        dim: to_i32("head dim", s.dim)?,
        scale: s.scale,
        keys_per_split: to_i32("keys per split", s.keys_per_split)?,
        split_count: to_i32("splits", s.split_count)?,
    };
    let f = dev.function(&crate::kernels::cuda::ATTENTION_DECODE, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(q.cuda_buffer()?).arg(cache.k().cuda_buffer()?).arg(cache.v().cuda_buffer()?);
    launch.arg(lens_buf.cuda_slice()?).arg(q_lens_buf.cuda_slice()?);
    launch.arg(part_ml.cuda_buffer()?).arg(part_acc.cuda_buffer()?).arg(&params);
    let row_groups = (s.heads / s.kv_heads * s.q_len).div_ceil(8);
    let cfg = LaunchConfig {
        grid_dim: (
            grid_x("cache splits", s.split_count)?,
            grid("sequences × kv heads", s.batch * s.kv_heads)?,
            grid("query row groups", row_groups)?,
        ),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: q is [batch, q_len, heads, dim], the cache [batch, capacity, kv_heads, dim]
    // with lens ≤ capacity and q_lens ≤ lens (checked), the partials [rows, splits, 2] and
    // [rows, splits, dim].
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;

    let o = Tensor::empty(q.shape(), q.dtype(), &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let params = DecodeMergeParams {
        rows: rows as u64,
        q_len: params.q_len,
        heads: params.heads,
        dim: params.dim,
        split_count: params.split_count,
        out_kind: dtype_code(q.dtype())?,
        pad0: 0,
    };
    let f = dev.function(&crate::kernels::cuda::ATTENTION_DECODE, "attention_decode_merge")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(part_ml.cuda_buffer()?).arg(part_acc.cuda_buffer()?).arg(o.cuda_buffer()?).arg(lse.cuda_buffer()?);
    launch.arg(&params);
    let cfg = LaunchConfig {
        grid_dim: (grid_x("query rows / 8", rows.div_ceil(8))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the partials as written above; o like q, lse [batch, heads, q_len].
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("attention_decode_merge", e))?;
    Ok(AttentionOutput { o, lse })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::cuda::{ATTENTION_BWD, ATTENTION_DECODE, ATTENTION_FWD};
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernel_sources() {
        assert_mirrored::<AttentionParams>(ATTENTION_FWD.source, Lang::Cuda);
        assert_mirrored::<AttentionParams>(ATTENTION_BWD.source, Lang::Cuda);
        assert_mirrored::<DecodeSplitParams>(ATTENTION_DECODE.source, Lang::Cuda);
        assert_mirrored::<DecodeMergeParams>(ATTENTION_DECODE.source, Lang::Cuda);
    }
}
