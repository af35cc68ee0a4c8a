//! WGSL launchers for LoRA: the fused layer (`shaders/matmul.wgsl` with the hooks of
//! `shaders/lora_fused.wgsl`) and the batched multi-adapter product
//! (`shaders/lora_shrink.wgsl`, `shaders/lora_expand.wgsl`).

use super::{AdapterSet, BaseWeight, Fused};
use crate::device::wgpu::WgpuDevice;
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input};
use crate::kernels::{kernel_params, wgsl, wgsl_struct};
use crate::ops::matmul::MatmulProblem;
use crate::ops::matmul::wgpu::{MatmulParams, groups};
use crate::ops::quant::wgpu::{QuantParams, decode_binding};
use crate::{DType, Result, Tensor};
use std::sync::Arc;

kernel_params! {
    /// The delta's rank and scale, and whether a bias joins (`struct LoraParams` in
    /// `shaders/lora_fused.wgsl`).
    struct LoraParams {
        rank: u32,
        scale: f32,
        has_bias: u32,
        pad0: u32,
    }
}

kernel_params! {
    /// The fused layer's uniform over a dense W.
    struct DenseUniform {
        mm: MatmulParams,
        lora: LoraParams,
    }
}

kernel_params! {
    /// The fused layer's uniform over a quantized W.
    struct QuantUniform {
        mm: MatmulParams,
        q: QuantParams,
        lora: LoraParams,
    }
}

kernel_params! {
    /// The batch's sizes (`struct LoraBatchedParams` in `shaders/lora_adapters.wgsl`).
    struct LoraBatchedParams {
        tokens: u32,
        inp: u32,
        outn: u32,
        rmax: u32,
        groups_x: u32,
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
}

pub(crate) fn batched(
    dev: &Arc<WgpuDevice>,
    x: &Tensor,
    y: &Tensor,
    set: &AdapterSet,
    adapters: &[i32],
) -> Result<Tensor> {
    let device = x.device();
    let tokens = x.shape()[0];
    let rmax = set.max_rank();
    let (table, rows) = set.device_tables(adapters, &device)?;
    let v = Tensor::empty(&[tokens, rmax], DType::F32, &device)?;
    let out = Tensor::empty(y.shape(), DType::F32, &device)?;
    let mut params = LoraBatchedParams {
        tokens: fits_u32("tokens", tokens)?,
        inp: fits_u32("in", set.inp)?,
        outn: fits_u32("out", set.out)?,
        rmax: fits_u32("rank", rmax)?,
        ..Default::default()
    };

    let (gx, gy) = grid_2d(tokens * rmax);
    params.groups_x = gx;
    let pipeline = dev.pipeline("lora_shrink", || format!("{}{}", wgsl::LORA_ADAPTERS, wgsl::LORA_SHRINK))?;
    let buffers = [x.wgpu_buffer()?, set.a.wgpu_buffer()?, table.wgpu_buffer()?, rows.wgpu_buffer()?, v.wgpu_buffer()?];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;

    let (gx, gy) = grid_2d((tokens * set.out).div_ceil(64));
    params.groups_x = gx;
    let pipeline = dev.pipeline("lora_expand", || format!("{}{}", wgsl::LORA_ADAPTERS, wgsl::LORA_EXPAND))?;
    let buffers = [
        v.wgpu_buffer()?,
        set.b.wgpu_buffer()?,
        table.wgpu_buffer()?,
        rows.wgpu_buffer()?,
        y.wgpu_buffer()?,
        out.wgpu_buffer()?,
    ];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
    Ok(out)
}

/// The fused forward pass: returns y (x's dtype) and xa (f32).
pub(crate) fn fused(dev: &Arc<WgpuDevice>, f: &Fused<'_>) -> Result<(Tensor, Tensor)> {
    let x = f.x;
    let device = x.device();
    let [out, inp] = f.base.shape();
    let (tokens, r) = (x.shape()[0], f.rank());
    let native = x.dtype() == DType::F16 && dev.shader_f16;
    let in_kernel = f.xa_in_kernel();
    let key = format!(
        "lora_fused_{}_{}{}_{}",
        match f.base {
            BaseWeight::Quantized(q) => format!("quant_{}", q.format()),
            BaseWeight::Dense(_) => "dense".to_string(),
        },
        x.dtype(),
        if native { "_native" } else { "" },
        if in_kernel { "xa" } else { "pre" }
    );
    let pipeline = dev.pipeline(&key, || {
        let enable = if native { "enable f16;\n" } else { "" };
        let (uniform, weight) = match f.base {
            BaseWeight::Dense(w) => (wgsl_struct::<DenseUniform>("Params"), wgsl_input("b", 1, w.dtype(), native)),
            BaseWeight::Quantized(q) => (
                wgsl_struct::<QuantUniform>("Params"),
                format!("{}fn load_b(i: u32) -> f32 {{ return quant_weight(i); }}\n", decode_binding(1, q.format())),
            ),
        };
        format!(
            "{enable}{uniform}{}{weight}const XA_IN_KERNEL: bool = {in_kernel};\n{}{}",
            wgsl_input("a", 0, x.dtype(), native),
            wgsl::LORA_FUSED,
            wgsl::MATMUL,
        )
    })?;
    let mp = MatmulProblem::unbatched(tokens, out, inp, true, x.dtype());
    let mm = MatmulParams::of(&mp)?;
    let lora = LoraParams { rank: fits_u32("rank", r)?, scale: f.scale, has_bias: f.bias.is_some() as u32, pad0: 0 };
    let (xa, a32) = if in_kernel {
        (Tensor::empty(&[tokens, r], DType::F32, &device)?, Some(f.a.to_dtype(DType::F32)?))
    } else {
        (f.shrink()?, None)
    };
    let y = Tensor::empty(&[tokens, out], DType::F32, &device)?;
    let weight = match f.base {
        BaseWeight::Dense(w) => w.wgpu_buffer()?,
        BaseWeight::Quantized(w) => w.raw().wgpu_buffer()?,
    };
    // Unused bindings get B_lora, which is bound read-only anyway.
    let lb = f.b.wgpu_buffer()?;
    let buffers = [
        x.wgpu_buffer()?,
        weight,
        y.wgpu_buffer()?,
        a32.as_ref().map(|a| a.wgpu_buffer()).transpose()?.unwrap_or(lb),
        xa.wgpu_buffer()?,
        lb,
        f.bias.as_ref().map(|b| b.wgpu_buffer()).transpose()?.unwrap_or(lb),
    ];
    // matmul.wgsl's uniform block sits at binding 3, before lora_fused.wgsl's bindings.
    match f.base {
        BaseWeight::Dense(_) => {
            dev.dispatch_params_at(&pipeline, &buffers, 3, &DenseUniform { mm, lora }, groups(&mp)?)?
        }
        BaseWeight::Quantized(w) => {
            let params = QuantUniform { mm, q: QuantParams::of(w)?, lora };
            dev.dispatch_params_at(&pipeline, &buffers, 3, &params, groups(&mp)?)?
        }
    }
    Ok((y.to_dtype(x.dtype())?, xa))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<LoraParams>(wgsl::LORA_FUSED, Lang::Wgsl);
        assert_mirrored::<LoraBatchedParams>(wgsl::LORA_ADAPTERS, Lang::Wgsl);
        assert_mirrored::<super::super::AdapterEntry>(wgsl::LORA_ADAPTERS, Lang::Wgsl);
    }
}
