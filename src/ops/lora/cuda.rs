//! CUDA launchers for LoRA (`kernels/lora.cu`): the fused layer, whose kernel [`select`]
//! picks, and the batched multi-adapter product.

use super::{AdapterSet, BaseWeight, Fused};
use crate::device::cuda::CudaDevice;
use crate::device::cuda::launch::{dtype_code, grid, grid_stride, grid_x, to_i32};
use crate::kernels::kernel_params;
use crate::ops::matmul::MatmulProblem;
use crate::ops::matmul::cuda::GemmEngine;
use crate::ops::quant::GEMV_MAX_TOKENS;
use crate::ops::quant::cuda::QuantParams;
use crate::tensor::RawBuffer;
use crate::{DType, Result, Tensor};
use cudarc::driver::{LaunchConfig, PushKernelArg};
use std::sync::Arc;

kernel_params! {
    /// The fused layer's sizes, rank and scale (`struct LoraParams` in `kernels/lora.cu`).
    pub(crate) struct LoraParams {
        m: i32,
        n: i32,
        k: i32,
        rank: i32,
        scale: f32,
        out_kind: i32,
    }
}

/// Where the fused kernels get xa = x·Aᵀ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum XaSource {
    /// Computed beforehand (dropout on the LoRA input, or a rank past the kernel's capacity)
    /// and read in the epilogue: `_pre`.
    Precomputed,
    /// From the same k-loop as the base product, for ranks up to `capacity`: `_xa` (SIMT,
    /// 32), `_xa16` or `_xa32` (tensor cores, the rank padded to 16 or 32).
    InKernel { capacity: usize },
}

/// The kernels of the fused layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LoraKernel {
    /// `lora_gemv_{dtype}`: quantized W and at most [`GEMV_MAX_TOKENS`] rows (decoding),
    /// the quant GEMV with the delta in its epilogue; xa computed first.
    Gemv,
    /// `lora_fused_{engine}_{dtype}_{dense|quant}_{xa}`: a GEMM engine with the delta as
    /// extra k-steps before each tile is written.
    Gemm { engine: GemmEngine, xa: XaSource },
}

/// The fused layer's kernel on a GPU of compute capability `cc`. The engine is the one the
/// base product alone would take (matmul's or the quantized GEMM's selector).
pub(crate) fn select(cc: (u32, u32), f: &Fused<'_>) -> LoraKernel {
    let [out, inp] = f.base.shape();
    let tokens = f.x.shape()[0];
    let engine = match f.base {
        BaseWeight::Quantized(_) if tokens <= GEMV_MAX_TOKENS => return LoraKernel::Gemv,
        BaseWeight::Quantized(w) => crate::ops::quant::cuda::gemm_engine(cc, f.x.dtype(), w, inp),
        BaseWeight::Dense(_) => {
            crate::ops::matmul::cuda::select(cc, &MatmulProblem::unbatched(tokens, out, inp, true, f.x.dtype()))
        }
    };
    let xa = if !f.xa_in_kernel() {
        XaSource::Precomputed
    } else {
        match engine {
            GemmEngine::Simt => XaSource::InKernel { capacity: 32 },
            GemmEngine::Mma if f.rank() <= 16 => XaSource::InKernel { capacity: 16 },
            GemmEngine::Mma => XaSource::InKernel { capacity: 32 },
        }
    };
    LoraKernel::Gemm { engine, xa }
}

impl LoraKernel {
    fn name(self, f: &Fused<'_>) -> String {
        let xd = f.x.dtype();
        match self {
            LoraKernel::Gemv => format!("lora_gemv_{xd}"),
            LoraKernel::Gemm { engine, xa } => {
                let weight = if matches!(f.base, BaseWeight::Dense(_)) { "dense" } else { "quant" };
                let xa = match (engine, xa) {
                    (_, XaSource::Precomputed) => "pre".to_string(),
                    (GemmEngine::Simt, XaSource::InKernel { .. }) => "xa".to_string(),
                    (GemmEngine::Mma, XaSource::InKernel { capacity }) => format!("xa{capacity}"),
                };
                format!("lora_fused_{}_{xd}_{weight}_{xa}", engine.name())
            }
        }
    }

