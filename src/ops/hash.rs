//! The 32-bit integer hash behind every seeded mask and rounding (dropout, stochastic
//! rounding in the optimizer): murmur3's finaliser, written the same way in Rust, CUDA and
//! WGSL, so a seed gives the same bits on every backend.

/// murmur3's 32-bit finaliser.
#[inline(always)]
pub(crate) fn mix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}
