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

/// bitsandbytes' 4-bit NF4 quantisation as its CPU path (`quantize_4bit`'s default torch
/// kernel) computes it: absmax per block of 64, `v = clamp(w · (1 / max(absmax, 1e-38)), −1, 1)`
/// in f32, code = the number of midpoints `(NF4[i] + NF4[i + 1]) / 2` below `v`
/// (`torch.bucketize`: a value on a midpoint takes the lower code); packed first-weight-high.
pub(super) fn quantize_nf4(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bounds: [f32; 15] = std::array::from_fn(|i| (NF4_CODE[i] + NF4_CODE[i + 1]) / 2.0);
    // torch clamps the divisor (not the stored absmax) at the f32 nearest 1e-38.
    let smallest = 1e-38f64 as f32;
    let absmax: Vec<f32> = values.par_chunks(64).map(|x| x.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
    let packed = values
        .par_chunks(64)
        .zip(absmax.par_iter())
        .flat_map_iter(|(x, &a)| {
            let inv = 1.0 / a.max(smallest);
            let q = move |v: f32| {
                let v = (v * inv).clamp(-1.0, 1.0);
                bounds.partition_point(|&b| b < v) as u8
            };
            x.chunks(2).map(move |p| (q(p[0]) << 4) | q(p[1]))
        })
        .collect();
    (packed, absmax)
}

/// Entries of bitsandbytes' CPU lookup table from a value in [−1, 1] to its 8-bit code.
const LUT_SIZE: usize = 65536;

/// bitsandbytes' CPU blockwise 8-bit quantisation (`quantize_blockwise`, blocks of 256, its
/// `cquantize_blockwise_cpu_fp32`): scale = max |v|; a block whose scale is 0 gets code 0
/// throughout; otherwise `v · (1 / scale)` is clamped to [−1, 1], mapped to one of 65536
/// evenly spaced table entries, `(v + 1) · 0.5 · 65535 + 0.5` truncated, and the entry's code
/// is the nearest code to the entry's own value (`−1 + 2i / 65535`). This is not always the
/// code nearest to `v`: near a midpoint between two codes the table's grid decides.
pub(super) fn quantize_blockwise_8bit(values: &[f32], code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    let lut = quantize_lut(code);
    let scales: Vec<f32> = values.chunks(256).map(|x| x.iter().fold(0f32, |m, v| m.max(v.abs()))).collect();
    let quantized = values
        .chunks(256)
        .zip(&scales)
        .flat_map(|(x, &s)| {
            let inv = 1.0 / s;
            let lut = &lut;
            x.iter().map(move |&v| {
                if s == 0.0 {
                    return 0;
                }
                // (v + 1)·0.5 is exact, so bnb's possible fused multiply-add of the rest cannot
                // change the truncated index (checked against the library at every entry
                // boundary). A NaN (only from a subnormal scale) truncates to entry 0, as
                // x86's conversion does.
                let v = (v * inv).clamp(-1.0, 1.0);
                lut[((v + 1.0) * 0.5 * (LUT_SIZE - 1) as f32 + 0.5) as usize]
            })
        })
        .collect();
    (quantized, scales)
}

/// bitsandbytes' `build_quantize_lut`: entry `i` holds the number of code midpoints
/// `0.5 · (code[j] + code[j + 1])` below `−1 + 2i / 65535` (all in f32).
fn quantize_lut(code: &[f32; 256]) -> Vec<u8> {
    let midpoints: [f32; 255] = std::array::from_fn(|j| 0.5 * (code[j] + code[j + 1]));
    let mut index = 0;
    (0..LUT_SIZE)
        .map(|i| {
            let value = -1.0 + (2.0 * i as f32) / (LUT_SIZE - 1) as f32;
            while index < midpoints.len() && midpoints[index] < value {
                index += 1;
            }
            index as u8
        })
        .collect()
}

/// `torch.mean` of a contiguous 1-D f32 tensor as torch's CPU kernel computes it on one
/// thread: torch's cascade sum (`cascade_sum` in ATen's `SumKernel.cpp`, for the 8-lane
/// `Vectorized<float>` of its AVX2 and default builds), then one f32 division by the length.
/// Torch computes every tensor of fewer than 32768 elements this way whatever its thread
/// count; longer ones it splits over its threads, so their last bit depends on that count
/// (this is the order of `torch.set_num_threads(1)`), and its AVX-512 build sums in 16 lanes.
pub(super) fn torch_mean_f32(values: &[f32]) -> f32 {
    torch_sum_f32(values) / values.len() as f32
}

/// torch's CPU sum of a contiguous f32 vector (see [`torch_mean_f32`]): 8-lane partial sums
/// of the whole 8-element groups by [`row_sum`], then an f32 accumulator that adds the
/// leftover elements in order and then the 8 lanes in order.
fn torch_sum_f32(values: &[f32]) -> f32 {
    const LANES: usize = 8;
    if values.len() < LANES {
        return row_sum(values.len(), |i| values[i]);
    }
    let groups = values.len() / LANES;
    let lanes = row_sum(groups, |i| Lanes::<LANES>(std::array::from_fn(|l| values[i * LANES + l])));
    let tail = values[groups * LANES..].iter().fold(0f32, |acc, &v| acc + v);
    lanes.0.iter().fold(tail, |acc, &v| acc + v)
}

/// A vector of `N` f32 lanes that add lane by lane (torch's `Vectorized<float>`).
#[derive(Clone, Copy)]
struct Lanes<const N: usize>([f32; N]);

impl<const N: usize> Default for Lanes<N> {
    fn default() -> Self {
        Lanes([0.0; N])
    }
}

impl<const N: usize> std::ops::Add for Lanes<N> {
    type Output = Self;
    fn add(self, other: Self) -> Self {
        Lanes(std::array::from_fn(|l| self.0[l] + other.0[l]))
    }
}

/// torch's `row_sum`: the `size` items read as rows of 4 summed by [`multi_row_sum`], the
/// items past the last whole row added to the first partial sum, then partials 1..3 added to it.
fn row_sum<T: Copy + Default + std::ops::Add<Output = T>>(size: usize, load: impl Fn(usize) -> T) -> T {
    const ILP: usize = 4;
    let rows = size / ILP;
    let mut partial = multi_row_sum::<T, ILP>(rows, |i, k| load(i * ILP + k));
    for i in rows * ILP..size {
        partial[0] = partial[0] + load(i);
    }
    (1..ILP).fold(partial[0], |acc, k| acc + partial[k])
}

/// torch's `multi_row_sum`: `NROWS` running sums over `size` rows in four levels; level 0 takes
/// `2^p` rows at a time (`p = max(4, ⌈log2 size⌉ / 4)`), then carries into level 1, which
/// carries into level 2 every `2^p` carries, and so on; at the end levels 1..3 are added to 0.
fn multi_row_sum<T: Copy + Default + std::ops::Add<Output = T>, const NROWS: usize>(
    size: usize,
    load: impl Fn(usize, usize) -> T,
) -> [T; NROWS] {
    const LEVELS: usize = 4;
    let ceil_log2 = if size <= 2 { 1 } else { usize::BITS - (size - 1).leading_zeros() } as usize;
    let power = (ceil_log2 / LEVELS).max(4);
    let step = 1usize << power;
    let mut acc = [[T::default(); NROWS]; LEVELS];
    let mut i = 0;
    while i + step <= size {
        for _ in 0..step {
            for (k, a) in acc[0].iter_mut().enumerate() {
                *a = *a + load(i, k);
            }
            i += 1;
        }
        for j in 1..LEVELS {
            let (lower, upper) = acc.split_at_mut(j);
            for (up, low) in upper[0].iter_mut().zip(lower[j - 1].iter_mut()) {
                *up = *up + *low;
                *low = T::default();
            }
            if i & ((step - 1) << (j * power)) != 0 {
                break;
            }
        }
    }
    for i in i..size {
        for (k, a) in acc[0].iter_mut().enumerate() {
            *a = *a + load(i, k);
        }
    }
    let mut sums = acc[0];
    for level in &acc[1..] {
        for (s, &a) in sums.iter_mut().zip(level) {
            *s = *s + a;
        }
    }
    sums
}
