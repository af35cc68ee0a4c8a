//! Rotary position embeddings (RoPE): [`rope`] and its backward, [`rope_backward`].
//!
//! x is `[batch, seq, heads, head_dim]` (queries or keys: one call each) and `positions` is
//! `[batch, seq]` u32, one position per token, so packed sequences and decoding at any
//! offset need nothing else. Feature pairs of the first `rotary_dim` features of each head
//! are rotated by the angle `position · inv_freq[i]`; the features past `rotary_dim` pass
//! through unchanged. Two layouts pair the features:
//!
//! - [`RopeLayout::HalfSplit`] (Hugging Face `rotate_half`): feature `i` pairs with
//!   `i + rotary_dim/2`, for `i < rotary_dim/2`.
//! - [`RopeLayout::Interleaved`] (Meta's `apply_rotary_emb`, GGUF): feature `2i` pairs with
//!   `2i + 1`.
//!
//! Pair `(a, b)` with frequency `i` becomes `(a·cos θ − b·sin θ, b·cos θ + a·sin θ)`.
//!
//! Arithmetic, as transformers does it in float32: `inv_freq` comes from the host once per
//! call ([`RopeConfig::inv_freq`]); the angle is the f32 product `f32(position) · inv_freq[i]`
//! (the position rounded to nearest f32, as torch's `.float()`), its cosine and sine are
//! taken in f32 with a full range reduction (angles reach 10⁵ and more; correctly rounded
//! on the CPU), the rotation is computed in f32 and rounded once to x's dtype. (transformers rounds cos and sin to a
//! half-precision x's dtype before multiplying; kiln keeps them in f32.)
//!
//! Kernels: CPU here (rayon over tokens); CUDA `kernels/rope.cu`, one block per token with
//! the token's cos/sin table in shared memory; WGSL `shaders/rope.wgsl`, one workgroup per
//! token, one output word per invocation, with its own range reduction (WGSL's `cos` and
//! `sin` promise nothing outside [−π, π]).

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod sincos;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::{Operands, operands};
use crate::tensor::{CpuStorage, StorageElement, with_elems};
use crate::{DType, Error, Result, Tensor};
use half::slice::HalfFloatSliceExt;
use half::{bf16, f16};
use rayon::prelude::*;

/// Which features form a rotated pair.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RopeLayout {
    /// Hugging Face (`rotate_half`): feature `i` pairs with `i + rotary_dim/2`.
    #[default]
    HalfSplit,
    /// Meta / GGUF (complex multiply of adjacent features): `2i` pairs with `2i + 1`.
    Interleaved,
}

/// How the inverse frequencies are rescaled for a longer context, as transformers'
/// `rope_parameters` (`rope_type`) define it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub enum RopeScaling {
    /// `rope_type: "default"`.
    #[default]
    None,
    /// `rope_type: "linear"`: positions divided by `factor`, computed as transformers does,
    /// `inv_freq / factor` in f32. `factor` finite and > 0.
    Linear { factor: f64 },
    /// `rope_type: "llama3"`: transformers' `_compute_llama3_parameters`, step for step in
    /// f32 (wavelengths below `original_max_position_embeddings / high_freq_factor` keep
    /// their frequency, those above `.. / low_freq_factor` are divided by `factor`, those
    /// between are interpolated). `factor` and `low_freq_factor` finite and > 0,
    /// `high_freq_factor` finite and > `low_freq_factor`, `original_max_position_embeddings`
    /// > 0.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: u32 },
}

/// The parameters of a rotary embedding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeConfig {
    /// The base (`rope_theta`), finite and > 0; rounded to f32 as torch rounds it.
    pub theta: f64,
    /// Features rotated at the start of each head (`head_dim · partial_rotary_factor`): even,
    /// > 0 and ≤ head_dim; `None` rotates the whole head.
    pub rotary_dim: Option<usize>,
    pub layout: RopeLayout,
    pub scaling: RopeScaling,
}

impl Default for RopeConfig {
    /// θ = 10000 (transformers' default), the whole head, [`RopeLayout::HalfSplit`], no scaling.
    fn default() -> Self {
        RopeConfig::new(10000.0)
    }
}

