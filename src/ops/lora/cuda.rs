//! CUDA launchers for LoRA (`kernels/lora.cu`): the fused layer and the batched
//! multi-adapter product.

use super::{AdapterSet, BaseWeight, Fused};
use crate::device::cuda::CudaDevice;
use crate::device::cuda::launch::{dtype_code, grid, to_i32};
use crate::ops::quant::cuda::QArgs;
use crate::tensor::RawBuffer;
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// `v[t] = x[t]·A_aᵀ` for every row's adapter a (`lora_shrink`), `[tokens, rmax]` f32: x
/// `[tokens, inp]` and the packed A f32, `table` and `rows` on the device as the kernel reads
/// them.
fn shrink(x: &Tensor, a: &Tensor, table: &RawBuffer, rows: &RawBuffer, inp: usize, rmax: usize) -> Result<Tensor> {
    let dev = x.cuda_device()?.clone();
    let tokens = x.shape()[0];
    let v = Tensor::empty(&[tokens, rmax], DType::F32, &x.device())?;
    let (inp, rmax_i) = (to_i32("in", inp)?, to_i32("rank", rmax)?);
    let f = dev.function(&crate::kernels::cuda::LORA, "lora_shrink")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(x.cuda_buffer()?).arg(a.cuda_buffer()?).arg(table.cuda_slice()?).arg(rows.cuda_slice()?);
    launch.arg(v.cuda_buffer()?).arg(&inp).arg(&rmax_i);
    let cfg = LaunchConfig {
        grid_dim: (grid("tokens", tokens)?, grid("rank groups", rmax.div_ceil(8))?, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x is [tokens, in], v [tokens, rmax]; the table and rows describe the packed A.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("lora_shrink", e))?;
    Ok(v)
}

pub(crate) fn batched(x: &Tensor, y: &Tensor, set: &AdapterSet, adapters: &[i32]) -> Result<Tensor> {
    let dev = x.cuda_device()?.clone();
    let device = x.device();
    let tokens = x.shape()[0];
    let rmax = set.max_rank();
    let table = RawBuffer::new(bytemuck::cast_slice(&set.table).to_vec(), &device)?;
    let rows = RawBuffer::new(bytemuck::cast_slice(adapters).to_vec(), &device)?;
    let v = shrink(x, &set.a, &table, &rows, set.inp, rmax)?;
    let out = Tensor::empty(y.shape(), DType::F32, &device)?;
    let (outn, rmax_i) = (set.out as i32, rmax as i32);
    let tokens64 = tokens as u64;
    let f = dev.function(&crate::kernels::cuda::LORA, "lora_expand")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(v.cuda_buffer()?).arg(set.b.cuda_buffer()?).arg(table.cuda_slice()?).arg(rows.cuda_slice()?);
    launch.arg(y.cuda_buffer()?).arg(out.cuda_buffer()?).arg(&tokens64).arg(&outn).arg(&rmax_i);
    let n = tokens * set.out;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 1 << 16) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: y and out are [tokens, out]; v as above.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("lora_expand", e))?;
    Ok(out)
}

