//! Quantized weights and products through them.
//!
//! Formats (each a [`QuantFormat`], stored as a [`QTensor`] of shape `[out, in]`, row-major,
//! blocks running along `in`):
//! - `Q8_0`: ggml's block of 32: an f16 scale `d`, then 32 `i8`; `w = d·q` (34 bytes).
//! - `Q4_0`: ggml's block of 32: an f16 scale `d`, then 16 bytes; byte `j` holds weight `j`
//!   in its low nibble and weight `j + 16` in its high one; `w = d·(q − 8)` (18 bytes).
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
mod gemv;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::matmul::{MatmulProblem, cpu_matmul_f32_out};
use crate::tensor::{CpuStorage, RawBuffer, Storage};
use crate::{DType, Device, Error, Result, Tensor};
use half::f16;
use rayon::prelude::*;
use std::fmt;
use std::sync::Arc;

/// Token rows up to which the products take the GEMV path.
pub const GEMV_MAX_TOKENS: usize = 8;

/// A quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Q8_0,
    Q4_0,
    Nf4,
    Nf4DoubleQuant,
}

impl QuantFormat {
    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 => 32,
            QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => 64,
        }
    }

    /// Bytes of one ggml block (Q8_0, Q4_0).
    pub fn ggml_block_bytes(self) -> Option<usize> {
        match self {
            QuantFormat::Q8_0 => Some(34),
            QuantFormat::Q4_0 => Some(18),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Nf4 => "nf4",
            QuantFormat::Nf4DoubleQuant => "nf4dq",
        }
    }

    pub const ALL: [QuantFormat; 4] =
        [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Nf4, QuantFormat::Nf4DoubleQuant];

    /// Kernel code of the format, shared with `kernels/quant.cu` and `shaders/quant.wgsl`.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub(crate) fn code(self) -> u32 {
        match self {
            QuantFormat::Q8_0 => 0,
            QuantFormat::Q4_0 => 1,
            QuantFormat::Nf4 => 2,
            QuantFormat::Nf4DoubleQuant => 3,
        }
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = Error;

    /// Parses `q8_0`, `q4_0`, `nf4`, `nf4dq` (case-insensitive).
    fn from_str(s: &str) -> Result<QuantFormat> {
        QuantFormat::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown quantized format {s:?}; known: q8_0, q4_0, nf4, nf4dq"))
        })
    }
}

