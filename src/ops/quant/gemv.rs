//! The CPU GEMV: `y = x·Wᵀ` for up to [`GEMV_MAX_TOKENS`] token rows (decoding), each weight
//! byte read once.
//!
//! Work is split by W rows; each task walks its rows one step at a time, a step being
//! `R` rows (two when there are at most four token rows, so a single token still has two
//! independent accumulators in flight) times every token row, all accumulators in registers.
//!
//! Kernels (x86-64 with AVX2, FMA and F16C; decoded blocks and a plain dot otherwise):
//! - exact: each block's integers are widened to f32 once and dotted with each token's f32
//!   activations; the dot is scaled by the block's scale (llama.cpp's order Σ d·(q·x)). Q4_1's
//!   minimum does not factor out of the dot: its weights are decoded whole, `q·d + m`.
//! - 8-bit activations (when allowed, the ggml formats): each token row is first rounded to
//!   [`Q8Rows`]; a block's dot is then exact in integers (`maddubs`/`madd`) and scaled once by
//!   `d_w·d_x`, as ggml's `vec_dot_q4_0_q8_0` and `vec_dot_q8_0_q8_0` compute it; Q4_1 adds
//!   `m·d_x·Σq`, as `vec_dot_q4_1_q8_1` does.
//! - NF4: codes looked up with two 8-entry permutes, then as the exact kernel.

#[cfg(target_arch = "x86_64")]
use super::formats::nf4_absmax;
use super::formats::{BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlBlock, decode_block};
#[cfg(target_arch = "x86_64")]
use super::{GEMV_MAX_TOKENS, NF4_CODE};
use super::{QTensor, QuantFormat};
use crate::tensor::try_zeros;
use rayon::prelude::*;

/// W rows per task: a row is a few microseconds of work, so threads get runs of rows.
const TASK_ROWS: usize = 32;

/// The ggml formats as the SIMD kernels' const parameter.
const KIND_Q8_0: u8 = 0;
const KIND_Q4_0: u8 = 1;
const KIND_Q4_1: u8 = 2;

fn ggml_kind(format: QuantFormat) -> Option<u8> {
    match format {
        QuantFormat::Q8_0 => Some(KIND_Q8_0),
        QuantFormat::Q4_0 => Some(KIND_Q4_0),
        QuantFormat::Q4_1 => Some(KIND_Q4_1),
        QuantFormat::Nf4 | QuantFormat::Nf4DoubleQuant => None,
    }
}

/// Binds the constant `$t` to `$tokens` (1 to [`GEMV_MAX_TOKENS`]) and evaluates `$body`, so
/// kernels keep one accumulator per token row in registers.
#[cfg(target_arch = "x86_64")]
#[rustfmt::skip]
macro_rules! with_token_count {
    ($tokens:expr, $t:ident => $body:expr) => {
        match $tokens {
            1 => { const $t: usize = 1; $body }
            2 => { const $t: usize = 2; $body }
            3 => { const $t: usize = 3; $body }
            4 => { const $t: usize = 4; $body }
            5 => { const $t: usize = 5; $body }
            6 => { const $t: usize = 6; $body }
            7 => { const $t: usize = 7; $body }
            _ => { const $t: usize = GEMV_MAX_TOKENS; $body }
        }
    };
}

/// Token rows rounded to 8 bits per block of 32, as ggml's `quantize_row_q8_0` rounds them but
/// with the scale kept in f32: `d = amax / 127`, `q = round(x·(1/d))` (half away from zero).
pub(crate) struct Q8Rows {
    /// `[tokens, cols]`.
    pub q: Vec<i8>,
    /// `[tokens, cols / 32]`: each block's `d`.
    pub d: Vec<f32>,
    /// `[tokens, cols / 32]`: each block's `−8·Σq`, the correction of a product with Q4_0's
    /// unsigned codes (`Σ (c − 8)·q = Σ c·q − 8·Σ q`). Read by the SIMD kernels.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pub q4_bias: Vec<i32>,
    /// `[tokens, cols / 32]`: each block's `d·Σq` (ggml's `block_q8_1::s`, kept in f32), the
    /// part of a product that Q4_1's minimum contributes (`Σ (d_w·c + m)·d·q = d_w·d·Σ c·q +
    /// m·d·Σq`).
    pub d_sum: Vec<f32>,
}

