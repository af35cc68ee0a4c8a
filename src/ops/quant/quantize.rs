//! Quantizers (CPU), following ggml's reference code and bitsandbytes.

use super::formats::{BlockQ4_0, BlockQ4_1, BlockQ8_0, NF4_CODE};
use half::f16;
use rayon::prelude::*;

/// ggml `quantize_row_q8_0_ref`: d = amax / 127, q = round(x / d) (half away from zero).
pub(super) fn quantize_q8_0(values: &[f32]) -> Vec<BlockQ8_0> {
    values
        .par_chunks(32)
        .map(|x| {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            BlockQ8_0 { d: f16::from_f32(d), qs: std::array::from_fn(|j| (x[j] * id).round() as i8) }
        })
        .collect()
}

/// ggml `quantize_row_q4_0_ref`: d = (the value of largest magnitude) / −8,
/// q = min(15, trunc(x / d + 8.5)); byte j = q[j] | q[j + 16] << 4.
pub(super) fn quantize_q4_0(values: &[f32]) -> Vec<BlockQ4_0> {
    values
        .par_chunks(32)
        .map(|x| {
            let (mut amax, mut max) = (0f32, 0f32);
            for &v in x {
                if amax < v.abs() {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            BlockQ4_0 { d: f16::from_f32(d), qs: pack_nibbles(x, |v| ((v * id + 8.5) as i8).min(15) as u8) }
        })
        .collect()
}

/// ggml `quantize_row_q4_1_ref` (and gguf-py's `Q4_1.quantize_blocks`): m = the block's
/// minimum, d = (max − min) / 15, q = min(15, trunc((x − min)·(1/d) + 0.5)).
pub(super) fn quantize_q4_1(values: &[f32]) -> Vec<BlockQ4_1> {
    values
        .par_chunks(32)
        .map(|x| {
            // ggml's comparisons: the first of equal values wins, so −0 and +0 stay as found.
            let (mut min, mut max) = (f32::MAX, -f32::MAX);
            for &v in x {
                if v < min {
                    min = v;
                }
                if v > max {
                    max = v;
                }
            }
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            BlockQ4_1 {
                d: f16::from_f32(d),
                m: f16::from_f32(min),
                qs: pack_nibbles(x, |v| (((v - min) * id + 0.5) as i32).min(15) as u8),
            }
        })
        .collect()
}

/// ggml's 4-bit packing of a block of 32: byte j = q(x[j]) | q(x[j + 16]) << 4.
fn pack_nibbles(x: &[f32], q: impl Fn(f32) -> u8) -> [u8; 16] {
    std::array::from_fn(|j| q(x[j]) | (q(x[j + 16]) << 4))
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
pub(super) fn quantize_nf4(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
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
pub(super) fn quantize_blockwise_8bit(values: &[f32], code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
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
