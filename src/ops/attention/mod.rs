//! Attention forward: `o = softmax(q·kᵀ·scale + mask)·v`. No [seq, seq] score matrix is
//! ever stored: few query rows go key by key with an online softmax (running max and sum),
//! many in tiles of query rows whose scores live only while the tile is processed.
//!
//! Layout: q `[batch, q_len, heads, head_dim]`, k and v `[batch, kv_len, kv_heads, head_dim]`
//! (what the projections produce; no transpose), `heads` a multiple of `kv_heads`
//! (grouped-query and multi-query attention). Causal masking aligns the last query with the
//! last key: query i sees keys j ≤ i + kv_len − q_len. With per-sequence lengths, keys at or
//! past a sequence's length are masked and its query rows at or past it give zeros. A row
//! with no visible key gives zeros and a logsumexp of −∞, never NaN.
//!
//! Kernels: CPU here (rayon over rows, or over (sequence, kv head) tasks and their tiles
//! with the matmul kernel); CUDA `kernels/attention_fwd.cu` and WGSL
//! `shaders/attention_fwd.wgsl`, one query row per thread.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
mod decode;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

pub use decode::{DECODE_SPLIT, DecodeOptions, KvCache, attention_decode};

use crate::ops::{Operands, operands};
use crate::tensor::{CpuStorage, StorageElement, try_vec, try_zeros, with_elems};
use crate::{DType, Element, Error, Result, Tensor};
use rayon::prelude::*;

/// Keys per block of the CPU forward's online softmax.
const KEY_BLOCK: usize = 64;

/// Largest head dimension the kernels take.
pub const MAX_HEAD_DIM: usize = 256;

/// How attention masks and scales.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AttentionOptions {
    pub causal: bool,
    /// Defaults to 1/√head_dim.
    pub scale: Option<f32>,
    /// Valid length of each sequence of the batch (padding after it).
    pub seq_lens: Option<Vec<usize>>,
}

/// The forward pass's results.
#[derive(Debug, Clone)]
pub struct AttentionOutput {
    /// `[batch, q_len, heads, head_dim]` in q's dtype.
    pub o: Tensor,
    /// `[batch, heads, q_len]` f32: log Σ exp(scores) per row, kept for the backward pass.
    pub lse: Tensor,
}

/// Per-sequence lengths on the device as u32 (unbounded lengths saturate), for the kernels.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn lens_buffer(lens: &[usize], device: &crate::Device) -> Result<crate::tensor::RawBuffer> {
    let lens32: Vec<u32> = lens.iter().map(|&l| l.min(u32::MAX as usize) as u32).collect();
    crate::tensor::RawBuffer::new(bytemuck::cast_slice(&lens32).to_vec(), device)
}

/// The sizes of one attention call, shared by every backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AttnShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
    pub scale: f32,
    pub causal: bool,
}

impl AttnShape {
    /// The keys query row i of sequence b sees: `0..end` (empty when the row is padding).
    pub(crate) fn visible(&self, i: usize, len: usize) -> usize {
        if i >= len.min(self.q_len) {
            return 0;
        }
        let kv_valid = len.min(self.kv_len);
        if self.causal {
            // The last query aligns with the last key.
            let shift = self.kv_len as i64 - self.q_len as i64;
            ((i as i64 + shift + 1).max(0) as usize).min(kv_valid)
        } else {
            kv_valid
        }
    }
}

