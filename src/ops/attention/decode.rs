//! Decoding: a KV cache per batch of sequences and attention of the newest query rows
//! against it, split along the cache (flash-decoding) and merged by logsumexp.
//! CPU here; CUDA `kernels/attention_decode.cu`, WGSL `shaders/attention_decode_*.wgsl`.

use super::{AttentionOutput, MAX_HEAD_DIM};
use crate::ops::{Operands, operands};
use crate::tensor::{CpuStorage, StorageElement, try_vec, try_zeros, with_elems};
use crate::{Error, Result, Tensor};
use rayon::prelude::*;

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
        if !dtype.is_float() {
            return Err(crate::tensor::not_float("KvCache::new"));
        }
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
        crate::ops::floats("KV cache append", &[k_new, v_new])?;
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
    pub keys_per_split: usize,
    pub split_count: usize,
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
    crate::ops::floats("attention_decode", &[q])?;
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
    if q.elem_count() == 0 {
        let lse = Tensor::full(&[batch, heads, q_len], f32::NEG_INFINITY, crate::DType::F32, &q.device())?;
        return Ok(AttentionOutput { o: Tensor::zeros(q.shape(), q.dtype(), &q.device())?, lse });
    }
    let longest = cache.lens.iter().copied().max().unwrap_or(0);
    // The CPU has few threads to fill and pays per split for its partials: longer splits.
    let keys_per_split = if q.device().is_cpu() { 4 * DECODE_SPLIT } else { DECODE_SPLIT };
    let split_count = longest.div_ceil(keys_per_split).max(1);
    let s = DecodeShape { batch, q_len, capacity, heads, kv_heads, dim, scale, keys_per_split, split_count };
    let lens = &cache.lens;
    match operands("attention_decode", [q, &cache.k, &cache.v])? {
        Operands::Cpu([_, ks, vs]) => cpu_decode(q, ks, vs, &s, lens, &q_lens),
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, _) => super::cuda::decode(dev, q, cache, &s, lens, &q_lens),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, _) => super::wgpu::decode(dev, q, cache, &s, lens, &q_lens),
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
    ks: &CpuStorage,
    vs: &CpuStorage,
    s: &DecodeShape,
    lens: &[usize],
    q_lens: &[usize],
) -> Result<AttentionOutput> {
    let qv = q.to_vec_f32()?;
    let differ = || Error::DType("the cache's k and v differ in dtype".into());
    let partials =
        with_elems!(ks, k => decode_splits(&qv, k, StorageElement::slice_of(vs).ok_or_else(differ)?, s, lens, q_lens));
    let (d, rows) = (s.dim, s.batch * s.heads * s.q_len);
    let mut o = try_zeros::<f32>(rows * d)?;
    let mut lse = try_vec(rows, f32::NEG_INFINITY)?;
    for (r, parts) in partials.chunks(s.split_count).enumerate() {
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
fn decode_splits<T: StorageElement>(
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
    let task_of =
        |task: usize| (task / (s.kv_heads * s.split_count), (task / s.split_count) % s.kv_heads, task % s.split_count);
    let tasks: Vec<Vec<Partial>> = (0..s.batch * s.kv_heads * s.split_count)
        .into_par_iter()
        .map(|task| {
            let (b, kh, split) = task_of(task);
            let j0 = split * s.keys_per_split;
            let ends: Vec<usize> = (0..rows_per_head)
                .map(|x| decode_visible(x % s.q_len, lens[b], q_lens[b]).min(j0 + s.keys_per_split))
                .collect();
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
    let mut by_row: Vec<Partial> = (0..s.batch * s.heads * s.q_len * s.split_count)
        .map(|_| Partial { m: f32::NEG_INFINITY, l: 0.0, acc: Vec::new() })
        .collect();
    for (task, parts) in tasks.into_iter().enumerate() {
        let (b, kh, split) = task_of(task);
        for (x, part) in parts.into_iter().enumerate() {
            let (h, i) = (kh * group + x / s.q_len, x % s.q_len);
            by_row[((b * s.heads + h) * s.q_len + i) * s.split_count + split] = part;
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