impl fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The 16 NormalFloat values of QLoRA (bitsandbytes' NF4 code), index = 4-bit code.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// bitsandbytes' dynamic 8-bit code (`create_dynamic_map(signed=True)`): 127 positive and
/// 127 negative values spread over 7 decades, 0 and 1, sorted.
pub fn dynamic_code() -> [f32; 256] {
    let mut values: Vec<f64> = Vec::with_capacity(256);
    for i in 0..7i32 {
        let items = (1usize << i) + 1;
        let scale = 10f64.powi(i - 6);
        for j in 0..items - 1 {
            let lo = 0.1 + 0.9 * j as f64 / (items - 1) as f64;
            let hi = 0.1 + 0.9 * (j + 1) as f64 / (items - 1) as f64;
            let mean = (lo + hi) / 2.0;
            values.push(scale * mean);
            values.push(-scale * mean);
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(|a, b| a.total_cmp(b));
    let mut code = [0f32; 256];
    for (c, v) in code.iter_mut().zip(values) {
        *c = v as f32;
    }
    code
}

/// Where the parts of an NF4 tensor sit in its buffer (byte offsets).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Nf4Layout {
    /// `absmax` as f32 per block, or with double quantisation one `u8` code per block.
    pub absmax_offset: usize,
    /// Double quantisation: f32 scale per 256 blocks.
    pub nested_offset: usize,
    /// Double quantisation: the 256-entry f32 code.
    pub code_offset: usize,
    /// Double quantisation: the mean subtracted from absmax before quantising it.
    pub offset: f32,
}

/// The absmax state of an NF4 tensor, as bitsandbytes keeps it.
#[derive(Debug, Clone, Copy)]
pub enum Nf4Absmax<'a> {
    /// One f32 per block of 64 weights.
    F32(&'a [f32]),
    /// QLoRA's double quantisation: `absmax = nested_code[quantized]·nested_absmax[block / 256] + offset`.
    DoubleQuant { quantized: &'a [u8], nested_absmax: &'a [f32], nested_code: &'a [f32], offset: f32 },
}

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

    /// Q8_0 or Q4_0 blocks exactly as ggml (and GGUF files) store them, for an `[out, in]`
    /// weight. `Err` when the format is not a ggml one, `in` is not a multiple of 32, or the
    /// byte count is not blocks × block bytes.
    pub fn from_ggml_blocks(format: QuantFormat, blocks: &[u8], shape: &[usize], device: &Device) -> Result<QTensor> {
        let Some(block_bytes) = format.ggml_block_bytes() else {
            return Err(Error::InvalidArgument(format!("{format} is not a ggml block format (q8_0, q4_0)")));
        };
        let (rows, cols) = check_shape(format, shape)?;
        let want = rows * cols / 32 * block_bytes;
        if blocks.len() != want {
            return Err(Error::InvalidArgument(format!(
                "{format} weight {shape:?} takes {} blocks = {want} bytes, got {} bytes",
                rows * cols / 32,
                blocks.len()
            )));
        }
        Self::from_parts(format, rows, cols, Nf4Layout::ggml(), blocks.to_vec(), device)
    }

    /// NF4 state as bitsandbytes keeps it: `packed` codes (two per byte, the first weight in
    /// the high nibble) and the absmax state, loaded without re-quantising.
    pub fn from_nf4(packed: &[u8], absmax: Nf4Absmax<'_>, shape: &[usize], device: &Device) -> Result<QTensor> {
        let format = match absmax {
            Nf4Absmax::F32(_) => QuantFormat::Nf4,
            Nf4Absmax::DoubleQuant { .. } => QuantFormat::Nf4DoubleQuant,
        };
        let (rows, cols) = check_shape(format, shape)?;
        let blocks = rows * cols / 64;
        if packed.len() != rows * cols / 2 {
            return Err(Error::InvalidArgument(format!(
                "nf4 weight {shape:?} packs into {} bytes, got {}",
                rows * cols / 2,
                packed.len()
            )));
        }
        let mut bytes = packed.to_vec();
        let absmax_offset = bytes.len();
        let layout = match absmax {
            Nf4Absmax::F32(absmax) => {
                if absmax.len() != blocks {
                    return Err(Error::InvalidArgument(format!(
                        "nf4 weight {shape:?} has {blocks} blocks of 64, got {} absmax values",
                        absmax.len()
                    )));
                }
                if let Some(bad) = absmax.iter().find(|v| !v.is_finite()) {
                    return Err(Error::InvalidArgument(format!("nf4 absmax holds a non-finite value ({bad})")));
                }
                bytes.extend(absmax.iter().flat_map(|v| v.to_le_bytes()));
                Nf4Layout { absmax_offset, nested_offset: 0, code_offset: 0, offset: 0.0 }
            }
            Nf4Absmax::DoubleQuant { quantized, nested_absmax, nested_code, offset } => {
                let nested = blocks.div_ceil(256);
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
                Nf4Layout { absmax_offset, nested_offset, code_offset, offset }
            }
        };
        Self::from_parts(format, rows, cols, layout, bytes, device)
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
        // Largest |code| of the format times each block's |scale|.
        let code_max = match format {
            QuantFormat::Q8_0 => 128.0,
            QuantFormat::Q4_0 => 8.0,
            QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => 1.0,
        };
        let blocks = rows * cols / format.block_size();
        w.max_abs = (0..blocks)
            .map(|b| match format {
                QuantFormat::Q8_0 => f16::from_le_bytes([bytes[34 * b], bytes[34 * b + 1]]).to_f32(),
                QuantFormat::Q4_0 => f16::from_le_bytes([bytes[18 * b], bytes[18 * b + 1]]).to_f32(),
                _ => nf4_absmax(&w, &bytes, b),
            })
            .fold(0f32, |m, s| m.max(s.abs() * code_max));
        w.device = *device;
        w.data = Arc::new(RawBuffer::new(bytes, device)?);
        Ok(w)
    }

    /// Quantizes an `[out, in]` weight (any float dtype, any device) on the CPU, as ggml's
    /// reference quantizers and bitsandbytes define each format, and puts the result on the
    /// weight's device. `Err` for NaN or infinite weights, a shape that is not `[out, in]`
    /// or an `in` that is not a multiple of the block.
    pub fn quantize(w: &Tensor, format: QuantFormat) -> Result<QTensor> {
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
                Self::from_parts(format, rows, cols, Nf4Layout::ggml(), quantize_q8_0(&values), &device)
            }
            QuantFormat::Q4_0 => {
                Self::from_parts(format, rows, cols, Nf4Layout::ggml(), quantize_q4_0(&values), &device)
            }
            QuantFormat::Nf4 => {
                let (packed, absmax) = quantize_nf4(&values);
                Self::from_nf4(&packed, Nf4Absmax::F32(&absmax), &[rows, cols], &device)
            }
            QuantFormat::Nf4DoubleQuant => {
                let (packed, absmax) = quantize_nf4(&values);
                let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
                let code = dynamic_code();
                let centered: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
                let (quantized, nested) = quantize_blockwise_8bit(&centered, &code);
                let state = Nf4Absmax::DoubleQuant {
                    quantized: &quantized,
                    nested_absmax: &nested,
                    nested_code: &code,
                    offset,
                };
                Self::from_nf4(&packed, state, &[rows, cols], &device)
            }
        }
    }

    /// The weight as a dense `[out, in]` tensor of `dtype` on the same device.
    pub fn dequantize(&self, dtype: DType) -> Result<Tensor> {
        match self.raw() {
            RawBuffer::Cpu(bytes) => {
                let mut out = vec![0f32; self.rows * self.cols];
                let bs = self.format.block_size();
                out.par_chunks_mut(bs).enumerate().for_each(|(b, dst)| decode_block(self, bytes, b, dst));
                Ok(Tensor::from_cpu_storage(CpuStorage::from_f32_vec(dtype, out), &[self.rows, self.cols], dtype))
            }
            #[cfg(feature = "cuda")]
            RawBuffer::Cuda { dev, buf, .. } => cuda::dequantize(dev, self, buf, dtype),
            #[cfg(feature = "wgpu")]
            RawBuffer::Wgpu { dev, buf, .. } => wgpu::dequantize(dev, self, buf, dtype),
        }
    }
}

