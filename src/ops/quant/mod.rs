//! Quantized weights and products through them.
//!
//! Formats (each a [`QuantFormat`], stored as a [`QTensor`] of shape `[out, in]`, row-major,
//! blocks running along `in`):
//! - `Q8_0`: ggml's block of 32: an f16 scale `d`, then 32 `i8`; `w = d·q` (34 bytes).
//! - `Q4_0`: ggml's block of 32: an f16 scale `d`, then 16 bytes; byte `j` holds weight `j`
//!   in its low nibble and weight `j + 16` in its high one; `w = d·(q − 8)` (18 bytes).
//! - `Q4_1`: ggml's block of 32: an f16 scale `d`, an f16 minimum `m`, then 16 bytes of
//!   nibbles packed as Q4_0's; `w = d·q + m` with `q` in 0..15 (20 bytes).
//! - `Nf4`: bitsandbytes' NF4: blocks of 64 with an f32 `absmax`; two 4-bit codes per byte,
//!   the first weight in the high nibble; `w = NF4[q]·absmax`.
//! - `Nf4DoubleQuant`: NF4 whose absmax values, less their mean (`offset`), are quantised to
//!   8 bits in blocks of 256 with bitsandbytes' dynamic 8-bit code and an f32 scale each:
//!   `absmax = code[qa]·nested_absmax + offset` (QLoRA's 4.127 bits per weight).
//!
//! On every device a `QTensor` is one buffer: the ggml blocks as they are, or for NF4 the
//! packed codes followed by the scale state (see [`Nf4Layout`]), so ggml blocks and
//! bitsandbytes state load without re-quantising.
//!
//! Products (`y = x·Wᵀ` and the input gradient `dx = dy·W`) pick their path by the number
//! of token rows: a GEMV for up to [`GEMV_MAX_TOKENS`] (decoding; each weight byte read
//! once), a GEMM that dequantises tiles of W next to the multiply otherwise. W is never
//! dequantised whole into memory.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
pub(crate) mod formats;
mod gemm;
mod gemv;
mod quantize;
mod rows;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

pub use formats::{
    BlockQ4_0, BlockQ4_1, BlockQ8_0, NF4_BLOCK, NF4_CODE, NF4_NESTED_BLOCK, Nf4Absmax, Nf4Layout, Nf4State,
    QuantFormat, dynamic_code,
};

use crate::ops::{Operands, operands};
use crate::tensor::{CpuStorage, RawBuffer, try_zeros, with_elems};
use crate::{DType, Device, Error, Result, Tensor};
use formats::{GgmlBlock, decode_block, nf4_absmax};
use quantize::{quantize_blockwise_8bit, quantize_nf4, quantize_q4_0, quantize_q4_1, quantize_q8_0, torch_mean_f32};
use rayon::prelude::*;
use std::fmt;
use std::sync::Arc;

/// Token rows up to which the products take the GEMV path.
pub const GEMV_MAX_TOKENS: usize = 8;

/// A quantized `[out, in]` weight on one device.
#[derive(Clone)]
pub struct QTensor {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    device: Device,
    layout: Nf4Layout,
    /// An upper bound on |w| over the tensor (from its block scales), so a kernel that
    /// rounds weights to f16 knows whether they fit.
    max_abs: f32,
    data: Arc<RawBuffer>,
}

impl fmt::Debug for QTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QTensor([{}, {}], {}, {})", self.rows, self.cols, self.format, self.device)
    }
}

fn check_shape(format: QuantFormat, shape: &[usize]) -> Result<(usize, usize)> {
    let &[rows, cols] = shape else {
        return Err(Error::Shape(format!("quantized weights are [out, in], got shape {shape:?}")));
    };
    if cols % format.block_size() != 0 {
        return Err(Error::Shape(format!(
            "{format} needs `in` to be a multiple of its block of {}, got shape {shape:?}",
            format.block_size()
        )));
    }
    rows.checked_mul(cols).ok_or_else(|| Error::Shape(format!("shape {shape:?} is too large")))?;
    Ok((rows, cols))
}

fn pad4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