impl Q8Rows {
    pub fn round(x: &[f32]) -> Q8Rows {
        let blocks = x.len() / 32;
        let mut q = vec![0i8; x.len()];
        let (mut d, mut q4_bias, mut d_sum) =
            (Vec::with_capacity(blocks), Vec::with_capacity(blocks), Vec::with_capacity(blocks));
        for (xb, qb) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)) {
            let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / 127.0;
            let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
            for (qj, &xj) in qb.iter_mut().zip(xb) {
                *qj = (xj * inv).round() as i8;
            }
            // A NaN or infinite activation makes its block's products NaN, as in the exact
            // product, rather than vanishing into a zero code.
            let scale = if xb.iter().all(|v| v.is_finite()) { scale } else { f32::NAN };
            let sum = qb.iter().map(|&v| v as i32).sum::<i32>();
            d.push(scale);
            q4_bias.push(-8 * sum);
            d_sum.push(scale * sum as f32);
        }
        Q8Rows { q, d, q4_bias, d_sum }
    }
}

/// `y = x·Wᵀ` for `tokens` rows of `x` (`[tokens, cols]`, f32), `[tokens, rows]` out. With
/// `int8_activations`, ggml-format weights take the product of x rounded to [`Q8Rows`].
pub(crate) fn cpu_gemv(
    w: &QTensor,
    bytes: &[u8],
    x: &[f32],
    tokens: usize,
    int8_activations: bool,
) -> crate::Result<Vec<f32>> {
    let (rows, cols) = (w.rows, w.cols);
    let kind = ggml_kind(w.format);
    let rounded = (int8_activations && kind.is_some()).then(|| Q8Rows::round(x));
    #[cfg(target_arch = "x86_64")]
    let simd = std::is_x86_feature_detected!("avx2")
        && std::is_x86_feature_detected!("fma")
        && std::is_x86_feature_detected!("f16c");
    #[cfg(not(target_arch = "x86_64"))]
    let simd = false;
    // [rows, tokens]: each task writes its rows' results contiguously.
    let mut by_row = try_zeros::<f32>(rows * tokens)?;
    by_row.par_chunks_mut(TASK_ROWS * tokens).enumerate().for_each(|(task, out)| {
        let first = task * TASK_ROWS;
        match (simd, kind, &rounded) {
            #[cfg(target_arch = "x86_64")]
            (true, Some(kind), xq) => {
                let bb = block_bytes(kind);
                let row = |o: usize| &bytes[o * (cols / 32) * bb..(o + 1) * (cols / 32) * bb];
                with_token_count!(tokens, T => if T <= 4 {
                    by_steps::<T, 2>(first, out, |rs, acc| ggml_step(kind, rs.map(row), x, xq.as_ref(), cols, acc))
                } else {
                    by_steps::<T, 1>(first, out, |rs, acc| ggml_step(kind, rs.map(row), x, xq.as_ref(), cols, acc))
                })
            }
            #[cfg(target_arch = "x86_64")]
            (true, None, _) => {
                let mut scales = vec![0f32; cols / 64];
                for (r, out) in out.chunks_mut(tokens).enumerate() {
                    let o = first + r;
                    for (bi, s) in scales.iter_mut().enumerate() {
                        *s = nf4_absmax(w, bytes, o * (cols / 64) + bi);
                    }
                    let mut acc = [0f32; GEMV_MAX_TOKENS];
                    // SAFETY: the features are present; the row holds cols / 2 code bytes,
                    // `scales` one absmax per block of 64, `x` tokens rows of cols values.
                    unsafe {
                        nf4_row_avx2(&bytes[o * cols / 2..(o + 1) * cols / 2], &scales, x, cols, tokens, &mut acc)
                    };
                    out.copy_from_slice(&acc[..tokens]);
                }
            }
            (_, _, Some(xq)) => {
                for (r, out) in out.chunks_mut(tokens).enumerate() {
                    int8_row_scalar(w, bytes, first + r, xq, cols, out);
                }
            }
            _ => {
                for (r, out) in out.chunks_mut(tokens).enumerate() {
                    exact_row_scalar(w, bytes, first + r, x, cols, out);
                }
            }
        }
    });
    let mut y = try_zeros::<f32>(tokens * rows)?;
    for (o, r) in by_row.chunks_exact(tokens).enumerate() {
        for (t, &v) in r.iter().enumerate() {
            y[t * rows + o] = v;
        }
    }
    Ok(y)
}