/// Checks the operands and returns the call's shape and per-sequence lengths.
fn validate(q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> Result<(AttnShape, Vec<usize>)> {
    crate::ops::same_device("attention", &[q, k, v])?;
    let (&[batch, q_len, heads, dim], &[kb, kv_len, kv_heads, kd]) = (q.shape(), k.shape()) else {
        return Err(Error::Shape(format!(
            "attention takes q [batch, q_len, heads, dim] and k, v [batch, kv_len, kv_heads, dim]; got {:?}, {:?}",
            q.shape(),
            k.shape()
        )));
    };
    if v.shape() != k.shape() || kb != batch || kd != dim || kv_heads == 0 || heads % kv_heads != 0 {
        return Err(Error::Shape(format!(
            "attention: q {:?}, k {:?}, v {:?} disagree (same batch and head dim, k = v, heads a multiple of kv_heads)",
            q.shape(),
            k.shape(),
            v.shape()
        )));
    }
    if dim == 0 || dim > MAX_HEAD_DIM {
        return Err(Error::Shape(format!("attention head dim {dim} is outside 1..={MAX_HEAD_DIM}")));
    }
    if q.dtype() != k.dtype() || q.dtype() != v.dtype() {
        return Err(Error::DType(format!(
            "attention: q {}, k {}, v {} must share a dtype",
            q.dtype(),
            k.dtype(),
            v.dtype()
        )));
    }
    let lens: Vec<usize> = match &options.seq_lens {
        None => try_vec(batch, usize::MAX)?,
        Some(l) if l.len() != batch => {
            return Err(Error::Shape(format!("{} sequence lengths for a batch of {batch}", l.len())));
        }
        Some(l) => {
            if let Some(bad) = l.iter().find(|&&n| n > q_len.max(kv_len)) {
                return Err(Error::Shape(format!(
                    "sequence length {bad} is past the tensors' {} positions",
                    q_len.max(kv_len)
                )));
            }
            l.clone()
        }
    };
    let scale = options.scale.unwrap_or(1.0 / (dim as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::InvalidArgument(format!("attention scale {scale} is not finite")));
    }
    Ok((AttnShape { batch, q_len, kv_len, heads, kv_heads, dim, scale, causal: options.causal }, lens))
}

/// Attention forward on q's device. Errors: `Shape` for ranks other than 4, mismatched
/// batch or head dims, heads not a multiple of kv_heads, a head dim over [`MAX_HEAD_DIM`],
/// a sequence-length vector of the wrong length or with lengths past the tensor; `DType` for
/// q, k, v of different dtypes; `DeviceMismatch`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> Result<AttentionOutput> {
    crate::ops::floats("attention", &[q, k, v])?;
    let (s, lens) = validate(q, k, v, options)?;
    if q.elem_count() == 0 || k.elem_count() == 0 {
        // No query row, or no key to see: zeros and a logsumexp of −∞ (or nothing at all).
        let lse = Tensor::full(&[s.batch, s.heads, s.q_len], f32::NEG_INFINITY, DType::F32, &q.device())?;
        return Ok(AttentionOutput { o: Tensor::zeros(q.shape(), q.dtype(), &q.device())?, lse });
    }
    match operands("attention", [q, k, v])? {
        Operands::Cpu([qs, ks, vs]) => cpu_forward(q, k, v, [qs, ks, vs], &s, &lens),
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, _) => cuda::forward(dev, q, k, v, &s, &lens),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, _) => wgpu::forward(dev, q, k, v, &s, &lens),
    }
}

