//! WGSL launcher for token selection (`shaders/sampling.wgsl`).

use super::{Plan, SampleParams, exp2_table_on};
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::wgsl;
use crate::{DType, Result, Tensor};
use std::sync::Arc;

pub(crate) fn sample(
    dev: &Arc<WgpuDevice>,
    logits: &Tensor,
    x: &WgpuBuffer,
    rows: usize,
    vocab: usize,
    plan: &Plan,
) -> Result<Tensor> {
    fits_u32("logits elements", rows * vocab)?;
    let mut params = SampleParams::new(plan, rows, vocab)?;
    let (gx, gy) = grid_2d(rows);
    params.groups_x = gx;
    let dtype = logits.dtype();
    let native_f16 = dtype == DType::F16 && dev.shader_f16;
    let key = format!("sample_{dtype}{}", if native_f16 { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let enable = if native_f16 { "enable f16;\n" } else { "" };
        format!("{enable}{}{}", wgsl_input("x", 0, dtype, native_f16), wgsl::SAMPLING)
    })?;
    let table = exp2_table_on(&logits.device())?;
    let ids = Tensor::empty(&[rows], DType::U32, &logits.device())?;
    dev.dispatch(&pipeline, &[x.get(), table.wgpu_buffer()?, ids.wgpu_buffer()?], &params, (gx, gy, 1))?;
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<SampleParams>(wgsl::SAMPLING, Lang::Wgsl);
    }
}