/// Runs `step` over the task's rows `R` at a time (`out` is `[rows, T]`); a last partial step
/// repeats its final row and drops the copy's results.
#[cfg(target_arch = "x86_64")]
fn by_steps<const T: usize, const R: usize>(
    first: usize,
    out: &mut [f32],
    step: impl Fn([usize; R], &mut [[f32; T]; R]),
) {
    let rows = out.len() / T;
    for (s, out) in out.chunks_mut(R * T).enumerate() {
        let base = first + s * R;
        let last = first + rows - 1;
        let mut acc = [[0f32; T]; R];
        step(std::array::from_fn(|r| (base + r).min(last)), &mut acc);
        for (o, a) in out.chunks_mut(T).zip(&acc) {
            o.copy_from_slice(a);
        }
    }
}

/// Bytes of a block of the ggml format `kind`.
#[cfg(target_arch = "x86_64")]
const fn block_bytes(kind: u8) -> usize {
    match kind {
        KIND_Q8_0 => BlockQ8_0::BYTES,
        KIND_Q4_0 => BlockQ4_0::BYTES,
        _ => BlockQ4_1::BYTES,
    }
}

/// One step of the ggml-format GEMV on `R` rows with AVX2: exact, or on 8-bit activations.
#[cfg(target_arch = "x86_64")]
fn ggml_step<const T: usize, const R: usize>(
    kind: u8,
    rows: [&[u8]; R],
    x: &[f32],
    rounded: Option<&Q8Rows>,
    cols: usize,
    acc: &mut [[f32; T]; R],
) {
    // SAFETY: the caller checked AVX2, FMA and F16C; each row holds cols / 32 blocks of
    // `kind`, `x` (and `rounded`) T rows of cols values.
    unsafe {
        match (kind, rounded) {
            (KIND_Q8_0, None) => ggml_rows_exact::<KIND_Q8_0, T, R>(rows, x, cols, acc),
            (KIND_Q4_0, None) => ggml_rows_exact::<KIND_Q4_0, T, R>(rows, x, cols, acc),
            (_, None) => ggml_rows_exact::<KIND_Q4_1, T, R>(rows, x, cols, acc),
            (KIND_Q8_0, Some(xq)) => ggml_rows_int8::<KIND_Q8_0, T, R>(rows, xq, cols, acc),
            (KIND_Q4_0, Some(xq)) => ggml_rows_int8::<KIND_Q4_0, T, R>(rows, xq, cols, acc),
            (_, Some(xq)) => ggml_rows_int8::<KIND_Q4_1, T, R>(rows, xq, cols, acc),
        }
    }
}

/// The 32 codes of a ggml 4-bit block (Q4_0, Q4_1) at `qs`, unsigned, one per byte: weights
/// 0..16 (the low nibbles) and weights 16..32 (the high ones). Two 128-bit halves: the
/// exact kernel widens each, and joining them would cost it two shuffles per block.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn nibbles(qs: *const u8) -> (std::arch::x86_64::__m128i, std::arch::x86_64::__m128i) {
    use std::arch::x86_64::*;
    // SAFETY: qs points at a block's 16 code bytes.
    let raw = unsafe { _mm_loadu_si128(qs.cast()) };
    let mask = _mm_set1_epi8(0x0F);
    (_mm_and_si128(raw, mask), _mm_and_si128(_mm_srli_epi16(raw, 4), mask))
}

/// An f16 of a ggml block (its scale at the start, Q4_1's minimum after it), in every lane.
/// Broadcasting the half before widening writes the whole register: an insert into lane 0
/// would wait on whatever the register held before (often an accumulator), chaining every
/// block to the last.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn broadcast_f16(blk: *const u8) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    // SAFETY: blk points at two bytes of a block.
    unsafe { _mm256_cvtph_ps(_mm_set1_epi16(blk.cast::<i16>().read_unaligned())) }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn sum_lanes(v: std::arch::x86_64::__m256) -> f32 {
    let mut lanes = [0f32; 8];
    // SAFETY: 8 lanes into 8 floats.
    unsafe { std::arch::x86_64::_mm256_storeu_ps(lanes.as_mut_ptr(), v) };
    lanes.iter().sum()
}

