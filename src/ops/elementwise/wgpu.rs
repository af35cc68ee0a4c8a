//! WGSL launchers for the elementwise family (`shaders/elementwise_map.wgsl`,
//! `shaders/elementwise_sum_rows.wgsl`).

use super::BinaryOp;
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input, wgsl_output_words};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::{kernel_params, wgsl, wgsl_struct};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// The map's extent and the op's scalars (`struct MapParams` in
    /// `shaders/elementwise_map.wgsl`).
    pub(crate) struct MapParams {
        len: u32,
        words: u32,
        groups_x: u32,
        s: f32,
        u0: u32,
        u1: u32,
        pad0: u32,
        pad1: u32,
    }
}

impl MapParams {
    /// A map over `len` elements written as `out_dtype`: one invocation per 32-bit word.
    pub(crate) fn over(len: usize, out_dtype: DType) -> Result<MapParams> {
        let words = len.div_ceil(4 / out_dtype.size_in_bytes());
        let (groups_x, _) = grid_2d(words.div_ceil(256));
        Ok(MapParams {
            len: fits_u32("elements", len)?,
            words: fits_u32("words", words)?,
            groups_x,
            ..Default::default()
        })
    }

    /// The workgroups covering every word.
    pub(crate) fn workgroups(&self) -> (u32, u32, u32) {
        let (gx, gy) = grid_2d((self.words as usize).div_ceil(256));
        (gx, gy, 1)
    }
}

kernel_params! {
    /// The map's uniform.
    struct MapUniform {
        map: MapParams,
    }
}

kernel_params! {
    /// `struct SumRowsParams` in `shaders/elementwise_sum_rows.wgsl`.
    struct SumRowsParams {
        rows: u32,
        cols: u32,
        groups_x: u32,
        pad0: u32,
    }
}

/// Runs the map shader over `inputs` (of `like`'s dtype; the first of its shape) into a new
/// `out_dtype` tensor of that shape. `apply` is the WGSL body of `fn apply(i: u32) -> f32`;
/// it may read the scalars `params.map.s`, `params.map.u0` and `params.map.u1`, set by
/// `scalars`.
fn map(
    dev: &Arc<WgpuDevice>,
    key: &str,
    like: &Tensor,
    inputs: &[&WgpuBuffer],
    out_dtype: DType,
    apply: &str,
    scalars: impl FnOnce(&mut MapParams),
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
        src += &wgsl_struct::<MapUniform>("Params");
        src += &format!(
            "@group(0) @binding({}) var<uniform> params: Params;\nfn apply(i: u32) -> f32 {{ {apply} }}\n{}",
            n_in + 1,
            wgsl::ELEMENTWISE_MAP
        );
        src
    })?;
    let out = Tensor::empty(like.shape(), out_dtype, &like.device())?;
    let mut params = MapParams::over(like.elem_count(), out_dtype)?;
    scalars(&mut params);
    let groups = params.workgroups();
    let mut buffers: Vec<&wgpu::Buffer> = inputs.iter().map(|b| b.get()).collect();
    buffers.push(out.wgpu_buffer()?);
    dev.dispatch(&pipeline, &buffers, &MapUniform { map: params }, groups)?;
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
    map(dev, op.name(), a, &[x, y], a.dtype(), apply, |_| {})
}

pub(crate) fn scale(dev: &Arc<WgpuDevice>, a: &Tensor, x: &WgpuBuffer, s: f32) -> Result<Tensor> {
    map(dev, "scale", a, &[x], a.dtype(), "return load_x(i) * params.map.s;", |p| p.s = s)
}

pub(crate) fn cast(dev: &Arc<WgpuDevice>, a: &Tensor, x: &WgpuBuffer, dtype: DType) -> Result<Tensor> {
    map(dev, "cast", a, &[x], dtype, "return load_x(i);", |_| {})
}

pub(crate) fn add_bias(
    dev: &Arc<WgpuDevice>,
    a: &Tensor,
    x: &WgpuBuffer,
    bias: &WgpuBuffer,
    cols: usize,
) -> Result<Tensor> {
    let cols = fits_u32("bias length", cols)?;
    map(dev, "add_bias", a, &[x, bias], a.dtype(), "return load_x(i) + load_y(i % params.map.u0);", |p| p.u0 = cols)
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
    let apply = "var h = (i * 0x9e3779b1u) ^ params.map.u0; h ^= h >> 16u; h *= 0x85ebca6bu; h ^= h >> 13u; \
                 h *= 0xc2b2ae35u; h ^= h >> 16u; return select(0.0, load_x(i) * params.map.s, h < params.map.u1);";
    map(dev, "dropout", a, &[x], a.dtype(), apply, |p| {
        p.s = scale;
        p.u0 = key;
        p.u1 = threshold;
    })
}

pub(crate) fn sum_rows(dev: &Arc<WgpuDevice>, a: &Tensor, x: &WgpuBuffer, rows: usize, cols: usize) -> Result<Tensor> {
    let lead = &a.shape()[..a.rank() - 1];
    let native_f16 = a.dtype() == DType::F16 && dev.shader_f16;
    let key = format!("sum_rows_{}{}", a.dtype(), if native_f16 { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let enable = if native_f16 { "enable f16;\n" } else { "" };
        format!("{enable}{}{}", wgsl_input("x", 0, a.dtype(), native_f16), wgsl::ELEMENTWISE_SUM_ROWS)
    })?;
    // Sums are written as f32, then rounded to the input's dtype.
    let sums = Tensor::empty(lead, DType::F32, &a.device())?;
    let (gx, gy) = grid_2d(rows);
    fits_u32("elements", rows * cols)?;
    let params = SumRowsParams { rows: fits_u32("rows", rows)?, cols: fits_u32("cols", cols)?, groups_x: gx, pad0: 0 };
    dev.dispatch(&pipeline, &[x.get(), sums.wgpu_buffer()?], &params, (gx, gy, 1))?;
    sums.to_dtype(a.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<MapParams>(wgsl::ELEMENTWISE_MAP, Lang::Wgsl);
        assert_mirrored::<SumRowsParams>(wgsl::ELEMENTWISE_SUM_ROWS, Lang::Wgsl);
    }
}
