//! WGSL launcher for matmul (`shaders/matmul.wgsl`), whose engine the quantized GEMM and the
//! fused LoRA layer reuse with their own loaders and hooks.

use super::MatmulProblem;
use crate::device::wgpu::launch::{fits_u32, wgsl_input};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::{kernel_params, wgsl, wgsl_struct};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// The product's sizes (`struct MatmulParams` in `shaders/matmul.wgsl`).
    pub(crate) struct MatmulParams {
        m: u32,
        n: u32,
        k: u32,
        lda: u32,
        ldb: u32,
        stride_a: u32,
        stride_b: u32,
        trans_a: u32,
        trans_b: u32,
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
}

kernel_params! {
    /// The uniform of the plain product.
    struct PlainParams {
        mm: MatmulParams,
    }
}

/// The hooks of `shaders/matmul.wgsl` for a plain product: nothing joins it.
pub(crate) const PLAIN_HOOKS: &str = "fn extra_load(k0: u32, li: u32) {}\nfn extra_mac(li: u32) {}\n\
    fn extra_epilogue(row0: u32, col0: u32, first_col: bool, lid: vec3<u32>, \
    acc: ptr<function, array<array<f32, 4>, 4>>) {}\nfn finish(v: f32, gj: u32) -> f32 { return v; }\n";

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
            "{enable}{}{}{}{PLAIN_HOOKS}{}",
            wgsl_struct::<PlainParams>("Params"),
            wgsl_input("a", 0, p.in_dtype, native_f16),
            wgsl_input("b", 1, p.in_dtype, native_f16),
            wgsl::MATMUL,
        )
    })?;
    // The kernel writes f32; another dtype is a rounding pass after it.
    let c = Tensor::empty(out_shape, DType::F32, &device)?;
    let params = PlainParams { mm: MatmulParams::of(p)? };
    dev.dispatch(&pipeline, &[a.get(), b.get(), c.wgpu_buffer()?], &params, groups(p)?)?;
    c.to_dtype(p.out_dtype)
}

impl MatmulParams {
    /// The sizes of a problem, checked against WGSL's 32-bit indices.
    pub(crate) fn of(p: &MatmulProblem) -> Result<MatmulParams> {
        fits_u32("matmul output elements", p.batch * p.m * p.n)?;
        fits_u32("matmul A elements", p.batch_stride_a.max(p.m * p.k) * p.batch)?;
        fits_u32("matmul B elements", p.batch_stride_b.max(p.k * p.n) * p.batch)?;
        Ok(MatmulParams {
            m: fits_u32("m", p.m)?,
            n: fits_u32("n", p.n)?,
            k: fits_u32("k", p.k)?,
            lda: fits_u32("lda", p.lda())?,
            ldb: fits_u32("ldb", p.ldb())?,
            stride_a: fits_u32("batch stride of A", p.batch_stride_a)?,
            stride_b: fits_u32("batch stride of B", p.batch_stride_b)?,
            trans_a: p.trans_a as u32,
            trans_b: p.trans_b as u32,
            ..Default::default()
        })
    }
}

/// Workgroups covering the output: 64×64 tiles, one z slice per batch.
pub(crate) fn groups(p: &MatmulProblem) -> Result<(u32, u32, u32)> {
    Ok((fits_u32("n tiles", p.n.div_ceil(64))?, fits_u32("m tiles", p.m.div_ceil(64))?, fits_u32("batch", p.batch)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shader() {
        assert_mirrored::<MatmulParams>(wgsl::MATMUL, Lang::Wgsl);
    }
}
