//! LoRA: a frozen weight W [out, in] plus a low-rank delta s·B·A, with A [r, in] and
//! B [out, r], and s = alpha / r (alpha / √r for rsLoRA).
//!
//! `merge` folds the delta into a dense W and `unmerge` takes it out again, for serving
//! one adapter at the speed of the base model. Both run on every backend: they are the
//! product B·A (matmul, f32 accumulation) scaled and added to W, rounded once to W's dtype.

use crate::ops::{MatmulOptions, add, matmul, matmul_with, scale as scale_op};
#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::device::Backend;
use crate::{DType, Error, Result, Tensor};

fn check(w: &Tensor, a: &Tensor, b: &Tensor, s: f32) -> Result<()> {
    crate::ops::same_device("lora merge", &[w, a, b])?;
    let (&[out, inp], &[r, a_in], &[b_out, b_r]) = (w.shape(), a.shape(), b.shape()) else {
        return Err(Error::Shape(format!(
            "lora merge takes W [out, in], A [r, in], B [out, r]; got {:?}, {:?}, {:?}",
            w.shape(),
            a.shape(),
            b.shape()
        )));
    };
    if a_in != inp || b_out != out || b_r != r {
        return Err(Error::Shape(format!(
            "lora_A {:?} and lora_B {:?} do not fit W {:?} (A must be [r, {inp}], B [{out}, r])",
            a.shape(),
            b.shape(),
            w.shape()
        )));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DType(format!("lora_A is {} but lora_B is {}", a.dtype(), b.dtype())));
    }
    if !s.is_finite() {
        return Err(Error::InvalidArgument(format!("lora scale {s} is not finite")));
    }
    Ok(())
}

/// `W + s·B·A` in W's dtype (the delta accumulated in f32). `Err` naming the tensors for
/// shapes that do not fit, A and B of different dtypes, tensors on different devices, or a
/// non-finite scale.
pub fn merge(w: &Tensor, a: &Tensor, b: &Tensor, s: f32) -> Result<Tensor> {
    crate::ops::floats("merge", &[w, a, b])?;
    check(w, a, b, s)?;
    add_delta(w, a, b, s)
}

/// `W − s·B·A`: takes a merged adapter out again (exact up to W's rounding).
pub fn unmerge(w: &Tensor, a: &Tensor, b: &Tensor, s: f32) -> Result<Tensor> {
    crate::ops::floats("unmerge", &[w, a, b])?;
    check(w, a, b, s)?;
    add_delta(w, a, b, -s)
}

fn add_delta(w: &Tensor, a: &Tensor, b: &Tensor, s: f32) -> Result<Tensor> {
    let delta = matmul_with(b, a, MatmulOptions::default().out_dtype(DType::F32))?;
    let sum = add(&w.to_dtype(DType::F32)?, &scale_op(&delta, s)?)?;
    sum.to_dtype(w.dtype())
}

/// The frozen base weight of a LoRA layer, `[out, in]`.
#[derive(Debug, Clone, Copy)]
pub enum BaseWeight<'a> {
    Dense(&'a Tensor),
    Quantized(&'a crate::ops::QTensor),
}

impl BaseWeight<'_> {
    fn shape(&self) -> [usize; 2] {
        match self {
            BaseWeight::Dense(w) => [w.shape().first().copied().unwrap_or(0), w.shape().get(1).copied().unwrap_or(0)],
            BaseWeight::Quantized(q) => q.shape(),
        }
    }

    fn device(&self) -> crate::Device {
        match self {
            BaseWeight::Dense(w) => w.device(),
            BaseWeight::Quantized(q) => q.device(),
        }
    }

    /// x·Wᵀ as f32.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => matmul_with(x, w, MatmulOptions::nt().out_dtype(DType::F32)),
            BaseWeight::Quantized(q) => crate::ops::qmatmul(&x.to_dtype(DType::F32)?, q),
        }
    }

    /// dy·W as f32 (dy rounded to a dense W's dtype first, as an unfused bf16 step rounds it).
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(w) => {
                matmul_with(&dy.to_dtype(w.dtype())?, w, MatmulOptions::default().out_dtype(DType::F32))
            }
            BaseWeight::Quantized(q) => crate::ops::qmatmul_input_grad(&dy.to_dtype(DType::F32)?, q),
        }
    }
}

