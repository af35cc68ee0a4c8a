//! Token selection on the device: [`argmax`] (greedy decoding) and [`sample`] (temperature,
//! top-k and top-p as Hugging Face's logits warpers apply them, then a seeded draw).
//!
//! Kernels: the CPU code here, `kernels/sampling.cu`, `shaders/sampling.wgsl`. One CPU
//! thread, CUDA block or WGSL workgroup handles one row.
//!
//! # The same tokens on every backend
//!
//! A seed gives the same ids on the CPU, CUDA and WGSL for the same logits. Three choices
//! make that hold bit for bit rather than almost always:
//!
//! - **Order keys.** Logits are ranked by a `u32` key of their bits (−0 equals +0, NaN is
//!   below −∞), so argmax, top-k and the top-p threshold are integer decisions.
//! - **Weights without `exp`.** The weight of logit x is `2^t` with `t = (x − max)·log2(e)/T`,
//!   computed from operations IEEE rounds exactly on every backend: `t·2²⁴` is truncated to
//!   a fixed-point integer, whose fraction's four 6-bit digits index a table of `2^(d·2⁻⁶ʲ)`
//!   (f32, uploaded from the host) multiplied together, and whose integer part is an exact
//!   power of two. A weight below 2⁻¹²⁶ (a token 87·T below the top) is 0. Sub and mul are
//!   never fed into an add where a fused multiply-add would round differently.
//! - **One summation order.** Every sum of weights is the *canonical sum*: lane `j` of 256
//!   adds the weights of tokens `j, j + 256, j + 512, …` in that order from 0, then the lane
//!   sums are added pairwise by halving (`s[j] += s[j + h]` for h = 128, 64, …, 1). The draw
//!   descends that same tree: with `r = u·W` (u uniform in [0, 1) with 24 bits, W the root),
//!   it goes to the left child while `r < offset + left` (else adds `left` to the offset and
//!   goes right, never into an empty subtree), then walks the chosen lane's tokens in order,
//!   adding their weights to the offset, and takes the first where `r` falls below the running
//!   sum (the lane's last token of non-zero weight should rounding leave none).
//!
//! The draw's uniform comes from murmur3's finaliser chained over (seed, step, row), in
//! 32-bit integer arithmetic: `sample(logits, params, step)` for row `r` depends only on
//! `(params.seed, step, r)` and that row. Backends that flush subnormal floats (WGSL allows
//! it; llvmpipe does) can differ only for logits closer to each other than 10⁻³⁸.
//!
//! # Filtering (Hugging Face's order)
//!
//! Temperature first (a monotone map, so it changes weights, not ranks), then top-k, then
//! top-p on the renormalised weights of the top-k survivors:
//! - top-k keeps every token whose logit is at least the k-th largest (ties at the threshold
//!   are all kept, as `TopKLogitsWarper` does);
//! - top-p keeps every token whose logit `v` has `mass(logits > v) < top_p · mass(top-k)`:
//!   the tokens `TopPLogitsWarper` keeps, with ties at the threshold all kept. The top token
//!   always survives.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::hash::mix32;
use crate::ops::{Operands, operands};
use crate::tensor::{CpuStorage, try_collect, with_elems};
use crate::{DType, Element, Error, Result, Tensor};
use rayon::prelude::*;
use std::sync::OnceLock;

/// How [`sample`] picks a token from each row of logits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Logits are divided by it. 0 is greedy decoding (the [`argmax`]); it must be finite
    /// and not negative.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits (ties at the threshold too); 0 turns it off, and
    /// a value past the vocabulary keeps every token.
    pub top_k: usize,
    /// Nucleus: keep the smallest set of highest logits whose probability reaches `top_p`;
    /// in (0, 1], where 1 turns it off.
    pub top_p: f32,
    /// The draws' seed; with the step and the row it fixes each draw.
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Temperature 1, no top-k, no top-p, seed 0: a draw from the softmax.
    fn default() -> Self {
        SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 0 }
    }
}

/// Lanes of the canonical summation order (the GPU kernels' threads per row).
pub(crate) const LANES: usize = 256;

/// `t · 2²⁴` below which a weight is 0 (`t` < −126, a weight under 2⁻¹²⁶).
const WEIGHT_FLOOR: f32 = -126.0 * 16_777_216.0;

/// The order key of −∞; NaN's is 0.
const NEG_INF_KEY: u32 = 0x007f_ffff;

