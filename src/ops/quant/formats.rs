//! Quantized weight formats: ggml's blocks as types, the NF4 and dynamic 8-bit codebooks of
//! bitsandbytes, the layout of NF4 state in a `QTensor`'s buffer, and decoding on the CPU.

use super::QTensor;
use crate::{Error, Result};
use bytemuck::{Pod, Zeroable};
use half::f16;
use std::fmt;

/// ggml's Q8_0 block: 32 weights `w = d·qs[j]` (`block_q8_0`, 34 bytes, unaligned in files).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    pub d: f16,
    pub qs: [i8; 32],
}

/// ggml's Q4_0 block: 32 weights `w = d·(q − 8)`; byte `j` of `qs` holds weight `j` in its
/// low nibble and weight `j + 16` in its high one (`block_q4_0`, 18 bytes).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_0 {
    pub d: f16,
    pub qs: [u8; 16],
}

/// ggml's Q4_1 block: 32 weights `w = d·q + m` with `q` in 0..15, nibbles packed as in
/// [`BlockQ4_0`] (`block_q4_1`, 20 bytes).
#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ4_1 {
    pub d: f16,
    pub m: f16,
    pub qs: [u8; 16],
}

/// A ggml block type: its size and how it decodes, so the code that walks a row of blocks
/// is written once for all of them.
pub(crate) trait GgmlBlock: Pod {
    /// Bytes of one block: `size_of::<Self>()`, as the kernels' pointer arithmetic uses it.
    const BYTES: usize = std::mem::size_of::<Self>();

    /// The block's scale as f32.
    fn scale(&self) -> f32;

    /// The block's minimum, added to every weight: Q4_1's `m`, zero for the formats
    /// symmetric about zero.
    fn min(&self) -> f32 {
        0.0
    }

    /// The block's 32 integer codes, centred where the format centres them (Q4_0's `q − 8`):
    /// weight `j` is `code(j)·scale + min`.
    fn code(&self, j: usize) -> i32;

    /// The largest |w| the block decodes to (a bound for symmetric formats).
    fn max_abs(&self) -> f32;

    /// Block `b` of a row-major run of blocks.
    fn at(bytes: &[u8], b: usize) -> &Self {
        bytemuck::from_bytes(&bytes[b * Self::BYTES..(b + 1) * Self::BYTES])
    }

    /// The 32 weights `d·code`, rounded once in f32 (as every kernel decodes them).
    fn decode(&self, out: &mut [f32]) {
        let d = self.scale();
        for (j, o) in out[..32].iter_mut().enumerate() {
            *o = self.code(j) as f32 * d;
        }
    }
}

/// ggml's 4-bit packing (Q4_0, Q4_1): nibble `j` of the 32, unsigned.
fn nibble(qs: &[u8; 16], j: usize) -> u8 {
    let byte = qs[j % 16];
    if j < 16 { byte & 15 } else { byte >> 4 }
}

/// The 32 weights of a ggml 4-bit block, both nibbles of a byte at once (a per-weight
/// `j % 16` costs the GEMM a third).
fn decode_nibbles(qs: &[u8; 16], out: &mut [f32], weight: impl Fn(u8) -> f32) {
    for (j, &byte) in qs.iter().enumerate() {
        out[j] = weight(byte & 15);
        out[j + 16] = weight(byte >> 4);
    }
}

impl GgmlBlock for BlockQ8_0 {
    fn scale(&self) -> f32 {
        { self.d }.to_f32()
    }

    fn code(&self, j: usize) -> i32 {
        self.qs[j] as i32
    }

    fn max_abs(&self) -> f32 {
        self.scale().abs() * 128.0
    }
}

impl GgmlBlock for BlockQ4_0 {
    fn scale(&self) -> f32 {
        { self.d }.to_f32()
    }

    fn code(&self, j: usize) -> i32 {
        nibble(&self.qs, j) as i32 - 8
    }

    fn max_abs(&self) -> f32 {
        self.scale().abs() * 8.0
    }

    fn decode(&self, out: &mut [f32]) {
        let d = self.scale();
        decode_nibbles(&self.qs, out, |q| (q as i32 - 8) as f32 * d);
    }
}

impl GgmlBlock for BlockQ4_1 {
    fn scale(&self) -> f32 {
        { self.d }.to_f32()
    }

    fn min(&self) -> f32 {
        { self.m }.to_f32()
    }

    fn code(&self, j: usize) -> i32 {
        nibble(&self.qs, j) as i32
    }