/// Whether this CPU runs the AVX2+FMA builds of the row kernels.
#[cfg(target_arch = "x86_64")]
static AVX2_FMA: std::sync::LazyLock<bool> =
    std::sync::LazyLock::new(|| std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"));

/// One query row against its first `visible` keys (key j at `keys[j·stride..][..d]`, its
/// value likewise): the attention output row and its logsumexp (−∞ with no key).
///
/// Keys go in blocks: the block's scores first, then one rescale of the running sum per
/// block and one exp per key (a rescale and two exps per key otherwise).
#[inline(always)]
fn attend_row(q: &[f32], keys: &[f32], values: &[f32], stride: usize, visible: usize, scale: f32) -> (Vec<f32>, f32) {
    let d = q.len();
    let (mut m, mut l, mut acc) = (f32::NEG_INFINITY, 0f32, vec![0f32; d]);
    let mut scores = [0f32; KEY_BLOCK];
    for start in (0..visible).step_by(KEY_BLOCK) {
        let n = KEY_BLOCK.min(visible - start);
        let mut block_max = f32::NEG_INFINITY;
        for (j, score) in scores[..n].iter_mut().enumerate() {
            *score = crate::ops::dot(q, &keys[(start + j) * stride..][..d]) * scale;
            block_max = block_max.max(*score);
        }
        let m_new = m.max(block_max);
        let correction = (m - m_new).exp();
        l *= correction;
        acc.iter_mut().for_each(|a| *a *= correction);
        for (j, &score) in scores[..n].iter().enumerate() {
            let p = (score - m_new).exp();
            l += p;
            acc.iter_mut().zip(&values[(start + j) * stride..][..d]).for_each(|(a, &x)| *a += p * x);
        }
        m = m_new;
    }
    if l > 0.0 {
        acc.iter_mut().for_each(|a| *a /= l);
        (acc, m + l.ln())
    } else {
        (acc, f32::NEG_INFINITY)
    }
}

/// [`attend_row`] compiled for AVX2 and FMA: the dots and the running sums in 256-bit lanes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_row_avx2(
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    stride: usize,
    visible: usize,
    scale: f32,
) -> (Vec<f32>, f32) {
    attend_row(q, keys, values, stride, visible, scale)
}

/// Query rows from which the CPU forward works in tiles with the matmul kernel; fewer rows
/// (decoding, short appends) go one row at a time, where a tile would be mostly empty.
const TILED_FORWARD_MIN_ROWS: usize = 16;

fn cpu_forward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    [qs, ks, vs]: [&CpuStorage; 3],
    s: &AttnShape,
    lens: &[usize],
) -> Result<AttentionOutput> {
    if s.q_len < TILED_FORWARD_MIN_ROWS {
        return cpu_forward_rows(q, k, v, s, lens);
    }
    let differ = || Error::DType("attention: q, k and v differ in dtype".into());
    let (o, lse) = with_elems!(qs, qe => cpu_forward_tiled(
        qe,
        StorageElement::slice_of(ks).ok_or_else(differ)?,
        StorageElement::slice_of(vs).ok_or_else(differ)?,
        s,
        lens
    )?);
    Ok(AttentionOutput {
        o: Tensor::from_cpu_storage(CpuStorage::from_f32_vec(q.dtype(), o)?, q.shape(), q.dtype()),
        lse: Tensor::from_slice(&lse, &[s.batch, s.heads, s.q_len], &crate::Device::Cpu)?,
    })
}

/// The CPU forward one query row at a time with [`attend_row`], rayon over rows.
fn cpu_forward_rows(q: &Tensor, k: &Tensor, v: &Tensor, s: &AttnShape, lens: &[usize]) -> Result<AttentionOutput> {
    let (qv, kv, vv) = (q.to_vec_f32()?, k.to_vec_f32()?, v.to_vec_f32()?);
    let (d, group) = (s.dim, s.heads / s.kv_heads);
    let rows = s.batch * s.heads * s.q_len;
    // Row index r = (b·heads + h)·q_len + i, the layout of lse.
    let results: Vec<(Vec<f32>, f32)> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let (b, h, i) = (r / (s.heads * s.q_len), (r / s.q_len) % s.heads, r % s.q_len);
            let kh = h / group;
            let qrow = &qv[((b * s.q_len + i) * s.heads + h) * d..][..d];
            // Key j of this row's kv head starts at keys[j * stride].
            let first = (b * s.kv_len * s.kv_heads + kh) * d;
            let stride = s.kv_heads * d;
            let visible = s.visible(i, lens[b]);
            let (keys, values) = (&kv[first..], &vv[first..]);
            #[cfg(target_arch = "x86_64")]
            if *AVX2_FMA {
                // SAFETY: the CPU has AVX2 and FMA (checked once at run time).
                return unsafe { attend_row_avx2(qrow, keys, values, stride, visible, s.scale) };
            }
            attend_row(qrow, keys, values, stride, visible, s.scale)
        })
        .collect();
    let mut o = try_zeros::<f32>(rows * d)?;
    let mut lse = try_zeros::<f32>(rows)?;
    for (r, (row, l)) in results.into_iter().enumerate() {
        let (b, h, i) = (r / (s.heads * s.q_len), (r / s.q_len) % s.heads, r % s.q_len);
        o[((b * s.q_len + i) * s.heads + h) * d..][..d].copy_from_slice(&row);
        lse[r] = l;
    }
    Ok(AttentionOutput {
        o: Tensor::from_f32(&o, q.shape(), q.dtype(), &crate::Device::Cpu)?,
        lse: Tensor::from_slice(&lse, &[s.batch, s.heads, s.q_len], &crate::Device::Cpu)?,
    })
}