impl Nf4Layout {
    fn ggml() -> Nf4Layout {
        Nf4Layout { absmax_offset: 0, nested_offset: 0, code_offset: 0, offset: 0.0 }
    }
}

// ---------------------------------------------------------------------------------------
// Quantizers (CPU), following ggml's reference code and bitsandbytes.

/// ggml `quantize_row_q8_0_ref`: d = amax / 127, q = round(x / d) (half away from zero).
fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
    values
        .par_chunks(32)
        .flat_map_iter(|x| {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let mut block = Vec::with_capacity(34);
            block.extend(f16::from_f32(d).to_le_bytes());
            block.extend(x.iter().map(|v| (v * id).round() as i8 as u8));
            block
        })
        .collect()
}

/// ggml `quantize_row_q4_0_ref`: d = (the value of largest magnitude) / −8,
/// q = min(15, trunc(x / d + 8.5)); byte j = q[j] | q[j + 16] << 4.
fn quantize_q4_0(values: &[f32]) -> Vec<u8> {
    values
        .par_chunks(32)
        .flat_map_iter(|x| {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in x {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            let q = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
            let mut block = Vec::with_capacity(18);
            block.extend(f16::from_f32(d).to_le_bytes());
            block.extend((0..16).map(|j| q(x[j]) | (q(x[j + 16]) << 4)));
            block
        })
        .collect()
}

fn nearest(code: &[f32], v: f32) -> u8 {
    let mut best = 0;
    for (i, c) in code.iter().enumerate() {
        if (v - c).abs() < (v - code[best]).abs() {
            best = i;
        }
    }
    best as u8
}

/// bitsandbytes' 4-bit NF4 quantisation: absmax per block of 64, codes nearest to w/absmax,
/// packed first-weight-high.
fn quantize_nf4(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let absmax: Vec<f32> = values.par_chunks(64).map(|x| x.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
    let packed = values
        .par_chunks(64)
        .zip(absmax.par_iter())
        .flat_map_iter(|(x, &a)| {
            let inv = if a != 0.0 { 1.0 / a } else { 0.0 };
            x.chunks(2).map(move |p| (nearest(&NF4_CODE, p[0] * inv) << 4) | nearest(&NF4_CODE, p[1] * inv))
        })
        .collect();
    (packed, absmax)
}

/// bitsandbytes' blockwise 8-bit quantisation (blocks of 256): scale = max |v|, code index
/// nearest to v / scale.
fn quantize_blockwise_8bit(values: &[f32], code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    let scales: Vec<f32> = values.chunks(256).map(|x| x.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
    let quantized = values
        .chunks(256)
        .zip(&scales)
        .flat_map(|(x, &s)| {
            let inv = if s != 0.0 { 1.0 / s } else { 0.0 };
            x.iter().map(move |v| nearest(code, v * inv))
        })
        .collect();
    (quantized, scales)
}

// ---------------------------------------------------------------------------------------
// Decoding (CPU)

fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The scale of NF4 block `b`.
fn nf4_absmax(w: &QTensor, bytes: &[u8], b: usize) -> f32 {
    let l = &w.layout;
    match w.format {
        QuantFormat::Nf4DoubleQuant => {
            let code = f32_at(bytes, l.code_offset + 4 * bytes[l.absmax_offset + b] as usize);
            code * f32_at(bytes, l.nested_offset + 4 * (b / 256)) + l.offset
        }
        _ => f32_at(bytes, l.absmax_offset + 4 * b),
    }
}

/// Decodes block `b` (in row-major block order) into `out` (one block of weights).
fn decode_block(w: &QTensor, bytes: &[u8], b: usize, out: &mut [f32]) {
    match w.format {
        QuantFormat::Q8_0 => {
            let blk = &bytes[34 * b..34 * b + 34];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            for (o, &q) in out.iter_mut().zip(&blk[2..]) {
                *o = (q as i8) as f32 * d;
            }
        }
        QuantFormat::Q4_0 => {
            let blk = &bytes[18 * b..18 * b + 18];
            let d = f16::from_le_bytes([blk[0], blk[1]]).to_f32();
            for j in 0..16 {
                out[j] = ((blk[2 + j] & 15) as i32 - 8) as f32 * d;
                out[j + 16] = ((blk[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => {
            let scale = nf4_absmax(w, bytes, b);
            for (j, &byte) in bytes[32 * b..32 * b + 32].iter().enumerate() {
                out[2 * j] = NF4_CODE[(byte >> 4) as usize] * scale;
                out[2 * j + 1] = NF4_CODE[(byte & 15) as usize] * scale;
            }
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
    /// Taken today by the CPU GEMV (at most [`GEMV_MAX_TOKENS`] rows) over Q8_0 and Q4_0
    /// weights, with or without SIMD. Every other path computes exactly as [`qmatmul`]: the
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
    product(x, w, Direction::Forward, options)
}

/// The input gradient through a frozen quantized weight: `dx = dy·W`, `dy` `[.., out]`,
/// `dx` `[.., in]` in `dy`'s dtype. W is dequantised tile by tile, never whole.
///
/// Errors as [`qmatmul`].
pub fn qmatmul_input_grad(dy: &Tensor, w: &QTensor) -> Result<Tensor> {
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
    let p = QProblem { tokens, k, n, direction };
    if tokens == 0 || n == 0 {
        return Tensor::empty(&out_shape, x.dtype(), &x.device());
    }
    match (x.storage(), w.raw()) {
        (Storage::Cpu(xs), RawBuffer::Cpu(bytes)) => {
            let xf = xs.to_f32_vec();
            let y = if tokens <= GEMV_MAX_TOKENS && direction == Direction::Forward {
                gemv::cpu_gemv(w, bytes, &xf, tokens, options.int8_activations)
            } else {
                cpu_gemm(w, bytes, &xf, &p)
            };
            Ok(Tensor::from_cpu_storage(CpuStorage::from_f32_vec(x.dtype(), y), &out_shape, x.dtype()))
        }
        #[cfg(feature = "cuda")]
        (Storage::Cuda { dev, buf }, RawBuffer::Cuda { buf: wb, .. }) => {
            let out = Tensor::empty(&out_shape, x.dtype(), &x.device())?;
            cuda::product(dev, &p, x, buf, w, wb, &out)?;
            Ok(out)
        }
        #[cfg(feature = "wgpu")]
        (Storage::Wgpu { dev, buf }, RawBuffer::Wgpu { buf: wb, .. }) => {
            wgpu::product(dev, &p, x, buf, w, wb, &out_shape)
        }
        #[allow(unreachable_patterns)]
        _ => Err(Error::DeviceMismatch("x and the weight are on different backends".into())),
    }
}

/// Columns of the result per task in the GEMM: a multiple of every block size.
const GEMM_PANEL: usize = 128;

/// GEMM: for each panel of result columns, decode the W rows or columns it needs to f32 and
/// run the dense CPU kernel on them; panels run in parallel and never hold all of W.
fn cpu_gemm(w: &QTensor, bytes: &[u8], x: &[f32], p: &QProblem) -> Vec<f32> {
    let (rows, cols, bs) = (w.rows, w.cols, w.format.block_size());
    let panels = p.n.div_ceil(GEMM_PANEL);
    let results: Vec<(usize, usize, Vec<f32>)> = (0..panels)
        .into_par_iter()
        .map(|pi| {
            let (j0, j1) = (pi * GEMM_PANEL, ((pi + 1) * GEMM_PANEL).min(p.n));
            let width = j1 - j0;
            let mut block = [0f32; 64];
            let panel = match p.direction {
                // Rows j0..j1 of W, each [k]: the panel is Bᵀ, [width, k].
                Direction::Forward => {
                    let mut panel = vec![0f32; width * cols];
                    for (r, dst) in panel.chunks_mut(cols).enumerate() {
                        for (bi, d) in dst.chunks_mut(bs).enumerate() {
                            decode_block(w, bytes, (j0 + r) * (cols / bs) + bi, d);
                        }
                    }
                    panel
                }
                // Columns j0..j1 of every W row: the panel is B, [k = rows, width].
                Direction::InputGrad => {
                    let mut panel = vec![0f32; rows * width];
                    for (r, dst) in panel.chunks_mut(width).enumerate() {
                        let mut c = j0;
                        while c < j1 {
                            let bi = c / bs;
                            decode_block(w, bytes, r * (cols / bs) + bi, &mut block[..bs]);
                            let take = (bi * bs + bs).min(j1) - c;
                            dst[c - j0..c - j0 + take].copy_from_slice(&block[c - bi * bs..c - bi * bs + take]);
                            c += take;
                        }
                    }
                    panel
                }
            };
            let mp = MatmulProblem {
                batch: 1,
                m: p.tokens,
                n: width,
                k: p.k,
                trans_a: false,
                trans_b: p.direction == Direction::Forward,
                batch_stride_a: 0,
                batch_stride_b: 0,
                in_dtype: DType::F32,
                out_dtype: DType::F32,
            };
            (j0, width, cpu_matmul_f32_out(&mp, x, &panel))
        })
        .collect();
    let mut y = vec![0f32; p.tokens * p.n];
    for (j0, width, part) in results {
        for t in 0..p.tokens {
            y[t * p.n + j0..t * p.n + j0 + width].copy_from_slice(&part[t * width..(t + 1) * width]);
        }
    }
    y
}
