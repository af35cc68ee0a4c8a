//! CUDA launchers for token embeddings (`kernels/embedding.cu`).

use super::Buckets;
use crate::device::cuda::launch::dtype_code;
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::kernels::kernel_params;
use crate::ops::quant::QTensor;
use crate::ops::quant::cuda::QuantParams;
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

kernel_params! {
    /// Sizes of an embedding launch (`struct EmbeddingParams` in `kernels/embedding.cu`).
    pub(crate) struct EmbeddingParams {
        tokens: u64,
        dim: u64,
        vocab: u64,
        row_words: u64,
        out_kind: i32,
        pad0: i32,
    }
}

/// Threads per block of every embedding kernel.
const THREADS: u32 = 128;
/// Blocks along a grid-stride dimension: enough to fill any GPU.
const MAX_BLOCKS: usize = 1 << 16;

/// One block per token (grid-stride past [`MAX_BLOCKS`]).
fn per_token(tokens: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (tokens.clamp(1, MAX_BLOCKS) as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// The widest word (16, 8, 4 or 2 bytes) that divides a row of `row_bytes`.
fn word_bytes(row_bytes: usize) -> usize {
    [16, 8, 4, 2].into_iter().find(|w| row_bytes.is_multiple_of(*w)).unwrap_or(2)
}

pub(crate) fn gather(
    dev: &Arc<CudaDevice>,
    table: &Tensor,
    rows: &CudaBuffer,
    ids: &CudaBuffer,
    tokens: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    let out = Tensor::empty(out_shape, table.dtype(), &table.device())?;
    let (vocab, dim) = (table.shape()[0], table.shape()[1]);
    let row_bytes = dim * table.dtype().size_in_bytes();
    let word = word_bytes(row_bytes);
    let p = EmbeddingParams {
        tokens: tokens as u64,
        dim: dim as u64,
        vocab: vocab as u64,
        row_words: (row_bytes / word) as u64,
        ..Default::default()
    };
    let name = format!("embedding_gather_w{word}");
    let f = dev.function(&crate::kernels::cuda::EMBEDDING, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(rows.get()).arg(ids.get()).arg(out.cuda_buffer()?).arg(&p);
    // SAFETY: the table holds vocab rows of row_words words, ids holds `tokens` u32 (each
    // below vocab, and the kernel checks again), out holds tokens rows; buffers start
    // 256-byte aligned and rows are whole words, so every word access is aligned.
    unsafe { launch.launch(per_token(tokens)) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}

pub(crate) fn qgather(
    dev: &Arc<CudaDevice>,
    table: &QTensor,
    blocks: &CudaBuffer,
    ids: &CudaBuffer,
    tokens: usize,
    dtype: DType,
    out_shape: &[usize],
) -> Result<Tensor> {
    let out = Tensor::empty(out_shape, dtype, &table.device())?;
    let [vocab, dim] = table.shape();
    let p = EmbeddingParams {
        tokens: tokens as u64,
        dim: dim as u64,
        vocab: vocab as u64,
        out_kind: dtype_code(dtype)?,
        ..Default::default()
    };
    let q = QuantParams::of(table);
    let f = dev.function(&crate::kernels::cuda::EMBEDDING, "embedding_qgather")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(blocks.get()).arg(ids.get()).arg(out.cuda_buffer()?).arg(&p).arg(&q);
    // SAFETY: the buffer holds the table's state as QuantParams describes, ids `tokens` u32
    // (checked below vocab, and again by the kernel), out tokens·dim elements of dtype;
    // dim is a multiple of the block (32 or 64), so each thread's 8 weights share a block
    // and its stores are aligned.
    unsafe { launch.launch(per_token(tokens)) }.map_err(|e| CudaDevice::launch_err("embedding_qgather", e))?;
    Ok(out)
}

pub(crate) fn backward(
    dev: &Arc<CudaDevice>,
    dy: &Tensor,
    grad: &CudaBuffer,
    buckets: &Buckets,
    dim: usize,
) -> Result<Tensor> {
    let device = dy.device();
    let vocab = buckets.offsets.len() - 1;
    let out = Tensor::empty(&[vocab, dim], DType::F32, &device)?;
    let offsets = Tensor::from_slice(&buckets.offsets, &[vocab + 1], &device)?;
    let positions = Tensor::from_slice(&buckets.positions, &[buckets.positions.len()], &device)?;
    let p = EmbeddingParams {
        tokens: buckets.positions.len() as u64,
        dim: dim as u64,
        vocab: vocab as u64,
        ..Default::default()
    };
    let name = format!("embedding_backward_{}", dy.dtype());
    let f = dev.function(&crate::kernels::cuda::EMBEDDING, &name)?;
    let cfg = LaunchConfig {
        grid_dim: (vocab.clamp(1, MAX_BLOCKS) as u32, dim.div_ceil(THREADS as usize).clamp(1, 65535) as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(grad.get()).arg(offsets.cuda_buffer()?).arg(positions.cuda_buffer()?).arg(out.cuda_buffer()?).arg(&p);
    // SAFETY: dy holds tokens·dim elements of its dtype; offsets vocab + 1 non-decreasing
    // u32 ending at tokens; positions `tokens` u32, each below tokens; out vocab·dim f32.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernel_source() {
        assert_mirrored::<EmbeddingParams>(crate::kernels::cuda::EMBEDDING.source, Lang::Cuda);
    }

    #[test]
    fn words_divide_rows() {
        assert_eq!(
            [word_bytes(2304), word_bytes(1152), word_bytes(12), word_bytes(6), word_bytes(2)],
            [16, 16, 4, 2, 2]
        );
    }
}