/// One LoRA layer as the forward and backward passes see it.
#[derive(Debug, Clone, Copy)]
pub struct LoraLinear<'a> {
    /// W, `[out, in]`, frozen.
    pub base: BaseWeight<'a>,
    /// An optional bias `[out]`, frozen.
    pub bias: Option<&'a Tensor>,
    /// A `[r, in]` and B `[out, r]`.
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    /// s = alpha / r (alpha / √r for rsLoRA).
    pub scale: f32,
    /// Dropout on the LoRA branch's input: probability and seed. The backward pass must get
    /// the same pair, so it applies the same mask.
    pub dropout: Option<(f32, u64)>,
}

impl LoraLinear<'_> {
    fn drop(&self, t: &Tensor) -> Result<Tensor> {
        match self.dropout {
            Some((p, seed)) => crate::ops::dropout(t, p, seed),
            None => Ok(t.clone()),
        }
    }
}

/// What the forward pass returns: the output and x·Aᵀ, kept for the backward pass.
#[derive(Debug, Clone)]
pub struct LoraOutput {
    /// `x·Wᵀ + s·(x·Aᵀ)·Bᵀ`, `[tokens, out]` in x's dtype.
    pub y: Tensor,
    /// `x·Aᵀ`, `[tokens, r]`, f32.
    pub xa: Tensor,
}

/// The gradients of a LoRA layer with W frozen.
#[derive(Debug, Clone)]
pub struct LoraGrads {
    /// `dy·W + s·(dy·B)·A`, `[tokens, in]`, f32.
    pub dx: Tensor,
    /// `s·(dy·B)ᵀ·x`, `[r, in]`, f32.
    pub da: Tensor,
    /// `s·dyᵀ·(x·Aᵀ)`, `[out, r]`, f32.
    pub db: Tensor,
}

fn check_layer(x: &Tensor, l: &LoraLinear<'_>) -> Result<()> {
    let (base, a, b, s) = (&l.base, l.a, l.b, l.scale);
    crate::ops::floats("lora layer", &[x, a, b])?;
    if let Some(bias) = l.bias {
        crate::ops::floats("lora layer", &[bias])?;
    }
    if let BaseWeight::Dense(w) = base {
        crate::ops::floats("lora layer", &[w])?;
    }
    if x.device() != base.device() {
        return Err(Error::DeviceMismatch(format!("x on {}, W on {}", x.device(), base.device())));
    }
    if let BaseWeight::Dense(w) = base {
        if w.rank() != 2 {
            return Err(Error::Shape(format!("lora layer: W {:?} must be [out, in]", w.shape())));
        }
    }
    crate::ops::same_device("lora", &[x, a, b])?;
    let [out, inp] = base.shape();
    let (&[r, a_in], &[b_out, b_r]) = (a.shape(), b.shape()) else {
        return Err(Error::Shape(format!(
            "lora_A must be [r, in] and lora_B [out, r]; got {:?}, {:?}",
            a.shape(),
            b.shape()
        )));
    };
    if x.rank() != 2 || x.shape()[1] != inp || a_in != inp || b_out != out || b_r != r || r == 0 {
        return Err(Error::Shape(format!(
            "lora layer: x {:?}, W [{out}, {inp}], lora_A {:?}, lora_B {:?} do not fit \
             (x [tokens, in], A [r, in], B [out, r], r ≥ 1)",
            x.shape(),
            a.shape(),
            b.shape()
        )));
    }
    if !s.is_finite() {
        return Err(Error::InvalidArgument(format!("lora scale {s} is not finite")));
    }
    if let Some(bias) = l.bias {
        if bias.shape() != [out] {
            return Err(Error::Shape(format!("lora layer: bias {:?} must be [{out}]", bias.shape())));
        }
    }
    Ok(())
}

/// The largest rank whose `x·Aᵀ` the fused GPU kernels compute from the tiles of x they
/// already hold; a larger rank (or dropout on the LoRA input) computes it first.
pub const FUSED_XA_MAX_RANK: usize = 32;