/// Exact ggml-format rows: each block's 32 integers widened to f32, dotted with each token's
/// activations, the dot scaled by the block's f16 scale (Q4_1: weights decoded whole).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ggml_rows_exact<const KIND: u8, const T: usize, const R: usize>(
    rows: [&[u8]; R],
    x: &[f32],
    cols: usize,
    out: &mut [[f32; T]; R],
) {
    use std::arch::x86_64::*;
    let block_bytes = block_bytes(KIND);
    debug_assert!(rows.iter().all(|r| r.len() >= cols / 32 * block_bytes) && x.len() >= T * cols);
    // SAFETY (whole body): block b of a row spans row[b·block_bytes..][..block_bytes]; token
    // t's activations for it are x[t·cols + 32b..][..32].
    unsafe {
        let widen = |v: __m128i| _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for b in 0..cols / 32 {
            for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                let blk = row.as_ptr().add(b * block_bytes);
                let mut d = broadcast_f16(blk);
                let w = if KIND == KIND_Q8_0 {
                    std::array::from_fn(|i| widen(_mm_loadl_epi64(blk.add(2 + 8 * i).cast())))
                } else {
                    let (mut lo, mut hi) = nibbles(blk.add(if KIND == KIND_Q4_1 { 4 } else { 2 }));
                    if KIND == KIND_Q4_0 {
                        let eight = _mm_set1_epi8(8);
                        (lo, hi) = (_mm_sub_epi8(lo, eight), _mm_sub_epi8(hi, eight));
                    }
                    let q = [widen(lo), widen(_mm_srli_si128(lo, 8)), widen(hi), widen(_mm_srli_si128(hi, 8))];
                    if KIND == KIND_Q4_1 {
                        // w = q·d + m, and the dot's scale is then 1.
                        let m = broadcast_f16(blk.add(2));
                        let scale = d;
                        d = _mm256_set1_ps(1.0);
                        q.map(|v| _mm256_fmadd_ps(v, scale, m))
                    } else {
                        q
                    }
                };
                for (t, acc) in acc.iter_mut().enumerate() {
                    let xp = x.as_ptr().add(t * cols + b * 32);
                    let s0 =
                        _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xp.add(8)), _mm256_mul_ps(w[0], _mm256_loadu_ps(xp)));
                    let s1 = _mm256_fmadd_ps(
                        w[3],
                        _mm256_loadu_ps(xp.add(24)),
                        _mm256_mul_ps(w[2], _mm256_loadu_ps(xp.add(16))),
                    );
                    *acc = _mm256_fmadd_ps(_mm256_add_ps(s0, s1), d, *acc);
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = sum_lanes(a);
            }
        }
    }
}

/// ggml-format rows against 8-bit activations: a block's 32 products are summed exactly in
/// integers, then scaled once by `d_w·d_x`. 4-bit codes enter unsigned (0..15): Q4_0 adds
/// the block's `−8·Σq` to the integer sum, Q4_1 adds `m·d_x·Σq` to the result; Q8_0's take
/// the sign of w onto x (`maddubs` wants one unsigned side).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn ggml_rows_int8<const KIND: u8, const T: usize, const R: usize>(
    rows: [&[u8]; R],
    xq: &Q8Rows,
    cols: usize,
    out: &mut [[f32; T]; R],
) {
    use std::arch::x86_64::*;
    let block_bytes = block_bytes(KIND);
    let blocks = cols / 32;
    debug_assert!(rows.iter().all(|r| r.len() >= blocks * block_bytes) && xq.q.len() >= T * cols);
    debug_assert!(xq.d.len() >= T * blocks && xq.q4_bias.len() >= T * blocks && xq.d_sum.len() >= T * blocks);
    // SAFETY (whole body): as in ggml_rows_exact, with token t's block b at
    // xq.q[t·cols + 32b..][..32], its scale, bias and d·Σq at [t·blocks + b].
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let q8 = KIND == KIND_Q8_0;
        let mut acc = [[_mm256_setzero_ps(); T]; R];
        for b in 0..blocks {
            for (row, acc) in rows.iter().zip(acc.iter_mut()) {
                let blk = row.as_ptr().add(b * block_bytes);
                let dw = broadcast_f16(blk);
                let w = if q8 {
                    _mm256_loadu_si256(blk.add(2).cast())
                } else {
                    let (lo, hi) = nibbles(blk.add(if KIND == KIND_Q4_1 { 4 } else { 2 }));
                    _mm256_set_m128i(hi, lo)
                };
                let m = if KIND == KIND_Q4_1 { broadcast_f16(blk.add(2)) } else { _mm256_setzero_ps() };
                // 4-bit: codes 0..15, pair sums ≤ 2·15·127. Q8_0: |w| ≤ 128, pair sums ≤ 2·128·127.
                let unsigned = if q8 { _mm256_sign_epi8(w, w) } else { w };
                for (t, acc) in acc.iter_mut().enumerate() {
                    let y = _mm256_loadu_si256(xq.q.as_ptr().add(t * cols + b * 32).cast());
                    let signed = if q8 { _mm256_sign_epi8(y, w) } else { y };
                    let mut dot = _mm256_madd_epi16(_mm256_maddubs_epi16(unsigned, signed), ones);
                    if KIND == KIND_Q4_0 {
                        // The bias spread over the 8 lanes the horizontal sum adds up.
                        let bias = *xq.q4_bias.get_unchecked(t * blocks + b);
                        dot = _mm256_add_epi32(dot, _mm256_setr_epi32(bias, 0, 0, 0, 0, 0, 0, 0));
                    }
                    let d = _mm256_mul_ps(dw, _mm256_set1_ps(*xq.d.get_unchecked(t * blocks + b)));
                    *acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), d, *acc);
                    if KIND == KIND_Q4_1 {
                        // m·d·Σq, in one of the 8 lanes the horizontal sum adds up.
                        let d_sum = *xq.d_sum.get_unchecked(t * blocks + b);
                        *acc = _mm256_fmadd_ps(m, _mm256_setr_ps(d_sum, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0), *acc);
                    }
                }
            }
        }
        for (o, a) in out.iter_mut().zip(&acc) {
            for (o, &a) in o.iter_mut().zip(a) {
                *o = sum_lanes(a);
            }
        }
    }
}