/// The largest inverse frequency kept: with positions below 2³² the angles stay below 2⁹⁶,
/// finite in f32.
const MAX_INV_FREQ: f32 = 18446744073709551616.0; // 2^64

impl RopeConfig {
    /// Base `theta`, the whole head rotated, [`RopeLayout::HalfSplit`], no scaling.
    pub fn new(theta: f64) -> RopeConfig {
        RopeConfig { theta, rotary_dim: None, layout: RopeLayout::HalfSplit, scaling: RopeScaling::None }
    }

    /// The same with the interleaved (Meta / GGUF) layout.
    pub fn interleaved(self) -> RopeConfig {
        RopeConfig { layout: RopeLayout::Interleaved, ..self }
    }

    /// The same rotating only the first `rotary_dim` features of each head.
    pub fn with_rotary_dim(self, rotary_dim: usize) -> RopeConfig {
        RopeConfig { rotary_dim: Some(rotary_dim), ..self }
    }

    /// The same with `scaling`.
    pub fn with_scaling(self, scaling: RopeScaling) -> RopeConfig {
        RopeConfig { scaling, ..self }
    }

    /// The rotated features for heads of `head_dim`; `Err(Shape)` for an odd head_dim, an
    /// odd, zero or too large rotary_dim.
    pub fn rotary_dim_for(&self, head_dim: usize) -> Result<usize> {
        if !head_dim.is_multiple_of(2) {
            return Err(Error::Shape(format!("rope: head_dim {head_dim} is odd; rotary pairs need an even head_dim")));
        }
        match self.rotary_dim {
            None => Ok(head_dim),
            Some(r) if r == 0 || !r.is_multiple_of(2) => {
                Err(Error::Shape(format!("rope: rotary_dim {r} must be even and > 0")))
            }
            Some(r) if r > head_dim => Err(Error::Shape(format!("rope: rotary_dim {r} exceeds head_dim {head_dim}"))),
            Some(r) => Ok(r),
        }
    }

    /// `Err(InvalidArgument)` naming the parameter when theta or a scaling parameter is out
    /// of its range.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::InvalidArgument(format!("rope: {what}")));
        if !(self.theta > 0.0 && (self.theta as f32).is_finite()) {
            return bad(format!("theta {} must be finite (in f32) and > 0", self.theta));
        }
        let positive = |name: &str, v: f64| -> Result<()> {
            match v > 0.0 && (v as f32).is_finite() && v as f32 > 0.0 {
                true => Ok(()),
                false => bad(format!("{name} {v} must be finite (in f32) and > 0")),
            }
        };
        match self.scaling {
            RopeScaling::None => Ok(()),
            RopeScaling::Linear { factor } => positive("linear scaling factor", factor),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                positive("llama3 factor", factor)?;
                positive("llama3 low_freq_factor", low_freq_factor)?;
                positive("llama3 high_freq_factor", high_freq_factor)?;
                if high_freq_factor <= low_freq_factor || ((high_freq_factor - low_freq_factor) as f32) <= 0.0 {
                    return bad(format!(
                        "llama3 high_freq_factor {high_freq_factor} must exceed low_freq_factor {low_freq_factor}"
                    ));
                }
                if original_max_position_embeddings == 0 {
                    return bad("llama3 original_max_position_embeddings must be > 0".into());
                }
                Ok(())
            }
        }
    }

    /// The `rotary_dim / 2` inverse frequencies for heads of `head_dim`, in f32 as
    /// transformers computes them: `1 / θ^(f32(2i) / f32(rotary_dim))` with θ rounded to
    /// f32 and the power correctly rounded (torch's vectorised `pow` is within one ulp of it
    /// and differs in the last bit for about 1% of entries), then the scaling rule.
    /// `Err` as [`Self::rotary_dim_for`] and [`Self::validate`] say, and `Err(InvalidArgument)`
    /// when the parameters give a frequency past 2⁶⁴ (angles that would overflow).
    pub fn inv_freq(&self, head_dim: usize) -> Result<Vec<f32>> {
        self.validate()?;
        let rot = self.rotary_dim_for(head_dim)?;
        let base = self.theta as f32 as f64;
        let mut inv: Vec<f32> = (0..rot / 2)
            .map(|i| {
                let exponent = (2 * i) as f32 / rot as f32;
                1.0f32 / base.powf(exponent as f64) as f32
            })
            .collect();
        match self.scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => inv.iter_mut().for_each(|f| *f /= factor as f32),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                // Each Python scalar meets an f32 tensor as an f32; `a / t` is torch's
                // `t.reciprocal() * a`. Rust never fuses these operations.
                let old = original_max_position_embeddings as f64;
                let (factor32, low32, old32) = (factor as f32, low_freq_factor as f32, old as f32);
                let low_wavelen = (old / low_freq_factor) as f32;
                let high_wavelen = (old / high_freq_factor) as f32;
                let span = (high_freq_factor - low_freq_factor) as f32;
                let two_pi = std::f64::consts::TAU as f32;
                for f in inv.iter_mut() {
                    let wavelen = (1.0f32 / *f) * two_pi;
                    let mut scaled = if wavelen > low_wavelen { *f / factor32 } else { *f };
                    // transformers' `~(wavelen < high) * ~(wavelen > low)`; wavelen is never NaN.
                    if (high_wavelen..=low_wavelen).contains(&wavelen) {
                        let smooth = ((1.0f32 / wavelen) * old32 - low32) / span;
                        scaled = (1.0 - smooth) * scaled / factor32 + smooth * scaled;
                    }
                    *f = scaled;
                }
            }
        }
        if let Some(f) = inv.iter().find(|f| !(f.is_finite() && **f <= MAX_INV_FREQ)) {
            return Err(Error::InvalidArgument(format!(
                "rope: theta {} with {:?} gives an inverse frequency {f} past 2^64; the angles would overflow",
                self.theta, self.scaling
            )));
        }
        Ok(inv)
    }
}

