//! Attention forward: `o = softmax(q·kᵀ·scale + mask)·v`, computed key by key with an
//! online softmax (running max and sum), so no [seq, seq] score matrix is ever stored.
//!
//! Layout: q `[batch, q_len, heads, head_dim]`, k and v `[batch, kv_len, kv_heads, head_dim]`
//! (what the projections produce; no transpose), `heads` a multiple of `kv_heads`
//! (grouped-query and multi-query attention). Causal masking aligns the last query with the
//! last key: query i sees keys j ≤ i + kv_len − q_len. With per-sequence lengths, keys at or
//! past a sequence's length are masked and its query rows at or past it give zeros. A row
//! with no visible key gives zeros and a logsumexp of −∞, never NaN.
//!
//! Kernels: CPU here (rayon over rows); CUDA `kernels/attention.cu` and WGSL
//! `shaders/attention_fwd.wgsl`, one query row per thread.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::tensor::Storage;
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

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
        None => vec![usize::MAX; batch],
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
    let (s, lens) = validate(q, k, v, options)?;
    match q.storage() {
        Storage::Cpu(_) => cpu_forward(q, k, v, &s, &lens),
        #[cfg(feature = "cuda")]
        Storage::Cuda { .. } => cuda::forward(q, k, v, &s, &lens),
        #[cfg(feature = "wgpu")]
        Storage::Wgpu { .. } => wgpu::forward(q, k, v, &s, &lens),
    }
}

fn cpu_forward(q: &Tensor, k: &Tensor, v: &Tensor, s: &AttnShape, lens: &[usize]) -> Result<AttentionOutput> {
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
            let (mut m, mut l, mut acc) = (f32::NEG_INFINITY, 0f32, vec![0f32; d]);
            for j in 0..s.visible(i, lens[b]) {
                let base = ((b * s.kv_len + j) * s.kv_heads + kh) * d;
                let score = crate::ops::dot(qrow, &kv[base..base + d]) * s.scale;
                let m_new = m.max(score);
                let correction = (m - m_new).exp();
                let p = (score - m_new).exp();
                l = l * correction + p;
                for (a, &x) in acc.iter_mut().zip(&vv[base..base + d]) {
                    *a = *a * correction + p * x;
                }
                m = m_new;
            }
            if l > 0.0 {
                acc.iter_mut().for_each(|a| *a /= l);
                (acc, m + l.ln())
            } else {
                (acc, f32::NEG_INFINITY)
            }
        })
        .collect();
    let mut o = vec![0f32; rows * d];
    let mut lse = vec![0f32; rows];
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
    crate::ops::same_device("attention_backward", &[q, k, v, &forward.o, &forward.lse, d_o])?;
    let (s, lens) = validate(q, k, v, options)?;
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
    // D = rowsum(dO ⊙ O), [batch, q_len, heads], with the elementwise kernels.
    let f32_of = |t: &Tensor| t.to_dtype(crate::DType::F32);
    let d = crate::ops::sum_rows(&crate::ops::mul(&f32_of(d_o)?, &f32_of(&forward.o)?)?)?;
    let inputs = BackwardInputs { q, k, v, d_o, lse: &forward.lse, dvec: &d };
    match q.storage() {
        Storage::Cpu(_) => cpu_backward(&inputs, &s, &lens),
        #[cfg(feature = "cuda")]
        Storage::Cuda { .. } => cuda::backward(&inputs, &s, &lens),
        #[cfg(feature = "wgpu")]
        Storage::Wgpu { .. } => wgpu::backward(&inputs, &s, &lens),
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
    pub dvec: &'a Tensor,
}

