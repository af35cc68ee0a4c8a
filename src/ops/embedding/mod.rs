//! Token embeddings: [`embedding`] gathers rows of a dense `[vocab, d]` table by token id,
//! [`qembedding`] gathers rows of a quantized table (GGUF models keep the token embedding
//! quantized and tie it to the output layer), and [`embedding_backward`] scatter-adds the
//! output gradient into the table's gradient, deterministically.
//!
//! Ids are `u32` tensors of any shape. They are checked against the vocabulary on the host
//! before any kernel runs: on a GPU the ids are copied to the host first (4 bytes per token
//! and one synchronisation per call), so an id out of range is an `Err` naming the id and
//! its position, never a wrong row or a read past the table. Each kernel tests `id < vocab`
//! as well, so no id can make it read outside the table.
//!
//! The backward sums, for each table row, the gradient rows of the positions holding its id
//! in increasing position order, in f32, starting from +0: the positions are bucketed by id
//! on the host (a counting sort, stable) and handed to the device as offsets and positions.
//! Every backend adds in that order with round-to-nearest f32 additions and no atomics, so
//! the result is the same bit for bit on every run and on every backend (a GPU that flushed
//! subnormal sums to zero would differ there alone).
//!
//! Kernels: the CPU code here, `kernels/embedding.cu`, `shaders/embedding_*.wgsl`.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::quant::QTensor;
use crate::ops::quant::formats::decode_blocks;
use crate::ops::{Operands, operands};
use crate::tensor::{CpuStorage, RawBuffer, StorageElement, try_zeros, with_dtype, with_elems};
use crate::{DType, Error, Result, Tensor};
use rayon::prelude::*;

/// `table[ids]`: row `ids[..]` of a dense `[vocab, d]` table (f32, f16 or bf16) for every
/// id, shape `ids.shape() + [d]`, in the table's dtype. The rows are copied bit for bit.
///
/// Errors: `DType` when the table is not a float tensor or `ids` is not `u32`; `Shape` when
/// the table is not `[vocab, d]`; `InvalidArgument` for an id ≥ vocab (naming the id and its
/// position); `DeviceMismatch` when the two are on different devices; `Unsupported` where a
/// GPU's 32-bit indexing cannot address the sizes.
pub fn embedding(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    crate::ops::floats("embedding", &[table])?;
    let operands = operands("embedding", [table, ids])?;
    let &[vocab, dim] = table.shape() else {
        return Err(Error::Shape(format!("embedding: the table must be [vocab, d], got shape {:?}", table.shape())));
    };
    let out_shape = output_shape("embedding", ids, dim)?;
    let host_ids = checked_ids("embedding", ids, vocab)?;
    if host_ids.is_empty() || dim == 0 {
        return Tensor::empty(&out_shape, table.dtype(), &table.device());
    }
    match operands {
        Operands::Cpu([t, _]) => {
            let out = with_elems!(t, rows => gather_rows(rows, &host_ids, dim)?);
            Ok(Tensor::from_cpu_storage(out, &out_shape, table.dtype()))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [t, i]) => cuda::gather(dev, table, t, i, host_ids.len(), &out_shape),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [t, i]) => wgpu::gather(dev, table, t, i, host_ids.len(), &out_shape),
    }
}

/// Rows of a quantized `[vocab, d]` table for every id, decoded as
/// [`QTensor::dequantize`] decodes them and rounded once to `dtype` (f32, f16 or bf16):
/// equal, element for element, to `embedding(&table.dequantize(dtype)?, ids)` without the
/// dense table. Shape `ids.shape() + [d]`. Every format a `QTensor` holds is read (the ggml
/// blocks and NF4), through the same decoders as the quantized products.
///
/// Errors: `DType` when `ids` is not `u32` or `dtype` is not a float type;
/// `InvalidArgument` for an id ≥ vocab (naming the id and its position); `DeviceMismatch`
/// when the ids and the table are on different devices; `Unsupported` where a GPU's 32-bit
/// indexing cannot address the sizes.
pub fn qembedding(table: &QTensor, ids: &Tensor, dtype: DType) -> Result<Tensor> {
    if !dtype.is_float() {
        return Err(Error::DType(format!("qembedding: the output dtype must be f32, f16 or bf16, got {dtype}")));
    }
    if ids.device() != table.device() {
        return Err(Error::DeviceMismatch(format!(
            "qembedding: ids on {} and the quantized table on {}; move one with to_device",
            ids.device(),
            table.device()
        )));
    }
    let [vocab, dim] = table.shape();
    let out_shape = output_shape("qembedding", ids, dim)?;
    let host_ids = checked_ids("qembedding", ids, vocab)?;
    if host_ids.is_empty() || dim == 0 {
        return Tensor::empty(&out_shape, dtype, &ids.device());
    }
    let mismatch = || Error::DeviceMismatch("qembedding: ids and the table are on different backends".into());
    match (operands("qembedding", [ids])?, table.raw()) {
        (Operands::Cpu(_), RawBuffer::Cpu(bytes)) => {
            let out = with_dtype!(dtype, T => decode_rows::<T>(table, bytes, &host_ids, dim)?);
            Ok(Tensor::from_cpu_storage(out, &out_shape, dtype))
        }
        #[cfg(feature = "cuda")]
        (Operands::Cuda(dev, [i]), RawBuffer::Cuda { buf, .. }) => {
            cuda::qgather(dev, table, buf, i, host_ids.len(), dtype, &out_shape)
        }
        #[cfg(feature = "wgpu")]
        (Operands::Wgpu(dev, [i]), RawBuffer::Wgpu { buf, .. }) => {
            wgpu::qgather(dev, table, buf, i, host_ids.len(), dtype, &out_shape)
        }
        #[allow(unreachable_patterns)]
        _ => Err(mismatch()),
    }
}

