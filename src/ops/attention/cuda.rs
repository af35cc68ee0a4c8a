//! CUDA launchers for attention: forward (`kernels/attention_fwd.cu`), backward
//! (`kernels/attention_bwd.cu`) and decoding (`kernels/attention_decode.cu`).

use super::{AttentionOutput, AttnShape};
use crate::device::cuda::CudaDevice;
use crate::device::cuda::launch::{dtype_code, grid, to_i32};
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Head dims with a tensor-core forward kernel (f16/bf16, sm_80+).
const MMA_HEAD_DIMS: [usize; 4] = [64, 80, 96, 128];

pub(crate) fn forward(q: &Tensor, k: &Tensor, v: &Tensor, s: &AttnShape, lens: &[usize]) -> Result<AttentionOutput> {
    let dev = q.cuda_device()?.clone();
    let device = q.device();
    if q.dtype() != DType::F32 && dev.cc.0 >= 8 && MMA_HEAD_DIMS.contains(&s.dim) {
        return forward_mma(&dev, q, k, v, s, lens);
    }
    let rows = (s.batch * s.heads * s.q_len) as u64;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let lens_ref = lens_buf.cuda_slice()?;
    let o = Tensor::empty(q.shape(), DType::F32, &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let name = format!("attention_fwd_{}", q.dtype());
    let f = dev.function(&crate::kernels::cuda::ATTENTION_FWD, &name)?;
    let (q_len, kv_len) = (to_i32("q_len", s.q_len)?, to_i32("kv_len", s.kv_len)?);
    let (heads, kv_heads, dim) = (to_i32("heads", s.heads)?, to_i32("kv_heads", s.kv_heads)?, to_i32("dim", s.dim)?);
    let causal = s.causal as i32;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(q.cuda_buffer()?).arg(k.cuda_buffer()?).arg(v.cuda_buffer()?).arg(lens_ref);
    launch.arg(o.cuda_buffer()?).arg(lse.cuda_buffer()?).arg(&q_len).arg(&kv_len).arg(&heads).arg(&kv_heads);
    launch.arg(&dim).arg(&s.scale).arg(&causal).arg(&rows);
    let cfg = LaunchConfig {
        grid_dim: ((rows as usize).div_ceil(128).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: q is [batch, q_len, heads, dim], k and v [batch, kv_len, kv_heads, dim], lens
    // one per sequence, o like q, lse [batch, heads, q_len].
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(AttentionOutput { o: o.to_dtype(q.dtype())?, lse })
}

/// The FlashAttention-2 forward on tensor cores: 64 query rows of one (batch, head) per
/// block of 128 threads.
fn forward_mma(
    dev: &std::sync::Arc<CudaDevice>,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    s: &AttnShape,
    lens: &[usize],
) -> Result<AttentionOutput> {
    let device = q.device();
    let lens_buf = super::lens_buffer(lens, &device)?;
    let o = Tensor::empty(q.shape(), q.dtype(), &device)?;
    let lse = Tensor::empty(&[s.batch, s.heads, s.q_len], DType::F32, &device)?;
    let name = format!("attention_fwd_mma_{}_d{}", q.dtype(), s.dim);
    let f = dev.function(&crate::kernels::cuda::ATTENTION_FWD, &name)?;
    let (q_len, kv_len) = (to_i32("q_len", s.q_len)?, to_i32("kv_len", s.kv_len)?);
    let (heads, kv_heads) = (to_i32("heads", s.heads)?, to_i32("kv_heads", s.kv_heads)?);
    let causal = s.causal as i32;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(q.cuda_buffer()?).arg(k.cuda_buffer()?).arg(v.cuda_buffer()?).arg(lens_buf.cuda_slice()?);
    launch.arg(o.cuda_buffer()?).arg(lse.cuda_buffer()?).arg(&q_len).arg(&kv_len).arg(&heads).arg(&kv_heads);
    launch.arg(&s.scale).arg(&causal);
    let cfg = LaunchConfig {
        grid_dim: (grid("query tiles", s.q_len.div_ceil(64))?, grid("batch × heads", s.batch * s.heads)?, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: q is [batch, q_len, heads, dim] and k, v [batch, kv_len, kv_heads, dim] in a
    // half type with dim one of MMA_HEAD_DIMS (rows of 16-byte multiples), lens one per
    // sequence, o like q, lse [batch, heads, q_len].
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(AttentionOutput { o, lse })
}

pub(crate) fn backward(
    inputs: &super::BackwardInputs<'_>,
    s: &AttnShape,
    lens: &[usize],
) -> Result<super::AttentionGrads> {
    let super::BackwardInputs { q, k, v, d_o, lse, dvec } = *inputs;
    let dev = q.cuda_device()?.clone();
    if q.dtype() != DType::F32 && dev.cc.0 >= 8 && MMA_HEAD_DIMS.contains(&s.dim) {
        return backward_mma(&dev, inputs, s, lens);
    }
    let device = q.device();
    let d_o = d_o.to_dtype(DType::F32)?;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let lens_ref = lens_buf.cuda_slice()?;
    let (q_len, kv_len) = (to_i32("q_len", s.q_len)?, to_i32("kv_len", s.kv_len)?);
    let (heads, kv_heads, dim) = (to_i32("heads", s.heads)?, to_i32("kv_heads", s.kv_heads)?, to_i32("dim", s.dim)?);
    let causal = s.causal as i32;
    let cfg = |rows: u64| LaunchConfig {
        grid_dim: ((rows as usize).div_ceil(128).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (128, 1, 1),
        shared_mem_bytes: 0,
    };
    let dq = Tensor::empty(q.shape(), DType::F32, &device)?;
    let dk = Tensor::empty(k.shape(), DType::F32, &device)?;
    let dv = Tensor::empty(v.shape(), DType::F32, &device)?;
    for (kind, rows) in
        [("dq", (s.batch * s.q_len * s.heads) as u64), ("dkv", (s.batch * s.kv_len * s.kv_heads) as u64)]
    {
        let name = format!("attention_bwd_{kind}_{}", q.dtype());
        let f = dev.function(&crate::kernels::cuda::ATTENTION_BWD, &name)?;
        let mut launch = dev.stream.launch_builder(&f);
        launch.arg(q.cuda_buffer()?).arg(k.cuda_buffer()?).arg(v.cuda_buffer()?).arg(d_o.cuda_buffer()?);
        launch.arg(lse.cuda_buffer()?).arg(dvec.cuda_buffer()?).arg(lens_ref);
        launch.arg(&q_len).arg(&kv_len).arg(&heads).arg(&kv_heads).arg(&dim).arg(&s.scale).arg(&causal);
        if kind == "dq" {
            launch.arg(dq.cuda_buffer()?);
        } else {
            launch.arg(dk.cuda_buffer()?).arg(dv.cuda_buffer()?);
        }
        launch.arg(&rows);
        // SAFETY: shapes as in `forward`; dO, lse and D are f32 of the stated shapes; the
        // outputs are shaped like q, k and v.
        unsafe { launch.launch(cfg(rows)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    }
    Ok(super::AttentionGrads { dq, dk, dv })
}

/// Decoding against a KV cache: the split kernel for the head dim's tier, then the merge.
pub(crate) fn decode(
    q: &Tensor,
    cache: &super::KvCache,
    s: &super::decode::DecodeShape,
    lens: &[usize],
    q_lens: &[usize],
) -> Result<AttentionOutput> {
    let dev = q.cuda_device()?.clone();
    let device = q.device();
    let rows = s.batch * s.heads * s.q_len;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let q_lens_buf = super::lens_buffer(q_lens, &device)?;
    let part_ml = Tensor::empty(&[rows * s.splits * 2], DType::F32, &device)?;
    let part_acc = Tensor::empty(&[rows * s.splits * s.dim], DType::F32, &device)?;
    let tier = match s.dim {
        0..=64 => 64,
        65..=128 => 128,
        _ => 256,
    };
    let name = format!("attention_decode_split_{}_d{tier}", q.dtype());
    let f = dev.function(&crate::kernels::cuda::ATTENTION_DECODE, &name)?;
    let (q_len, capacity) = (to_i32("q_len", s.q_len)?, to_i32("cache capacity", s.capacity)?);
    let (heads, kv_heads, dim) = (to_i32("heads", s.heads)?, to_i32("kv_heads", s.kv_heads)?, to_i32("dim", s.dim)?);
    let (split_keys, splits) = (to_i32("split", s.split)?, to_i32("splits", s.splits)?);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(q.cuda_buffer()?).arg(cache.k().cuda_buffer()?).arg(cache.v().cuda_buffer()?);
    launch.arg(lens_buf.cuda_slice()?).arg(q_lens_buf.cuda_slice()?);
    launch.arg(part_ml.cuda_buffer()?).arg(part_acc.cuda_buffer()?);
    launch.arg(&q_len).arg(&capacity).arg(&heads).arg(&kv_heads).arg(&dim).arg(&s.scale).arg(&split_keys).arg(&splits);
    let row_groups = (s.heads / s.kv_heads * s.q_len).div_ceil(8);
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(s.splits).map_err(|_| crate::Error::Unsupported("too many cache splits".into()))?,
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
    let f = dev.function(&crate::kernels::cuda::ATTENTION_DECODE, "attention_decode_merge")?;
    let (kind, rows64) = (dtype_code(q.dtype()), rows as u64);
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(part_ml.cuda_buffer()?).arg(part_acc.cuda_buffer()?).arg(o.cuda_buffer()?).arg(lse.cuda_buffer()?);
    launch.arg(&kind).arg(&q_len).arg(&heads).arg(&dim).arg(&splits).arg(&rows64);
    let cfg = LaunchConfig {
        grid_dim: (grid("query rows", rows.div_ceil(8))?, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: the partials as written above; o like q, lse [batch, heads, q_len].
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("attention_decode_merge", e))?;
    Ok(AttentionOutput { o, lse })
}

/// The FlashAttention-2 backward on tensor cores: dq per 64 query rows, dk and dv per 64
/// keys (summing the kv head's group of query heads in the block), dO in q's half type.
fn backward_mma(
    dev: &std::sync::Arc<CudaDevice>,
    inputs: &super::BackwardInputs<'_>,
    s: &AttnShape,
    lens: &[usize],
) -> Result<super::AttentionGrads> {
    let super::BackwardInputs { q, k, v, d_o, lse, dvec } = *inputs;
    let device = q.device();
    let d_o = d_o.to_dtype(q.dtype())?;
    let lens_buf = super::lens_buffer(lens, &device)?;
    let (q_len, kv_len) = (to_i32("q_len", s.q_len)?, to_i32("kv_len", s.kv_len)?);
    let (heads, kv_heads) = (to_i32("heads", s.heads)?, to_i32("kv_heads", s.kv_heads)?);
    let causal = s.causal as i32;
    let dq = Tensor::empty(q.shape(), DType::F32, &device)?;
    let dk = Tensor::empty(k.shape(), DType::F32, &device)?;
    let dv = Tensor::empty(v.shape(), DType::F32, &device)?;
    for kind in ["dq", "dkv"] {
        let name = format!("attention_bwd_{kind}_mma_{}_d{}", q.dtype(), s.dim);
        let f = dev.function(&crate::kernels::cuda::ATTENTION_BWD, &name)?;
        let mut launch = dev.stream.launch_builder(&f);
        launch.arg(q.cuda_buffer()?).arg(k.cuda_buffer()?).arg(v.cuda_buffer()?).arg(d_o.cuda_buffer()?);
        launch.arg(lse.cuda_buffer()?).arg(dvec.cuda_buffer()?).arg(lens_buf.cuda_slice()?);
        let grid_dim = if kind == "dq" {
            launch.arg(dq.cuda_buffer()?);
            (grid("query tiles", s.q_len.div_ceil(64))?, grid("batch × heads", s.batch * s.heads)?, 1)
        } else {
            launch.arg(dk.cuda_buffer()?).arg(dv.cuda_buffer()?);
            (grid("key tiles", s.kv_len.div_ceil(64))?, grid("batch × kv heads", s.batch * s.kv_heads)?, 1)
        };
        launch.arg(&q_len).arg(&kv_len).arg(&heads).arg(&kv_heads).arg(&s.scale).arg(&causal);
        let cfg = LaunchConfig { grid_dim, block_dim: (128, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: q, dO [batch, q_len, heads, dim] and k, v [batch, kv_len, kv_heads, dim] in
        // one half type with dim one of MMA_HEAD_DIMS; lse [batch, heads, q_len] and D
        // [batch, q_len, heads] f32; the gradients f32 shaped like q, k and v.
        unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    }
    Ok(super::AttentionGrads { dq, dk, dv })
}