fn cpu_backward(inputs: &BackwardInputs<'_>, s: &AttnShape, lens: &[usize]) -> Result<AttentionGrads> {
    let BackwardInputs { q, k, v, d_o, lse, dvec } = *inputs;
    let (qv, kv, vv, dov) = (q.to_vec_f32()?, k.to_vec_f32()?, v.to_vec_f32()?, d_o.to_vec_f32()?);
    let (lse, dd) = (lse.to_vec::<f32>()?, dvec.to_vec::<f32>()?);
    let (d, group) = (s.dim, s.heads / s.kv_heads);
    let q_at = |b: usize, i: usize, h: usize| ((b * s.q_len + i) * s.heads + h) * d;
    let kv_at = |b: usize, j: usize, kh: usize| ((b * s.kv_len + j) * s.kv_heads + kh) * d;
    // p and dS of one (query row, key) pair.
    let pair = |b: usize, h: usize, i: usize, j: usize| -> (f32, f32) {
        let (qb, kb) = (q_at(b, i, h), kv_at(b, j, h / group));
        let score = crate::ops::dot(&qv[qb..qb + d], &kv[kb..kb + d]) * s.scale;
        let p = (score - lse[(b * s.heads + h) * s.q_len + i]).exp();
        let dp = crate::ops::dot(&dov[qb..qb + d], &vv[kb..kb + d]);
        (p, p * (dp - dd[(b * s.q_len + i) * s.heads + h]))
    };
    let mut dq = vec![0f32; qv.len()];
    dq.par_chunks_mut(d).enumerate().for_each(|(row, out)| {
        let (b, i, h) = (row / (s.q_len * s.heads), (row / s.heads) % s.q_len, row % s.heads);
        for j in 0..s.visible(i, lens[b]) {
            let (_, ds) = pair(b, h, i, j);
            let kb = kv_at(b, j, h / group);
            for (o, &x) in out.iter_mut().zip(&kv[kb..kb + d]) {
                *o += s.scale * ds * x;
            }
        }
    });
    let mut dk = vec![0f32; kv.len()];
    let mut dv = vec![0f32; vv.len()];
    dk.par_chunks_mut(d).zip(dv.par_chunks_mut(d)).enumerate().for_each(|(row, (dk_row, dv_row))| {
        let (b, j, kh) = (row / (s.kv_len * s.kv_heads), (row / s.kv_heads) % s.kv_len, row % s.kv_heads);
        for h in kh * group..(kh + 1) * group {
            for i in 0..s.q_len {
                if j >= s.visible(i, lens[b]) {
                    continue;
                }
                let (p, ds) = pair(b, h, i, j);
                let qb = q_at(b, i, h);
                for c in 0..d {
                    dv_row[c] += p * dov[qb + c];
                    dk_row[c] += s.scale * ds * qv[qb + c];
                }
            }
        }
    });
    let cpu = crate::Device::Cpu;
    Ok(AttentionGrads {
        dq: Tensor::from_slice(&dq, q.shape(), &cpu)?,
        dk: Tensor::from_slice(&dk, k.shape(), &cpu)?,
        dv: Tensor::from_slice(&dv, v.shape(), &cpu)?,
    })
}

// ---------------------------------------------------------------------------------------
// Decoding against a KV cache

/// Keys per split of the cache in [`attention_decode`] (flash-decoding): each split of each
/// sequence and kv head is its own piece of work, so one long sequence fills the device (an
/// 8192-token cache with 8 kv heads is 1024 of them). It also keeps one WGSL invocation,
/// which walks a split, under llvmpipe's cut-off of about 65 000 loop iterations (a split
/// takes split × (2·head_dim + 1)).
pub const DECODE_SPLIT: usize = 64;

/// A key/value cache for a batch of sequences of different lengths: k and v are
/// `[batch, capacity, kv_heads, head_dim]`, and sequence b holds its first `lens()[b]` rows.
/// Appending writes the new rows in place after the old ones; nothing already cached is
/// copied (unless the storage is shared with another tensor, which keeps its values).
#[derive(Debug, Clone)]
pub struct KvCache {
    k: Tensor,
    v: Tensor,
    lens: Vec<usize>,
}

