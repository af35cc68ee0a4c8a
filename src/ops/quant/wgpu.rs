//! WGSL launchers for quantized weights: dequantize (the elementwise map shader with a
//! quantized loader), GEMV (`shaders/quant_gemv.wgsl`) and GEMM (`shaders/matmul.wgsl` with
//! a loader that decodes W tiles as it stages them).

use super::{Direction, QProblem, QTensor};
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input, wgsl_output_words};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::wgsl::{ELEMENTWISE_MAP as MAP, QUANT_DECODE as DECODE, QUANT_GEMV as GEMV};
use crate::ops::matmul::MatmulProblem;
use crate::ops::matmul::wgpu::{PARAMS_FIELDS, PLAIN_HOOKS, SHADER as MATMUL_SHADER, groups, params as matmul_params};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

/// The `q_*` fields of `Params` that quant_decode.wgsl reads.
pub(crate) const QUANT_FIELDS: &str = "q_format: u32, q_absmax: u32, q_nested: u32, q_code: u32, q_offset: u32,";

pub(crate) fn quant_params(w: &QTensor) -> Result<[u32; 5]> {
    let l = w.nf4_layout();
    fits_u32("quantized weight bytes", w.raw().len())?;
    fits_u32("quantized weight elements", w.rows * w.cols)?;
    Ok([w.format.code(), l.absmax_offset as u32, l.nested_offset as u32, l.code_offset as u32, l.offset.to_bits()])
}

pub(crate) fn decode_binding(binding: u32) -> String {
    format!("@group(0) @binding({binding}) var<storage, read> w: array<u32>;\n{DECODE}")
}

fn native_f16(dev: &WgpuDevice, dtype: DType) -> bool {
    dtype == DType::F16 && dev.shader_f16
}

pub(crate) fn dequantize(dev: &Arc<WgpuDevice>, w: &QTensor, buf: &WgpuBuffer, dtype: DType) -> Result<Tensor> {
    let pipeline = dev.pipeline(&format!("dequantize_{dtype}"), || {
        format!(
            "struct Params {{ len: u32, words: u32, groups_x: u32, s: f32, {QUANT_FIELDS} }}\n\
             @group(0) @binding(2) var<uniform> params: Params;\n{}{}\
             fn apply(i: u32) -> f32 {{ return quant_weight(i); }}\n{MAP}",
            decode_binding(0),
            wgsl_output_words(1, dtype),
        )
    })?;
    let out = Tensor::empty(&[w.rows, w.cols], dtype, &w.device())?;
    let len = w.rows * w.cols;
    let words = len.div_ceil(if dtype == DType::F32 { 1 } else { 2 });
    let (gx, gy) = grid_2d(words.div_ceil(256));
    let mut params = vec![fits_u32("elements", len)?, fits_u32("words", words)?, gx, 0];
    params.extend(quant_params(w)?);
    dev.dispatch(&pipeline, &[buf.get(), out.wgpu_buffer()?], &params, (gx, gy, 1))?;
    Ok(out)
}

pub(crate) fn product(
    dev: &Arc<WgpuDevice>,
    p: &QProblem,
    x: &Tensor,
    xbuf: &WgpuBuffer,
    w: &QTensor,
    wbuf: &WgpuBuffer,
    out_shape: &[usize],
) -> Result<Tensor> {
    let native = native_f16(dev, x.dtype());
    let enable = if native { "enable f16;\n" } else { "" };
    let suffix = format!("{}{}", x.dtype(), if native { "_native" } else { "" });
    let y = Tensor::empty(out_shape, DType::F32, &x.device())?;
    if p.tokens <= super::GEMV_MAX_TOKENS && p.direction == Direction::Forward {
        let pipeline = dev.pipeline(&format!("quant_gemv_{suffix}"), || {
            format!(
                "{enable}struct Params {{ rows: u32, cols: u32, tokens: u32, groups_x: u32, {QUANT_FIELDS} }}\n{}{}{GEMV}",
                decode_binding(0),
                wgsl_input("x", 1, x.dtype(), native),
            )
        })?;
        let (gx, gy) = grid_2d(w.rows);
        let mut params = vec![fits_u32("out", w.rows)?, fits_u32("in", w.cols)?, p.tokens as u32, gx];
        params.extend(quant_params(w)?);
        dev.dispatch(&pipeline, &[wbuf.get(), xbuf.get(), y.wgpu_buffer()?], &params, (gx, gy, 1))?;
    } else {
        // matmul.wgsl with A = x and B = W (Wᵀ forward): its B index is then W's flat index.
        let pipeline = dev.pipeline(&format!("quant_gemm_{suffix}"), || {
            format!(
                "{enable}struct Params {{ {PARAMS_FIELDS} {QUANT_FIELDS} }}\n{}{}\
                 fn load_b(i: u32) -> f32 {{ return quant_weight(i); }}\n{PLAIN_HOOKS}{MATMUL_SHADER}",
                wgsl_input("a", 0, x.dtype(), native),
                decode_binding(1),
            )
        })?;
        let mp = MatmulProblem {
            batch: 1,
            m: p.tokens,
            n: p.n,
            k: p.k,
            trans_a: false,
            trans_b: p.direction == Direction::Forward,
            batch_stride_a: 0,
            batch_stride_b: 0,
            in_dtype: x.dtype(),
            out_dtype: DType::F32,
        };
        let mut params = matmul_params(&mp)?;
        params.extend(quant_params(w)?);
        dev.dispatch(&pipeline, &[xbuf.get(), wbuf.get(), y.wgpu_buffer()?], &params, groups(&mp)?)?;
    }
    y.to_dtype(x.dtype())
}