/// Scaled scores `[rows, keys]` (`row_visible[r]` keys visible to row r) into probabilities
/// in place, `p = exp(score − max) / Σ`, masked keys 0; writes each row's logsumexp
/// `max + ln Σ`, −∞ for a row with no visible key (its probabilities all 0).
#[inline(always)]
fn softmax_rows(scores: &mut [f32], keys: usize, row_visible: &[usize], lse: &mut [f32]) {
    use crate::ops::activation::exp;
    for ((row, &visible), row_lse) in scores.chunks_exact_mut(keys).zip(row_visible).zip(lse.iter_mut()) {
        let (seen, masked) = row.split_at_mut(visible);
        masked.fill(0.0);
        if visible == 0 {
            *row_lse = f32::NEG_INFINITY;
            continue;
        }
        // Max and sum in LANES independent partials, so the loops vectorise.
        let mut maxes = [f32::NEG_INFINITY; LANES];
        let mut chunks = seen.chunks_exact(LANES);
        for chunk in &mut chunks {
            maxes.iter_mut().zip(chunk).for_each(|(m, &x)| *m = if x > *m { x } else { *m });
        }
        let m = chunks.remainder().iter().chain(&maxes).fold(f32::NEG_INFINITY, |m, &x| m.max(x));
        let mut sums = [0f32; LANES];
        let mut chunks = seen.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            sums.iter_mut().zip(chunk).for_each(|(sum, x)| {
                *x = exp(*x - m);
                *sum += *x;
            });
        }
        let mut sum: f32 = sums.iter().sum();
        for x in chunks.into_remainder() {
            *x = exp(*x - m);
            sum += *x;
        }
        let inv = 1.0 / sum;
        seen.iter_mut().for_each(|x| *x *= inv);
        *row_lse = m + sum.ln();
    }
}

/// Independent partial maxima and sums per softmax row: two AVX2 vectors.
const LANES: usize = 16;

/// [`softmax_rows`] compiled for AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_rows_avx2(scores: &mut [f32], keys: usize, row_visible: &[usize], lse: &mut [f32]) {
    softmax_rows(scores, keys, row_visible, lse)
}