impl KvCache {
    /// An empty cache of `capacity` positions per sequence, zero-filled.
    pub fn new(
        batch: usize,
        capacity: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: crate::DType,
        device: &crate::Device,
    ) -> Result<KvCache> {
        if batch == 0 || capacity == 0 || kv_heads == 0 || head_dim == 0 || head_dim > MAX_HEAD_DIM {
            return Err(Error::Shape(format!(
                "KV cache [batch {batch}, capacity {capacity}, kv_heads {kv_heads}, head_dim {head_dim}]: \
                 every size must be at least 1 and head_dim at most {MAX_HEAD_DIM}"
            )));
        }
        let shape = [batch, capacity, kv_heads, head_dim];
        Ok(KvCache {
            k: Tensor::zeros(&shape, dtype, device)?,
            v: Tensor::zeros(&shape, dtype, device)?,
            lens: vec![0; batch],
        })
    }

    /// Appends `counts[b]` new rows to sequence b (all `n` rows when `counts` is `None`),
    /// from k_new and v_new `[batch, n, kv_heads, head_dim]`. `Err`, with nothing written,
    /// when shapes, dtypes or devices do not fit or a sequence would pass the capacity (and
    /// on WebGPU, for f16/bf16 rows of an odd number of elements).
    pub fn append(&mut self, k_new: &Tensor, v_new: &Tensor, counts: Option<&[usize]>) -> Result<()> {
        crate::ops::same_device("KV cache append", &[&self.k, k_new, v_new])?;
        let [batch, capacity, kv_heads, dim] = self.shape();
        let n = k_new.shape().get(1).copied().unwrap_or(0);
        if k_new.shape() != [batch, n, kv_heads, dim] || v_new.shape() != k_new.shape() {
            return Err(Error::Shape(format!(
                "KV cache append: k {:?} and v {:?} must both be [{batch}, n, {kv_heads}, {dim}]",
                k_new.shape(),
                v_new.shape()
            )));
        }
        if k_new.dtype() != self.k.dtype() || v_new.dtype() != self.k.dtype() {
            return Err(Error::DType(format!(
                "KV cache of {} given k {} and v {}",
                self.k.dtype(),
                k_new.dtype(),
                v_new.dtype()
            )));
        }
        let counts: Vec<usize> = match counts {
            Some(c) if c.len() != batch => {
                return Err(Error::Shape(format!("{} append counts for a batch of {batch}", c.len())));
            }
            Some(c) => c.to_vec(),
            None => vec![n; batch],
        };
        for (b, (&len, &count)) in self.lens.iter().zip(&counts).enumerate() {
            if count > n || len + count > capacity {
                return Err(Error::Shape(format!(
                    "KV cache append: sequence {b} holds {len} of {capacity} positions and cannot take {count} \
                     more (of {n} given)"
                )));
            }
        }
        let row = kv_heads * dim;
        #[cfg(feature = "wgpu")]
        if matches!(self.k.device(), crate::Device::Wgpu(_))
            && !(row * self.k.dtype().size_in_bytes()).is_multiple_of(4)
        {
            return Err(Error::Unsupported(format!(
                "a WebGPU KV cache copies whole 4-byte words: kv_heads × head_dim = {row} must be even for {}",
                self.k.dtype()
            )));
        }
        for (b, &count) in counts.iter().enumerate() {
            let (dst, src) = ((b * capacity + self.lens[b]) * row, b * n * row);
            self.k.write_region(dst, k_new, src, count * row)?;
            self.v.write_region(dst, v_new, src, count * row)?;
        }
        self.lens.iter_mut().zip(&counts).for_each(|(l, c)| *l += c);
        Ok(())
    }

    /// Drops the rows of sequence b past `len` (rolling back tokens, or reusing the slot
    /// with `len` 0). `Err` when b is out of range or `len` is past its length.
    pub fn truncate(&mut self, b: usize, len: usize) -> Result<()> {
        match self.lens.get_mut(b) {
            Some(l) if len <= *l => {
                *l = len;
                Ok(())
            }
            Some(l) => Err(Error::InvalidArgument(format!("sequence {b} holds {l} rows, cannot truncate to {len}"))),
            None => Err(Error::InvalidArgument(format!("sequence {b} of a batch of {}", self.lens.len()))),
        }
    }