/// The fused forward pass: returns y (x's dtype) and xa (f32).
pub(crate) fn fused(f: &Fused<'_>) -> Result<(Tensor, Tensor)> {
    let x = f.x;
    let dev = x.cuda_device()?.clone();
    let device = x.device();
    let xd = x.dtype();
    let [out, inp] = f.base.shape();
    let (tokens, r) = (x.shape()[0], f.rank());
    let y = Tensor::empty(&[tokens, out], xd, &device)?;
    let kind = dtype_code(xd);
    let (m, n, k, r_i) = (to_i32("tokens", tokens)?, to_i32("out", out)?, to_i32("in", inp)?, to_i32("rank", r)?);
    let null = 0u64;
    let bias = f.bias.as_ref().map(|b| b.cuda_buffer()).transpose()?;
    let b = f.b.cuda_buffer()?;

    if let BaseWeight::Quantized(w) = f.base {
        if tokens <= crate::ops::quant::GEMV_MAX_TOKENS {
            let xa = gemv_shrink(f)?;
            let name = format!("lora_gemv_{xd}");
            let func = dev.function(&crate::kernels::cuda::LORA, &name)?;
            let q = QArgs::of(w);
            let mut launch = dev.stream.launch_builder(&func);
            launch.arg(w.raw().cuda_slice()?).arg(x.cuda_buffer()?).arg(y.cuda_buffer()?).arg(&kind);
            launch.arg(&n).arg(&k).arg(&m);
            launch.arg(&null).arg(xa.cuda_buffer()?).arg(&null).arg(b);
            match bias {
                Some(bias) => launch.arg(bias),
                None => launch.arg(&null),
            };
            launch.arg(&r_i).arg(&f.scale);
            q.push(&mut launch);
            let cfg = LaunchConfig {
                grid_dim: (grid("out rows", out.div_ceil(8))?, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: x [tokens, in], y [tokens, out], xa [tokens, r], B [out, r], bias [out];
            // the weight buffer holds its state as QArgs describes.
            unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
            return Ok((y, xa));
        }
    }

    let tensor_cores = match f.base {
        BaseWeight::Dense(_) => xd != DType::F32 && dev.cc.0 >= 8 && inp.is_multiple_of(8),
        BaseWeight::Quantized(w) => crate::ops::quant::cuda::uses_tensor_cores(&dev, xd, w, inp),
    };
    let (mode, xa) = if f.xa_in_kernel() {
        let mode = match (tensor_cores, r <= 16) {
            (true, true) => "xa16",
            (true, false) => "xa32",
            (false, _) => "xa",
        };
        (mode, Tensor::empty(&[tokens, r], DType::F32, &device)?)
    } else {
        ("pre", f.shrink()?)
    };
    let engine = if tensor_cores { "mma" } else { "simt" };
    let weight = if matches!(f.base, BaseWeight::Dense(_)) { "dense" } else { "quant" };
    let name = format!("lora_fused_{engine}_{xd}_{weight}_{mode}");
    let func = dev.function(&crate::kernels::cuda::LORA, &name)?;
    let mut launch = dev.stream.launch_builder(&func);
    launch.arg(x.cuda_buffer()?);
    match f.base {
        BaseWeight::Dense(w) => launch.arg(w.cuda_buffer()?),
        BaseWeight::Quantized(w) => launch.arg(w.raw().cuda_slice()?),
    };
    launch.arg(y.cuda_buffer()?).arg(&kind).arg(&m).arg(&n).arg(&k);
    if mode == "pre" {
        launch.arg(&null).arg(xa.cuda_buffer()?).arg(&null);
    } else {
        launch.arg(f.a.cuda_buffer()?).arg(&null).arg(xa.cuda_buffer()?);
    }
    launch.arg(b);
    match bias {
        Some(bias) => launch.arg(bias),
        None => launch.arg(&null),
    };
    launch.arg(&r_i).arg(&f.scale);
    let q = match f.base {
        BaseWeight::Quantized(w) => Some(QArgs::of(w)),
        BaseWeight::Dense(_) => None,
    };
    if let Some(q) = &q {
        q.push(&mut launch);
    }
    let cfg = if tensor_cores {
        LaunchConfig {
            grid_dim: (grid("n tiles", out.div_ceil(128))?, grid("token tiles", tokens.div_ceil(128))?, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        }
    } else {
        LaunchConfig {
            grid_dim: (grid("n tiles", out.div_ceil(64))?, grid("token tiles", tokens.div_ceil(64))?, 1),
            block_dim: (16, 16, 1),
            shared_mem_bytes: 0,
        }
    };
    // SAFETY: x [tokens, in] (rows 16-byte aligned on the tensor-core path: in % 8 == 0),
    // W [out, in] dense in x's dtype or quantized as QArgs describes, y [tokens, out],
    // A [r, in] in x's dtype, xa [tokens, r], B [out, r], bias [out]; r ≤ 32 when the kernel
    // computes xa itself.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok((y, xa))
}

/// xa for the decoding path: `lora_shrink` with a one-adapter table (every row picks it),
/// one warp per (token, rank column).
fn gemv_shrink(f: &Fused<'_>) -> Result<Tensor> {
    let x = f.lora_input()?;
    let device = x.device();
    let (tokens, r) = (x.shape()[0], f.rank());
    let table = RawBuffer::new(bytemuck::cast_slice(&[0u32, 0, r as u32, 1f32.to_bits()]).to_vec(), &device)?;
    let rows = RawBuffer::new(vec![0u8; 4 * tokens], &device)?;
    shrink(&x.to_dtype(DType::F32)?, &f.a.to_dtype(DType::F32)?, &table, &rows, x.shape()[1], r)
}