/// One row, exact, without SIMD: decoded blocks dotted with each token row.
fn exact_row_scalar(w: &QTensor, bytes: &[u8], o: usize, x: &[f32], cols: usize, out: &mut [f32]) {
    let bs = w.format.block_size();
    let mut buf = [0f32; 64];
    out.fill(0.0);
    for bi in 0..cols / bs {
        let decoded = &mut buf[..bs];
        decode_block(w, bytes, o * (cols / bs) + bi, decoded);
        for (t, a) in out.iter_mut().enumerate() {
            *a += crate::ops::dot(decoded, &x[t * cols + bi * bs..t * cols + bi * bs + bs]);
        }
    }
}

/// One ggml-format row against 8-bit activations, without SIMD: the same integer sums.
fn int8_row_scalar(w: &QTensor, bytes: &[u8], o: usize, xq: &Q8Rows, cols: usize, out: &mut [f32]) {
    match w.format {
        QuantFormat::Q4_0 => int8_row::<BlockQ4_0>(bytes, o, xq, cols, out),
        QuantFormat::Q4_1 => int8_row::<BlockQ4_1>(bytes, o, xq, cols, out),
        _ => int8_row::<BlockQ8_0>(bytes, o, xq, cols, out),
    }
}

fn int8_row<B: GgmlBlock>(bytes: &[u8], o: usize, xq: &Q8Rows, cols: usize, out: &mut [f32]) {
    let blocks = cols / 32;
    out.fill(0.0);
    for b in 0..blocks {
        let blk = B::at(bytes, o * blocks + b);
        let (dw, m) = (blk.scale(), blk.min());
        for (t, a) in out.iter_mut().enumerate() {
            let yq = &xq.q[t * cols + 32 * b..][..32];
            let dot: i32 = yq.iter().enumerate().map(|(j, &q)| blk.code(j) * q as i32).sum();
            *a += dot as f32 * (dw * xq.d[t * blocks + b]) + m * xq.d_sum[t * blocks + b];
        }
    }
}

