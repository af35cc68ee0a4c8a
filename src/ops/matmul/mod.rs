//! Dense matmul: `C = op(A) · op(B)`, where `op` is the identity or the transpose, with an
//! optional leading batch dimension.
//!
//! Kernels by backend:
//! - CPU (here): operands packed into f32 panels, a 6×16 register-blocked micro-kernel
//!   (AVX2+FMA when the processor has it), cache blocking over k, rayon over output tiles.
//! - CUDA (`kernels/matmul.cu`): a tensor-core kernel for f16/bf16 on sm_80+ (`mma.sync`,
//!   `ldmatrix`, `cp.async`) when rows are 16-byte aligned, else a tiled SIMT kernel.
//! - WGSL (`shaders/matmul.wgsl`): register-blocked, 4×4 outputs per invocation.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::ops::{Operands, SharedMut, operands};
use crate::tensor::{CpuStorage, StorageElement, try_zeros, with_elems};
use crate::{DType, Element, Error, Result, Tensor};
use rayon::prelude::*;

/// How [`matmul_with`] reads its operands and what it writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MatmulOptions {
    /// Use Aᵀ: `a` is stored `[.., k, m]`.
    pub trans_a: bool,
    /// Use Bᵀ: `b` is stored `[.., n, k]` (the layout of a `[out, in]` weight).
    pub trans_b: bool,
    /// Output dtype; `None` means the inputs' dtype. Accumulation is f32 whatever it is.
    pub out_dtype: Option<DType>,
}

impl MatmulOptions {
    /// A·Bᵀ, the product of activations with a `[out, in]` weight (and backward's dy·Wᵀ).
    pub fn nt() -> Self {
        MatmulOptions { trans_b: true, ..Default::default() }
    }

    /// Aᵀ·B, backward's weight gradient xᵀ·dy.
    pub fn tn() -> Self {
        MatmulOptions { trans_a: true, ..Default::default() }
    }

    pub fn out_dtype(self, dtype: DType) -> Self {
        MatmulOptions { out_dtype: Some(dtype), ..self }
    }
}

/// The sizes and layout of one matmul, shared by every backend's launcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MatmulProblem {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
    /// Elements between consecutive batches of A; 0 when A is shared by every batch.
    pub batch_stride_a: usize,
    pub batch_stride_b: usize,
    pub in_dtype: DType,
    pub out_dtype: DType,
}

impl MatmulProblem {
    /// One `[m, k]` A times B (`[k, n]`, or `[n, k]` with `trans_b`), f32 out: the product
    /// the other families run on their operands.
    pub(crate) fn unbatched(m: usize, n: usize, k: usize, trans_b: bool, in_dtype: DType) -> MatmulProblem {
        MatmulProblem {
            batch: 1,
            m,
            n,
            k,
            trans_a: false,
            trans_b,
            batch_stride_a: 0,
            batch_stride_b: 0,
            in_dtype,
            out_dtype: DType::F32,
        }
    }

    /// Elements between rows of A as stored (k, or m when transposed).
    pub fn lda(&self) -> usize {
        if self.trans_a { self.m } else { self.k }
    }

    pub fn ldb(&self) -> usize {
        if self.trans_b { self.k } else { self.n }
    }

    /// Offset of A(i, p) within a batch.
    #[inline(always)]
    fn a_index(&self, i: usize, p: usize) -> usize {
        if self.trans_a { p * self.lda() + i } else { i * self.lda() + p }
    }
}

/// `a · b` with the inputs' dtype out. See [`matmul_with`].
pub fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_with(a, b, MatmulOptions::default())
}

