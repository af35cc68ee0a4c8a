//! The CPU GEMM through a quantized weight (more than `GEMV_MAX_TOKENS` rows, and every
//! input gradient): panels of W decoded to f32 beside the dense micro-kernel.

use super::formats::{decode_block, decode_blocks};
use super::{Direction, QProblem, QTensor};
use crate::ops::matmul::{MatmulProblem, cpu_matmul_f32_out};
use crate::tensor::try_zeros;
use crate::{DType, Result};
use rayon::prelude::*;

/// Columns of the result per task in the GEMM: a multiple of every block size.
const GEMM_PANEL: usize = 128;

/// GEMM: for each panel of result columns, decode the W rows or columns it needs to f32 and
/// run the dense CPU kernel on them; panels run in parallel and never hold all of W.
pub(super) fn cpu_gemm(w: &QTensor, bytes: &[u8], x: &[f32], p: &QProblem) -> Result<Vec<f32>> {
    let (rows, cols, bs) = (w.rows, w.cols, w.format.block_size());
    let panels = p.n.div_ceil(GEMM_PANEL);
    let results: Vec<(usize, usize, Vec<f32>)> = (0..panels)
        .into_par_iter()
        .map(|pi| -> Result<(usize, usize, Vec<f32>)> {
            let (j0, j1) = (pi * GEMM_PANEL, ((pi + 1) * GEMM_PANEL).min(p.n));
            let width = j1 - j0;
            let mut block = [0f32; 64];
            let panel = match p.direction {
                // Rows j0..j1 of W, each [k]: the panel is Bᵀ, [width, k].
                Direction::Forward => {
                    let mut panel = try_zeros::<f32>(width * cols)?;
                    for (r, dst) in panel.chunks_mut(cols).enumerate() {
                        decode_blocks(w, bytes, (j0 + r) * (cols / bs), dst);
                    }
                    panel
                }
                // Columns j0..j1 of every W row: the panel is B, [k = rows, width].
                Direction::InputGrad => {
                    let mut panel = try_zeros::<f32>(rows * width)?;
                    for (r, dst) in panel.chunks_mut(width).enumerate() {
                        let mut c = j0;
                        while c < j1 {
                            let bi = c / bs;
                            decode_block(w, bytes, r * (cols / bs) + bi, &mut block[..bs]);
                            let take = (bi * bs + bs).min(j1) - c;
                            dst[c - j0..c - j0 + take].copy_from_slice(&block[c - bi * bs..c - bi * bs + take]);
                            c += take;
                        }
                    }
                    panel
                }
            };
            let mp = MatmulProblem::unbatched(p.tokens, width, p.k, p.direction == Direction::Forward, DType::F32);
            Ok((j0, width, cpu_matmul_f32_out(&mp, x, &panel)?))
        })
        .collect::<Result<_>>()?;
    let mut y = try_zeros::<f32>(p.tokens * p.n)?;
    for (j0, width, part) in results {
        for t in 0..p.tokens {
            y[t * p.n + j0..t * p.n + j0 + width].copy_from_slice(&part[t * width..(t + 1) * width]);
        }
    }
    Ok(y)
}
