//! WGSL launcher of the rotary embedding (`shaders/rope.wgsl`).

use super::{RopeLayout, RopeShape};
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input, wgsl_output_words};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::{kernel_params, wgsl};
use crate::tensor::RawBuffer;
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// `struct RopeParams` in `shaders/rope.wgsl`.
    pub(crate) struct RopeParams {
        tokens: u32,
        heads: u32,
        head_dim: u32,
        half: u32,
        interleaved: u32,
        sign: f32,
        groups_x: u32,
        words: u32,
    }
}

pub(crate) fn rope(
    dev: &Arc<WgpuDevice>,
    x: &Tensor,
    xb: &WgpuBuffer,
    positions: &WgpuBuffer,
    inv_freq: &[f32],
    s: &RopeShape,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let native_f16 = dtype == DType::F16 && dev.shader_f16;
    let key = format!("rope_{dtype}{}", if native_f16 { "_native" } else { "" });
    let pipeline = dev.pipeline(&key, || {
        let enable = if native_f16 { "enable f16;\n" } else { "" };
        format!("{enable}{}{}{}", wgsl_input("x", 0, dtype, native_f16), wgsl_output_words(3, dtype), wgsl::ROPE)
    })?;
    // Every element offset, and one past the last, in u32.
    fits_u32("rope elements", x.elem_count())?;
    let row = s.heads * s.head_dim;
    let (groups_x, groups_y) = grid_2d(s.tokens);
    let params = RopeParams {
        tokens: fits_u32("tokens", s.tokens)?,
        heads: fits_u32("heads", s.heads)?,
        head_dim: fits_u32("head_dim", s.head_dim)?,
        half: fits_u32("rotary_dim / 2", s.rot / 2)?,
        interleaved: (s.layout == RopeLayout::Interleaved) as u32,
        sign: s.sign,
        groups_x,
        // head_dim is even, so a token's row is whole words in every dtype.
        words: fits_u32("words per token", row / (4 / dtype.size_in_bytes()))?,
    };
    let inv = RawBuffer::new(bytemuck::cast_slice(inv_freq).to_vec(), &x.device())?;
    let out = Tensor::empty(x.shape(), dtype, &x.device())?;
    dev.dispatch(
        &pipeline,
        &[xb.get(), positions.get(), inv.wgpu_buffer()?, out.wgpu_buffer()?],
        &params,
        (groups_x, groups_y, 1),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<RopeParams>(wgsl::ROPE, Lang::Wgsl);
    }
}
