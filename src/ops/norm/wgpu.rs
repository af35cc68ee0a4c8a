//! WGSL launchers for RMSNorm (`shaders/norm_forward.wgsl`, `shaders/norm_backward_dx.wgsl`,
//! `shaders/norm_dw_partial.wgsl`, `shaders/norm_dw_reduce.wgsl`).

use super::dw_groups;
use crate::device::wgpu::launch::{
    WGSL_ROUNDING, elems_per_word, fits_u32, grid_2d, wgsl_input, wgsl_round, wgsl_word_output,
};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::{kernel_params, wgsl, wgsl_struct};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// The sizes of one dispatch (`struct NormParams` of the `shaders/norm_*.wgsl`, generated
    /// from this one).
    pub(crate) struct NormParams {
        rows: u32,
        d: u32,
        /// Workgroups along x of a 2-D grid.
        groups_x: u32,
        eps: f32,
        /// The backward's row groups (see `dw_groups`).
        rows_per_group: u32,
        groups: u32,
        pad0: u32,
        pad1: u32,
    }
}

/// `struct NormParams`, generated from the Rust struct, and its uniform binding at `b`.
fn params_binding(b: u32) -> String {
    wgsl_struct::<NormParams>("NormParams") + &format!("@group(0) @binding({b}) var<uniform> params: NormParams;\n")
}

/// How the row kernels write x's dtype: packed words of the dtype itself when rows are
/// whole words, else f32 (odd rows of f16/bf16, whose last word would straddle two rows),
/// rounded by a cast after.
fn row_out_dtype(dtype: DType, d: usize) -> DType {
    if d.is_multiple_of(elems_per_word(dtype) as usize) { dtype } else { DType::F32 }
}

fn native(dev: &WgpuDevice, dtypes: &[DType]) -> (bool, &'static str) {
    let on = dev.shader_f16 && dtypes.contains(&DType::F16);
    (on, if on { "enable f16;\n" } else { "" })
}

fn params(rows: usize, d: usize) -> Result<(NormParams, (u32, u32, u32))> {
    let (gx, gy) = grid_2d(rows);
    fits_u32("elements", rows.saturating_mul(d))?;
    let p = NormParams { rows: fits_u32("rows", rows)?, d: fits_u32("d", d)?, groups_x: gx, ..Default::default() };
    Ok((p, (gx, gy, 1)))
}

/// y, h (with a residual) and rstd.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward(
    dev: &Arc<WgpuDevice>,
    x: &Tensor,
    xb: &WgpuBuffer,
    residual: Option<&WgpuBuffer>,
    w: &Tensor,
    wb: &WgpuBuffer,
    rows: usize,
    d: usize,
    eps: f32,
) -> Result<(Tensor, Option<Tensor>, Tensor)> {
    let (xt, wt) = (x.dtype(), w.dtype());
    let out_dtype = row_out_dtype(xt, d);
    let (native_f16, enable) = native(dev, &[xt, wt]);
    let with_res = residual.is_some();
    let key = format!("norm_forward_{xt}_{wt}_{out_dtype}_{}{}", with_res, if native_f16 { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let mut src = format!("{enable}{WGSL_ROUNDING}");
        let mut b = 0;
        let mut next = || {
            b += 1;
            b - 1
        };
        src += &wgsl_input("x", next(), xt, native_f16);
        if with_res {
            src += &wgsl_input("r", next(), xt, native_f16);
            src += &format!("fn load_in(i: u32) -> f32 {{ return {}; }}\n", wgsl_round(xt, "load_x(i) + load_r(i)"));
        } else {
            src += "fn load_in(i: u32) -> f32 { return load_x(i); }\n";
        }
        src += &wgsl_input("w", next(), wt, native_f16);
        src += &wgsl_word_output("y", next(), out_dtype);
        if with_res {
            src += &wgsl_word_output("h", next(), out_dtype);
        } else {
            src += "fn store_h(w: u32, v: vec2<f32>) {}\n";
        }
        src += &format!("@group(0) @binding({}) var<storage, read_write> rstd: array<f32>;\n", next());
        src += &params_binding(next());
        src += &format!("const ELEMS: u32 = {}u;\n", elems_per_word(out_dtype));
        src += wgsl::NORM_FORWARD;
        src
    })?;
    let device = x.device();
    let y = Tensor::empty(x.shape(), out_dtype, &device)?;
    let h = residual.map(|_| Tensor::empty(x.shape(), out_dtype, &device)).transpose()?;
    let rstd = Tensor::empty(super::lead(x), DType::F32, &device)?;
    let (mut p, groups) = params(rows, d)?;
    p.eps = eps;
    let mut buffers = vec![xb.get()];
    if let Some(r) = residual {
        buffers.push(r.get());
    }
    buffers.extend([wb.get(), y.wgpu_buffer()?]);
    if let Some(h) = &h {
        buffers.push(h.wgpu_buffer()?);
    }
    buffers.push(rstd.wgpu_buffer()?);
    dev.dispatch(&pipeline, &buffers, &p, groups)?;
    let (y, h) = (y.to_dtype(xt)?, h.map(|h| h.to_dtype(xt)).transpose()?);
    Ok((y, h, rstd))
}

