//! The cosines and sines of a token's rotary angles, correctly rounded to f32, eight lanes
//! at a time in f64 (branch-free, so the lane loop vectorises).
//!
//! The angle `a` is the f32 product `f32(position) · inv_freq[i]`. In f64, `a` is reduced by
//! π/2 with a three-part Cody–Waite constant (the first two parts of 23 bits, so `k · part`
//! is exact for quadrants `k < 2³⁰` and the first two subtractions are exact), and the
//! reduced `r ∈ [−π/4, π/4]` goes through fdlibm's `__kernel_sin` / `__kernel_cos`
//! polynomials (error below 2⁻⁵⁸). The f64 result is within about 2⁻⁵² relative of the
//! true value, so rounding it to f32 gives the correctly rounded f32 unless the true value
//! lies within that distance of a rounding midpoint (about one angle in 2²⁸); the tests
//! find no such angle among millions. (glibc's `f32::sin_cos`, used before, is faithful
//! but not correctly rounded: it differs in the last bit for about 2.5% of rope angles.)
//! Angles past [`FAST_LIMIT`] (where `k` outgrows the exact products) go through libm.

/// Lanes per step: a multiple of every x86 and Arm f64 vector width.
pub(crate) const LANES: usize = 8;

/// |a| up to 2³⁰ keeps the quadrant below 2³⁰ (the products `k · PIO2_1`, `k · PIO2_2`
/// exact).
const FAST_LIMIT: f32 = 1073741824.0; // 2^30

/// π/2 = PIO2_1 + PIO2_2 + PIO2_3 to about 2⁻¹⁰³; PIO2_1 and PIO2_2 have 23 significant bits.
const PIO2_1: f64 = f64::from_bits(0x3FF9_21FB_4000_0000); // 0x1.921fb4p+0
const PIO2_2: f64 = f64::from_bits(0x3E74_442D_0000_0000); // 0x1.4442dp-24
const PIO2_3: f64 = f64::from_bits(0x3CF8_4698_98CC_5170); // 0x1.8469898cc517p-48

/// Adding 1.5 · 2⁵² rounds an f64 below 2⁵¹ to the nearest integer (ties to even), which
/// then sits in the low bits of the sum.
const ROUND_SHIFTER: f64 = 6755399441055744.0;

// fdlibm's __kernel_sin and __kernel_cos coefficients.
const S1: f64 = -0.16666666666666632;
const S2: f64 = 0.00833333333332249;
const S3: f64 = -0.0001984126982985795;
const S4: f64 = 2.7557313707070068e-06;
const S5: f64 = -2.5050760253406863e-08;
const S6: f64 = 1.58969099521155e-10;
const C1: f64 = 0.0416666666666666;
const C2: f64 = -0.001388888888887411;
const C3: f64 = 2.480158728947673e-05;
const C4: f64 = -2.7557314351390663e-07;
const C5: f64 = 2.087572321298175e-09;
const C6: f64 = -1.1359647557788195e-11;

/// `(sin a, cos a)` of eight f32 angles, each correctly rounded to f32 (see the module
/// docs); only meaningful for |a| ≤ [`FAST_LIMIT`].
#[inline(always)]
fn sin_cos_lanes(a: &[f32; LANES]) -> ([f32; LANES], [f32; LANES]) {
    let mut sin = [0f32; LANES];
    let mut cos = [0f32; LANES];
    for l in 0..LANES {
        let x = a[l] as f64;
        let shifted = x * std::f64::consts::FRAC_2_PI + ROUND_SHIFTER;
        let quadrant = shifted.to_bits();
        let k = shifted - ROUND_SHIFTER;
        let r = ((x - k * PIO2_1) - k * PIO2_2) - k * PIO2_3;
        let z = r * r;
        // sin r has r's sign on [−π/4, π/4]; copysign keeps sin(−0) = −0.
        let sin_r = (r + r * z * (S1 + z * (S2 + z * (S3 + z * (S4 + z * (S5 + z * S6)))))).copysign(r);
        let cos_r = 1.0 - 0.5 * z + z * z * (C1 + z * (C2 + z * (C3 + z * (C4 + z * (C5 + z * C6)))));
        // a = k·π/2 + r: odd quadrants swap sine and cosine; the sine is negated in
        // quadrants 2 and 3, the cosine in 1 and 2.
        let odd = quadrant & 1 == 1;
        let (s, c) = if odd { (cos_r, sin_r) } else { (sin_r, cos_r) };
        let sin_sign = (quadrant & 2) << 62;
        let cos_sign = (quadrant.wrapping_add(1) & 2) << 62;
        sin[l] = f64::from_bits(s.to_bits() ^ sin_sign) as f32;
        cos[l] = f64::from_bits(c.to_bits() ^ cos_sign) as f32;
    }
    (sin, cos)
}

