//! CUDA launcher of the rotary embedding (`kernels/rope.cu`). [`vector_width`] picks the
//! kernel: the widest access (up to 16 bytes) the layout's pair offsets keep aligned.

use super::{RopeLayout, RopeShape};
use crate::device::cuda::launch::grid_x;
use crate::device::cuda::{CudaBuffer, CudaDevice};
use crate::kernels::kernel_params;
use crate::tensor::RawBuffer;
use crate::{Error, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

kernel_params! {
    /// `struct RopeParams` in `kernels/rope.cu`.
    pub(crate) struct RopeParams {
        tokens: u32,
        heads: u32,
        head_dim: u32,
        half: u32,
        interleaved: u32,
        sign: f32,
        pad0: u32,
        pad1: u32,
    }
}

/// Inverse frequencies the launch carries by value (`ROPE_PARAM_FREQS` in `kernels/rope.cu`);
/// more are uploaded.
const PARAM_FREQS: usize = 256;

/// `struct RopeFreqs` in `kernels/rope.cu`: the frequencies, by value.
#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct RopeFreqs {
    f: [f32; PARAM_FREQS],
}

// SAFETY: a `#[repr(C)]` `Pod` struct goes to the kernel by value, byte for byte.
unsafe impl cudarc::driver::DeviceRepr for RopeFreqs {}

/// Elements per vector access: the largest of 8, 4, 2, 1 (at most 16 bytes) dividing
/// head_dim and the pair offset (HalfSplit: rot/2; Interleaved: rot, and at least 2 so a
/// vector holds whole pairs).
pub(crate) fn vector_width(s: &RopeShape, elem_bytes: usize) -> usize {
    let offset = match s.layout {
        RopeLayout::HalfSplit => s.rot / 2,
        RopeLayout::Interleaved => s.rot,
    };
    let floor = if s.layout == RopeLayout::Interleaved { 2 } else { 1 };
    [8, 4, 2, 1]
        .into_iter()
        .find(|&n| {
            (n >= floor && n * elem_bytes <= 16 && s.head_dim.is_multiple_of(n) && offset.is_multiple_of(n))
                || n == floor
        })
        .unwrap_or(floor)
}

pub(crate) fn rope(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    xb: &CudaBuffer,
    positions: &CudaBuffer,
    inv_freq: &[f32],
    s: &RopeShape,
) -> Result<Tensor> {
    let fits = |what: &str, v: usize| {
        u32::try_from(v)
            .map_err(|_| Error::Unsupported(format!("rope: {what} = {v} exceeds the kernel's 32-bit sizes")))
    };
    let n = vector_width(s, x.dtype().size_in_bytes());
    let params = RopeParams {
        tokens: fits("tokens", s.tokens)?,
        heads: fits("heads", s.heads)?,
        head_dim: fits("head_dim", s.head_dim)?,
        half: fits("rotary_dim / 2", s.rot / 2)?,
        interleaved: (s.layout == RopeLayout::Interleaved) as u32,
        sign: s.sign,
        ..Default::default()
    };
    // Vectors per head × heads must index in 32 bits too.
    fits("heads × head_dim", s.heads * s.head_dim)?;
    // Up to PARAM_FREQS frequencies ride in the launch; more go through a buffer.
    let mut freqs = RopeFreqs { f: [0.0; PARAM_FREQS] };
    let uploaded = match inv_freq.len() <= PARAM_FREQS {
        true => {
            freqs.f[..inv_freq.len()].copy_from_slice(inv_freq);
            None
        }
        false => Some(RawBuffer::new(bytemuck::cast_slice(inv_freq).to_vec(), &x.device())?),
    };
    let out = Tensor::empty(x.shape(), x.dtype(), &x.device())?;
    let name = format!("rope_{}_v{n}", x.dtype());
    // Enough threads for one vector each of a token's widest pass, in warps, up to 256.
    let per_token = (s.heads * s.head_dim / n / 2).max(1);
    let threads = per_token.next_multiple_of(32).clamp(32, 256) as u32;
    let cfg = LaunchConfig {
        grid_dim: (grid_x("rope tokens", s.tokens)?, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = dev.function(&crate::kernels::cuda::ROPE, &name)?;
    let mut launch = dev.stream.launch_builder(&f);
    let null = 0u64;
    launch.arg(xb.get()).arg(positions.get());
    match &uploaded {
        Some(buf) => launch.arg(buf.cuda_slice()?),
        None => launch.arg(&null),
    };
    launch.arg(out.cuda_buffer()?).arg(&params).arg(&freqs);
    // SAFETY: x and out hold tokens · heads · head_dim elements of the dtype the name says,
    // positions one u32 per token, and the rot/2 frequencies are in `freqs` or (past
    // PARAM_FREQS) the uploaded buffer; the vector width divides every offset the kernel
    // accesses (vector_width), and buffers start 256-byte aligned.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernels() {
        assert_mirrored::<RopeParams>(crate::kernels::cuda::ROPE.source, Lang::Cuda);
    }

    #[test]
    fn the_frequencies_by_value_match_the_kernel() {
        let define = format!("#define ROPE_PARAM_FREQS {PARAM_FREQS}\n");
        assert!(crate::kernels::cuda::ROPE.source.contains(&define), "kernels/rope.cu must say {define}");
        let declared =
            crate::kernels::mirror::declared_fields(crate::kernels::cuda::ROPE.source, "RopeFreqs", Lang::Cuda);
        assert_eq!(declared, Some(vec![("f[ROPE_PARAM_FREQS]".to_string(), "float".to_string())]));
    }

    #[test]
    fn vector_width_keeps_every_access_aligned() {
        let shape = |head_dim, rot, layout| RopeShape { tokens: 1, heads: 1, head_dim, rot, layout, sign: 1.0 };
        assert_eq!(vector_width(&shape(64, 64, RopeLayout::HalfSplit), 2), 8);
        assert_eq!(vector_width(&shape(64, 64, RopeLayout::HalfSplit), 4), 4);
        assert_eq!(vector_width(&shape(64, 12, RopeLayout::HalfSplit), 2), 2);
        assert_eq!(vector_width(&shape(6, 6, RopeLayout::HalfSplit), 2), 1);
        assert_eq!(vector_width(&shape(6, 6, RopeLayout::Interleaved), 2), 2);
        assert_eq!(vector_width(&shape(128, 32, RopeLayout::Interleaved), 2), 8);
        assert_eq!(vector_width(&shape(2, 2, RopeLayout::Interleaved), 4), 2);
    }
}