/// `C = op(A) · op(B)` on the operands' device, accumulating in f32.
///
/// Shapes: `a` is `[m, k]` (`[k, m]` with `trans_a`), `b` is `[k, n]` (`[n, k]` with
/// `trans_b`), each optionally with a leading batch dimension. When both have one they must
/// agree; when one has it, the other is shared by every batch. The output is `[m, n]`, or
/// `[batch, m, n]` when either input is batched.
///
/// Dtypes: `a` and `b` share one of f32, f16, bf16; the output is `options.out_dtype` (any
/// of the three) or the inputs' dtype.
///
/// Errors: `Shape` when ranks are not 2 or 3, inner or batch dimensions differ (the message
/// names both shapes); `DType` when `a` and `b` differ; `DeviceMismatch`; `OutOfMemory`.
/// Zero-sized dimensions are valid: an empty output, or zeros when `k` is 0.
pub fn matmul_with(a: &Tensor, b: &Tensor, options: MatmulOptions) -> Result<Tensor> {
    crate::ops::floats("matmul", &[a, b])?;
    if !options.out_dtype.is_none_or(DType::is_float) {
        return Err(crate::tensor::not_float("matmul's output"));
    }
    let operands = operands("matmul", [a, b])?;
    let (problem, out_shape) = plan(a, b, options)?;
    let device = a.device();
    if problem.k == 0 {
        return Tensor::zeros(&out_shape, problem.out_dtype, &device);
    }
    if out_shape.contains(&0) {
        return Tensor::empty(&out_shape, problem.out_dtype, &device);
    }
    match operands {
        Operands::Cpu([sa, sb]) => {
            Ok(Tensor::from_cpu_storage(cpu_matmul(&problem, sa, sb)?, &out_shape, problem.out_dtype))
        }
        #[cfg(feature = "cuda")]
        Operands::Cuda(dev, [ba, bb]) => {
            let out = Tensor::empty(&out_shape, problem.out_dtype, &device)?;
            cuda::matmul(dev, &problem, ba, bb, &out)?;
            Ok(out)
        }
        #[cfg(feature = "wgpu")]
        Operands::Wgpu(dev, [ba, bb]) => wgpu::matmul(dev, &problem, ba, bb, device, &out_shape),
    }
}

/// Checks shapes and dtypes and works out the problem and the output shape.
fn plan(a: &Tensor, b: &Tensor, o: MatmulOptions) -> Result<(MatmulProblem, Vec<usize>)> {
    let (sa, sb) = (a.shape(), b.shape());
    let describe =
        || format!("a {sa:?}{} · b {sb:?}{}", if o.trans_a { "ᵀ" } else { "" }, if o.trans_b { "ᵀ" } else { "" });
    if !(2..=3).contains(&sa.len()) || !(2..=3).contains(&sb.len()) {
        return Err(Error::Shape(format!("matmul takes rank 2 or 3 operands, got {}", describe())));
    }
    if a.dtype() != b.dtype() {
        return Err(Error::DType(format!(
            "matmul operands must share a dtype, got {} and {} ({})",
            a.dtype(),
            b.dtype(),
            describe()
        )));
    }
    let (ra, rb) = (sa.len(), sb.len());
    let (m, ka) = if o.trans_a { (sa[ra - 1], sa[ra - 2]) } else { (sa[ra - 2], sa[ra - 1]) };
    let (kb, n) = if o.trans_b { (sb[rb - 1], sb[rb - 2]) } else { (sb[rb - 2], sb[rb - 1]) };
    if ka != kb {
        return Err(Error::Shape(format!("matmul inner dimensions differ ({ka} vs {kb}): {}", describe())));
    }
    let batch_a = if ra == 3 { Some(sa[0]) } else { None };
    let batch_b = if rb == 3 { Some(sb[0]) } else { None };
    let batch = match (batch_a, batch_b) {
        (Some(x), Some(y)) if x != y => {
            return Err(Error::Shape(format!("matmul batch dimensions differ ({x} vs {y}): {}", describe())));
        }
        (Some(x), _) | (_, Some(x)) => Some(x),
        (None, None) => None,
    };
    let problem = MatmulProblem {
        batch: batch.unwrap_or(1),
        m,
        n,
        k: ka,
        trans_a: o.trans_a,
        trans_b: o.trans_b,
        batch_stride_a: if batch_a.is_some() { m * ka } else { 0 },
        batch_stride_b: if batch_b.is_some() { ka * n } else { 0 },
        in_dtype: a.dtype(),
        out_dtype: o.out_dtype.unwrap_or(a.dtype()),
    };
    let out_shape = match batch {
        Some(bs) => vec![bs, m, n],
        None => vec![m, n],
    };
    // Every index the kernels form stays below the output's element count.
    [problem.batch, m, n].iter().try_fold(1usize, |acc, &d| acc.checked_mul(d)).ok_or_else(|| {
        Error::Shape(format!("matmul output {out_shape:?} has more elements than fit in usize: {}", describe()))
    })?;
    Ok((problem, out_shape))
}

// ---------------------------------------------------------------------------------------
// CPU

/// Rows of A per micro-kernel call.
const MR: usize = 6;
/// Columns of B per micro-kernel call (two 8-wide AVX registers).
pub(crate) const NR: usize = 16;
/// Depth of one packed panel (tuned on a 2-core AVX2 machine; 256 and 384 were slower).
pub(crate) const KC: usize = 512;
/// Rows of A packed together (a multiple of MR), sized for L2.
const MC: usize = 72;
/// Columns of C per task, so narrow and wide problems both split across threads.
const NC: usize = 256;