/// Applies the rotary embedding to x `[batch, seq, heads, head_dim]` (f32, f16 or bf16) at
/// `positions` `[batch, seq]` (u32). Returns a tensor of x's shape and dtype.
///
/// Errors: `Err(DType)` when x holds integers or positions is not u32; `Err(Shape)` when x
/// is not rank 4, positions is not `[batch, seq]`, head_dim is odd, or rotary_dim is odd,
/// zero or larger than head_dim; `Err(InvalidArgument)` for theta or a scaling parameter out
/// of range; `Err(DeviceMismatch)` when x and positions are on different devices. Empty
/// dimensions give an empty result.
pub fn rope(x: &Tensor, positions: &Tensor, cfg: &RopeConfig) -> Result<Tensor> {
    apply("rope", x, positions, cfg, Direction::Forward)
}

/// The backward of [`rope`]: `dx` from `dy` (both `[batch, seq, heads, head_dim]`), the
/// rotation by the opposite angles (a rotation's inverse is its transpose). Same contract.
pub fn rope_backward(dy: &Tensor, positions: &Tensor, cfg: &RopeConfig) -> Result<Tensor> {
    apply("rope_backward", dy, positions, cfg, Direction::Backward)
}

/// Forward rotates by +θ, backward by −θ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    Forward,
    Backward,
}

impl Direction {
    /// The factor applied to every sine.
    pub(crate) fn sin_sign(self) -> f32 {
        match self {
            Direction::Forward => 1.0,
            Direction::Backward => -1.0,
        }
    }
}

/// The sizes of one call, shared by every backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RopeShape {
    pub tokens: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub rot: usize,
    pub layout: RopeLayout,
    pub sign: f32,
}