    /// `[batch, capacity, kv_heads, head_dim]`.
    pub fn shape(&self) -> [usize; 4] {
        let s = self.k.shape();
        [s[0], s[1], s[2], s[3]]
    }

    /// Rows held per sequence.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    pub fn k(&self) -> &Tensor {
        &self.k
    }

    pub fn v(&self) -> &Tensor {
        &self.v
    }
}

/// How [`attention_decode`] scales and which query rows are real.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DecodeOptions {
    /// Defaults to 1/√head_dim.
    pub scale: Option<f32>,
    /// Valid query rows per sequence (rows after them are padding and give zeros); all
    /// `q_len` when `None`.
    pub q_lens: Option<Vec<usize>>,
}

/// The sizes of one decode call, shared by every backend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DecodeShape {
    pub batch: usize,
    pub q_len: usize,
    pub capacity: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
    pub scale: f32,
    /// Keys per split, and the splits covering the longest sequence.
    pub split: usize,
    pub splits: usize,
}

/// Keys query row i of a sequence with `len` cached rows and `q_valid` real query rows sees:
/// the new rows are the cache's last `q_valid`, so row i sits at position len − q_valid + i
/// and sees keys 0..=that position (causal); a padding row sees none.
pub(crate) fn decode_visible(i: usize, len: usize, q_valid: usize) -> usize {
    if i >= q_valid { 0 } else { len - q_valid + i + 1 }
}

/// Attention of the new query rows against a KV cache (decoding; also chunked prefill):
/// q `[batch, q_len, heads, head_dim]` holds each sequence's newest `q_lens[b]` tokens,
/// whose keys and values are already appended to `cache`. Causal: each row sees the cache
/// up to its own position. Split along the cache (flash-decoding): partial softmax results
/// over [`DECODE_SPLIT`] keys (4× that on the CPU) are computed independently, then merged
/// with their logsumexps. Returns o like q (q's dtype) and lse `[batch, heads, q_len]` (−∞
/// and zeros for padding rows).
///
/// Errors: `Shape` when q does not fit the cache (batch, head dim, heads a multiple of
/// kv_heads), when `q_lens` has the wrong length or a sequence has fewer cached rows than
/// query rows; `DType`; `DeviceMismatch`.
pub fn attention_decode(q: &Tensor, cache: &KvCache, options: &DecodeOptions) -> Result<AttentionOutput> {
    crate::ops::same_device("attention_decode", &[q, &cache.k])?;
    let [batch, capacity, kv_heads, dim] = cache.shape();
    let &[qb, q_len, heads, qd] = q.shape() else {
        return Err(Error::Shape(format!("attention_decode takes q [batch, q_len, heads, dim], got {:?}", q.shape())));
    };
    if qb != batch || qd != dim || heads % kv_heads != 0 {
        return Err(Error::Shape(format!(
            "attention_decode: q {:?} does not fit the cache [{batch}, {capacity}, {kv_heads}, {dim}] \
             (same batch and head dim, heads a multiple of kv_heads)",
            q.shape()
        )));
    }
    if q.dtype() != cache.k.dtype() {
        return Err(Error::DType(format!("attention_decode: q is {} and the cache {}", q.dtype(), cache.k.dtype())));
    }
    let q_lens: Vec<usize> = match &options.q_lens {
        None => vec![q_len; batch],
        Some(l) if l.len() != batch => {
            return Err(Error::Shape(format!("{} query lengths for a batch of {batch}", l.len())));
        }
        Some(l) => l.clone(),
    };
    for (b, (&ql, &len)) in q_lens.iter().zip(&cache.lens).enumerate() {
        if ql > q_len || ql > len {
            return Err(Error::Shape(format!(
                "sequence {b}: {ql} query rows, but q has {q_len} and the cache holds {len} rows \
                 (append the new keys and values before decoding)"
            )));
        }
    }
    let scale = options.scale.unwrap_or(1.0 / (dim as f32).sqrt());
    if !scale.is_finite() {
        return Err(Error::InvalidArgument(format!("attention scale {scale} is not finite")));
    }
    let longest = cache.lens.iter().copied().max().unwrap_or(0);
    // The CPU has few threads to fill and pays per split for its partials: longer splits.
    let split = if q.device().is_cpu() { 4 * DECODE_SPLIT } else { DECODE_SPLIT };
    let splits = longest.div_ceil(split).max(1);
    let s = DecodeShape { batch, q_len, capacity, heads, kv_heads, dim, scale, split, splits };
    let lens = &cache.lens;
    match q.storage() {
        Storage::Cpu(_) => cpu_decode(q, cache, &s, lens, &q_lens),
        #[cfg(feature = "cuda")]
        Storage::Cuda { .. } => cuda::decode(q, cache, &s, lens, &q_lens),
        #[cfg(feature = "wgpu")]
        Storage::Wgpu { .. } => wgpu::decode(q, cache, &s, lens, &q_lens),
    }
}

