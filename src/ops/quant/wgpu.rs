//! WGSL launchers for quantized weights: dequantize (the elementwise map shader with a
//! quantized loader), GEMV (`shaders/quant_gemv.wgsl`) and GEMM (`shaders/matmul.wgsl` with
//! a loader that decodes W tiles as it stages them).

use super::{Direction, GEMV_MAX_TOKENS, QProblem, QTensor, QuantFormat};
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input, wgsl_output_words};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::{kernel_params, wgsl, wgsl_struct};
use crate::ops::elementwise::wgpu::MapParams;
use crate::ops::matmul::MatmulProblem;
use crate::ops::matmul::wgpu::{MatmulParams, PLAIN_HOOKS, groups};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// The weight's format and the place of its NF4 state (`struct QuantParams` in
    /// `shaders/quant_decode.wgsl`).
    pub(crate) struct QuantParams {
        format: u32,
        absmax_offset: u32,
        nested_offset: u32,
        code_offset: u32,
        offset: f32,
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
}

impl QuantParams {
    pub(crate) fn of(w: &QTensor) -> Result<QuantParams> {
        let l = w.nf4_layout();
        fits_u32("quantized weight bytes", w.raw().len())?;
        fits_u32("quantized weight elements", w.rows * w.cols)?;
        Ok(QuantParams {
            format: w.format.code(),
            absmax_offset: l.absmax_offset as u32,
            nested_offset: l.nested_offset as u32,
            code_offset: l.code_offset as u32,
            offset: l.offset,
            ..Default::default()
        })
    }
}

kernel_params! {
    /// The GEMV's sizes (`struct QuantGemvParams` in `shaders/quant_gemv.wgsl`).
    struct QuantGemvParams {
        rows: u32,
        cols: u32,
        tokens: u32,
        groups_x: u32,
    }
}

kernel_params! {
    /// The GEMV's uniform.
    struct GemvUniform {
        gemv: QuantGemvParams,
        q: QuantParams,
    }
}

kernel_params! {
    /// The GEMM's uniform: matmul's sizes and the weight's decoding.
    struct GemmUniform {
        mm: MatmulParams,
        q: QuantParams,
    }
}

kernel_params! {
    /// Dequantize's uniform: the map's extent and the weight's decoding.
    struct DequantizeUniform {
        map: MapParams,
        q: QuantParams,
    }
}

/// The `w` binding with the decoders of `shaders/quant_decode.wgsl`, built for `format`:
/// pipelines that include it are cached per format (their keys end in the format's name).
pub(crate) fn decode_binding(binding: u32, format: QuantFormat) -> String {
    format!(
        "const QUANT_FORMAT: u32 = {}u;\n@group(0) @binding({binding}) var<storage, read> w: array<u32>;\n{}",
        format.code(),
        wgsl::QUANT_DECODE
    )
}

fn native_f16(dev: &WgpuDevice, dtype: DType) -> bool {
    dtype == DType::F16 && dev.shader_f16
}

pub(crate) fn dequantize(dev: &Arc<WgpuDevice>, w: &QTensor, buf: &WgpuBuffer, dtype: DType) -> Result<Tensor> {
    let pipeline = dev.pipeline(&format!("dequantize_{dtype}_{}", w.format), || {
        format!(
            "{}@group(0) @binding(2) var<uniform> params: Params;\n{}{}\
             fn apply(i: u32) -> f32 {{ return quant_weight(i); }}\n{}",
            wgsl_struct::<DequantizeUniform>("Params"),
            decode_binding(0, w.format),
            wgsl_output_words(1, dtype),
            wgsl::ELEMENTWISE_MAP,
        )
    })?;
    let out = Tensor::empty(&[w.rows, w.cols], dtype, &w.device())?;
    let map = MapParams::over(w.rows * w.cols, dtype)?;
    let groups = map.workgroups();
    let params = DequantizeUniform { map, q: QuantParams::of(w)? };
    dev.dispatch(&pipeline, &[buf.get(), out.wgpu_buffer()?], &params, groups)?;
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
    let q = QuantParams::of(w)?;
    if p.tokens <= GEMV_MAX_TOKENS && p.direction == Direction::Forward {
        let pipeline = dev.pipeline(&format!("quant_gemv_{suffix}_{}", w.format), || {
            format!(
                "{enable}{}{}{}{}",
                wgsl_struct::<GemvUniform>("Params"),
                decode_binding(0, w.format),
                wgsl_input("x", 1, x.dtype(), native),
                wgsl::QUANT_GEMV,
            )
        })?;
        // Eight rows per workgroup (quant_gemv.wgsl).
        let (gx, gy) = grid_2d(w.rows.div_ceil(8));
        let gemv = QuantGemvParams {
            rows: fits_u32("out", w.rows)?,
            cols: fits_u32("in", w.cols)?,
            tokens: p.tokens as u32,
            groups_x: gx,
        };
        dev.dispatch(&pipeline, &[wbuf.get(), xbuf.get(), y.wgpu_buffer()?], &GemvUniform { gemv, q }, (gx, gy, 1))?;
    } else {
        // matmul.wgsl with A = x and B = W (Wᵀ forward): its B index is then W's flat index.
        let pipeline = dev.pipeline(&format!("quant_gemm_{suffix}_{}", w.format), || {
            format!(
                "{enable}{}{}{}fn load_b(i: u32) -> f32 {{ return quant_weight(i); }}\n{PLAIN_HOOKS}{}",
                wgsl_struct::<GemmUniform>("Params"),
                wgsl_input("a", 0, x.dtype(), native),
                decode_binding(1, w.format),
                wgsl::MATMUL,
            )
        })?;
        let mp = MatmulProblem::unbatched(p.tokens, p.n, p.k, p.direction == Direction::Forward, x.dtype());
        let params = GemmUniform { mm: MatmulParams::of(&mp)?, q };
        dev.dispatch(&pipeline, &[xbuf.get(), wbuf.get(), y.wgpu_buffer()?], &params, groups(&mp)?)?;
    }
    y.to_dtype(x.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<QuantParams>(wgsl::QUANT_DECODE, Lang::Wgsl);
        assert_mirrored::<QuantGemvParams>(wgsl::QUANT_GEMV, Lang::Wgsl);
    }

    #[test]
    fn block_sizes_match_the_shader() {
        use crate::ops::quant::formats::GgmlBlock;
        for (name, bytes) in [
            ("BLOCK_Q8_0_BYTES", super::super::BlockQ8_0::BYTES),
            ("BLOCK_Q4_0_BYTES", super::super::BlockQ4_0::BYTES),
            ("BLOCK_Q4_1_BYTES", super::super::BlockQ4_1::BYTES),
        ] {
            let decl = format!("const {name}: u32 = {bytes}u;");
            assert!(wgsl::QUANT_DECODE.contains(&decl), "shaders/quant_decode.wgsl lacks `{decl}`");
        }
    }
}