/// dx and dw.
#[allow(clippy::too_many_arguments)]
pub(crate) fn backward(
    dev: &Arc<WgpuDevice>,
    x: &Tensor,
    dyb: &WgpuBuffer,
    xb: &WgpuBuffer,
    w: &Tensor,
    wb: &WgpuBuffer,
    rstdb: &WgpuBuffer,
    rows: usize,
    d: usize,
) -> Result<(Tensor, Tensor)> {
    let (xt, wt) = (x.dtype(), w.dtype());
    let device = x.device();
    let (groups, per_group) = dw_groups(rows);
    let (mut p, row_groups) = params(rows, d)?;
    p.rows_per_group = fits_u32("rows per group", per_group)?;
    p.groups = fits_u32("row groups", groups)?;
    let rstd_binding = |b: u32| format!("@group(0) @binding({b}) var<storage, read> rstd: array<f32>;\n");

    // dx, a workgroup per row.
    let out_dtype = row_out_dtype(xt, d);
    let (native_f16, enable) = native(dev, &[xt, wt]);
    let key = format!("norm_backward_dx_{xt}_{wt}_{out_dtype}{}", if native_f16 { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        format!(
            "{enable}{WGSL_ROUNDING}{}{}{}{}{}{}const ELEMS: u32 = {}u;\n{}",
            wgsl_input("dy", 0, xt, native_f16),
            wgsl_input("x", 1, xt, native_f16),
            wgsl_input("w", 2, wt, native_f16),
            rstd_binding(3),
            wgsl_word_output("dx", 4, out_dtype),
            params_binding(5),
            elems_per_word(out_dtype),
            wgsl::NORM_BACKWARD_DX
        )
    })?;
    let dx = Tensor::empty(x.shape(), out_dtype, &device)?;
    dev.dispatch(&pipeline, &[dyb.get(), xb.get(), wb.get(), rstdb.get(), dx.wgpu_buffer()?], &p, row_groups)?;
    let dx = dx.to_dtype(xt)?;

    // dw's partial sums, a (column, group) per invocation.
    let (native_f16, enable) = native(dev, &[xt]);
    let key = format!("norm_dw_partial_{xt}{}", if native_f16 { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        format!(
            "{enable}{}{}{}@group(0) @binding(3) var<storage, read_write> partials: array<f32>;\n{}{}",
            wgsl_input("dy", 0, xt, native_f16),
            wgsl_input("x", 1, xt, native_f16),
            rstd_binding(2),
            params_binding(4),
            wgsl::NORM_DW_PARTIAL
        )
    })?;
    let partials = Tensor::empty(&[groups, d], DType::F32, &device)?;
    let column_groups = fits_u32("column workgroups", d.div_ceil(256))?;
    dev.dispatch(
        &pipeline,
        &[dyb.get(), xb.get(), rstdb.get(), partials.wgpu_buffer()?],
        &p,
        (column_groups, groups as u32, 1),
    )?;

    // dw, the partials added in group order.
    let key = format!("norm_dw_reduce_{wt}");
    let pipeline = dev.pipeline(&key, || {
        format!(
            "{WGSL_ROUNDING}@group(0) @binding(0) var<storage, read> partials: array<f32>;\n{}{}const ELEMS: u32 = {}u;\n{}",
            wgsl_word_output("dw", 1, wt),
            params_binding(2),
            elems_per_word(wt),
            wgsl::NORM_DW_REDUCE
        )
    })?;
    let dw = Tensor::empty(w.shape(), wt, &device)?;
    let (gx, gy) = grid_2d(d.div_ceil(elems_per_word(wt) as usize).div_ceil(256));
    let reduce = NormParams { groups_x: gx, ..p };
    dev.dispatch(&pipeline, &[partials.wgpu_buffer()?, dw.wgpu_buffer()?], &reduce, (gx, gy, 1))?;
    Ok((dx, dw))
}