    /// Weights run monotonically from `m` (code 0) to `15·d + m`, each rounded as decoded.
    fn max_abs(&self) -> f32 {
        let (d, m) = (self.scale(), self.min());
        m.abs().max((15.0 * d + m).abs())
    }

    /// `q·d + m` rounded twice (product, then sum), as gguf-py's `dequantize` computes it.
    fn decode(&self, out: &mut [f32]) {
        let (d, m) = (self.scale(), self.min());
        decode_nibbles(&self.qs, out, |q| q as f32 * d + m);
    }
}

/// A quantized weight format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    Q8_0,
    Q4_0,
    Q4_1,
    Nf4,
    Nf4DoubleQuant,
}

impl QuantFormat {
    /// Weights per block.
    pub fn block_size(self) -> usize {
        match self {
            QuantFormat::Q8_0 | QuantFormat::Q4_0 | QuantFormat::Q4_1 => 32,
            QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => 64,
        }
    }

    /// Bytes of one ggml block (Q8_0: [`BlockQ8_0`], Q4_0: [`BlockQ4_0`], Q4_1:
    /// [`BlockQ4_1`]).
    pub fn ggml_block_bytes(self) -> Option<usize> {
        match self {
            QuantFormat::Q8_0 => Some(BlockQ8_0::BYTES),
            QuantFormat::Q4_0 => Some(BlockQ4_0::BYTES),
            QuantFormat::Q4_1 => Some(BlockQ4_1::BYTES),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q8_0 => "q8_0",
            QuantFormat::Q4_0 => "q4_0",
            QuantFormat::Q4_1 => "q4_1",
            QuantFormat::Nf4 => "nf4",
            QuantFormat::Nf4DoubleQuant => "nf4dq",
        }
    }

    pub const ALL: [QuantFormat; 5] =
        [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Nf4, QuantFormat::Nf4DoubleQuant];

    /// Kernel code of the format, shared with `kernels/quant.cuh` and
    /// `shaders/quant_decode.wgsl`: the ggml formats first, so `code < 3` tells them apart.
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub(crate) fn code(self) -> u32 {
        match self {
            QuantFormat::Q8_0 => 0,
            QuantFormat::Q4_0 => 1,
            QuantFormat::Q4_1 => 2,
            QuantFormat::Nf4 => 3,
            QuantFormat::Nf4DoubleQuant => 4,
        }
    }
}

impl std::str::FromStr for QuantFormat {
    type Err = Error;