fn apply(op: &str, x: &Tensor, positions: &Tensor, cfg: &RopeConfig, dir: Direction) -> Result<Tensor> {
    crate::ops::floats(op, &[x])?;
    if positions.dtype() != DType::U32 {
        return Err(Error::DType(format!("{op}: positions must be u32, got {}", positions.dtype())));
    }
    let operands = operands(op, [x, positions])?;
    let &[batch, seq, heads, head_dim] = x.shape() else {
        return Err(Error::Shape(format!("{op}: x must be [batch, seq, heads, head_dim], got {:?}", x.shape())));
    };
    if positions.shape() != [batch, seq] {
        return Err(Error::Shape(format!(
            "{op}: positions {:?} must be [batch, seq] = [{batch}, {seq}] for x {:?}",
            positions.shape(),
            x.shape()
        )));
    }
    let inv_freq = cfg.inv_freq(head_dim).map_err(|e| rename(e, op))?;
    let shape = RopeShape {
        tokens: batch * seq,
        heads,
        head_dim,
        rot: 2 * inv_freq.len(),
        layout: cfg.layout,
        sign: dir.sin_sign(),
    };
    if x.elem_count() == 0 {
        return Tensor::empty(x.shape(), x.dtype(), &x.device());
    }
    match operands {
        Operands::Cpu([xs, ps]) => {
            let pos = ps.as_u32().ok_or_else(|| Error::DType(format!("{op}: positions must be u32")))?;
            let mut out = Tensor::empty(x.shape(), x.dtype(), &x.device())?;
            let storage = out.storage_mut()?.as_cpu_mut().ok_or_else(|| Error::Unsupported(format!("{op}: output")))?;
            with_elems!(storage, o => rotate_tokens(xs, pos, &inv_freq, o, &shape)?);
            Ok(out)
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [xb, pb]) => cuda::rope(dev, x, xb, pb, &inv_freq, &shape),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [xb, pb]) => wgpu::rope(dev, x, xb, pb, &inv_freq, &shape),
    }
}

/// The config's errors say `rope:`; the backward's say `rope_backward:`.
fn rename(e: Error, op: &str) -> Error {
    let fix = |m: String| m.replacen("rope:", &format!("{op}:"), 1);
    match e {
        Error::Shape(m) => Error::Shape(fix(m)),
        Error::InvalidArgument(m) => Error::InvalidArgument(fix(m)),
        other => other,
    }
}

/// The CPU kernel: per token, the cos/sin table of its angles ([`sincos::cos_sin_table`]),
/// its row widened to f32, every head's pairs rotated (plain slices, so the loops
/// vectorise), and the row rounded back once. Compiled twice: for the baseline target and,
/// chosen at run time, for AVX2 (the same IEEE operations, so the same bits).
fn rotate_tokens<T: RopeElement>(
    x: &CpuStorage,
    positions: &[u32],
    inv_freq: &[f32],
    out: &mut [T],
    s: &RopeShape,
) -> Result<()> {
    let x = T::slice_of(x).ok_or_else(|| Error::DType("rope: x and the output differ in dtype".into()))?;
    let row = s.heads * s.head_dim;
    #[cfg(target_arch = "x86_64")]
    let avx2 = std::arch::is_x86_feature_detected!("avx2");
    out.par_chunks_mut(row).zip(x.par_chunks(row)).zip(positions[..s.tokens].par_iter()).for_each_init(
        || Scratch::new(row, inv_freq.len()),
        |w, ((out, x), &position)| {
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: the CPU has AVX2 (checked above).
                return unsafe { rotate_token_avx2(x, position, inv_freq, out, s, w) };
            }
            rotate_token(x, position, inv_freq, out, s, w)
        },
    );
    Ok(())
}

/// Per-thread scratch: cos, sign · sin, the token's row in f32, its result.
struct Scratch {
    cos: Vec<f32>,
    sin: Vec<f32>,
    x: Vec<f32>,
    out: Vec<f32>,
}