/// The CPU forward for many query rows, one task per (sequence, kv head) like
/// [`cpu_backward`]: the task gathers its keys and values once, then for each tile of query
/// positions (in parallel) stacks the rows of every query head of the group (they share
/// the keys, so the keys are packed once for all of them) and forms the scores `S = Q·Kᵀ`
/// with the dense matmul kernel (the scale applied to Q), the masked row softmax `P` with
/// its logsumexp, and `O = P·V`. A tile reads only the keys its last row sees.
/// Returns o (f32, q's layout) and the logsumexps.
fn cpu_forward_tiled<T: Element>(
    qv: &[T],
    kv: &[T],
    vv: &[T],
    s: &AttnShape,
    lens: &[usize],
) -> Result<(Vec<f32>, Vec<f32>)> {
    use crate::ops::matmul::{MatmulProblem, cpu_matmul_into};
    let (d, group) = (s.dim, s.heads / s.kv_heads);
    let q_at = |b: usize, i: usize, h: usize| ((b * s.q_len + i) * s.heads + h) * d;
    let kv_at = |b: usize, j: usize, kh: usize| ((b * s.kv_len + j) * s.kv_heads + kh) * d;
    let product = |m: usize, n: usize, k: usize, trans_b: bool, a: &[f32], b: &[f32], c: &mut [f32]| {
        cpu_matmul_into(&MatmulProblem::unbatched(m, n, k, trans_b, DType::F32), a, b, c, false);
    };

    // Per task, tile after tile, the tile's rows head after head: output rows [_, d] and
    // their logsumexps (rows past the sequence's length are not stored).
    type TaskOut = (Vec<f32>, Vec<f32>);
    let tasks: Vec<Result<TaskOut>> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|task| -> Result<TaskOut> {
            let (b, kh) = (task / s.kv_heads, task % s.kv_heads);
            let q_rows = lens[b].min(s.q_len);
            let row_visible: Vec<usize> = (0..q_rows).map(|i| s.visible(i, lens[b])).collect();
            let n_keys = row_visible.iter().copied().max().unwrap_or(0);
            let gather = |src: &[T]| -> Result<Vec<f32>> {
                let mut out = try_zeros::<f32>(n_keys * d)?;
                for (j, row) in out.chunks_exact_mut(d).enumerate() {
                    T::slice_to_f32(&src[kv_at(b, j, kh)..][..d], row);
                }
                Ok(out)
            };
            let (keys, values) = (gather(kv)?, gather(vv)?);
            let mut o = try_zeros::<f32>(group * q_rows * d)?;
            let mut lse = try_vec(group * q_rows, f32::NEG_INFINITY)?;
            o.par_chunks_mut(group * QUERY_TILE * d)
                .zip(lse.par_chunks_mut(group * QUERY_TILE))
                .enumerate()
                .try_for_each(|(tile, (o_tile, lse_tile))| -> Result<()> {
                    let (i0, rows) = (tile * QUERY_TILE, lse_tile.len() / group);
                    let visible = &row_visible[i0..i0 + rows];
                    let keys_seen = visible.iter().copied().max().unwrap_or(0);
                    if keys_seen == 0 {
                        return Ok(());
                    }
                    // The scale goes on q: rows·d products instead of rows·keys.
                    let mut q_tile = try_zeros::<f32>(group * rows * d)?;
                    let mut tile_visible = try_zeros::<usize>(group * rows)?;
                    for (g, (q_head, visible_head)) in
                        q_tile.chunks_exact_mut(rows * d).zip(tile_visible.chunks_exact_mut(rows)).enumerate()
                    {
                        for (r, row) in q_head.chunks_exact_mut(d).enumerate() {
                            T::slice_to_f32(&qv[q_at(b, i0 + r, kh * group + g)..][..d], row);
                            row.iter_mut().for_each(|x| *x *= s.scale);
                        }
                        visible_head.copy_from_slice(visible);
                    }
                    let m = group * rows;
                    let mut p = try_zeros::<f32>(m * keys_seen)?;
                    product(m, keys_seen, d, true, &q_tile, &keys[..keys_seen * d], &mut p);
                    #[cfg(target_arch = "x86_64")]
                    if *AVX2_FMA {
                        // SAFETY: the CPU has AVX2 and FMA (checked once at run time).
                        unsafe { softmax_rows_avx2(&mut p, keys_seen, &tile_visible, lse_tile) };
                    } else {
                        softmax_rows(&mut p, keys_seen, &tile_visible, lse_tile);
                    }
                    #[cfg(not(target_arch = "x86_64"))]
                    softmax_rows(&mut p, keys_seen, &tile_visible, lse_tile);
                    product(m, d, keys_seen, false, &p, &values[..keys_seen * d], o_tile);
                    Ok(())
                })?;
            Ok((o, lse))
        })
        .collect();
    let tasks = tasks.into_iter().collect::<Result<Vec<_>>>()?;
    // Where head g's row i sits in its task's tile-major buffers (None past the length).
    let task_row = |b: usize, i: usize, g: usize| -> Option<usize> {
        let q_rows = lens[b].min(s.q_len);
        (i < q_rows).then(|| {
            let (tile, r) = (i / QUERY_TILE, i % QUERY_TILE);
            let rows = QUERY_TILE.min(q_rows - tile * QUERY_TILE);
            group * tile * QUERY_TILE + g * rows + r
        })
    };
    let mut o = try_zeros::<f32>(qv.len())?;
    let mut lse = try_vec(s.batch * s.heads * s.q_len, f32::NEG_INFINITY)?;
    // One (sequence, position) row of o holds every head.
    o.par_chunks_mut(s.heads * d).enumerate().for_each(|(row, out)| {
        let (b, i) = (row / s.q_len, row % s.q_len);
        for (h, out_head) in out.chunks_exact_mut(d).enumerate() {
            if let Some(at) = task_row(b, i, h % group) {
                out_head.copy_from_slice(&tasks[b * s.kv_heads + h / group].0[at * d..][..d]);
            }
        }
    });
    for (row, out) in lse.chunks_exact_mut(s.q_len).enumerate() {
        let (b, h) = (row / s.heads, row % s.heads);
        for (i, x) in out.iter_mut().enumerate() {
            if let Some(at) = task_row(b, i, h % group) {
                *x = tasks[b * s.kv_heads + h / group].1[at];
            }
        }
    }
    Ok((o, lse))
}

