//! WGSL launchers for the elementwise family (`shaders/elementwise_map.wgsl`,
//! `shaders/elementwise_sum_rows.wgsl`).

use super::BinaryOp;
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input, wgsl_output_words};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::wgsl::{ELEMENTWISE_MAP as MAP_SHADER, ELEMENTWISE_SUM_ROWS as SUM_ROWS_SHADER};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

/// Runs the map shader over `inputs` (of `like`'s dtype; the first of its shape) into a new
/// `out_dtype` tensor of that shape. `apply` is the WGSL body of `fn apply(i: u32) -> f32`;
/// it may read `params.s` (f32), `params.u0` and `params.u1` (u32), given by `args`.
fn map(
    dev: &Arc<WgpuDevice>,
    key: &str,
    like: &Tensor,
    inputs: &[&WgpuBuffer],
    out_dtype: DType,
    apply: &str,
    args: (f32, u32, u32),
) -> Result<Tensor> {
    let names = ["x", "y"];
    let in_dtype = like.dtype();
    let native_f16 = in_dtype == DType::F16 && dev.shader_f16;
    let key = format!("{key}_{in_dtype}_{out_dtype}{}", if native_f16 { "_native" } else { "" });
    let n_in = inputs.len() as u32;
    let pipeline = dev.pipeline(&key, || {
        let mut src = String::new();
        if native_f16 {
            src += "enable f16;\n";
        }
        for (i, name) in names.iter().take(inputs.len()).enumerate() {
            src += &wgsl_input(name, i as u32, in_dtype, native_f16);
        }
        src += &wgsl_output_words(n_in, out_dtype);
        src += &format!(
            "struct Params {{ len: u32, words: u32, groups_x: u32, s: f32, u0: u32, u1: u32 }}\n\
             @group(0) @binding({}) var<uniform> params: Params;\n\
             fn apply(i: u32) -> f32 {{ {apply} }}\n{MAP_SHADER}",
            n_in + 1
        );
        src
    })?;
    let out = Tensor::empty(like.shape(), out_dtype, &like.device())?;
    let len = like.elem_count();
    let per_word = if out_dtype == DType::F32 { 1 } else { 2 };
    let words = len.div_ceil(per_word);
    let (gx, gy) = grid_2d(words.div_ceil(256));
    let params = [fits_u32("elements", len)?, fits_u32("words", words)?, gx, args.0.to_bits(), args.1, args.2];
    let mut buffers: Vec<&wgpu::Buffer> = inputs.iter().map(|b| b.get()).collect();
    buffers.push(out.wgpu_buffer()?);
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
    Ok(out)
}

pub(crate) fn binary(
    dev: &Arc<WgpuDevice>,
    op: BinaryOp,
    a: &Tensor,
    x: &WgpuBuffer,
    y: &WgpuBuffer,
) -> Result<Tensor> {
    let apply = match op {
        BinaryOp::Add => "return load_x(i) + load_y(i);",
        BinaryOp::Mul => "return load_x(i) * load_y(i);",
    };
    map(dev, op.name(), a, &[x, y], a.dtype(), apply, (0.0, 0, 0))
}

pub(crate) fn scale(dev: &Arc<WgpuDevice>, a: &Tensor, x: &WgpuBuffer, s: f32) -> Result<Tensor> {
    map(dev, "scale", a, &[x], a.dtype(), "return load_x(i) * params.s;", (s, 0, 0))
}

pub(crate) fn cast(dev: &Arc<WgpuDevice>, a: &Tensor, x: &WgpuBuffer, dtype: DType) -> Result<Tensor> {
    map(dev, "cast", a, &[x], dtype, "return load_x(i);", (0.0, 0, 0))
}

pub(crate) fn add_bias(
    dev: &Arc<WgpuDevice>,
    a: &Tensor,
    x: &WgpuBuffer,
    bias: &WgpuBuffer,
    cols: usize,
) -> Result<Tensor> {
    let cols = fits_u32("bias length", cols)?;
    map(dev, "add_bias", a, &[x, bias], a.dtype(), "return load_x(i) + load_y(i % params.u0);", (0.0, cols, 0))
}

pub(crate) fn dropout(
    dev: &Arc<WgpuDevice>,
    a: &Tensor,
    x: &WgpuBuffer,
    key: u32,
    threshold: u32,
    scale: f32,
) -> Result<Tensor> {
    // The keep test of `super::keeps`: murmur3's finaliser of (i · golden ratio) ^ key.
    let apply = "var h = (i * 0x9e3779b1u) ^ params.u0; h ^= h >> 16u; h *= 0x85ebca6bu; h ^= h >> 13u; \
                 h *= 0xc2b2ae35u; h ^= h >> 16u; return select(0.0, load_x(i) * params.s, h < params.u1);";
    map(dev, "dropout", a, &[x], a.dtype(), apply, (scale, key, threshold))
}

pub(crate) fn sum_rows(dev: &Arc<WgpuDevice>, a: &Tensor, x: &WgpuBuffer, rows: usize, cols: usize) -> Result<Tensor> {
    let lead = &a.shape()[..a.rank() - 1];
    let native_f16 = a.dtype() == DType::F16 && dev.shader_f16;
    let key = format!("sum_rows_{}{}", a.dtype(), if native_f16 { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let enable = if native_f16 { "enable f16;\n" } else { "" };
        format!("{enable}{}{SUM_ROWS_SHADER}", wgsl_input("x", 0, a.dtype(), native_f16))
    })?;
    // Sums are written as f32, then rounded to the input's dtype.
    let sums = Tensor::empty(lead, DType::F32, &a.device())?;
    let (gx, gy) = grid_2d(rows);
    fits_u32("elements", rows * cols)?;
    let params = [fits_u32("rows", rows)?, fits_u32("cols", cols)?, gx];
    dev.dispatch(&pipeline, &[x.get(), sums.wgpu_buffer()?], &params, (gx, gy, 1))?;
    sums.to_dtype(a.dtype())
}