impl Scratch {
    fn new(row: usize, half: usize) -> Scratch {
        Scratch { cos: vec![0.0; half], sin: vec![0.0; half], x: vec![0.0; row], out: vec![0.0; row] }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn rotate_token_avx2<T: RopeElement>(
    x: &[T],
    position: u32,
    inv_freq: &[f32],
    out: &mut [T],
    s: &RopeShape,
    w: &mut Scratch,
) {
    rotate_token(x, position, inv_freq, out, s, w)
}

#[inline(always)]
fn rotate_token<T: RopeElement>(
    x: &[T],
    position: u32,
    inv_freq: &[f32],
    out: &mut [T],
    s: &RopeShape,
    w: &mut Scratch,
) {
    let half = s.rot / 2;
    // Rust's u32 → f32 rounds to nearest even, as torch's `.float()`.
    sincos::cos_sin_table(position as f32, inv_freq, s.sign, &mut w.cos, &mut w.sin);
    T::widen(x, &mut w.x);
    let (cos, sin) = (&w.cos[..], &w.sin[..]);
    for (o, x) in w.out.chunks_exact_mut(s.head_dim).zip(w.x.chunks_exact(s.head_dim)) {
        let (o, pass_out) = o.split_at_mut(s.rot);
        let (x, pass_in) = x.split_at(s.rot);
        match s.layout {
            RopeLayout::HalfSplit => {
                let (oa, ob) = o.split_at_mut(half);
                let (xa, xb) = x.split_at(half);
                let pairs = oa.iter_mut().zip(ob.iter_mut()).zip(xa.iter().zip(xb)).zip(cos.iter().zip(sin));
                for (((oa, ob), (&a, &b)), (&c, &s)) in pairs {
                    *oa = a * c - b * s;
                    *ob = b * c + a * s;
                }
            }
            RopeLayout::Interleaved => {
                for ((o, x), (&c, &s)) in o.chunks_exact_mut(2).zip(x.chunks_exact(2)).zip(cos.iter().zip(sin)) {
                    o[0] = x[0] * c - x[1] * s;
                    o[1] = x[1] * c + x[0] * s;
                }
            }
        }
        pass_out.copy_from_slice(pass_in);
    }
    // Rounded once; pass-through values come back unchanged (f32 holds every f16 and bf16).
    T::narrow(&w.out, out);
}

/// The row conversions of the CPU kernel, inlined into it (so they vectorise for its target).
trait RopeElement: StorageElement {
    /// Widens to f32, as `Element::to_f32`.
    fn widen(src: &[Self], dst: &mut [f32]);
    /// Rounds to nearest even, as `Element::from_f32`.
    fn narrow(src: &[f32], dst: &mut [Self]);
}

impl RopeElement for f32 {
    #[inline(always)]
    fn widen(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [f32]) {
        dst.copy_from_slice(src);
    }
}

impl RopeElement for f16 {
    #[inline(always)]
    fn widen(src: &[f16], dst: &mut [f32]) {
        src.convert_to_f32_slice(dst);
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [f16]) {
        dst.convert_from_f32_slice(src);
    }
}

impl RopeElement for bf16 {
    /// Branch-free bit operations with `half`'s results (a NaN comes back quiet).
    #[inline(always)]
    fn widen(src: &[bf16], dst: &mut [f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let b = s.to_bits() as u32;
            let quiet = if b & 0x7FFF > 0x7F80 { 0x0040 } else { 0 };
            *d = f32::from_bits((b | quiet) << 16);
        }
    }
    #[inline(always)]
    fn narrow(src: &[f32], dst: &mut [bf16]) {
        for (d, s) in dst.iter_mut().zip(src) {
            let b = s.to_bits();
            let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
            let nan = (b >> 16) | 0x0040;
            *d = bf16::from_bits(if b & 0x7FFF_FFFF > 0x7F80_0000 { nan } else { rounded } as u16);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_conversions_match_half() {
        let mut bits: Vec<u32> = (0..=u32::MAX).step_by(65_521).collect();
        bits.extend([0, 0x8000_0000, 0x7F80_0000, 0xFF80_0000, 0x7F7F_FFFF, 0x7F7F_8000, 0x7FC0_0000, 0x7F80_0001]);
        bits.extend([0x7FFF_FFFF, 0x0000_8000, 0x0001_8000, 0x0000_7FFF, 0x3F80_8000, 0x3F81_8000, 0xFF7F_8000]);
        let f: Vec<f32> = bits.iter().map(|&b| f32::from_bits(b)).collect();
        let mut narrow = vec![bf16::ZERO; f.len()];
        <bf16 as RopeElement>::narrow(&f, &mut narrow);
        for (v, n) in f.iter().zip(&narrow) {
            assert_eq!(n.to_bits(), bf16::from_f32(*v).to_bits(), "narrow {:#x}", v.to_bits());
        }
        let all: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
        let mut wide = vec![0f32; all.len()];
        <bf16 as RopeElement>::widen(&all, &mut wide);
        for (b, w) in all.iter().zip(&wide) {
            assert_eq!(w.to_bits(), b.to_f32().to_bits(), "widen {:#x}", b.to_bits());
        }
    }
}