/// One split's partial result of one query row: running max, running sum, Σ p·v.
struct Partial {
    m: f32,
    l: f32,
    acc: Vec<f32>,
}

fn cpu_decode(
    q: &Tensor,
    cache: &KvCache,
    s: &DecodeShape,
    lens: &[usize],
    q_lens: &[usize],
) -> Result<AttentionOutput> {
    use crate::tensor::CpuStorage;
    #[allow(irrefutable_let_patterns)] // only the CPU backend is built without features
    let (Storage::Cpu(ks), Storage::Cpu(vs)) = (cache.k.storage(), cache.v.storage()) else {
        return Err(Error::DeviceMismatch("the CPU decode needs the cache on the CPU".into()));
    };
    let qv = q.to_vec_f32()?;
    let partials = match (ks, vs) {
        (CpuStorage::F32(k), CpuStorage::F32(v)) => decode_splits(&qv, k, v, s, lens, q_lens),
        (CpuStorage::F16(k), CpuStorage::F16(v)) => decode_splits(&qv, k, v, s, lens, q_lens),
        (CpuStorage::BF16(k), CpuStorage::BF16(v)) => decode_splits(&qv, k, v, s, lens, q_lens),
        _ => return Err(Error::DType("the cache's k and v differ in dtype".into())),
    };
    let (d, rows) = (s.dim, s.batch * s.heads * s.q_len);
    let mut o = vec![0f32; rows * d];
    let mut lse = vec![f32::NEG_INFINITY; rows];
    for (r, parts) in partials.chunks(s.splits).enumerate() {
        let (b, h, i) = (r / (s.heads * s.q_len), (r / s.q_len) % s.heads, r % s.q_len);
        let (m, l, acc) = merge_partials(parts, d);
        if l > 0.0 {
            o[((b * s.q_len + i) * s.heads + h) * d..][..d].iter_mut().zip(&acc).for_each(|(o, a)| *o = a / l);
            lse[r] = m + l.ln();
        }
    }
    Ok(AttentionOutput {
        o: Tensor::from_f32(&o, q.shape(), q.dtype(), &crate::Device::Cpu)?,
        lse: Tensor::from_slice(&lse, &[s.batch, s.heads, s.q_len], &crate::Device::Cpu)?,
    })
}