/// The table's gradient: `d_table[v, :] = Σ dy[p, :]` over the positions `p` whose id is
/// `v`, shape `[vocab, d]`, always f32 (accumulated in f32 from `dy` of any float dtype, so
/// the optimizer gets the sums unrounded). Rows whose id never appears are zero.
///
/// Deterministic: each row sums its positions in increasing position order, in f32 from +0,
/// on every backend, so the same inputs give the same bits on every run and every device
/// (see the module docs).
///
/// Errors: `DType` when `dy` is not a float tensor or `ids` is not `u32`; `Shape` when `dy`
/// is not `ids.shape() + [d]`; `InvalidArgument` for an id ≥ vocab (naming the id and its
/// position); `DeviceMismatch`; `Unsupported` for more than 2³² − 1 positions, or where a
/// GPU's 32-bit indexing cannot address the sizes; `OutOfMemory` for a table no memory holds.
pub fn embedding_backward(dy: &Tensor, ids: &Tensor, vocab: usize) -> Result<Tensor> {
    crate::ops::floats("embedding_backward", &[dy])?;
    let operands = operands("embedding_backward", [dy, ids])?;
    let Some((&dim, lead)) = dy.shape().split_last() else {
        return Err(Error::Shape("embedding_backward: dy must be ids.shape() + [d], got a rank-0 tensor".into()));
    };
    if lead != ids.shape() {
        return Err(Error::Shape(format!(
            "embedding_backward: dy {:?} must be the ids' shape {:?} plus [d]",
            dy.shape(),
            ids.shape()
        )));
    }
    check_ids_dtype("embedding_backward", ids)?;
    // The gradient's size is checked before anything sized by the vocabulary is made.
    let out_shape = [vocab, dim];
    vocab.checked_mul(dim).and_then(|n| n.checked_mul(4)).ok_or_else(|| {
        Error::Shape(format!("embedding_backward: the gradient {out_shape:?} has more bytes than fit in usize"))
    })?;
    let host_ids = checked_ids("embedding_backward", ids, vocab)?;
    if dim == 0 || vocab == 0 {
        return Tensor::empty(&out_shape, DType::F32, &dy.device());
    }
    if host_ids.is_empty() {
        return Tensor::zeros(&out_shape, DType::F32, &dy.device());
    }
    let buckets = Buckets::of(&host_ids, vocab)?;
    match operands {
        Operands::Cpu([g, _]) => {
            let dyf = g.to_f32_vec()?;
            let mut out = try_zeros::<f32>(vocab * dim)?;
            out.par_chunks_mut(dim).enumerate().for_each(|(v, row)| {
                for &p in buckets.positions_of(v) {
                    let src = &dyf[p as usize * dim..(p as usize + 1) * dim];
                    for (acc, &x) in row.iter_mut().zip(src) {
                        *acc += x;
                    }
                }
            });
            Ok(Tensor::from_cpu_storage(CpuStorage::F32(out), &out_shape, DType::F32))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [g, _]) => cuda::backward(dev, dy, g, &buckets, dim),
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [g, _]) => wgpu::backward(dev, dy, g, &buckets, dim),
    }
}

/// The token positions grouped by id, each group in increasing position order (a stable
/// counting sort): the positions of id `v` are `positions[offsets[v]..offsets[v + 1]]`.
pub(crate) struct Buckets {
    pub(crate) offsets: Vec<u32>,
    pub(crate) positions: Vec<u32>,
}

impl Buckets {
    /// Buckets of `ids`, each below `vocab` (checked by the caller).
    fn of(ids: &[u32], vocab: usize) -> Result<Buckets> {
        if u32::try_from(ids.len()).is_err() {
            return Err(Error::Unsupported(format!(
                "embedding_backward over {} positions: the position buckets index with u32 (at most {})",
                ids.len(),
                u32::MAX
            )));
        }
        let len = vocab
            .checked_add(1)
            .ok_or_else(|| Error::Shape(format!("embedding_backward: a vocabulary of {vocab} rows is too large")))?;
        let mut offsets = try_zeros::<u32>(len)?;
        for &id in ids {
            offsets[id as usize + 1] += 1;
        }
        for v in 0..vocab {
            offsets[v + 1] += offsets[v];
        }
        let mut next = try_zeros::<u32>(vocab)?;
        next.copy_from_slice(&offsets[..vocab]);
        let mut positions = try_zeros::<u32>(ids.len())?;
        for (p, &id) in ids.iter().enumerate() {
            let slot = &mut next[id as usize];
            positions[*slot as usize] = p as u32;
            *slot += 1;
        }
        Ok(Buckets { offsets, positions })
    }