/// The LoRA layer's forward pass over dense or quantized W, fused:
/// `y = x·Wᵀ + bias + s·(drop(x)·Aᵀ)·Bᵀ`, with x `[tokens, in]`. The delta is added to each
/// tile of the base product before the tile is written, so no `[tokens, out]` intermediate
/// exists; the products accumulate in f32 and y is rounded once to x's dtype.
///
/// - CUDA and WGSL: the GEMM kernels of the base product with a LoRA extension. Without
///   dropout and for r ≤ [`FUSED_XA_MAX_RANK`], x·Aᵀ comes out of the same k-loop from the x
///   tiles already staged (x is read once for both products); otherwise it is computed
///   first and the GEMM's epilogue reads it. Quantized W with at most 8 tokens (decoding)
///   goes through the quantized GEMV with the same epilogue.
/// - CPU: x·Aᵀ first, then the base product, then `s·(x·Aᵀ)·Bᵀ` accumulated into the base
///   product's f32 tiles in the matmul micro-kernel's registers.
///
/// A is used in x's dtype (as the unfused `x·Aᵀ` would be), B and the bias in f32. A dense
/// W must share x's dtype. `Err` naming the shapes when they do not fit.
pub fn lora_forward(x: &Tensor, layer: &LoraLinear<'_>) -> Result<LoraOutput> {
    check_layer(x, layer)?;
    if let BaseWeight::Dense(w) = layer.base {
        if w.dtype() != x.dtype() {
            return Err(Error::DType(format!("lora layer: x is {} but W is {}", x.dtype(), w.dtype())));
        }
    }
    let [out, _] = layer.base.shape();
    let tokens = x.shape()[0];
    let device = x.device();
    let fused = Fused {
        x,
        base: layer.base,
        a: layer.a.to_dtype(x.dtype())?,
        b: layer.b.to_dtype(DType::F32)?,
        bias: layer.bias.map(|b| b.to_dtype(DType::F32)).transpose()?,
        scale: layer.scale,
        dropout: layer.dropout,
    };
    if tokens == 0 || out == 0 {
        // No output to fuse into; x·Aᵀ still comes back for the backward pass.
        return Ok(LoraOutput { y: Tensor::empty(&[tokens, out], x.dtype(), &device)?, xa: fused.shrink()? });
    }
    let (y, xa) = match device.backend()? {
        Backend::Cpu => cpu_fused(&fused)?,
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => cuda::fused(&dev, &fused)?,
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(dev) => wgpu::fused(&dev, &fused)?,
    };
    Ok(LoraOutput { y, xa })
}

/// The operands of the fused forward pass, in the dtypes the kernels read.
pub(crate) struct Fused<'a> {
    /// `[tokens, in]`.
    pub x: &'a Tensor,
    pub base: BaseWeight<'a>,
    /// `[r, in]` in x's dtype.
    pub a: Tensor,
    /// `[out, r]`, f32.
    pub b: Tensor,
    /// `[out]`, f32.
    pub bias: Option<Tensor>,
    pub scale: f32,
    pub dropout: Option<(f32, u64)>,
}

impl Fused<'_> {
    pub fn rank(&self) -> usize {
        self.a.shape()[0]
    }

    /// `drop(x)`, the LoRA branch's input.
    pub fn lora_input(&self) -> Result<Tensor> {
        match self.dropout {
            Some((p, seed)) => crate::ops::dropout(self.x, p, seed),
            None => Ok(self.x.clone()),
        }
    }

    /// `drop(x)·Aᵀ`, f32: the kernels' xa when they do not compute it themselves.
    pub fn shrink(&self) -> Result<Tensor> {
        matmul_with(&self.lora_input()?, &self.a, MatmulOptions::nt().out_dtype(DType::F32))
    }

    /// Whether the GPU kernels compute xa in their own k-loop.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub fn xa_in_kernel(&self) -> bool {
        self.dropout.is_none() && self.rank() <= FUSED_XA_MAX_RANK
    }
}

