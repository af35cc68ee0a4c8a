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

/// Attention forward on q's device. Errors: `Shape` for ranks other than 4, mismatched
/// batch or head dims, heads not a multiple of kv_heads, a head dim over [`MAX_HEAD_DIM`],
/// a sequence-length vector of the wrong length or with lengths past the tensor; `DType` for
/// q, k, v of different dtypes; `DeviceMismatch`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, options: &AttentionOptions) -> Result<AttentionOutput> {
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
    let s = AttnShape { batch, q_len, kv_len, heads, kv_heads, dim, scale, causal: options.causal };
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