/// One row's plan, the same numbers on every backend: the kernels' scalar parameters.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan {
    /// Argmax only.
    pub(crate) greedy: bool,
    /// Tokens top-k keeps; 0 when top-k keeps them all.
    pub(crate) top_k: u32,
    /// The top-p mass; 1 when off.
    pub(crate) top_p: f32,
    /// log2(e) / T · 2²⁴, finite.
    pub(crate) scale24: f32,
    /// The draws' key for this (seed, step).
    pub(crate) key: u32,
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
crate::kernels::kernel_params! {
    /// A launch's scalars (`struct SampleParams` in `kernels/sampling.cu` and
    /// `shaders/sampling.wgsl`).
    pub(crate) struct SampleParams {
        rows: u32,
        vocab: u32,
        top_k: u32,
        greedy: u32,
        top_p: f32,
        scale24: f32,
        key: u32,
        groups_x: u32,
    }
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
impl SampleParams {
    /// The plan for `rows` rows of `vocab` tokens; `groups_x` is left for WGSL's 2-D grid.
    pub(crate) fn new(plan: &Plan, rows: usize, vocab: usize) -> Result<SampleParams> {
        let fits = |what: &str, v: usize| {
            u32::try_from(v).map_err(|_| Error::Unsupported(format!("sample: {what} = {v} exceeds 32-bit indexing")))
        };
        Ok(SampleParams {
            rows: fits("rows", rows)?,
            vocab: fits("vocab", vocab)?,
            top_k: plan.top_k,
            greedy: plan.greedy as u32,
            top_p: plan.top_p,
            scale24: plan.scale24,
            key: plan.key,
            groups_x: 1,
        })
    }
}

/// The id of the largest logit of each row: `logits` `[n, vocab]` f32, f16 or bf16 →
/// `[n]` U32, on the logits' device.
///
/// Ties go to the lowest index. NaN ranks below every other value (−∞ included), so a row
/// with a NaN still gives its largest number; a row of NaN alone gives 0. −0 equals +0.
///
/// Errors: `Err(DType)` for integer logits, `Err(Shape)` unless `logits` is 2-D,
/// `Err(InvalidArgument)` for rows with no token (vocab 0) and `Err(Unsupported)` for a
/// vocabulary past u32 ids. No rows give an empty `[0]`.
pub fn argmax(logits: &Tensor) -> Result<Tensor> {
    let plan = Plan { greedy: true, top_k: 0, top_p: 1.0, scale24: 0.0, key: 0 };
    run("argmax", logits, plan)
}

/// One token id per row of `logits` `[n, vocab]` (f32, f16 or bf16) → `[n]` U32, on the
/// logits' device: a draw from the softmax of `logits / temperature` restricted by top-k
/// and top-p, as described in the [module docs](self). `temperature` 0 is [`argmax`].
///
/// Row `r`'s draw depends only on `(params.seed, step, r)` and that row's logits, and is
/// the same on every backend: a generation loop passes its step (or any counter it never
/// repeats for a seed). NaN logits are never drawn; a row of NaN alone gives 0. −∞ logits
/// are never drawn unless the whole row is −∞, which is then uniform; +∞ logits share the
/// draw uniformly and leave the rest out.
///
/// Errors: those of [`argmax`], and `Err(InvalidArgument)` for a temperature that is
/// negative or not finite or a `top_p` outside (0, 1].
pub fn sample(logits: &Tensor, params: &SamplingParams, step: u64) -> Result<Tensor> {
    let SamplingParams { temperature, top_k, top_p, seed } = *params;
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(Error::InvalidArgument(format!(
            "sample: temperature must be finite and at least 0 (0 is greedy), got {temperature}"
        )));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(Error::InvalidArgument(format!("sample: top_p must be in (0, 1] (1 turns it off), got {top_p}")));
    }
    let vocab = logits.shape().get(1).copied().unwrap_or(0);
    let scale = (std::f64::consts::LOG2_E / temperature as f64 * 16_777_216.0).min(f32::MAX as f64) as f32;
    let plan = Plan {
        greedy: temperature == 0.0,
        top_k: if top_k == 0 || top_k >= vocab { 0 } else { top_k as u32 },
        top_p,
        scale24: scale,
        key: draw_key(seed, step),
    };
    run("sample", logits, plan)
}