fn cpu_fused(f: &Fused<'_>) -> Result<(Tensor, Tensor)> {
    use crate::ops::matmul::{MatmulProblem, cpu_matmul_into};
    let xa = f.shrink()?;
    let mut y = f.base.forward(f.x)?;
    let [out, _] = f.base.shape();
    let (tokens, r) = (f.x.shape()[0], f.rank());
    let sxa: Vec<f32> = xa.to_vec::<f32>()?.iter().map(|v| f.scale * v).collect();
    let b = f.b.to_vec::<f32>()?;
    let bias = f.bias.as_ref().map(|b| b.to_vec::<f32>()).transpose()?;
    let crate::tensor::Storage::Cpu(crate::tensor::CpuStorage::F32(yv)) = y.storage_mut()? else {
        return Err(Error::InvalidArgument("the CPU base product is f32".into()));
    };
    // (s·xa)·Bᵀ as a product of depth r, accumulated into the base product's tiles.
    let p = MatmulProblem::unbatched(tokens, out, r, true, DType::F32);
    cpu_matmul_into(&p, &sxa, &b, yv, true);
    if let Some(bias) = bias {
        use rayon::prelude::*;
        yv.par_chunks_mut(out).for_each(|row| row.iter_mut().zip(&bias).for_each(|(y, b)| *y += b));
    }
    Ok((y.to_dtype(f.x.dtype())?, xa))
}

/// The LoRA layer's backward pass with W (and the bias) frozen, reusing x·Aᵀ from the
/// forward pass: `dx = dy·W + s·drop((dy·B)·A)`, `dA = s·(dy·B)ᵀ·drop(x)`,
/// `dB = s·dyᵀ·(x·Aᵀ)`, all f32. A quantized W goes through the quantized input gradient,
/// never dequantized whole.
pub fn lora_backward(dy: &Tensor, x: &Tensor, xa: &Tensor, layer: &LoraLinear<'_>) -> Result<LoraGrads> {
    crate::ops::floats("lora_backward", &[dy, xa])?;
    check_layer(x, layer)?;
    let [out, _] = layer.base.shape();
    let r = layer.a.shape()[0];
    if dy.shape() != [x.shape()[0], out] || xa.shape() != [x.shape()[0], r] {
        return Err(Error::Shape(format!(
            "lora backward: dy {:?} must be [{}, {out}] and xa {:?} [{}, {r}]",
            dy.shape(),
            x.shape()[0],
            xa.shape(),
            x.shape()[0]
        )));
    }
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let (dy, xa, a, b) = (f32_of(dy)?, f32_of(xa)?, f32_of(layer.a)?, f32_of(layer.b)?);
    // The scale goes on the rank-r factors, never on a [tokens, in] or [out, in] product.
    let s = layer.scale;
    let s_dyb = scale_op(&matmul(&dy, &b)?, s)?; // s·dy·B, [tokens, r]
    let da = matmul_with(&s_dyb, &f32_of(&layer.drop(x)?)?, MatmulOptions::tn())?;
    let db = matmul_with(&dy, &scale_op(&xa, s)?, MatmulOptions::tn())?;
    let mut dx = layer.base.input_grad(&dy)?;
    let cpu_in_place = dx.device().is_cpu() && layer.dropout.is_none();
    if cpu_in_place {
        // dx += (s·dy·B)·A straight into the base gradient's tiles.
        let (s_dyb, a) = (s_dyb.to_vec::<f32>()?, a.to_vec::<f32>()?);
        let [tokens, inp] = [dx.shape()[0], dx.shape()[1]];
        let p = crate::ops::matmul::MatmulProblem::unbatched(tokens, inp, r, false, DType::F32);
        let crate::tensor::Storage::Cpu(crate::tensor::CpuStorage::F32(out)) = dx.storage_mut()? else {
            return Err(Error::DType("lora backward: the base gradient is not f32 on the CPU".into()));
        };
        crate::ops::matmul::cpu_matmul_into(&p, &s_dyb, &a, out, true);
    } else {
        dx = add(&dx, &layer.drop(&matmul(&s_dyb, &a)?)?)?;
    }
    Ok(LoraGrads { dx, da, db })
}

