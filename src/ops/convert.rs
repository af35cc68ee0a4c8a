//! Run conversions between the storage types and f32 for the row-wise CPU kernels, written
//! so the loops vectorise: bf16 by bit operations (half converts it one branchy element at a
//! time), f16 and f32 through [`Element`]'s slice conversions. Rounding is to nearest even
//! and NaN stays NaN, as `bf16::from_f32` does.

use crate::ops::{SharedMut, write_at};
use crate::{DType, Element};

/// `src` as f32: the slice itself when T is f32, else converted into `scratch`.
#[inline]
pub(crate) fn as_f32<'a, T: Element>(src: &'a [T], scratch: &'a mut [f32]) -> &'a [f32] {
    if T::DTYPE == DType::F32 {
        bytemuck::cast_slice(src)
    } else {
        let scratch = &mut scratch[..src.len()];
        to_f32(src, scratch);
        scratch
    }
}

/// Writes `src` rounded to T at elements `at..` of `dst`: directly when T is f32, else
/// through `scratch`, which then holds the rounded values.
///
/// # Safety
/// As [`write_at`]: the range lies within `dst`'s allocation and no other task touches it.
#[inline]
pub(crate) unsafe fn store<T: Element>(dst: SharedMut<T>, at: usize, src: &[f32], scratch: &mut [T]) {
    if T::DTYPE == DType::F32 {
        // SAFETY: the caller's contract.
        unsafe { write_at(dst, at, bytemuck::cast_slice(src)) };
    } else {
        let scratch = &mut scratch[..src.len()];
        from_f32(src, scratch);
        // SAFETY: the caller's contract.
        unsafe { write_at(dst, at, scratch) };
    }
}

/// `dst[i] = src[i]` as f32.
#[inline]
pub(crate) fn to_f32<T: Element>(src: &[T], dst: &mut [f32]) {
    if T::DTYPE == DType::BF16 {
        let bits: &[u16] = bytemuck::cast_slice(src);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { bf16_to_f32_avx2(bits, dst) };
        }
        bf16_to_f32(bits, dst);
    } else {
        T::slice_to_f32(src, dst);
    }
}

/// `dst[i] = src[i]` rounded to T.
#[inline]
pub(crate) fn from_f32<T: Element>(src: &[f32], dst: &mut [T]) {
    if T::DTYPE == DType::BF16 {
        let bits: &mut [u16] = bytemuck::cast_slice_mut(dst);
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2.
            return unsafe { f32_to_bf16_avx2(src, bits) };
        }
        f32_to_bf16(src, bits);
    } else {
        T::slice_from_f32(src, dst);
    }
}

#[inline(always)]
fn bf16_to_f32(bits: &[u16], dst: &mut [f32]) {
    for (d, &b) in dst.iter_mut().zip(bits) {
        *d = f32::from_bits((b as u32) << 16);
    }
}

#[inline(always)]
fn f32_to_bf16(src: &[f32], bits: &mut [u16]) {
    for (d, &x) in bits.iter_mut().zip(src) {
        let b = x.to_bits();
        let nearest_even = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
        let quiet_nan = ((b >> 16) | 0x40) as u16;
        *d = if (b & 0x7fff_ffff) > 0x7f80_0000 { quiet_nan } else { nearest_even };
    }
}

// The same loops with 8-wide vectors (the baseline's SSE2 cannot narrow 32 to 16 bits in one
// instruction, so there the rounding loop runs element by element).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn bf16_to_f32_avx2(bits: &[u16], dst: &mut [f32]) {
    bf16_to_f32(bits, dst)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn f32_to_bf16_avx2(src: &[f32], bits: &mut [u16]) {
    f32_to_bf16(src, bits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::bf16;

    #[test]
    fn bf16_conversions_equal_halfs() {
        let mut values: Vec<f32> = (0..100_000u32).map(|i| f32::from_bits(i.wrapping_mul(0x9e37_79b9))).collect();
        values.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            f32::MAX,
            -f32::MAX,
            1.0 + 2f32.powi(-8),
        ]);
        let mut ours = vec![bf16::ZERO; values.len()];
        from_f32(&values, &mut ours);
        for (v, o) in values.iter().zip(&ours) {
            let want = bf16::from_f32(*v);
            assert!(want.to_bits() == o.to_bits() || (want.is_nan() && o.is_nan()), "{v}: {o} vs {want}");
        }
        let mut back = vec![0f32; ours.len()];
        to_f32(&ours, &mut back);
        for (b, o) in back.iter().zip(&ours) {
            assert!(b.to_bits() == o.to_f32().to_bits() || (b.is_nan() && o.is_nan()));
        }
    }
}