impl QTensor {
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    pub fn device(&self) -> Device {
        self.device
    }

    /// Bytes the weight takes on its device, every part of its state included.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() + if self.format == QuantFormat::Nf4DoubleQuant { 4 } else { 0 }
    }

    /// Storage bits per weight, every part of the state included.
    pub fn bits_per_weight(&self) -> f64 {
        8.0 * self.size_in_bytes() as f64 / (self.rows * self.cols).max(1) as f64
    }

    /// Where the NF4 parts sit in [`QTensor::to_bytes`] (zeros for the ggml formats).
    pub fn nf4_layout(&self) -> Nf4Layout {
        self.layout
    }

    /// The raw bytes: ggml blocks, or the NF4 parts laid out as [`QTensor::nf4_layout`] says.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.data.to_vec()
    }

    /// An upper bound on |w| over the whole tensor.
    pub fn max_abs_bound(&self) -> f32 {
        self.max_abs
    }

    pub(crate) fn raw(&self) -> &RawBuffer {
        &self.data
    }

    /// A copy on `device`.
    pub fn to_device(&self, device: &Device) -> Result<QTensor> {
        if *device == self.device {
            return Ok(self.clone());
        }
        Ok(QTensor { device: *device, data: Arc::new(RawBuffer::new(self.to_bytes()?, device)?), ..self.clone() })
    }

    /// Q8_0, Q4_0 or Q4_1 blocks exactly as ggml (and GGUF files) store them, for an `[out, in]`
    /// weight. `Err` when the format is not a ggml one, `in` is not a multiple of 32, the
    /// byte count is not blocks × block bytes, or a block's scale is not finite (the rule
    /// [`QTensor::from_nf4`] follows too).
    pub fn from_ggml_blocks(format: QuantFormat, blocks: &[u8], shape: &[usize], device: &Device) -> Result<QTensor> {
        let Some(block_bytes) = format.ggml_block_bytes() else {
            return Err(Error::InvalidArgument(format!("{format} is not a ggml block format (q8_0, q4_0, q4_1)")));
        };
        let (rows, cols) = check_shape(format, shape)?;
        let want = (rows * cols / 32)
            .checked_mul(block_bytes)
            .ok_or_else(|| Error::Shape(format!("{format} weight {shape:?} takes more bytes than fit in usize")))?;
        if blocks.len() != want {
            return Err(Error::InvalidArgument(format!(
                "{format} weight {shape:?} takes {} blocks = {want} bytes, got {} bytes",
                rows * cols / 32,
                blocks.len()
            )));
        }
        Self::from_parts(format, rows, cols, Nf4Layout::ggml(), blocks.to_vec(), device)
    }

    /// NF4 state as bitsandbytes keeps it (see [`Nf4State`]), loaded without re-quantising.
    /// `Err` naming the part that does not fit the shape, a non-finite scale, or a block size
    /// kiln's kernels do not take (they take [`NF4_BLOCK`] weights per absmax and
    /// [`NF4_NESTED_BLOCK`] absmax values per nested scale, bnb's defaults).
    pub fn from_nf4(state: &Nf4State, shape: &[usize], device: &Device) -> Result<QTensor> {
        let format = match state.absmax {
            Nf4Absmax::F32(_) => QuantFormat::Nf4,
            Nf4Absmax::DoubleQuant { .. } => QuantFormat::Nf4DoubleQuant,
        };
        if state.block_size != NF4_BLOCK {
            return Err(Error::Unsupported(format!(
                "nf4 state with blocks of {} weights: kiln's kernels take blocks of {NF4_BLOCK} (bnb's blocksize=64)",
                state.block_size
            )));
        }
        let (rows, cols) = check_shape(format, shape)?;
        let elements = rows * cols; // check_shape checked the product
        let blocks = elements / NF4_BLOCK;
        if state.packed.len() != elements / 2 {
            return Err(Error::InvalidArgument(format!(
                "nf4 weight {shape:?} packs into {} bytes, got {}",
                elements / 2,
                state.packed.len()
            )));
        }
        let mut bytes = state.packed.clone();
        let absmax_offset = bytes.len();
        let layout = match &state.absmax {
            Nf4Absmax::F32(absmax) => {
                if absmax.len() != blocks {
                    return Err(Error::InvalidArgument(format!(
                        "nf4 weight {shape:?} has {blocks} blocks of {NF4_BLOCK}, got {} absmax values",
                        absmax.len()
                    )));
                }
                if let Some(bad) = absmax.iter().find(|v| !v.is_finite()) {
                    return Err(Error::InvalidArgument(format!("nf4 absmax holds a non-finite value ({bad})")));
                }
                bytes.extend(absmax.iter().flat_map(|v| v.to_le_bytes()));
                Nf4Layout { absmax_offset, nested_offset: 0, code_offset: 0, offset: 0.0 }
            }
            Nf4Absmax::DoubleQuant { quantized, nested_absmax, nested_code, offset, nested_block_size } => {
                if *nested_block_size != NF4_NESTED_BLOCK {
                    return Err(Error::Unsupported(format!(
                        "nf4 double quantization in blocks of {nested_block_size} absmax values: kiln's kernels \
                         take blocks of {NF4_NESTED_BLOCK} (bnb's nested blocksize=256)"
                    )));
                }
                let nested = blocks.div_ceil(NF4_NESTED_BLOCK);
                if quantized.len() != blocks || nested_absmax.len() != nested || nested_code.len() != 256 {
                    return Err(Error::InvalidArgument(format!(
                        "nf4 double-quant state for {shape:?} needs {blocks} quantized absmax, {nested} nested \
                         absmax and a 256-entry code; got {}, {} and {}",
                        quantized.len(),
                        nested_absmax.len(),
                        nested_code.len()
                    )));
                }
                if !offset.is_finite() || nested_absmax.iter().chain(nested_code).any(|v| !v.is_finite()) {
                    return Err(Error::InvalidArgument("nf4 double-quant state holds a non-finite value".into()));
                }
                bytes.extend_from_slice(quantized);
                bytes.resize(pad4(bytes.len()), 0);
                let nested_offset = bytes.len();
                bytes.extend(nested_absmax.iter().flat_map(|v| v.to_le_bytes()));
                let code_offset = bytes.len();
                bytes.extend(nested_code.iter().flat_map(|v| v.to_le_bytes()));
                Nf4Layout { absmax_offset, nested_offset, code_offset, offset: *offset }
            }
        };
        Self::from_parts(format, rows, cols, layout, bytes, device)
    }

    /// The state of an NF4 weight as bitsandbytes keeps it (copied to the host), for writing
    /// it as a QLoRA checkpoint. `Err(InvalidArgument)` for a ggml format.
    pub fn nf4_state(&self) -> Result<Nf4State> {
        if !matches!(self.format, QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant) {
            return Err(Error::InvalidArgument(format!("a {} weight has no NF4 state", self.format)));
        }
        let bytes = self.to_bytes()?;
        let l = &self.layout;
        let blocks = self.rows * self.cols / NF4_BLOCK;
        let f32s = |at: usize, n: usize| -> Vec<f32> {
            bytes[at..at + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        };
        let absmax = match self.format {
            QuantFormat::Nf4 => Nf4Absmax::F32(f32s(l.absmax_offset, blocks)),
            _ => Nf4Absmax::DoubleQuant {
                quantized: bytes[l.absmax_offset..l.absmax_offset + blocks].to_vec(),
                nested_absmax: f32s(l.nested_offset, blocks.div_ceil(NF4_NESTED_BLOCK)),
                nested_code: f32s(l.code_offset, 256),
                offset: l.offset,
                nested_block_size: NF4_NESTED_BLOCK,
            },
        };
        Ok(Nf4State { packed: bytes[..l.absmax_offset].to_vec(), block_size: NF4_BLOCK, absmax })
    }

    fn from_parts(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        layout: Nf4Layout,
        bytes: Vec<u8>,
        device: &Device,
    ) -> Result<QTensor> {
        let mut w = QTensor {
            format,
            rows,
            cols,
            device: Device::Cpu,
            layout,
            max_abs: 0.0,
            data: Arc::new(RawBuffer::Cpu(Vec::new())),
        };
        /// A ggml block's scale, minimum and largest |w|.
        fn ggml<B: GgmlBlock>(bytes: &[u8], b: usize) -> (f32, f32, f32) {
            let block = B::at(bytes, b);
            (block.scale(), block.min(), block.max_abs())
        }
        let blocks = rows * cols / format.block_size();
        let state = |b: usize| match format {
            QuantFormat::Q8_0 => ggml::<BlockQ8_0>(&bytes, b),
            QuantFormat::Q4_0 => ggml::<BlockQ4_0>(&bytes, b),
            QuantFormat::Q4_1 => ggml::<BlockQ4_1>(&bytes, b),
            QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => {
                let absmax = nf4_absmax(&w, &bytes, b);
                (absmax, 0.0, absmax.abs())
            }
        };
        // One rule for every format: a scale (and Q4_1's minimum) must be finite (ggml writes
        // an infinite f16 for weights beyond 65504·code; such a block decodes to NaN).
        if let Some(b) = (0..blocks).find(|&b| {
            let (scale, min, _) = state(b);
            !(scale.is_finite() && min.is_finite())
        }) {
            let per_row = cols / format.block_size();
            let (scale, min, _) = state(b);
            let (min, holds) = match format {
                QuantFormat::Q4_1 => (format!(" and the minimum {min}"), 65504.0),
                QuantFormat::Q8_0 => (String::new(), 65504.0 * 128.0),
                QuantFormat::Q4_0 => (String::new(), 65504.0 * 8.0),
                QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => (String::new(), 65504.0),
            };
            return Err(Error::InvalidArgument(format!(
                "{format} block {b} (row {}, columns {}..{}) has the scale {scale}{min}: its weights lie beyond \
                 what the format holds (|w| ≤ {holds} for {format})",
                b / per_row.max(1),
                b % per_row.max(1) * format.block_size(),
                (b % per_row.max(1) + 1) * format.block_size(),
            )));
        }
        w.max_abs = (0..blocks).map(|b| state(b).2).fold(0f32, f32::max);
        w.device = *device;
        w.data = Arc::new(RawBuffer::new(bytes, device)?);
        Ok(w)
    }

    /// Quantizes an `[out, in]` weight (any float dtype, any device) on the CPU, as ggml's
    /// reference quantizers and bitsandbytes define each format, and puts the result on the
    /// weight's device. `Err` for NaN or infinite weights, weights beyond what a ggml
    /// format's f16 scale holds (|w| > 65504·127 for Q8_0, 65504·8 for Q4_0; for Q4_1 a block
    /// minimum below −65504 or a block range past 15·65504; where ggml would write an infinite
    /// scale), a shape that is not `[out, in]` or an `in` that is not a multiple of the block.
    ///
    /// NF4 and NF4 with double quantization give the bytes of bitsandbytes'
    /// `quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=...)` on the CPU:
    /// its bucketing of the 4-bit codes, its lookup table for the 8-bit absmax codes (not
    /// always the nearest code), and for the offset torch's f32 `absmax.mean()` in torch's
    /// summation order (one thread; torch splits 32768 or more absmax values over its threads,
    /// which can move the offset's last bit).
    pub fn quantize(w: &Tensor, format: QuantFormat) -> Result<QTensor> {
        crate::ops::floats("quantize", &[w])?;
        let (rows, cols) = check_shape(format, w.shape())?;
        let values = w.to_vec_f32()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(Error::InvalidArgument(format!(
                "cannot quantize a non-finite weight ({} at row {}, column {})",
                values[i],
                i / cols.max(1),
                i % cols.max(1)
            )));
        }
        let device = w.device();
        match format {
            QuantFormat::Q8_0 => {
                let blocks = quantize_q8_0(&values);
                Self::from_parts(format, rows, cols, Nf4Layout::ggml(), bytemuck::cast_vec(blocks), &device)
            }
            QuantFormat::Q4_0 => {
                let blocks = quantize_q4_0(&values);
                Self::from_parts(format, rows, cols, Nf4Layout::ggml(), bytemuck::cast_vec(blocks), &device)
            }
            QuantFormat::Q4_1 => {
                let blocks = quantize_q4_1(&values);
                Self::from_parts(format, rows, cols, Nf4Layout::ggml(), bytemuck::cast_vec(blocks), &device)
            }
            QuantFormat::Nf4 => {
                let (packed, absmax) = quantize_nf4(&values);
                let state = Nf4State { packed, block_size: NF4_BLOCK, absmax: Nf4Absmax::F32(absmax) };
                Self::from_nf4(&state, &[rows, cols], &device)
            }
            QuantFormat::Nf4DoubleQuant => {
                let (packed, absmax) = quantize_nf4(&values);
                // bitsandbytes' `absmax.mean()`: torch's f32 mean, in torch's summation order.
                let offset = if absmax.is_empty() { 0.0 } else { torch_mean_f32(&absmax) };
                let code = dynamic_code();
                let centered: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
                let (quantized, nested_absmax) = quantize_blockwise_8bit(&centered, &code);
                let absmax = Nf4Absmax::DoubleQuant {
                    quantized,
                    nested_absmax,
                    nested_code: code.to_vec(),
                    offset,
                    nested_block_size: NF4_NESTED_BLOCK,
                };
                Self::from_nf4(&Nf4State { packed, block_size: NF4_BLOCK, absmax }, &[rows, cols], &device)
            }
        }
    }

    /// The weight as a dense `[out, in]` tensor of `dtype` on the same device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        if !dtype.is_float() {
            return Err(crate::tensor::not_float("dequantize"));
        }
        match self.raw() {
            RawBuffer::Cpu(bytes) => {
                let mut out = try_zeros::<f32>(self.rows * self.cols)?;
                let bs = self.format.block_size();
                out.par_chunks_mut(bs).enumerate().for_each(|(b, dst)| decode_block(self, bytes, b, dst));
                Ok(Tensor::from_cpu_storage(CpuStorage::from_f32_vec(dtype, out)?, &[self.rows, self.cols], dtype))
            }
            #[cfg(feature = "cuda")]
            RawBuffer::Cuda { dev, buf, .. } => cuda::dequantize(dev, self, buf, dtype),
            #[cfg(feature = "wgpu")]
            RawBuffer::Wgpu { dev, buf, .. } => wgpu::dequantize(dev, self, buf, dtype),
        }
    }
}