    fn positions_of(&self, v: usize) -> &[u32] {
        &self.positions[self.offsets[v] as usize..self.offsets[v + 1] as usize]
    }

    /// The size of the largest group (the longest sum of the backward).
    #[cfg(any(test, feature = "wgpu"))]
    pub(crate) fn longest(&self) -> usize {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize).max().unwrap_or(0)
    }
}

/// `Err(DType)` unless `ids` holds `u32`.
fn check_ids_dtype(op: &str, ids: &Tensor) -> Result<()> {
    if ids.dtype() != DType::U32 {
        return Err(Error::DType(format!("{op}: ids must be a u32 tensor, got {}", ids.dtype())));
    }
    Ok(())
}

/// `ids.shape() + [dim]`, checked to have a size.
fn output_shape(op: &str, ids: &Tensor, dim: usize) -> Result<Vec<usize>> {
    check_ids_dtype(op, ids)?;
    let mut shape = ids.shape().to_vec();
    shape.push(dim);
    ids.elem_count()
        .checked_mul(dim)
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| Error::Shape(format!("{op}: output {shape:?} has more elements than fit in usize")))?;
    Ok(shape)
}

/// The ids on the host, each checked to be below `vocab`; `Err(InvalidArgument)` naming the
/// first one that is not and where it sits.
fn checked_ids(op: &str, ids: &Tensor, vocab: usize) -> Result<Vec<u32>> {
    check_ids_dtype(op, ids)?;
    let host = match ids.storage().as_cpu().and_then(CpuStorage::as_u32) {
        Some(v) => v.to_vec(),
        None => ids.to_vec::<u32>()?,
    };
    if let Some(i) = host.iter().position(|&id| id as usize >= vocab) {
        return Err(Error::InvalidArgument(format!(
            "{op}: id {} at position {:?} (flat index {i}) is out of range for a vocabulary of {vocab}",
            host[i],
            unravel(i, ids.shape())
        )));
    }
    Ok(host)
}

/// The multi-index of flat index `i` in a row-major `shape`.
fn unravel(mut i: usize, shape: &[usize]) -> Vec<usize> {
    let mut index = vec![0; shape.len()];
    for (slot, &d) in index.iter_mut().zip(shape).rev() {
        *slot = i % d.max(1);
        i /= d.max(1);
    }
    index
}

/// Row `ids[t]` of `rows` (`[vocab, dim]`) for every t, copied.
fn gather_rows<T: StorageElement>(rows: &[T], ids: &[u32], dim: usize) -> Result<CpuStorage> {
    let mut out = try_zeros::<T>(ids.len() * dim)?;
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(dst, &id)| {
        let at = id as usize * dim;
        dst.copy_from_slice(&rows[at..at + dim]);
    });
    Ok(T::into_storage(out))
}

/// Row `ids[t]` of a quantized table for every t, decoded a run of blocks at a time into
/// f32 on the stack and rounded once to `T`.
fn decode_rows<T: StorageElement>(table: &QTensor, bytes: &[u8], ids: &[u32], dim: usize) -> Result<CpuStorage> {
    /// Weights decoded at a time: a whole number of blocks of 32 and of 64.
    const RUN: usize = 256;
    let blocks_per_row = dim / table.format().block_size();
    let mut out = try_zeros::<T>(ids.len() * dim)?;
    out.par_chunks_mut(dim).zip(ids.par_iter()).for_each(|(row, &id)| {
        let mut run = [0f32; RUN];
        let first = id as usize * blocks_per_row;
        for (k, dst) in row.chunks_mut(RUN).enumerate() {
            let decoded = &mut run[..dst.len()];
            decode_blocks(table, bytes, first + k * RUN / table.format().block_size(), decoded);
            T::slice_from_f32(decoded, dst);
        }
    });
    Ok(T::into_storage(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_keep_positions_in_order() {
        let b = Buckets::of(&[2, 0, 2, 2, 1, 0], 4).unwrap();
        assert_eq!(b.offsets, [0, 2, 3, 6, 6]);
        assert_eq!(b.positions, [1, 5, 4, 0, 2, 3]);
        assert_eq!(b.longest(), 3);
        assert!(b.positions_of(3).is_empty());
    }

    #[test]
    fn positions_unravel_row_major() {
        assert_eq!(unravel(7, &[2, 3, 2]), [1, 0, 1]);
        assert_eq!(unravel(0, &[]), Vec::<usize>::new());
    }
}