/// The backward pass's results, f32, shaped like q, k and v.
#[derive(Debug, Clone)]
pub struct AttentionGrads {
    pub dq: Tensor,
    pub dk: Tensor,
    pub dv: Tensor,
}

/// Attention backward in the FlashAttention-2 scheme: the scores are recomputed from q, k
/// and the saved logsumexp, never stored; `D = rowsum(dO ⊙ O)`, then per visible pair
/// `p = exp(s − lse)`, `dV += p·dO`, `dS = p·(dO·V − D)`, `dQ += scale·dS·K`,
/// `dK += scale·dS·Q`. Grouped-query gradients are summed into the shared k/v heads.
/// `options` must be the forward's. Errors as [`attention`], plus `Shape` when `d_o` or the
/// forward's outputs do not fit.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    forward: &AttentionOutput,
    d_o: &Tensor,
    options: &AttentionOptions,
) -> Result<AttentionGrads> {
    crate::ops::floats("attention_backward", &[q, k, v, &forward.o, d_o])?;
    crate::ops::same_device("attention_backward", &[q, k, v, &forward.o, &forward.lse, d_o])?;
    let (s, lens) = validate(q, k, v, options)?;
    if forward.lse.dtype() != DType::F32 {
        return Err(Error::DType(format!(
            "attention_backward: lse is {}; it must be the forward's f32 logsumexp",
            forward.lse.dtype()
        )));
    }
    if d_o.shape() != q.shape() || forward.o.shape() != q.shape() || forward.lse.shape() != [s.batch, s.heads, s.q_len]
    {
        return Err(Error::Shape(format!(
            "attention_backward: dO {:?}, O {:?}, lse {:?} must be {:?}, {:?}, [{}, {}, {}]",
            d_o.shape(),
            forward.o.shape(),
            forward.lse.shape(),
            q.shape(),
            q.shape(),
            s.batch,
            s.heads,
            s.q_len
        )));
    }
    if q.elem_count() == 0 || k.elem_count() == 0 {
        let zeros = |t: &Tensor| Tensor::zeros(t.shape(), DType::F32, &t.device());
        return Ok(AttentionGrads { dq: zeros(q)?, dk: zeros(k)?, dv: zeros(v)? });
    }
    // D = rowsum(dO ⊙ O), [batch, q_len, heads], with the elementwise kernels.
    let f32_of = |t: &Tensor| t.to_dtype(DType::F32);
    let d = crate::ops::sum_rows(&crate::ops::mul(&f32_of(d_o)?, &f32_of(&forward.o)?)?)?;
    let inputs = BackwardInputs { q, k, v, d_o, lse: &forward.lse, delta: &d };
    match operands("attention_backward", [q, &d])? {
        Operands::Cpu(_) => cpu_backward(&inputs, &s, &lens),
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, _) => cuda::backward(dev, &inputs, &s, &lens),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, _) => wgpu::backward(dev, &inputs, &s, &lens),
    }
}