/// The CPU product (`plan` checked that a and b share a dtype).
fn cpu_matmul(p: &MatmulProblem, a: &CpuStorage, b: &CpuStorage) -> Result<CpuStorage> {
    let differ = || Error::DType("matmul: the operands' dtypes differ".into());
    let c = with_elems!(a, a => cpu_matmul_f32_out(p, a, StorageElement::slice_of(b).ok_or_else(differ)?)?);
    CpuStorage::from_f32_vec(p.out_dtype, c)
}

/// The CPU matmul with its f32 accumulators as the result (row-major [batch, m, n]).
/// Other families call it on panels they have decoded to f32.
pub(crate) fn cpu_matmul_f32_out<T: Element>(p: &MatmulProblem, a: &[T], b: &[T]) -> Result<Vec<f32>> {
    let mut c = try_zeros::<f32>(p.batch * p.m * p.n)?;
    cpu_matmul_into(p, a, b, &mut c, false);
    Ok(c)
}

/// `c = a·b`, or `c += a·b` when `accumulate` (the product is added to each tile of C in
/// the micro-kernel's registers, so no second [m, n] buffer exists). `c` holds
/// `batch·m·n` values: the caller sizes it from the problem.
pub(crate) fn cpu_matmul_into<T: Element>(p: &MatmulProblem, a: &[T], b: &[T], c: &mut [f32], accumulate: bool) {
    let (m, n) = (p.m, p.n);
    debug_assert_eq!(c.len(), p.batch * m * n);
    if m * n == 0 {
        return;
    }
    for (bi, c_batch) in c.chunks_mut(m * n).enumerate() {
        let a = &a[bi * p.batch_stride_a..];
        let b = &b[bi * p.batch_stride_b..];
        if m <= SMALL_M {
            small_m(p, a, b, c_batch, accumulate);
        } else {
            cpu_matmul_packed(p, a, &DenseB { p, b }, c_batch, accumulate);
        }
    }
}

/// How the blocked CPU product gets its B: it packs one depth slice of B at a time, so B
/// may be stored in any form (dense, transposed, quantized blocks) as long as a slice can be
/// produced in the packed layout.
pub(crate) trait PackB: Sync {
    /// Writes B(pc..pc+kc, 0..n) into `out` (`n.div_ceil(NR)·NR·kc` values, zeroed on entry)
    /// as strips of [`NR`] columns: strip `js` holds at `js·NR·kc + d·NR` the values
    /// B(pc+d, js·NR..js·NR+NR). Columns past n stay zero. `pc` is a multiple of [`KC`].
    fn pack(&self, pc: usize, kc: usize, out: &mut [f32]);
}

/// Fills the strips of a packed B slice in parallel: `fill(j0, cols, strip)` writes columns
/// `j0..j0+cols` (at most NR of them) into `strip` (`NR·kc` values).
pub(crate) fn pack_strips(n: usize, kc: usize, out: &mut [f32], fill: impl Fn(usize, usize, &mut [f32]) + Sync) {
    out.par_chunks_mut(NR * kc).enumerate().for_each(|(js, strip)| fill(js * NR, NR.min(n - js * NR), strip));
}

/// One batch of `c (+)= op(A)·B` through the blocked kernel (KC depth slices, MC row
/// blocks, NC column blocks, the MR×NR micro-kernel), with each depth slice of B packed by
/// `b`. `p` gives m, n, k and A's layout; its B fields are not read.
pub(crate) fn cpu_matmul_packed<T: Element>(
    p: &MatmulProblem,
    a: &[T],
    b: &impl PackB,
    c: &mut [f32],
    accumulate: bool,
) {
    let (m, n) = (p.m, p.n);
    debug_assert_eq!(c.len(), m * n);
    let c_ptr = SharedMut(c.as_mut_ptr());
    for pc in (0..p.k).step_by(KC) {
        let kc = KC.min(p.k - pc);
        let mut b_packed = vec![0f32; n.div_ceil(NR) * NR * kc];
        b.pack(pc, kc, &mut b_packed);
        let row_blocks = m.div_ceil(MC);
        // Split columns too only when rows alone leave threads idle: each column block
        // packs its A block again.
        let col_blocks = if row_blocks >= 4 * rayon::current_num_threads() { 1 } else { n.div_ceil(NC) };
        let nc_block = n.div_ceil(col_blocks);
        (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
            let (ib, jb) = (t / col_blocks, t % col_blocks);
            let (i0, j0) = (ib * MC, (jb * nc_block).div_ceil(NR) * NR);
            let mc = MC.min(m - i0);
            let j1 = (((jb + 1) * nc_block).div_ceil(NR) * NR).min(n);
            if j0 >= j1 {
                return;
            }
            let nc = j1 - j0;
            let a_packed = pack_a(p, a, i0, mc, pc, kc);
            for s in 0..mc.div_ceil(MR) {
                for js in (j0 / NR)..(j0 + nc).div_ceil(NR) {
                    let (ri, cj) = (i0 + s * MR, js * NR);
                    // SAFETY: tasks own disjoint (rows, columns) tiles of C, and the
                    // micro-kernel writes only rows ri..ri+mr, columns cj..cj+nr.
                    unsafe {
                        micro_kernel(
                            kc,
                            &a_packed[s * MR * kc..],
                            &b_packed[js * NR * kc..],
                            c_ptr.ptr().add(ri * n + cj),
                            n,
                            MR.min(m - ri),
                            NR.min(n - cj),
                            accumulate || pc > 0,
                        );
                    }
                }
            }
        });
    }
}