crate::kernels::kernel_params! {
    /// One adapter of an [`AdapterSet`] as the batched kernels read it (`struct AdapterEntry`
    /// in `kernels/lora.cu` and `shaders/lora_adapters.wgsl`): where its A and B start in the
    /// packed arrays (elements), its rank and its scale.
    pub(crate) struct AdapterEntry {
        a_offset: u32,
        b_offset: u32,
        rank: u32,
        scale: f32,
    }
}

/// Many adapters of one layer, packed for serving them side by side: each row of a batch
/// picks its adapter (Punica's BGMV idea). Ranks may differ between adapters.
#[derive(Debug, Clone)]
pub struct AdapterSet {
    /// Every adapter's A, flattened one after the other, f32.
    a: Tensor,
    /// Every adapter's B, flattened one after the other, f32.
    b: Tensor,
    /// One entry per adapter.
    table: Vec<AdapterEntry>,
    ranks: Vec<usize>,
    inp: usize,
    out: usize,
}

impl AdapterSet {
    /// Packs `(A [r, in], B [out, r], scale)` triples (any float dtype, one device, one
    /// `[out, in]`) onto their device. `Err` naming the adapter whose shapes disagree.
    pub fn new(adapters: &[(&Tensor, &Tensor, f32)]) -> Result<AdapterSet> {
        for (a, b, _) in adapters {
            crate::ops::floats("AdapterSet::new", &[a, b])?;
        }
        let Some((a0, b0, _)) = adapters.first() else {
            return Err(Error::InvalidArgument("an adapter set needs at least one adapter".into()));
        };
        let (inp, out, device) =
            (a0.shape().get(1).copied().unwrap_or(0), b0.shape().first().copied().unwrap_or(0), a0.device());
        let (mut a_all, mut b_all, mut table, mut ranks) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (i, (a, b, s)) in adapters.iter().enumerate() {
            let (&[r, a_in], &[b_out, b_r]) = (a.shape(), b.shape()) else {
                return Err(Error::Shape(format!(
                    "adapter {i}: A {:?} and B {:?} must be matrices",
                    a.shape(),
                    b.shape()
                )));
            };
            if a_in != inp || b_out != out || b_r != r || r == 0 {
                return Err(Error::Shape(format!(
                    "adapter {i}: A {:?} and B {:?} do not fit [r, {inp}] and [{out}, r]",
                    a.shape(),
                    b.shape()
                )));
            }
            if a.device() != device || b.device() != device {
                return Err(Error::DeviceMismatch(format!("adapter {i} is not on {device}")));
            }
            if !s.is_finite() {
                return Err(Error::InvalidArgument(format!("adapter {i}: scale {s} is not finite")));
            }
            let offset = |v: usize| u32::try_from(v).map_err(|_| Error::Unsupported("adapter set too large".into()));
            table.push(AdapterEntry {
                a_offset: offset(a_all.len())?,
                b_offset: offset(b_all.len())?,
                rank: offset(r)?,
                scale: *s,
            });
            a_all.extend(a.to_vec_f32()?);
            b_all.extend(b.to_vec_f32()?);
            ranks.push(r);
        }
        Ok(AdapterSet {
            a: Tensor::from_slice(&a_all, &[a_all.len()], &device)?,
            b: Tensor::from_slice(&b_all, &[b_all.len()], &device)?,
            table,
            ranks,
            inp,
            out,
        })
    }

    pub fn len(&self) -> usize {
        self.ranks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ranks.is_empty()
    }

    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    fn max_rank(&self) -> usize {
        self.ranks.iter().copied().max().unwrap_or(0)
    }

    /// The adapter table and each row's adapter index, on `device` as the batched kernels
    /// read them.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    fn device_tables(
        &self,
        adapters: &[i32],
        device: &crate::Device,
    ) -> Result<(crate::tensor::RawBuffer, crate::tensor::RawBuffer)> {
        use crate::tensor::RawBuffer;
        Ok((
            RawBuffer::new(bytemuck::cast_slice(&self.table).to_vec(), device)?,
            RawBuffer::new(bytemuck::cast_slice(adapters).to_vec(), device)?,
        ))
    }
}