    /// Parses `q8_0`, `q4_0`, `q4_1`, `nf4`, `nf4dq` (case-insensitive).
    fn from_str(s: &str) -> Result<QuantFormat> {
        QuantFormat::ALL.into_iter().find(|f| f.name().eq_ignore_ascii_case(s)).ok_or_else(|| {
            Error::InvalidArgument(format!("unknown quantized format {s:?}; known: q8_0, q4_0, q4_1, nf4, nf4dq"))
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

/// bitsandbytes' dynamic 8-bit code, `create_dynamic_map(signed=True)`, bit for bit as bnb
/// builds it on x86-64 (torch's vectorized CPU builds): 127 positive and 127 negative values
/// spread over 7 decades, 0 and 1, sorted. In f32: per decade 10ᵏ (k = −6..0), the means of
/// neighbouring points of `torch.linspace(0.1, 1, 2ⁱ + 1)`, each times f32(±10ᵏ).
pub fn dynamic_code() -> [f32; 256] {
    let mut values: Vec<f32> = Vec::with_capacity(256);
    for i in 0..7 {
        let points = torch_linspace_f32(0.1, 1.0, (1 << i) + 1);
        // Python's `10 ** k` is pow(10, k) in f64; torch multiplies by it in f32.
        let scale = 10f64.powf(i as f64 - 6.0) as f32;
        for pair in points.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            values.push(-scale * mean);
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(|a, b| a.total_cmp(b));
    let mut code = [0f32; 256];
    code.copy_from_slice(&values);
    code
}

/// `torch.linspace(start, end, n, dtype=torch.float32)` as torch's CPU kernel computes it in
/// its AVX2 and AVX-512 builds (the ones x86-64 machines run): in f32, with
/// `step = (end − start) / (n − 1)`, points before the middle `start + step·i` and the rest
/// `end − step·(n − 1 − i)`, each one fused multiply-add (the compiler contracts them).
fn torch_linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f32;
    (0..n)
        .map(|i| if i < n / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
        .collect()
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

/// Weights per NF4 absmax block, the only block size kiln's kernels take (bnb's default).
pub const NF4_BLOCK: usize = 64;
/// Absmax values per block of double quantisation (bnb's `nested_blocksize`, QLoRA's 256).
pub const NF4_NESTED_BLOCK: usize = 256;

/// An NF4 weight's state as bitsandbytes keeps it (`Params4bit` and its `QuantState`):
/// what [`QTensor::from_nf4`](super::QTensor::from_nf4) loads and
/// [`QTensor::nf4_state`](super::QTensor::nf4_state) hands back, so a QLoRA checkpoint loads
/// without re-quantising and a weight kiln quantized can be written as one.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4State {
    /// The 4-bit codes, two per byte, the first weight in the high nibble (bnb's `weight`).
    pub packed: Vec<u8>,
    /// Weights per absmax block (bnb's `blocksize`).
    pub block_size: usize,
    pub absmax: Nf4Absmax,
}

/// The absmax state of an NF4 weight.
#[derive(Debug, Clone, PartialEq)]
pub enum Nf4Absmax {
    /// One f32 per block (bnb's `absmax`).
    F32(Vec<f32>),
    /// QLoRA's double quantisation, `absmax = nested_code[quantized]·nested_absmax[block /
    /// nested_block_size] + offset`: bnb's `absmax` (u8), `state2.absmax`, `state2.code`,
    /// `offset` and `state2.blocksize`.
    DoubleQuant {
        quantized: Vec<u8>,
        nested_absmax: Vec<f32>,
        nested_code: Vec<f32>,
        offset: f32,
        nested_block_size: usize,
    },
}

impl Nf4Layout {
    /// No NF4 state: the layout of a ggml tensor.
    pub(crate) fn ggml() -> Nf4Layout {
        Nf4Layout { absmax_offset: 0, nested_offset: 0, code_offset: 0, offset: 0.0 }
    }
}

// ---------------------------------------------------------------------------------------
// Decoding (CPU)

fn f32_at(bytes: &[u8], at: usize) -> f32 {
    f32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// The scale of NF4 block `b`.
pub(crate) fn nf4_absmax(w: &QTensor, bytes: &[u8], b: usize) -> f32 {
    let l = &w.layout;
    match w.format {
        QuantFormat::Nf4DoubleQuant => {
            let code = f32_at(bytes, l.code_offset + 4 * bytes[l.absmax_offset + b] as usize);
            code * f32_at(bytes, l.nested_offset + 4 * (b / 256)) + l.offset
        }
        _ => f32_at(bytes, l.absmax_offset + 4 * b),
    }
}

/// Decodes the blocks from `first` on (in row-major block order) into `out`, a whole
/// number of blocks long: the format is matched once for the run.
pub(crate) fn decode_blocks(w: &QTensor, bytes: &[u8], first: usize, out: &mut [f32]) {
    fn ggml<B: GgmlBlock>(bytes: &[u8], first: usize, out: &mut [f32]) {
        let blocks = out.len() / 32;
        let run: &[B] = bytemuck::cast_slice(&bytes[first * B::BYTES..(first + blocks) * B::BYTES]);
        for (blk, o) in run.iter().zip(out.chunks_exact_mut(32)) {
            blk.decode(o);
        }
    }
    match w.format {
        QuantFormat::Q8_0 => ggml::<BlockQ8_0>(bytes, first, out),
        QuantFormat::Q4_0 => ggml::<BlockQ4_0>(bytes, first, out),
        QuantFormat::Q4_1 => ggml::<BlockQ4_1>(bytes, first, out),
        QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => {
            for (i, o) in out.chunks_exact_mut(NF4_BLOCK).enumerate() {
                decode_block(w, bytes, first + i, o);
            }
        }
    }
}

/// Decodes block `b` (in row-major block order) into `out` (one block of weights).
pub(crate) fn decode_block(w: &QTensor, bytes: &[u8], b: usize, out: &mut [f32]) {
    match w.format {
        QuantFormat::Q8_0 => BlockQ8_0::at(bytes, b).decode(out),
        QuantFormat::Q4_0 => BlockQ4_0::at(bytes, b).decode(out),
        QuantFormat::Q4_1 => BlockQ4_1::at(bytes, b).decode(out),
        QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => {
            let scale = nf4_absmax(w, bytes, b);
            for (j, &byte) in bytes[32 * b..32 * b + 32].iter().enumerate() {
                out[2 * j] = NF4_CODE[(byte >> 4) as usize] * scale;
                out[2 * j + 1] = NF4_CODE[(byte & 15) as usize] * scale;
            }
        }
    }
}