    fn config(self, tokens: usize, out: usize) -> Result<LaunchConfig> {
        match self {
            // A warp per output row, 8 per block.
            LoraKernel::Gemv => Ok(LaunchConfig {
                grid_dim: (grid_x("out rows / 8", out.div_ceil(8))?, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            }),
            LoraKernel::Gemm { engine, .. } => engine.config(tokens, out, 1),
        }
    }
}

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
        grid_dim: (grid_x("tokens", tokens)?, grid("rank groups", rmax.div_ceil(8))?, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: x is [tokens, in], v [tokens, rmax]; the table and rows describe the packed A.
    unsafe { launch.launch(cfg) }.map_err(|e| CudaDevice::launch_err("lora_shrink", e))?;
    Ok(v)
}

pub(crate) fn batched(
    dev: &Arc<CudaDevice>,
    x: &Tensor,
    y: &Tensor,
    set: &AdapterSet,
    adapters: &[i32],
) -> Result<Tensor> {
    let device = x.device();
    let tokens = x.shape()[0];
    let rmax = set.max_rank();
    let (table, rows) = set.device_tables(adapters, &device)?;
    let v = shrink(x, &set.a, &table, &rows, set.inp, rmax)?;
    let out = Tensor::empty(y.shape(), DType::F32, &device)?;
    let (outn, rmax_i) = (to_i32("out", set.out)?, to_i32("rank", rmax)?);
    let tokens64 = tokens as u64;
    let f = dev.function(&crate::kernels::cuda::LORA, "lora_expand")?;
    let mut launch = dev.stream.launch_builder(&f);
    launch.arg(v.cuda_buffer()?).arg(set.b.cuda_buffer()?).arg(table.cuda_slice()?).arg(rows.cuda_slice()?);
    launch.arg(y.cuda_buffer()?).arg(out.cuda_buffer()?).arg(&tokens64).arg(&outn).arg(&rmax_i);
    // SAFETY: y and out are [tokens, out]; v as above.
    unsafe { launch.launch(grid_stride(tokens * set.out)) }.map_err(|e| CudaDevice::launch_err("lora_expand", e))?;
    Ok(out)
}

/// The fused forward pass: returns y (x's dtype) and xa (f32).
pub(crate) fn fused(dev: &Arc<CudaDevice>, f: &Fused<'_>) -> Result<(Tensor, Tensor)> {
    let x = f.x;
    let device = x.device();
    let [out, inp] = f.base.shape();
    let (tokens, r) = (x.shape()[0], f.rank());
    let kernel = select(dev.cc, f);
    let name = kernel.name(f);
    let y = Tensor::empty(&[tokens, out], x.dtype(), &device)?;
    let params = LoraParams {
        m: to_i32("tokens", tokens)?,
        n: to_i32("out", out)?,
        k: to_i32("in", inp)?,
        rank: to_i32("rank", r)?,
        scale: f.scale,
        out_kind: dtype_code(x.dtype())?,
    };
    // xa: computed first (written by `shrink`), or by the kernel (`xa_out`).
    let (xa, xa_in_kernel) = match kernel {
        LoraKernel::Gemv => (gemv_shrink(f)?, false),
        LoraKernel::Gemm { xa: XaSource::Precomputed, .. } => (f.shrink()?, false),
        LoraKernel::Gemm { xa: XaSource::InKernel { .. }, .. } => {
            (Tensor::empty(&[tokens, r], DType::F32, &device)?, true)
        }
    };
    let null = 0u64;
    let func = dev.function(&crate::kernels::cuda::LORA, &name)?;
    let mut launch = dev.stream.launch_builder(&func);
    match (kernel, f.base) {
        (LoraKernel::Gemv, BaseWeight::Quantized(w)) => launch.arg(w.raw().cuda_slice()?).arg(x.cuda_buffer()?),
        (_, BaseWeight::Dense(w)) => launch.arg(x.cuda_buffer()?).arg(w.cuda_buffer()?),
        (_, BaseWeight::Quantized(w)) => launch.arg(x.cuda_buffer()?).arg(w.raw().cuda_slice()?),
    };
    launch.arg(y.cuda_buffer()?);
    // LORA_BUFFERS: A_lora, xa_in, xa_out, B_lora, bias (null where the kernel reads none).
    if xa_in_kernel {
        launch.arg(f.a.cuda_buffer()?).arg(&null).arg(xa.cuda_buffer()?);
    } else {
        launch.arg(&null).arg(xa.cuda_buffer()?).arg(&null);
    }
    launch.arg(f.b.cuda_buffer()?);
    match &f.bias {
        Some(bias) => launch.arg(bias.cuda_buffer()?),
        None => launch.arg(&null),
    };
    launch.arg(&params);
    let q = match f.base {
        BaseWeight::Quantized(w) => Some(QuantParams::of(w)),
        BaseWeight::Dense(_) => None,
    };
    if let Some(q) = &q {
        launch.arg(q);
    }
    // SAFETY: x [tokens, in] (rows 16-byte aligned on the tensor-core engine, which `select`
    // takes only for in % 8 == 0), W [out, in] dense in x's dtype or quantized as QuantParams
    // describes, y [tokens, out], A [r, in] in x's dtype, xa [tokens, r], B [out, r], bias
    // [out]; r within the in-kernel capacity when the kernel computes xa itself.
    unsafe { launch.launch(kernel.config(tokens, out)?) }.map_err(|e| CudaDevice::launch_err(&name, e))?;
    Ok((y, xa))
}

/// xa for the decoding path: `lora_shrink` with a one-adapter table (every row picks it),
/// one warp per (token, rank column).
fn gemv_shrink(f: &Fused<'_>) -> Result<Tensor> {
    let x = f.lora_input()?;
    let device = x.device();
    let (tokens, r) = (x.shape()[0], f.rank());
    let entry = super::AdapterEntry { a_offset: 0, b_offset: 0, rank: r as u32, scale: 1.0 };
    let table = RawBuffer::new(bytemuck::bytes_of(&entry).to_vec(), &device)?;
    let rows = RawBuffer::new(vec![0u8; 4 * tokens], &device)?;
    shrink(&x.to_dtype(DType::F32)?, &f.a.to_dtype(DType::F32)?, &table, &rows, x.shape()[1], r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_kernel_source() {
        assert_mirrored::<LoraParams>(crate::kernels::cuda::LORA.source, Lang::Cuda);
        assert_mirrored::<super::super::AdapterEntry>(crate::kernels::cuda::LORA.source, Lang::Cuda);
    }
}