/// One output row of the NF4 GEMV with AVX2: 4-bit codes become NF4 values by two 8-entry
/// permutes and a blend, are dotted with each token's activations, and each block's dot is
/// scaled by its absmax (Σ a·(c·x), within the same bound as Σ (a·c)·x).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn nf4_row_avx2(
    codes: &[u8],
    scales: &[f32],
    x: &[f32],
    cols: usize,
    tokens: usize,
    acc: &mut [f32; GEMV_MAX_TOKENS],
) {
    use std::arch::x86_64::*;
    debug_assert!(codes.len() * 2 == cols && scales.len() * 64 == cols && x.len() >= tokens * cols);
    // SAFETY (whole body): block b's codes are codes[32b..32b + 32], its activations
    // x[t·cols + 64b..][..64].
    unsafe {
        let table_lo = _mm256_loadu_ps(NF4_CODE.as_ptr());
        let table_hi = _mm256_loadu_ps(NF4_CODE.as_ptr().add(8));
        let nibble = _mm_set1_epi8(0x0F);
        // NF4 values of eight 4-bit codes held one per byte.
        let lookup = |idx8: __m128i| {
            let idx = _mm256_cvtepu8_epi32(idx8);
            let hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
            _mm256_blendv_ps(_mm256_permutevar8x32_ps(table_lo, idx), _mm256_permutevar8x32_ps(table_hi, idx), hi)
        };
        let mut sums = [_mm256_setzero_ps(); GEMV_MAX_TOKENS];
        for (b, &scale) in scales.iter().enumerate() {
            let mut w = [_mm256_setzero_ps(); 8];
            for half in 0..2 {
                let raw = _mm_loadu_si128(codes.as_ptr().add(32 * b + 16 * half) as *const __m128i);
                let hi = _mm_and_si128(_mm_srli_epi16(raw, 4), nibble);
                let lo = _mm_and_si128(raw, nibble);
                // Element 2i is byte i's high nibble, 2i + 1 its low one.
                let first = _mm_unpacklo_epi8(hi, lo);
                let second = _mm_unpackhi_epi8(hi, lo);
                w[4 * half] = lookup(first);
                w[4 * half + 1] = lookup(_mm_srli_si128(first, 8));
                w[4 * half + 2] = lookup(second);
                w[4 * half + 3] = lookup(_mm_srli_si128(second, 8));
            }
            let s = _mm256_set1_ps(scale);
            for (t, sum) in sums.iter_mut().enumerate().take(tokens) {
                let xp = x.as_ptr().add(t * cols + b * 64);
                let mut d = _mm256_mul_ps(w[0], _mm256_loadu_ps(xp));
                for (k, wk) in w.iter().enumerate().skip(1) {
                    d = _mm256_fmadd_ps(*wk, _mm256_loadu_ps(xp.add(8 * k)), d);
                }
                *sum = _mm256_fmadd_ps(d, s, *sum);
            }
        }
        for (a, sum) in acc.iter_mut().zip(sums).take(tokens) {
            let mut lanes = [0f32; 8];
            _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
            *a = lanes.iter().sum();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, Device, Tensor};

    /// The plain loops (machines without AVX2) against the SIMD kernels, exact and on 8-bit
    /// activations; each within twice the f32 accumulation bound of the other.
    #[test]
    fn scalar_rows_match_the_simd_kernels() {
        let (rows, cols) = (37, 160);
        let w = Tensor::randn(&[rows, cols], 0.0, 0.1, 7, DType::F32, &Device::Cpu).unwrap();
        for format in [QuantFormat::Q8_0, QuantFormat::Q4_0, QuantFormat::Q4_1] {
            let q = QTensor::quantize(&w, format).unwrap();
            let bytes = q.to_bytes().unwrap();
            let dense = q.dequantize(DType::F32).unwrap().to_vec::<f32>().unwrap();
            for tokens in 1..=GEMV_MAX_TOKENS {
                let x = Tensor::randn(&[tokens, cols], 0.0, 1.0, tokens as u64, DType::F32, &Device::Cpu).unwrap();
                let x = x.to_vec::<f32>().unwrap();
                let xq = Q8Rows::round(&x);
                for int8 in [false, true] {
                    let simd = cpu_gemv(&q, &bytes, &x, tokens, int8).unwrap();
                    let mut row = vec![0f32; tokens];
                    for o in 0..rows {
                        if int8 {
                            int8_row_scalar(&q, &bytes, o, &xq, cols, &mut row);
                        } else {
                            exact_row_scalar(&q, &bytes, o, &x, cols, &mut row);
                        }
                        for (t, &plain) in row.iter().enumerate() {
                            let mass: f64 =
                                (0..cols).map(|j| (x[t * cols + j] * dense[o * cols + j]).abs() as f64).sum();
                            let bound = 4.0 * cols as f64 * f32::EPSILON as f64 / 2.0 * mass;
                            let got = simd[t * rows + o];
                            assert!(
                                ((got - plain) as f64).abs() <= bound,
                                "{format} tokens {tokens} int8 {int8} row {o}: simd {got}, scalar {plain}"
                            );
                        }
                    }
                }
            }
        }
    }
}