/// Checks the logits and dispatches.
fn run(op: &str, logits: &Tensor, plan: Plan) -> Result<Tensor> {
    crate::ops::floats(op, &[logits])?;
    let operands = operands(op, [logits])?;
    let &[rows, vocab] = logits.shape() else {
        return Err(Error::Shape(format!("{op}: logits must be [n, vocab], got {:?}", logits.shape())));
    };
    if rows == 0 {
        return Tensor::empty(&[0], DType::U32, &logits.device());
    }
    if vocab == 0 {
        return Err(Error::InvalidArgument(format!("{op}: logits {:?} have no token to choose", logits.shape())));
    }
    if u32::try_from(vocab).is_err() {
        return Err(Error::Unsupported(format!("{op}: a vocabulary of {vocab} tokens exceeds u32 ids")));
    }
    match operands {
        Operands::Cpu([x]) => {
            let ids = with_elems!(x, x => cpu_rows(x, rows, vocab, &plan)?);
            Ok(Tensor::from_cpu_storage(CpuStorage::U32(ids), &[rows], DType::U32))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [buf]) => cuda::sample(dev, logits, buf, rows, vocab, &plan),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [buf]) => wgpu::sample(dev, logits, buf, rows, vocab, &plan),
    }
}

/// The draws' key for (seed, step): murmur3's finaliser chained over their 32-bit halves.
pub(crate) fn draw_key(seed: u64, step: u64) -> u32 {
    let s = mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ 0x5bd1_e995));
    mix32(s ^ mix32(step as u32 ^ mix32((step >> 32) as u32 ^ 0x27d4_eb2f)))
}

/// Row `row`'s uniform in [0, 1), 24 random bits (`kernels/sampling.cu` and the shader
/// compute the same).
pub(crate) fn uniform(key: u32, row: u32) -> f32 {
    let h = mix32(key ^ mix32(row.wrapping_mul(0x9e37_79b1) ^ 0x1656_67b1));
    (h >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The order key of a logit: larger value, larger key; −0 as +0; every NaN is 0, below −∞.
pub(crate) fn order_key(x: f32) -> u32 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return 0;
    }
    let b = if b == 0x8000_0000 { 0 } else { b };
    if b & 0x8000_0000 != 0 { !b } else { b | 0x8000_0000 }
}

/// `2^(d · 2^-(6j + 6))` for digit d < 64 of table j < 4, rounded to f32: the weights'
/// fractional powers of two, the same bits on every backend.
pub(crate) fn exp2_table() -> &'static [f32; 256] {
    static TABLE: OnceLock<[f32; 256]> = OnceLock::new();
    TABLE.get_or_init(|| {
        std::array::from_fn(|i| {
            let (j, d) = (i / 64, i % 64);
            (d as f64 * 2f64.powi(-(6 * j as i32 + 6))).exp2() as f32
        })
    })
}

/// The table as an f32 tensor on `device`, uploaded once per device.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn exp2_table_on(device: &crate::Device) -> Result<Tensor> {
    static ON_DEVICE: std::sync::Mutex<Vec<(crate::Device, Tensor)>> = std::sync::Mutex::new(Vec::new());
    let mut cached = ON_DEVICE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, t)) = cached.iter().find(|(d, _)| d == device) {
        return Ok(t.clone());
    }
    let t = Tensor::from_slice(exp2_table(), &[256], device)?;
    cached.push((*device, t.clone()));
    Ok(t)
}

/// The weight of logit `x` in a row whose largest is `max` (of key `max_key`): 1 for the
/// largest, `2^((x − max)·scale24 / 2²⁴)` from the table, 0 below 2⁻¹²⁶ and for −∞ and NaN.
#[inline]
pub(crate) fn weight(x: f32, key: u32, max: f32, max_key: u32, scale24: f32, table: &[f32; 256]) -> f32 {
    if key == max_key {
        return 1.0;
    }
    if key <= NEG_INF_KEY {
        return 0.0; // −∞ and NaN, by their keys: no backend's float compares are trusted with them
    }
    let tf = (x - max) * scale24;
    if tf.is_nan() || tf <= WEIGHT_FLOOR {
        return 0.0;
    }
    let i = tf as i32;
    let (n, q) = (i >> 24, (i & 0xff_ffff) as usize);
    let mant = table[q >> 18] * table[64 + ((q >> 12) & 63)] * table[128 + ((q >> 6) & 63)] * table[192 + (q & 63)];
    mant * f32::from_bits(((n + 127) as u32) << 23)
}

