//! WGSL launchers for LoRA: the fused layer (`shaders/matmul.wgsl` with the hooks of
//! `shaders/lora_fused.wgsl`) and the batched multi-adapter product
//! (`shaders/lora_shrink.wgsl`, `shaders/lora_expand.wgsl`).

use super::{AdapterSet, BaseWeight, Fused};
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input};
use crate::kernels::wgsl::{LORA_EXPAND as EXPAND, LORA_FUSED as FUSED, LORA_SHRINK as SHRINK};
use crate::ops::matmul::MatmulProblem;
use crate::ops::matmul::wgpu::{PARAMS_FIELDS, SHADER as MATMUL_SHADER, groups, params as matmul_params};
use crate::ops::quant::wgpu::{QUANT_FIELDS, decode_binding, quant_params};
use crate::tensor::RawBuffer;
use crate::{DType, Result, Tensor};

pub(crate) fn batched(x: &Tensor, y: &Tensor, set: &AdapterSet, adapters: &[i32]) -> Result<Tensor> {
    let dev = x.wgpu_device()?.clone();
    let device = x.device();
    let tokens = x.shape()[0];
    let rmax = set.max_rank();
    let table = RawBuffer::new(bytemuck::cast_slice(&set.table).to_vec(), &device)?;
    let rows = RawBuffer::new(bytemuck::cast_slice(adapters).to_vec(), &device)?;
    let v = Tensor::empty(&[tokens, rmax], DType::F32, &device)?;
    let out = Tensor::empty(y.shape(), DType::F32, &device)?;
    let dims =
        [fits_u32("tokens", tokens)?, fits_u32("in", set.inp)?, fits_u32("out", set.out)?, fits_u32("rank", rmax)?];

    let (gx, gy) = grid_2d(tokens * rmax);
    let pipeline = dev.pipeline("lora_shrink", || SHRINK.to_string())?;
    let params = [dims[0], dims[1], dims[2], dims[3], gx];
    let buffers = [x.wgpu_buffer()?, set.a.wgpu_buffer()?, table.wgpu_buffer()?, rows.wgpu_buffer()?, v.wgpu_buffer()?];
    dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;

    let (gx, gy) = grid_2d((tokens * set.out).div_ceil(64));
    let pipeline = dev.pipeline("lora_expand", || EXPAND.to_string())?;
    let params = [dims[0], dims[1], dims[2], dims[3], gx];
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
pub(crate) fn fused(f: &Fused<'_>) -> Result<(Tensor, Tensor)> {
    let x = f.x;
    let dev = x.wgpu_device()?.clone();
    let device = x.device();
    let [out, inp] = f.base.shape();
    let (tokens, r) = (x.shape()[0], f.rank());
    let native = x.dtype() == DType::F16 && dev.shader_f16;
    let in_kernel = f.xa_in_kernel();
    let quantized = matches!(f.base, BaseWeight::Quantized(_));
    let key = format!(
        "lora_fused_{}_{}{}_{}",
        if quantized { "quant" } else { "dense" },
        x.dtype(),
        if native { "_native" } else { "" },
        if in_kernel { "xa" } else { "pre" }
    );
    let pipeline = dev.pipeline(&key, || {
        let enable = if native { "enable f16;\n" } else { "" };
        let (weight_fields, weight) = match f.base {
            BaseWeight::Dense(w) => ("", wgsl_input("b", 1, w.dtype(), native)),
            BaseWeight::Quantized(_) => {
                (QUANT_FIELDS, format!("{}fn load_b(i: u32) -> f32 {{ return quant_weight(i); }}\n", decode_binding(1)))
            }
        };
        format!(
            "{enable}struct Params {{ {PARAMS_FIELDS} {weight_fields} lora_r: u32, lora_scale: u32, lora_bias: u32, }}\n\
             {}{weight}const XA_IN_KERNEL: bool = {in_kernel};\n{FUSED}{MATMUL_SHADER}",
            wgsl_input("a", 0, x.dtype(), native),
        )
    })?;
    let mp = MatmulProblem {
        batch: 1,
        m: tokens,
        n: out,
        k: inp,
        trans_a: false,
        trans_b: true,
        batch_stride_a: 0,
        batch_stride_b: 0,
        in_dtype: x.dtype(),
        out_dtype: DType::F32,
    };
    let mut params = matmul_params(&mp)?;
    if let BaseWeight::Quantized(w) = f.base {
        params.extend(quant_params(w)?);
    }
    params.extend([fits_u32("rank", r)?, f.scale.to_bits(), f.bias.is_some() as u32]);
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
    dev.dispatch_params_at(&pipeline, &buffers, 3, &params, groups(&mp)?)?;
    Ok((y.to_dtype(x.dtype())?, xa))
}