// ---------------------------------------------------------------------------------------
// Products

/// `y = x·Wᵀ` with `W` quantized: `x` is `[.., in]` (f32, f16 or bf16), `y` is `[.., out]`
/// in `x`'s dtype, accumulated in f32. Up to [`GEMV_MAX_TOKENS`] rows take the GEMV path.
///
/// Errors: `Shape` when `x`'s last dimension is not `in` (naming both shapes);
/// `DeviceMismatch`; `OutOfMemory`.
pub fn qmatmul(x: &Tensor, w: &QTensor) -> Result<Tensor> {
    qmatmul_with(x, w, QMatmulOptions::default())
}

/// What [`qmatmul_with`] may trade for speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QMatmulOptions {
    /// Allow rounding the activations to 8 bits per block of 32 where a backend has integer
    /// kernels for the product, as llama.cpp computes on the CPU: per row and block,
    /// `d = amax / 127` (kept in f32) and `q = round(x·(1/d))`, half away from zero, so each
    /// activation moves by at most `d / 2` (to within f32 rounding); the block's dot with the
    /// weight's integers is then exact and scaled once by `d_w·d`.
    ///
    /// Taken today by the CPU GEMV (at most [`GEMV_MAX_TOKENS`] rows) over Q8_0, Q4_0 and
    /// Q4_1 weights, with or without SIMD. Every other path computes exactly as [`qmatmul`]: the
    /// GPU GEMVs are bound by W's bytes, not by widening them, and the GEMMs reuse each
    /// decoded weight across many rows.
    pub int8_activations: bool,
}