/// Rows of A up to which the product streams B once instead of packing it (decoding).
const SMALL_M: usize = 4;

/// C = A·B for a few rows of A: B is read once, in its stored order, in chunks converted to
/// f32, and every row of A is applied to each chunk. Parallel over columns of C.
fn small_m<T: Element>(p: &MatmulProblem, a: &[T], b: &[T], c: &mut [f32], accumulate: bool) {
    const CHUNK: usize = 64;
    let (m, n, k) = (p.m, p.n, p.k);
    let a_rows: Vec<Vec<f32>> = (0..m).map(|i| (0..k).map(|q| a[p.a_index(i, q)].to_f32()).collect()).collect();
    let columns: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .map(|chunk| {
            let (j0, j1) = (chunk * CHUNK, ((chunk + 1) * CHUNK).min(n));
            let mut out = vec![0f32; m * (j1 - j0)];
            let mut row = vec![0f32; k.max(CHUNK)];
            if p.trans_b {
                // B stored [n, k]: each column j of C is a dot product with B's row j.
                for j in j0..j1 {
                    T::slice_to_f32(&b[j * p.ldb()..j * p.ldb() + k], &mut row[..k]);
                    for i in 0..m {
                        out[i * (j1 - j0) + j - j0] = crate::ops::dot(&a_rows[i], &row[..k]);
                    }
                }
            } else {
                // B stored [k, n]: C's chunk accumulates a[i][q] · B's row q, chunk columns.
                for q in 0..k {
                    T::slice_to_f32(&b[q * p.ldb() + j0..q * p.ldb() + j1], &mut row[..j1 - j0]);
                    for i in 0..m {
                        let s = a_rows[i][q];
                        for (o, r) in out[i * (j1 - j0)..(i + 1) * (j1 - j0)].iter_mut().zip(&row) {
                            *o += s * r;
                        }
                    }
                }
            }
            (j0, out)
        })
        .collect();
    for (j0, out) in columns {
        let width = out.len() / m;
        for i in 0..m {
            let dst = &mut c[i * n + j0..i * n + j0 + width];
            let src = &out[i * width..(i + 1) * width];
            if accumulate {
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                dst.copy_from_slice(src);
            }
        }
    }
}

/// A dense B (`[k, n]`, or `[n, k]` with `trans_b`) of one batch. Stored runs are converted
/// whole: a row of B (or of Bᵀ) at a time.
struct DenseB<'a, T> {
    p: &'a MatmulProblem,
    b: &'a [T],
}

impl<T: Element> PackB for DenseB<'_, T> {
    fn pack(&self, pc: usize, kc: usize, out: &mut [f32]) {
        let (p, b) = (self.p, self.b);
        let ldb = p.ldb();
        pack_strips(p.n, kc, out, |j0, cols, strip| {
            if p.trans_b {
                // Column j of B is stored as a run along k: convert it, then spread it at
                // stride NR.
                let mut run = vec![0f32; kc];
                for jj in 0..cols {
                    let start = (j0 + jj) * ldb + pc;
                    T::slice_to_f32(&b[start..start + kc], &mut run);
                    for (d, &v) in run.iter().enumerate() {
                        strip[d * NR + jj] = v;
                    }
                }
            } else {
                for d in 0..kc {
                    let start = (pc + d) * ldb + j0;
                    T::slice_to_f32(&b[start..start + cols], &mut strip[d * NR..d * NR + cols]);
                }
            }
        });
    }
}