/// The canonical sum's 256 lane sums of `w(i)` over `0..vocab`.
fn lane_sums(vocab: usize, w: impl Fn(usize) -> f32) -> [f32; LANES] {
    let mut acc = [0f32; LANES];
    for start in (0..vocab).step_by(LANES) {
        for (j, a) in acc.iter_mut().enumerate().take(vocab - start) {
            *a += w(start + j);
        }
    }
    acc
}

/// The canonical tree over the lane sums: level of size s at `[512 − 2s, 512 − s)`, the
/// root at 510; node i of size s is children i and i + s of size 2s.
fn tree(lanes: &[f32; LANES]) -> [f32; 2 * LANES] {
    let mut t = [0f32; 2 * LANES];
    t[..LANES].copy_from_slice(lanes);
    let mut h = LANES / 2;
    while h > 0 {
        let (src, dst) = (2 * LANES - 4 * h, 2 * LANES - 2 * h);
        for j in 0..h {
            t[dst + j] = t[src + j] + t[src + j + h];
        }
        h /= 2;
    }
    t
}

/// The canonical sum of `w(i)` over `0..vocab`.
fn canonical_sum(vocab: usize, w: impl Fn(usize) -> f32) -> f32 {
    tree(&lane_sums(vocab, w))[2 * LANES - 2]
}

/// The token of the draw `r` in the canonical tree of weights `w`.
fn descend(t: &[f32; 2 * LANES], r: f32, vocab: usize, w: impl Fn(usize) -> f32) -> usize {
    let (mut lane, mut offset) = (0usize, 0f32);
    let mut s = 1;
    while s < LANES {
        let children = 2 * LANES - 4 * s;
        let (left, right) = (t[children + lane], t[children + lane + s]);
        let through_left = offset + left;
        if r >= through_left && right != 0.0 {
            offset = through_left;
            lane += s;
        }
        s *= 2;
    }
    let mut last = lane;
    for i in (lane..vocab).step_by(LANES) {
        let wi = w(i);
        if wi > 0.0 {
            offset += wi;
            last = i;
            if r < offset {
                return i;
            }
        }
    }
    last
}

fn cpu_rows<T: Element>(x: &[T], rows: usize, vocab: usize, plan: &Plan) -> Result<Vec<u32>> {
    try_collect((0..rows).into_par_iter().map(|r| {
        let row: Vec<f32> = x[r * vocab..(r + 1) * vocab].iter().map(|v| v.to_f32()).collect();
        cpu_row(&row, r as u32, plan) as u32
    }))
}

/// One row's token, as the kernels choose it.
pub(crate) fn cpu_row(x: &[f32], row: u32, plan: &Plan) -> usize {
    let vocab = x.len();
    let keys: Vec<u32> = x.iter().map(|&v| order_key(v)).collect();
    // Largest key, lowest index.
    let (mut best, mut best_key) = (0usize, keys[0]);
    for (i, &k) in keys.iter().enumerate().skip(1) {
        if k > best_key {
            (best, best_key) = (i, k);
        }
    }
    if plan.greedy || best_key == 0 {
        return best;
    }
    let max = x[best];
    let table = exp2_table();
    // top-k: the k-th largest key.
    let tau_k = if plan.top_k == 0 {
        0
    } else {
        let mut sorted = keys.clone();
        let k = plan.top_k as usize;
        *sorted.select_nth_unstable_by(k - 1, |a, b| b.cmp(a)).1
    };
    let w: Vec<f32> = x
        .iter()
        .zip(&keys)
        .map(|(&v, &k)| if k >= tau_k { weight(v, k, max, best_key, plan.scale24, table) } else { 0.0 })
        .collect();
    // top-p: the smallest key v ≥ τ_k of a token with mass(keys > v) < p · mass(top-k).
    let tau = if plan.top_p >= 1.0 {
        tau_k
    } else {
        let bound = plan.top_p * canonical_sum(vocab, |i| w[i]);
        let mut candidates: Vec<u32> = keys.iter().copied().filter(|&k| k >= tau_k).collect();
        candidates.sort_unstable();
        candidates.dedup();
        let kept = |v: u32| canonical_sum(vocab, |i| if keys[i] > v { w[i] } else { 0.0 }) < bound;
        // `kept` grows with v and holds for the largest key.
        let first = candidates.partition_point(|&v| !kept(v));
        candidates[first.min(candidates.len() - 1)]
    };
    let wk = |i: usize| if keys[i] >= tau { w[i] } else { 0.0 };
    let t = tree(&lane_sums(vocab, wk));
    let r = uniform(plan.key, row) * t[2 * LANES - 2];
    descend(&t, r, vocab, wk)
}