/// What every backend's backward reads: the forward's inputs, dO, the saved logsumexp and
/// D = rowsum(dO ⊙ O) (f32, `[batch, q_len, heads]`).
pub(crate) struct BackwardInputs<'a> {
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub d_o: &'a Tensor,
    pub lse: &'a Tensor,
    pub delta: &'a Tensor,
}

/// Query rows per tile of the CPU forward and backward: the tile's scores
/// `[QUERY_TILE, keys]` are formed with the matmul kernel and live only while the tile is
/// processed.
const QUERY_TILE: usize = 64;

/// The CPU backward, one task per (sequence, kv head): the task gathers its keys and values
/// once, then for each query head of the group and each tile of query rows forms the tile's
/// scores `S = Q·Kᵀ` with the dense matmul kernel, `P = exp(S·scale − lse)` (masked),
/// `dP = dO·Vᵀ`, `dS = P ⊙ (dP − D)`, and the products `dQ = scale·dS·K`,
/// `dK += scale·dSᵀ·Q`, `dV += Pᵀ·dO`. A tile reads only the keys its last row sees.
fn cpu_backward(inputs: &BackwardInputs<'_>, s: &AttnShape, lens: &[usize]) -> Result<AttentionGrads> {
    use crate::ops::matmul::{MatmulProblem, cpu_matmul_into};
    let BackwardInputs { q, k, v, d_o, lse, delta } = *inputs;
    let (qv, kv, vv, dov) = (q.to_vec_f32()?, k.to_vec_f32()?, v.to_vec_f32()?, d_o.to_vec_f32()?);
    let (lse, dd) = (lse.to_vec::<f32>()?, delta.to_vec::<f32>()?);
    let (d, group) = (s.dim, s.heads / s.kv_heads);
    let q_at = |b: usize, i: usize, h: usize| ((b * s.q_len + i) * s.heads + h) * d;
    let kv_at = |b: usize, j: usize, kh: usize| ((b * s.kv_len + j) * s.kv_heads + kh) * d;
    // [m, k]·[k, n] (or with either side stored transposed) into `c`, f32.
    let product =
        |m: usize, n: usize, k: usize, trans_a: bool, trans_b: bool, a: &[f32], b: &[f32], c: &mut [f32], acc: bool| {
            let p = MatmulProblem { trans_a, ..MatmulProblem::unbatched(m, n, k, trans_b, DType::F32) };
            cpu_matmul_into(&p, a, b, c, acc);
        };

    // Per task: (dq rows of each head of the group, dk, dv), each [rows, d].
    type TaskGrads = (Vec<Vec<f32>>, Vec<f32>, Vec<f32>);
    let tasks: Vec<Result<TaskGrads>> = (0..s.batch * s.kv_heads)
        .into_par_iter()
        .map(|task| -> Result<TaskGrads> {
            let (b, kh) = (task / s.kv_heads, task % s.kv_heads);
            let q_rows = lens[b].min(s.q_len);
            let n_keys = (0..q_rows).map(|i| s.visible(i, lens[b])).max().unwrap_or(0);
            let gather = |src: &[f32], rows: usize, at: &dyn Fn(usize) -> usize| -> Result<Vec<f32>> {
                let mut out = try_zeros::<f32>(rows * d)?;
                for (r, row) in out.chunks_exact_mut(d).enumerate() {
                    row.copy_from_slice(&src[at(r)..at(r) + d]);
                }
                Ok(out)
            };
            let keys = gather(&kv, n_keys, &|j| kv_at(b, j, kh))?;
            let values = gather(&vv, n_keys, &|j| kv_at(b, j, kh))?;
            let mut dk = try_zeros::<f32>(n_keys * d)?;
            let mut dv = try_zeros::<f32>(n_keys * d)?;
            let mut dq_heads = Vec::with_capacity(group);
            for h in kh * group..(kh + 1) * group {
                let qh = gather(&qv, q_rows, &|i| q_at(b, i, h))?;
                let doh = gather(&dov, q_rows, &|i| q_at(b, i, h))?;
                let mut dq = try_zeros::<f32>(q_rows * d)?;
                for i0 in (0..q_rows).step_by(QUERY_TILE) {
                    let rows = QUERY_TILE.min(q_rows - i0);
                    let keys_seen = (i0..i0 + rows).map(|i| s.visible(i, lens[b])).max().unwrap_or(0);
                    if keys_seen == 0 {
                        continue;
                    }
                    let (q_tile, do_tile) = (&qh[i0 * d..(i0 + rows) * d], &doh[i0 * d..(i0 + rows) * d]);
                    let mut p = try_zeros::<f32>(rows * keys_seen)?;
                    let mut dp = try_zeros::<f32>(rows * keys_seen)?;
                    product(rows, keys_seen, d, false, true, q_tile, &keys, &mut p, false);
                    product(rows, keys_seen, d, false, true, do_tile, &values, &mut dp, false);
                    for (r, (p_row, dp_row)) in
                        p.chunks_exact_mut(keys_seen).zip(dp.chunks_exact_mut(keys_seen)).enumerate()
                    {
                        let i = i0 + r;
                        let (row_lse, row_d) =
                            (lse[(b * s.heads + h) * s.q_len + i], dd[(b * s.q_len + i) * s.heads + h]);
                        let visible = s.visible(i, lens[b]);
                        for (j, (pj, dpj)) in p_row.iter_mut().zip(dp_row.iter_mut()).enumerate() {
                            // p = exp(score − lse); dS = p·(dP − D), stored in dp.
                            let prob = if j < visible { (*pj * s.scale - row_lse).exp() } else { 0.0 };
                            *pj = prob;
                            *dpj = prob * (*dpj - row_d);
                        }
                    }
                    let ds = &mut dp;
                    ds.iter_mut().for_each(|x| *x *= s.scale);
                    product(rows, d, keys_seen, false, false, ds, &keys, &mut dq[i0 * d..(i0 + rows) * d], false);
                    product(keys_seen, d, rows, true, false, ds, q_tile, &mut dk[..keys_seen * d], true);
                    product(keys_seen, d, rows, true, false, &p, do_tile, &mut dv[..keys_seen * d], true);
                }
                dq_heads.push(dq);
            }
            Ok((dq_heads, dk, dv))
        })
        .collect();
    let mut dq = try_zeros::<f32>(qv.len())?;
    let mut dk = try_zeros::<f32>(kv.len())?;
    let mut dv = try_zeros::<f32>(vv.len())?;
    for (task, grads) in tasks.into_iter().enumerate() {
        let (dq_heads, dk_task, dv_task) = grads?;
        let (b, kh) = (task / s.kv_heads, task % s.kv_heads);
        for (g, dq_head) in dq_heads.iter().enumerate() {
            for (i, row) in dq_head.chunks_exact(d).enumerate() {
                let at = q_at(b, i, kh * group + g);
                dq[at..at + d].copy_from_slice(row);
            }
        }
        for (j, (k_row, v_row)) in dk_task.chunks_exact(d).zip(dv_task.chunks_exact(d)).enumerate() {
            let at = kv_at(b, j, kh);
            dk[at..at + d].copy_from_slice(k_row);
            dv[at..at + d].copy_from_slice(v_row);
        }
    }
    let cpu = crate::Device::Cpu;
    Ok(AttentionGrads {
        dq: Tensor::from_slice(&dq, q.shape(), &cpu)?,
        dk: Tensor::from_slice(&dk, k.shape(), &cpu)?,
        dv: Tensor::from_slice(&dv, v.shape(), &cpu)?,
    })
}