/// Packs A(i0..i0+mc, pc..pc+kc) as strips of MR rows, like [`PackB`]'s strips of B.
fn pack_a<T: Element>(p: &MatmulProblem, a: &[T], i0: usize, mc: usize, pc: usize, kc: usize) -> Vec<f32> {
    let strips = mc.div_ceil(MR);
    let lda = p.lda();
    let mut out = vec![0f32; strips * MR * kc];
    let mut run = vec![0f32; if p.trans_a { 0 } else { kc }];
    for (s, strip) in out.chunks_mut(MR * kc).enumerate() {
        let (r0, rows) = (i0 + s * MR, MR.min(mc - s * MR));
        if p.trans_a {
            // Aᵀ is stored [k, m]: each depth step's MR rows are a stored run.
            for d in 0..kc {
                let start = (pc + d) * lda + r0;
                T::slice_to_f32(&a[start..start + rows], &mut strip[d * MR..d * MR + rows]);
            }
        } else {
            for ii in 0..rows {
                let start = (r0 + ii) * lda + pc;
                T::slice_to_f32(&a[start..start + kc], &mut run);
                for (d, &v) in run.iter().enumerate() {
                    strip[d * MR + ii] = v;
                }
            }
        }
    }
    out
}

/// C[0..mr, 0..nr] (+)= Apanel · Bpanel over `kc` steps; `ldc` is C's row stride.
///
/// # Safety
/// `c` must be valid for writes of rows `0..mr` and columns `0..nr` at stride `ldc`.
#[allow(clippy::too_many_arguments)]
unsafe fn micro_kernel(
    kc: usize,
    a: &[f32],
    b: &[f32],
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
        // SAFETY: the features are present; the caller upholds the pointer contract.
        unsafe { micro_kernel_avx2(kc, a.as_ptr(), b.as_ptr(), c, ldc, mr, nr, accumulate) };
        return;
    }
    let mut acc = [[0f32; NR]; MR];
    for d in 0..kc {
        let bd = &b[d * NR..d * NR + NR];
        for i in 0..MR {
            let ai = a[d * MR + i];
            for j in 0..NR {
                acc[i][j] += ai * bd[j];
            }
        }
    }
    // SAFETY: the caller guarantees the tile is writable.
    unsafe { store_tile(&acc, c, ldc, mr, nr, accumulate) };
}

unsafe fn store_tile(acc: &[[f32; NR]; MR], c: *mut f32, ldc: usize, mr: usize, nr: usize, accumulate: bool) {
    for (i, row) in acc.iter().enumerate().take(mr) {
        for (j, &v) in row.iter().enumerate().take(nr) {
            // SAFETY: i < mr and j < nr, inside the caller's tile.
            unsafe {
                let dst = c.add(i * ldc + j);
                *dst = if accumulate { *dst + v } else { v };
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn micro_kernel_avx2(
    kc: usize,
    a: *const f32,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    mr: usize,
    nr: usize,
    accumulate: bool,
) {
    use std::arch::x86_64::*;
    // SAFETY (whole body): a holds kc·MR and b kc·NR floats; c as the caller promises.
    unsafe {
        let mut lo = [_mm256_setzero_ps(); MR];
        let mut hi = [_mm256_setzero_ps(); MR];
        for d in 0..kc {
            let b0 = _mm256_loadu_ps(b.add(d * NR));
            let b1 = _mm256_loadu_ps(b.add(d * NR + 8));
            for i in 0..MR {
                let ai = _mm256_broadcast_ss(&*a.add(d * MR + i));
                lo[i] = _mm256_fmadd_ps(ai, b0, lo[i]);
                hi[i] = _mm256_fmadd_ps(ai, b1, hi[i]);
            }
        }
        if mr == MR && nr == NR {
            for i in 0..MR {
                let row = c.add(i * ldc);
                let (mut x, mut y) = (lo[i], hi[i]);
                if accumulate {
                    x = _mm256_add_ps(x, _mm256_loadu_ps(row));
                    y = _mm256_add_ps(y, _mm256_loadu_ps(row.add(8)));
                }
                _mm256_storeu_ps(row, x);
                _mm256_storeu_ps(row.add(8), y);
            }
        } else {
            let mut acc = [[0f32; NR]; MR];
            for i in 0..MR {
                _mm256_storeu_ps(acc[i].as_mut_ptr(), lo[i]);
                _mm256_storeu_ps(acc[i].as_mut_ptr().add(8), hi[i]);
            }
            store_tile(&acc, c, ldc, mr, nr, accumulate);
        }
    }
}
