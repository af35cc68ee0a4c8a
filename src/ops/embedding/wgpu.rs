//! WGSL launchers for token embeddings: the dense gather (`shaders/embedding_gather.wgsl`),
//! the quantized gather (the elementwise map with `shaders/embedding_qgather.wgsl` over the
//! decoders of `shaders/quant_decode.wgsl`) and the backward
//! (`shaders/embedding_backward.wgsl`), each after `shaders/embedding_common.wgsl`.

use super::Buckets;
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input, wgsl_output_words};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::{kernel_params, wgsl, wgsl_struct};
use crate::ops::elementwise::wgpu::MapParams;
use crate::ops::quant::QTensor;
use crate::ops::quant::wgpu::{QuantParams, decode_binding};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// Sizes of an embedding dispatch (`struct EmbeddingParams` in
    /// `shaders/embedding_common.wgsl`).
    pub(crate) struct EmbeddingParams {
        tokens: u32,
        dim: u32,
        vocab: u32,
        elems: u32,
        words: u32,
        groups_x: u32,
        half: u32,
        pass_start: u32,
        pass_len: u32,
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
}

kernel_params! {
    /// The dense gather's and the backward's uniform.
    struct EmbeddingUniform {
        emb: EmbeddingParams,
    }
}

kernel_params! {
    /// The quantized gather's uniform: the map's extent, the table's decoding, the sizes.
    struct QGatherUniform {
        map: MapParams,
        q: QuantParams,
        emb: EmbeddingParams,
    }
}

/// Positions one backward pass adds at most for each element, well under lavapipe's loop
/// limit of about 65k iterations per invocation.
pub(crate) const BACKWARD_PASS: usize = 4096;

/// The sizes shared by the launches, checked to fit the shaders' u32 indices.
fn sizes(tokens: usize, dim: usize, vocab: usize) -> Result<EmbeddingParams> {
    fits_u32("table elements", vocab * dim)?;
    Ok(EmbeddingParams {
        tokens: fits_u32("ids", tokens)?,
        dim: fits_u32("embedding width", dim)?,
        vocab: fits_u32("vocabulary", vocab)?,
        elems: fits_u32("embedding elements", tokens * dim)?,
        ..Default::default()
    })
}

pub(crate) fn gather(
    dev: &Arc<WgpuDevice>,
    table: &Tensor,
    rows: &WgpuBuffer,
    ids: &WgpuBuffer,
    tokens: usize,
    out_shape: &[usize],
) -> Result<Tensor> {
    let pipeline = dev.pipeline("embedding_gather", || {
        format!("{}{}{}", wgsl::EMBEDDING_COMMON, wgsl_struct::<EmbeddingUniform>("Params"), wgsl::EMBEDDING_GATHER)
    })?;
    let (vocab, dim) = (table.shape()[0], table.shape()[1]);
    let mut emb = sizes(tokens, dim, vocab)?;
    let half = table.dtype().size_in_bytes() == 2;
    let words = (tokens * dim).div_ceil(if half { 2 } else { 1 });
    let (gx, gy) = grid_2d(words.div_ceil(256));
    emb.words = fits_u32("output words", words)?;
    emb.groups_x = gx;
    emb.half = half as u32;
    let out = Tensor::empty(out_shape, table.dtype(), &table.device())?;
    dev.dispatch(&pipeline, &[rows.get(), ids.get(), out.wgpu_buffer()?], &EmbeddingUniform { emb }, (gx, gy, 1))?;
    Ok(out)
}

pub(crate) fn qgather(
    dev: &Arc<WgpuDevice>,
    table: &QTensor,
    blocks: &WgpuBuffer,
    ids: &WgpuBuffer,
    tokens: usize,
    dtype: DType,
    out_shape: &[usize],
) -> Result<Tensor> {
    let pipeline = dev.pipeline(&format!("embedding_qgather_{dtype}_{}", table.format()), || {
        format!(
            "{}{}{}@group(0) @binding(1) var<storage, read> ids: array<u32>;\n{}\
             @group(0) @binding(3) var<uniform> params: Params;\n{}{}",
            wgsl::EMBEDDING_COMMON,
            wgsl_struct::<QGatherUniform>("Params"),
            decode_binding(0, table.format()),
            wgsl_output_words(2, dtype),
            wgsl::EMBEDDING_QGATHER,
            wgsl::ELEMENTWISE_MAP,
        )
    })?;
    let [vocab, dim] = table.shape();
    let emb = sizes(tokens, dim, vocab)?;
    let q = QuantParams::of(table)?;
    let map = MapParams::over(tokens * dim, dtype)?;
    let groups = map.workgroups();
    let out = Tensor::empty(out_shape, dtype, &table.device())?;
    dev.dispatch(&pipeline, &[blocks.get(), ids.get(), out.wgpu_buffer()?], &QGatherUniform { map, q, emb }, groups)?;
    Ok(out)
}

pub(crate) fn backward(
    dev: &Arc<WgpuDevice>,
    dy: &Tensor,
    grad: &WgpuBuffer,
    buckets: &Buckets,
    dim: usize,
) -> Result<Tensor> {
    let device = dy.device();
    let native = dy.dtype() == DType::F16 && dev.shader_f16;
    let key = format!("embedding_backward_{}{}", dy.dtype(), if native { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        format!(
            "{}{}{}{}{}",
            if native { "enable f16;\n" } else { "" },
            wgsl::EMBEDDING_COMMON,
            wgsl_struct::<EmbeddingUniform>("Params"),
            wgsl_input("dy", 0, dy.dtype(), native),
            wgsl::EMBEDDING_BACKWARD,
        )
    })?;
    let vocab = buckets.offsets.len() - 1;
    let tokens = buckets.positions.len();
    fits_u32("dy elements", tokens * dim)?;
    let mut emb = sizes(tokens, dim, vocab)?;
    emb.elems = fits_u32("gradient elements", vocab * dim)?;
    emb.pass_len = BACKWARD_PASS as u32;
    let (gx, gy) = grid_2d((vocab * dim).div_ceil(256));
    emb.groups_x = gx;
    let out = Tensor::empty(&[vocab, dim], DType::F32, &device)?;
    let offsets = Tensor::from_slice(&buckets.offsets, &[vocab + 1], &device)?;
    let positions = Tensor::from_slice(&buckets.positions, &[tokens], &device)?;
    let buffers = [grad.get(), offsets.wgpu_buffer()?, positions.wgpu_buffer()?, out.wgpu_buffer()?];
    for pass in 0..buckets.longest().div_ceil(BACKWARD_PASS).max(1) {
        emb.pass_start = (pass * BACKWARD_PASS) as u32;
        dev.dispatch(&pipeline, &buffers, &EmbeddingUniform { emb }, (gx, gy, 1))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<EmbeddingParams>(wgsl::EMBEDDING_COMMON, Lang::Wgsl);
    }
}
