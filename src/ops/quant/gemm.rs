//! The CPU GEMM through a quantized weight (more than `GEMV_MAX_TOKENS` rows, and every
//! input gradient): the dense blocked kernel, with its B packed straight from W's blocks.

use super::formats::{decode_block, decode_blocks};
use super::{Direction, QProblem, QTensor};
use crate::ops::matmul::{KC, MatmulProblem, NR, PackB, cpu_matmul_packed, pack_strips};
use crate::tensor::try_zeros;
use crate::{Element, Result};
use rayon::prelude::*;

/// B of the product as W's blocks: `Wᵀ` (`[in, out]`) forward, `W` (`[out, in]`) for the
/// input gradient. Each depth slice is decoded once into the packed layout, so no more of
/// W than one slice ever exists as f32.
struct QuantB<'a> {
    w: &'a QTensor,
    bytes: &'a [u8],
    direction: Direction,
}

impl PackB for QuantB<'_> {
    fn pack(&self, pc: usize, kc: usize, out: &mut [f32]) {
        let (w, bytes) = (self.w, self.bytes);
        let bs = w.format.block_size();
        let blocks_per_row = w.cols / bs;
        match self.direction {
            // B(d, j) = W[j, d]: column j of B is a run of W row j's blocks, decoded whole
            // and spread at stride NR. Slices start on block boundaries (KC and `in` are
            // multiples of the block size).
            Direction::Forward => {
                debug_assert!(pc.is_multiple_of(bs) && kc.is_multiple_of(bs));
                pack_strips(w.rows, kc, out, |j0, cols, strip| {
                    let mut run = vec![0f32; kc];
                    for jj in 0..cols {
                        decode_blocks(w, bytes, (j0 + jj) * blocks_per_row + pc / bs, &mut run);
                        for (d, &v) in run.iter().enumerate() {
                            strip[d * NR + jj] = v;
                        }
                    }
                });
            }
            // B(d, j) = W[d, j]: one block of W row d spans bs / NR strips, so the strips
            // covering a block column are filled together and each block is decoded once.
            Direction::InputGrad => {
                debug_assert!(bs.is_multiple_of(NR) && w.cols.is_multiple_of(bs));
                out.par_chunks_mut(bs * kc).enumerate().for_each(|(bc, strips)| {
                    let mut block = [0f32; 64];
                    for d in 0..kc {
                        decode_block(w, bytes, (pc + d) * blocks_per_row + bc, &mut block[..bs]);
                        for (s, strip) in strips.chunks_exact_mut(NR * kc).enumerate() {
                            strip[d * NR..d * NR + NR].copy_from_slice(&block[s * NR..s * NR + NR]);
                        }
                    }
                });
            }
        }
    }
}

/// GEMM: `x·Wᵀ` or `dy·W` through the dense CPU kernel's blocking, W decoded one depth
/// slice at a time into the kernel's packed B.
pub(super) fn cpu_gemm<T: Element>(w: &QTensor, bytes: &[u8], x: &[T], p: &QProblem) -> Result<Vec<f32>> {
    debug_assert!(KC.is_multiple_of(w.format.block_size()));
    let mut y = try_zeros::<f32>(p.tokens * p.n)?;
    let mp = MatmulProblem::unbatched(p.tokens, p.n, p.k, p.direction == Direction::Forward, T::DTYPE);
    cpu_matmul_packed(&mp, x, &QuantB { w, bytes, direction: p.direction }, &mut y, false);
    Ok(y)
}
