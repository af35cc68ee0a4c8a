//! WGSL launcher for the activations (`shaders/activation_map.wgsl`).

use super::Act;
use crate::device::wgpu::launch::{WGSL_ROUNDING, elems_per_word, fits_u32, grid_2d, wgsl_input, wgsl_word_output};
use crate::device::wgpu::{WgpuBuffer, WgpuDevice};
use crate::kernels::{kernel_params, wgsl};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// The map's extent (`struct ActParams` in `shaders/activation_map.wgsl`).
    pub(crate) struct ActParams {
        len: u32,
        words: u32,
        groups_x: u32,
        pad0: u32,
    }
}

/// The WGSL body of `apply(i)` for `act`, its inputs bound as a, b, c.
fn apply(act: Act) -> &'static str {
    match act {
        Act::Swiglu => "return vec2<f32>(swiglu(load_a(i), load_b(i)), 0.0);",
        Act::SwigluBackward => "return swiglu_backward(load_a(i), load_b(i), load_c(i));",
        Act::Gelu => "return vec2<f32>(gelu(load_a(i)), 0.0);",
        Act::GeluBackward => "return vec2<f32>(gelu_backward(load_a(i), load_b(i)), 0.0);",
    }
}

/// One dispatch of `act` over `like`'s elements: the inputs, then the outputs.
pub(crate) fn run(
    dev: &Arc<WgpuDevice>,
    act: Act,
    like: &Tensor,
    inputs: &[&WgpuBuffer],
    outputs: &[Tensor],
) -> Result<()> {
    let dtype = like.dtype();
    let native_f16 = dtype == DType::F16 && dev.shader_f16;
    let key = format!("activation_{}_{dtype}{}", act.name(), if native_f16 { "_native" } else { "" });
    let (n_in, n_out) = (inputs.len() as u32, outputs.len() as u32);
    let pipeline = dev.pipeline(&key, || {
        let mut src = String::from(if native_f16 { "enable f16;\n" } else { "" });
        src += WGSL_ROUNDING;
        for (k, name) in ["a", "b", "c"].iter().take(inputs.len()).enumerate() {
            src += &wgsl_input(name, k as u32, dtype, native_f16);
        }
        src += &wgsl_word_output("out0", n_in, dtype);
        if n_out == 2 {
            src += &wgsl_word_output("out1", n_in + 1, dtype);
        } else {
            src += "fn store_out1(w: u32, v: vec2<f32>) {}\n";
        }
        src += &format!("@group(0) @binding({}) var<uniform> params: ActParams;\n", n_in + n_out);
        src += &format!("const ELEMS: u32 = {}u;\n", elems_per_word(dtype));
        src += &format!("fn apply(i: u32) -> vec2<f32> {{ {} }}\n", apply(act));
        src += wgsl::ACTIVATION_MAP;
        src
    })?;
    let len = like.elem_count();
    let words = len.div_ceil(elems_per_word(dtype) as usize);
    let (gx, gy) = grid_2d(words.div_ceil(256));
    let params = ActParams { len: fits_u32("elements", len)?, words: fits_u32("words", words)?, groups_x: gx, pad0: 0 };
    let mut buffers: Vec<&wgpu::Buffer> = inputs.iter().map(|b| b.get()).collect();
    for o in outputs {
        buffers.push(o.wgpu_buffer()?);
    }
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<ActParams>(wgsl::ACTIVATION_MAP, Lang::Wgsl);
    }
}