/// `y + s_a·(x·A_aᵀ)·B_aᵀ` for every row, with `a = adapters[row]` (−1: the row gets no
/// delta). x `[tokens, in]`, y `[tokens, out]` (the base output, any float dtype; the result
/// has y's dtype). Two launches for the whole batch whatever the number of adapters: a
/// shrink to `[tokens, max rank]` and an expand that adds to y.
/// `Err` for an index out of range (naming the row), or shapes that do not fit.
pub fn lora_batched(x: &Tensor, y: &Tensor, set: &AdapterSet, adapters: &[i32]) -> Result<Tensor> {
    crate::ops::floats("lora_batched", &[x, y, &set.a, &set.b])?;
    crate::ops::same_device("lora_batched", &[x, y, &set.a])?;
    let tokens = x.shape().first().copied().unwrap_or(0);
    if x.shape() != [tokens, set.inp] || y.shape() != [tokens, set.out] || adapters.len() != tokens {
        return Err(Error::Shape(format!(
            "lora_batched: x {:?}, y {:?} and {} adapter indices do not fit [tokens, {}], [tokens, {}]",
            x.shape(),
            y.shape(),
            adapters.len(),
            set.inp,
            set.out
        )));
    }
    if let Some((row, &a)) = adapters.iter().enumerate().find(|&(_, &a)| a < -1 || a >= set.len() as i32) {
        return Err(Error::InvalidArgument(format!(
            "row {row} asks for adapter {a}, the set has {} (−1 for none)",
            set.len()
        )));
    }
    if tokens == 0 || set.out == 0 {
        return Ok(y.clone());
    }
    let xf = x.to_dtype(DType::F32)?;
    let yf = y.to_dtype(DType::F32)?;
    let out = match xf.device().backend()? {
        Backend::Cpu => cpu_batched(&xf, &yf, set, adapters)?,
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => cuda::batched(&dev, &xf, &yf, set, adapters)?,
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(dev) => wgpu::batched(&dev, &xf, &yf, set, adapters)?,
    };
    out.to_dtype(y.dtype())
}

fn cpu_batched(x: &Tensor, y: &Tensor, set: &AdapterSet, adapters: &[i32]) -> Result<Tensor> {
    use crate::tensor::{CpuStorage, Storage};
    use rayon::prelude::*;
    // Borrowed, not copied: the packed adapters are read in place on every call.
    fn f32_of(t: &Tensor) -> Result<&[f32]> {
        match t.storage() {
            Storage::Cpu(CpuStorage::F32(v)) => Ok(v.as_slice()),
            _ => Err(Error::InvalidArgument("lora_batched: the CPU path takes f32 host tensors".into())),
        }
    }
    let (xv, av, bv) = (f32_of(x)?, f32_of(&set.a)?, f32_of(&set.b)?);
    let mut out = y.copy()?;
    let Storage::Cpu(CpuStorage::F32(yv)) = out.storage_mut()? else {
        return Err(Error::InvalidArgument("lora_batched: the CPU path takes f32 host tensors".into()));
    };
    let (inp, outs) = (set.inp, set.out);
    // Per row: v = A·x (r values), then y += s·(B·v).
    let expand = |t: usize, row: &mut [f32]| {
        let Ok(a) = usize::try_from(adapters[t]) else { return };
        let e = set.table[a];
        let (ao, bo, r, s) = (e.a_offset as usize, e.b_offset as usize, e.rank as usize, e.scale);
        let xr = &xv[t * inp..(t + 1) * inp];
        let v: Vec<f32> = (0..r).map(|j| crate::ops::dot(xr, &av[ao + j * inp..ao + (j + 1) * inp])).collect();
        for (o, yo) in row.iter_mut().enumerate() {
            *yo += s * crate::ops::dot(&v, &bv[bo + o * r..bo + (o + 1) * r]);
        }
    };
    if adapters.len() * (inp + outs) < 1 << 16 {
        // A few decoding rows: less work than handing it to other threads costs.
        yv.chunks_mut(outs).enumerate().for_each(|(t, row)| expand(t, row));
    } else {
        yv.par_chunks_mut(outs).enumerate().for_each(|(t, row)| expand(t, row));
    }
    Ok(out)
}