/// The split partials of every query row, in (row, split) order. One task per (sequence,
/// kv head, split) converts each cached key and value row once and applies it to every
/// query row of the kv head's group: the split's scores first, then its softmax, then Σ p·v.
fn decode_splits<T: crate::Element>(
    qv: &[f32],
    k: &[T],
    v: &[T],
    s: &DecodeShape,
    lens: &[usize],
    q_lens: &[usize],
) -> Vec<Partial> {
    let (d, group) = (s.dim, s.heads / s.kv_heads);
    let rows_per_head = group * s.q_len;
    // Task (b, kh, split) yields the partials of its rows x = (h − kh·group)·q_len + i.
    let task_of = |task: usize| (task / (s.kv_heads * s.splits), (task / s.splits) % s.kv_heads, task % s.splits);
    let tasks: Vec<Vec<Partial>> = (0..s.batch * s.kv_heads * s.splits)
        .into_par_iter()
        .map(|task| {
            let (b, kh, split) = task_of(task);
            let j0 = split * s.split;
            let ends: Vec<usize> =
                (0..rows_per_head).map(|x| decode_visible(x % s.q_len, lens[b], q_lens[b]).min(j0 + s.split)).collect();
            let j1 = ends.iter().copied().max().unwrap_or(0).max(j0);
            let keys = j1 - j0;
            let mut scores = vec![f32::NEG_INFINITY; rows_per_head * keys];
            let mut row = vec![0f32; d];
            for j in j0..j1 {
                let base = ((b * s.capacity + j) * s.kv_heads + kh) * d;
                T::slice_to_f32(&k[base..base + d], &mut row);
                for (x, &end) in ends.iter().enumerate() {
                    if j < end {
                        let (h, i) = (kh * group + x / s.q_len, x % s.q_len);
                        let qrow = &qv[((b * s.q_len + i) * s.heads + h) * d..][..d];
                        scores[x * keys + j - j0] = crate::ops::dot(qrow, &row) * s.scale;
                    }
                }
            }
            let mut parts: Vec<Partial> = scores
                .chunks_mut(keys.max(1))
                .take(rows_per_head)
                .map(|sc| {
                    let m = sc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let mut l = 0f32;
                    if m > f32::NEG_INFINITY {
                        for p in sc.iter_mut() {
                            *p = (*p - m).exp();
                            l += *p;
                        }
                    }
                    Partial { m, l, acc: vec![0f32; d] }
                })
                .collect();
            parts.resize_with(rows_per_head, || Partial { m: f32::NEG_INFINITY, l: 0.0, acc: vec![0f32; d] });
            for j in j0..j1 {
                let base = ((b * s.capacity + j) * s.kv_heads + kh) * d;
                T::slice_to_f32(&v[base..base + d], &mut row);
                for (x, part) in parts.iter_mut().enumerate() {
                    let p = scores[x * keys + j - j0];
                    if p > 0.0 {
                        part.acc.iter_mut().zip(&row).for_each(|(a, v)| *a += p * v);
                    }
                }
            }
            parts
        })
        .collect();
    // Every (row, split) belongs to exactly one task: move each partial to its place.
    let mut by_row: Vec<Partial> = (0..s.batch * s.heads * s.q_len * s.splits)
        .map(|_| Partial { m: f32::NEG_INFINITY, l: 0.0, acc: Vec::new() })
        .collect();
    for (task, parts) in tasks.into_iter().enumerate() {
        let (b, kh, split) = task_of(task);
        for (x, part) in parts.into_iter().enumerate() {
            let (h, i) = (kh * group + x / s.q_len, x % s.q_len);
            by_row[((b * s.heads + h) * s.q_len + i) * s.splits + split] = part;
        }
    }
    by_row
}

/// Merges split results: M = max m, L = Σ e^(m − M)·l, acc = Σ e^(m − M)·acc. Splits with no
/// key (l = 0) take no part.
fn merge_partials(parts: &[Partial], d: usize) -> (f32, f32, Vec<f32>) {
    let m = parts.iter().filter(|p| p.l > 0.0).map(|p| p.m).fold(f32::NEG_INFINITY, f32::max);
    let (mut l, mut acc) = (0f32, vec![0f32; d]);
    for p in parts.iter().filter(|p| p.l > 0.0) {
        let w = (p.m - m).exp();
        l += w * p.l;
        acc.iter_mut().zip(&p.acc).for_each(|(a, x)| *a += w * x);
    }
    (m, l, acc)
}