impl QMatmulOptions {
    /// Allows 8-bit activations: see the field of the same name.
    pub fn int8_activations(self) -> Self {
        QMatmulOptions { int8_activations: true }
    }
}

/// [`qmatmul`] with options: the same contract, the same errors.
pub fn qmatmul_with(x: &Tensor, w: &QTensor, options: QMatmulOptions) -> Result<Tensor> {
    crate::ops::floats("qmatmul", &[x])?;
    product(x, w, Direction::Forward, options)
}

/// The input gradient through a frozen quantized weight: `dx = dy·W`, `dy` `[.., out]`,
/// `dx` `[.., in]` in `dy`'s dtype. W is dequantised tile by tile, never whole.
///
/// Errors as [`qmatmul`].
pub fn qmatmul_input_grad(dy: &Tensor, w: &QTensor) -> Result<Tensor> {
    crate::ops::floats("qmatmul_input_grad", &[dy])?;
    product(dy, w, Direction::InputGrad, QMatmulOptions::default())
}

/// Which product through W.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// `x·Wᵀ`: reduces over `in`.
    Forward,
    /// `dy·W`: reduces over `out`.
    InputGrad,
}

/// The sizes of one product: `tokens` rows of `x`, reduced over `k`, giving `n` columns.
#[derive(Debug, Clone, Copy)]
pub(crate) struct QProblem {
    pub tokens: usize,
    pub k: usize,
    pub n: usize,
    pub direction: Direction,
}