/// Fills `cos[i]` and `sin[i]` with cos and `sign` · sin of the f32 angle
/// `position · inv_freq[i]`, correctly rounded to f32 (as libm's `f32::sin_cos` gives them).
/// `cos` and `sin` are as long as `inv_freq`.
#[inline(always)]
pub(crate) fn cos_sin_table(position: f32, inv_freq: &[f32], sign: f32, cos: &mut [f32], sin: &mut [f32]) {
    for ((f, c), s) in inv_freq.chunks(LANES).zip(cos.chunks_mut(LANES)).zip(sin.chunks_mut(LANES)) {
        let mut angles = [0f32; LANES];
        for (a, &f) in angles.iter_mut().zip(f) {
            *a = position * f;
        }
        let (lane_sin, lane_cos) = sin_cos_lanes(&angles);
        let in_range = angles.iter().all(|a| a.abs() <= FAST_LIMIT);
        for i in 0..f.len() {
            let (sv, cv) = if in_range { (lane_sin[i], lane_cos[i]) } else { angles[i].sin_cos() };
            c[i] = cv;
            s[i] = sign * sv;
        }
    }
}

/// `(sin a, cos a)` of one angle by the table's path; for the tests.
#[cfg(test)]
pub(crate) fn sin_cos(a: f32) -> (f32, f32) {
    let (mut c, mut s) = ([0f32], [0f32]);
    cos_sin_table(a, &[1.0], 1.0, &mut c, &mut s);
    (s[0], c[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::rope::RopeConfig;

    /// The correctly rounded reference: f64's sin/cos are within an ulp of f64, far finer
    /// than f32's rounding.
    fn reference(a: f32) -> (f32, f32) {
        let x = a as f64;
        (x.sin() as f32, x.cos() as f32)
    }

    /// Counts the angles whose sine or cosine differs from the reference, printing them,
    /// and reports how many differ from libm's `f32::sin_cos`.
    fn mismatches(angles: impl Iterator<Item = f32>) -> (usize, usize) {
        let (mut n, mut bad, mut off_libm) = (0, 0, 0);
        for a in angles {
            n += 1;
            let (s, c) = sin_cos(a);
            let (rs, rc) = reference(a);
            let (ls, lc) = a.sin_cos();
            off_libm += usize::from(s.to_bits() != ls.to_bits() || c.to_bits() != lc.to_bits());
            if s.to_bits() != rs.to_bits() || c.to_bits() != rc.to_bits() {
                bad += 1;
                eprintln!("a = {a:e}: fast ({s:e}, {c:e}), f64 ({rs:e}, {rc:e}), libm ({ls:e}, {lc:e})");
            }
        }
        eprintln!("{off_libm} of {n} differ from libm's f32::sin_cos");
        (n, bad)
    }

    #[test]
    fn rope_angles_are_correctly_rounded() {
        let mut total = (0, 0);
        for theta in [10000.0, 100000.0, 500000.0] {
            for head_dim in [64, 128] {
                let inv_freq = RopeConfig::new(theta).inv_freq(head_dim).unwrap();
                // Every position below 2¹⁴, then a stride through 2²⁴ (odd, so every residue
                // class is visited).
                let positions = (0u32..1 << 14).chain((1u32 << 14..=1 << 24).step_by(4099));
                let angles = positions.flat_map(|p| inv_freq.iter().map(move |f| p as f32 * f));
                let (n, bad) = mismatches(angles);
                eprintln!("theta {theta}, head_dim {head_dim}: {bad} of {n} angles differ");
                total = (total.0 + n, total.1 + bad);
            }
        }
        eprintln!("rope angles: {} of {} differ", total.1, total.0);
        assert!(total.0 > 4_000_000);
        assert_eq!(total.1, 0);
    }

    #[test]
    fn arbitrary_angles_are_correctly_rounded() {
        // A stride through the f32 bit patterns of [0, 2³⁰] and their negations.
        let angles = (0..=FAST_LIMIT.to_bits()).step_by(523).map(f32::from_bits).flat_map(|a| [a, -a]);
        let (n, bad) = mismatches(angles);
        eprintln!("arbitrary angles: {bad} of {n} differ");
        assert_eq!(bad, 0);
    }

    #[test]
    fn large_angles_fall_back_to_libm() {
        for a in [1.1e9f32, 1.5e9, 1.0e12, 3.0e20, 7.9e28] {
            assert_eq!(sin_cos(a), a.sin_cos(), "{a}");
        }
    }
}
