//! WGSL launcher for matmul (`shaders/matmul.wgsl`).

use super::MatmulProblem;
use crate::device::wgpu::{WgpuBuffer, WgpuDevice, fits_u32, wgsl_input};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

const SHADER: &str = include_str!("../../../shaders/matmul.wgsl");

pub(crate) fn matmul(
    dev: &Arc<WgpuDevice>,
    p: &MatmulProblem,
    a: &WgpuBuffer,
    b: &WgpuBuffer,
    device: crate::Device,
    out_shape: &[usize],
) -> Result<Tensor> {
    let native_f16 = p.in_dtype == DType::F16 && dev.shader_f16;
    let key = format!("matmul_{}{}", p.in_dtype, if native_f16 { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let enable = if native_f16 { "enable f16;\n" } else { "" };
        format!(
            "{enable}{}{}{SHADER}",
            wgsl_input("a", 0, p.in_dtype, native_f16),
            wgsl_input("b", 1, p.in_dtype, native_f16)
        )
    })?;
    // The kernel writes f32; another dtype is a rounding pass after it.
    let c = Tensor::empty(out_shape, DType::F32, &device)?;
    fits_u32("matmul output elements", p.batch * p.m * p.n)?;
    fits_u32("matmul A elements", p.batch_stride_a.max(p.m * p.k) * p.batch)?;
    fits_u32("matmul B elements", p.batch_stride_b.max(p.k * p.n) * p.batch)?;
    let params = [
        fits_u32("m", p.m)?,
        fits_u32("n", p.n)?,
        fits_u32("k", p.k)?,
        fits_u32("lda", p.lda())?,
        fits_u32("ldb", p.ldb())?,
        fits_u32("batch stride of A", p.batch_stride_a)?,
        fits_u32("batch stride of B", p.batch_stride_b)?,
        p.trans_a as u32,
        p.trans_b as u32,
    ];
    let groups = (p.n.div_ceil(64) as u32, p.m.div_ceil(64) as u32, fits_u32("batch", p.batch)?);
    dev.dispatch(&pipeline, &[a.get(), b.get(), c.wgpu_buffer()?], &params, groups)?;
    c.to_dtype(p.out_dtype)
}