fn product(x: &Tensor, w: &QTensor, direction: Direction, options: QMatmulOptions) -> Result<Tensor> {
    if x.device() != w.device() {
        return Err(Error::DeviceMismatch(format!(
            "x on {} and the quantized weight on {}; move one with to_device",
            x.device(),
            w.device()
        )));
    }
    let (k, n) = match direction {
        Direction::Forward => (w.cols, w.rows),
        Direction::InputGrad => (w.rows, w.cols),
    };
    let Some((&last, lead)) = x.shape().split_last() else {
        return Err(Error::Shape("the activations need at least one dimension".into()));
    };
    if last != k {
        let what = if direction == Direction::Forward { "x·Wᵀ" } else { "dy·W" };
        return Err(Error::Shape(format!(
            "{what}: activations {:?} do not fit the {} weight [{}, {}] (last dimension must be {k})",
            x.shape(),
            w.format,
            w.rows,
            w.cols
        )));
    }
    let tokens: usize = lead.iter().product();
    let mut out_shape = lead.to_vec();
    out_shape.push(n);
    tokens
        .checked_mul(n)
        .ok_or_else(|| Error::Shape(format!("output {out_shape:?} has more elements than fit in usize")))?;
    let p = QProblem { tokens, k, n, direction };
    if tokens == 0 || n == 0 {
        return Tensor::empty(&out_shape, x.dtype(), &x.device());
    }
    if k == 0 {
        return Tensor::zeros(&out_shape, x.dtype(), &x.device());
    }
    let mismatch = || Error::DeviceMismatch("x and the weight are on different backends".into());
    match operands("quantized product", [x])? {
        Operands::Cpu([xs]) => {
            let bytes = w.raw().as_cpu().ok_or_else(mismatch)?;
            let y = if tokens <= GEMV_MAX_TOKENS && direction == Direction::Forward {
                gemv::cpu_gemv(w, bytes, &xs.to_f32_vec()?, tokens, options.int8_activations)?
            } else {
                // The GEMM converts rows of x as it packs them: no f32 copy of x.
                with_elems!(xs, xv => gemm::cpu_gemm(w, bytes, xv, &p)?)
            };
            Ok(Tensor::from_cpu_storage(CpuStorage::from_f32_vec(x.dtype(), y)?, &out_shape, x.dtype()))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [buf]) => {
            let out = Tensor::empty(&out_shape, x.dtype(), &x.device())?;
            cuda::product(dev, &p, x, buf, w, w.raw().as_cuda().ok_or_else(mismatch)?, &out)?;
            Ok(out)
        }
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [buf]) => {
            wgpu::product(dev, &p, x, buf, w, w.raw().as_wgpu().ok_or_else(mismatch)?, &out_shape)
        }
    }
}
