// The GEMM engines shared by every product of the crate (prepended after common.cuh).
// C[b] = op(A[b]) · B[b], f32 accumulation, C row-major [M, N]. A is stored [M, K]
// (lda = K), or [K, M] when trans_a (lda = M), at b * stride_a. B comes from a loader, so
// dense matmul and the products through quantized weights share one kernel body: the
// loader decides how a tile of B reaches shared memory. out_kind: 0 f32, 1 f16, 2 bf16.
//
// gemm_simt<T, BLoad>
//     Any shape, any arch. 256 threads (16×16) per 64×64 tile of C, 4×4 outputs per thread
//     in registers; 16-deep tiles of A and B staged in shared memory as f32, loaded along
//     the stored rows so global reads coalesce. Grid (ceil(N/64), ceil(M/64), batch).
//
// gemm_mma<BF, TRANS_A, TRANS_B, BStage>
//     Tensor cores, sm_80+, f16/bf16, A rows 16-byte aligned (lda a multiple of 8). 256
//     threads (8 warps as 2×4) per 128×128 tile of C, each warp 64×32 as 4×4
//     mma.m16n8k16 tiles. 32-deep tiles of A go global → shared with cp.async (zero-filled
//     past the edges), double-buffered with B's; fragments come from shared memory with
//     ldmatrix (.trans for the operand stored the other way). Rows are padded by 8 halves
//     so ldmatrix is free of bank conflicts. Grid (ceil(N/128), ceil(M/128), batch).

//
// The LoRA extension (template argument LORA_RANK, see kernels/lora.cu): both engines can add
// `bias + s·xa·B_loraᵀ` to the tile of C before it is written, with B_lora [N, r] f32.
//   LORA_RANK < 0   plain product, no extension (the default).
//   LORA_RANK == 0  xa [M, r] f32 comes from global memory (computed beforehand).
//   LORA_RANK > 0   xa = A·A_loraᵀ is computed in the same k-loop from the tiles of A already
//                   in shared memory (A read once for both products), with A_lora [r, K] in A's
//                   type and r ≤ LORA_RANK; the blocks of the first column write it out for the
//                   backward pass.
// The delta goes in as extra k-steps of 16 (SIMT) or 32 (mma) rank columns in f32: xa (times
// s) and B_loraᵀ are staged into the freed tile buffers and multiply-added into the same
// accumulators, so no [M, N] delta is ever written.

struct LoraArgs {
    const void* a;      // A_lora [r, K], A's element type (LORA_RANK > 0)
    const float* xa_in; // [M, r] (LORA_RANK == 0)
    float* xa_out;      // [M, r] (LORA_RANK > 0)
    const float* b;     // B_lora [N, r]
    const float* bias;  // [N] or null
    int r;
    float scale;
};

// ---------------------------------------------------------------------------------------
// SIMT

#define SIMT_TILE 64
#define SIMT_K 16

// Rank columns of the in-kernel xa in the SIMT engine (LORA_RANK > 0 means r ≤ SIMT_LORA_R).
#define SIMT_LORA_R 32

// acc += tile_a[kk][rows]ᵀ · tile_b[kk][cols] over one 16-deep step.
__device__ __forceinline__ void simt_mac(const float (&tile_a)[SIMT_K][SIMT_TILE],
                                         const float (&tile_b)[SIMT_K][SIMT_TILE], float (&acc)[4][4], int tx,
                                         int ty) {
#pragma unroll
    for (int kk = 0; kk < SIMT_K; kk++) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; i++) {
            av[i] = tile_a[kk][ty * 4 + i];
            bv[i] = tile_b[kk][tx * 4 + i];
        }
#pragma unroll
        for (int i = 0; i < 4; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
    }
}

// B comes from a loader: `bload(batch, k, n)` is B(k, n) as f32. `trans_b` only orders the
// tile loads so consecutive threads walk B's stored rows.
template <class T, class BLoad, int LORA_RANK = -1>
__device__ void gemm_simt(const typename T::storage* __restrict__ A, const BLoad& bload,
                          void* __restrict__ C, int out_kind, int M, int N, int K, int lda,
                          u64 stride_a, int trans_a, int trans_b, const LoraArgs& lora = LoraArgs{}) {
    static_assert(LORA_RANK <= SIMT_LORA_R, "the SIMT engine computes xa for ranks up to SIMT_LORA_R");
    if (LORA_RANK > 0 && lora.r > LORA_RANK) __trap();  // the launcher computes xa beforehand past LORA_RANK
    __shared__ float tile_a[SIMT_K][SIMT_TILE];
    __shared__ float tile_b[SIMT_K][SIMT_TILE];
    // A_lora's k-tile, [kk][j]; one float when unused.
    __shared__ float tile_la[LORA_RANK > 0 ? SIMT_K : 1][LORA_RANK > 0 ? SIMT_LORA_R : 1];
    const int tx = threadIdx.x, ty = threadIdx.y, li = ty * 16 + tx;
    const int row0 = blockIdx.y * SIMT_TILE, col0 = blockIdx.x * SIMT_TILE;
    const u64 batch = blockIdx.z;
    A += batch * stride_a;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
    // In-kernel xa: this thread's row of the tile and rank columns lj, lj + 4, ..
    const int lrow = li & 63, lj = li >> 6;
    float xa_acc[SIMT_LORA_R / 4];
#pragma unroll
    for (int q = 0; q < SIMT_LORA_R / 4; q++) xa_acc[q] = 0.f;

    for (int k0 = 0; k0 < K; k0 += SIMT_K) {
#pragma unroll
        for (int t = 0; t < 4; t++) {
            const int e = li + t * 256;
            const int mm = trans_a ? e % SIMT_TILE : e / SIMT_K;
            const int kk = trans_a ? e / SIMT_TILE : e % SIMT_K;
            const int gi = row0 + mm, gk = k0 + kk;
            float v = 0.f;
            if (gi < M && gk < K) v = T::load(A[trans_a ? (u64)gk * lda + gi : (u64)gi * lda + gk]);
            tile_a[kk][mm] = v;
        }
#pragma unroll
        for (int t = 0; t < 4; t++) {
            const int e = li + t * 256;
            const int nn = trans_b ? e / SIMT_K : e % SIMT_TILE;
            const int kk = trans_b ? e % SIMT_K : e / SIMT_TILE;
            const int gj = col0 + nn, gk = k0 + kk;
            float v = 0.f;
            if (gj < N && gk < K) v = bload(batch, gk, gj);
            tile_b[kk][nn] = v;
        }
        if (LORA_RANK > 0) {
            const typename T::storage* la = (const typename T::storage*)lora.a;
#pragma unroll
            for (int t = 0; t < SIMT_K * SIMT_LORA_R / 256; t++) {
                const int e = li + t * 256;
                const int j = e / SIMT_K, kk = e % SIMT_K, gk = k0 + kk;
                tile_la[kk][j] = (j < lora.r && gk < K) ? T::load(la[(u64)j * K + gk]) : 0.f;
            }
        }
        __syncthreads();
        simt_mac(tile_a, tile_b, acc, tx, ty);
        if (LORA_RANK > 0) {
#pragma unroll
            for (int kk = 0; kk < SIMT_K; kk++) {
                const float a = tile_a[kk][lrow];
#pragma unroll
                for (int q = 0; q < SIMT_LORA_R / 4; q++) xa_acc[q] = fmaf(a, tile_la[kk][lj + 4 * q], xa_acc[q]);
            }
        }
        __syncthreads();
    }

    if (LORA_RANK >= 0) {
        // The delta as extra k-steps: tile_a[jj][row] = s·xa(row, j0 + jj), tile_b[jj][col] =
        // B_lora(col, j0 + jj).
        for (int j0 = 0; j0 < lora.r; j0 += SIMT_K) {
            if (LORA_RANK > 0) {
#pragma unroll
                for (int q = 0; q < SIMT_LORA_R / 4; q++) {
                    const int j = lj + 4 * q;
                    if (j >= j0 && j < j0 + SIMT_K) tile_a[j - j0][lrow] = lora.scale * xa_acc[q];
                    if (j >= j0 && j < j0 + SIMT_K && j < lora.r && blockIdx.x == 0 && row0 + lrow < M)
                        lora.xa_out[(u64)(row0 + lrow) * lora.r + j] = xa_acc[q];
                }
            } else {
#pragma unroll
                for (int t = 0; t < 4; t++) {
                    const int e = li + t * 256;
                    const int mm = e / SIMT_K, jj = e % SIMT_K;
                    const int gi = row0 + mm, j = j0 + jj;
                    tile_a[jj][mm] = (gi < M && j < lora.r) ? lora.scale * lora.xa_in[(u64)gi * lora.r + j] : 0.f;
                }
            }
#pragma unroll
            for (int t = 0; t < 4; t++) {
                const int e = li + t * 256;
                const int nn = e / SIMT_K, jj = e % SIMT_K;
                const int gj = col0 + nn, j = j0 + jj;
                tile_b[jj][nn] = (gj < N && j < lora.r) ? lora.b[(u64)gj * lora.r + j] : 0.f;
            }
            __syncthreads();
            simt_mac(tile_a, tile_b, acc, tx, ty);
            __syncthreads();
        }
    }

    const u64 c_base = batch * (u64)M * N;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int gi = row0 + ty * 4 + i;
        if (gi >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int gj = col0 + tx * 4 + j;
            if (gj >= N) continue;
            float v = acc[i][j];
            if (LORA_RANK >= 0 && lora.bias) v += lora.bias[gj];
            store_out(C, c_base + (u64)gi * N + gj, v, out_kind);
        }
    }
}

// B as a dense row-major matrix: [K, N], or [N, K] when trans.
template <class T>
struct DenseB {
    const typename T::storage* __restrict__ B;
    int ldb;
    u64 stride_b;
    int trans;
    __device__ __forceinline__ float operator()(u64 batch, int k, int n) const {
        return T::load(B[batch * stride_b + (trans ? (u64)n * ldb + k : (u64)k * ldb + n)]);
    }
};

// ---------------------------------------------------------------------------------------
// Tensor cores: mma.sync m16n8k16, ldmatrix, cp.async

#define MMA_BM 128
#define MMA_BN 128
#define MMA_BK 32
#define MMA_PAD 8
// A stored k-contiguous in shared memory: [BM][BK + PAD]; m-contiguous: [BK][BM + PAD].
#define MMA_TILE_HALVES (MMA_BM * (MMA_BK + MMA_PAD) > MMA_BK * (MMA_BM + MMA_PAD) \
                             ? MMA_BM * (MMA_BK + MMA_PAD)                            \
                             : MMA_BK * (MMA_BM + MMA_PAD))

__device__ __forceinline__ u32 smem_addr(const void* p) {
    return (u32)__cvta_generic_to_shared(p);
}

// 16 bytes global → shared, asynchronously; reads `bytes` (0 or 16) and zero-fills the rest.
__device__ __forceinline__ void cp_async_16(u32 dst, const void* src, int bytes) {
    const u64 global = (u64)__cvta_generic_to_global(src);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global), "r"(bytes) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
    if (TRANS) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                     : "r"(addr)
                     : "memory");
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                     : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                     : "r"(addr)
                     : "memory");
    }
}

template <bool BF>
__device__ __forceinline__ void mma_16816(float (&c)[4], const u32 (&a)[4], u32 b0, u32 b1) {
    if (BF) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
            "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
}

// Two f32 values rounded to the half type, packed as an mma operand register (lo first).
template <bool BF>
__device__ __forceinline__ u32 pack_half2(float lo, float hi) {
    return BF ? (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16) : (u32)f32_to_f16(lo) | ((u32)f32_to_f16(hi) << 16);
}

// Issues the cp.async copies of one ROWS×COLS tile (COLS contiguous in memory, a multiple
// of 8) whose element (r, c) is src[(r0 + r) * ld + c0 + c], into shared memory with row
// stride COLS + PAD. Rows at or past `rows_in` and 8-chunks at or past `cols_in` read
// nothing and are zero-filled; the launcher guarantees cols_in and ld are multiples of 8.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile_async(u16* dst, const u16* src, u64 ld, int r0, int c0,
                                                int rows_in, int cols_in) {
    constexpr int CHUNKS_PER_ROW = COLS / 8;
    constexpr int CHUNKS = ROWS * CHUNKS_PER_ROW;
    static_assert(CHUNKS % 256 == 0 || CHUNKS < 256, "tile must split evenly over 256 threads");
#pragma unroll
    for (int t = 0; t < (CHUNKS + 255) / 256; t++) {
        const int chunk = threadIdx.x + t * 256;
        if (CHUNKS < 256 && chunk >= CHUNKS) break;
        const int r = chunk / CHUNKS_PER_ROW;
        const int c = (chunk % CHUNKS_PER_ROW) * 8;
        const bool inside = (r0 + r) < rows_in && (c0 + c) < cols_in;
        const u16* g = inside ? src + (u64)(r0 + r) * ld + (c0 + c) : src;
        cp_async_16(smem_addr(dst + r * (COLS + MMA_PAD) + c), g, inside ? 16 : 0);
    }
}

// Rank columns per delta step of the mma engine, and the largest in-kernel rank (LORA_RANK > 0):
// A_lora's double-buffered k-tiles must fit beside A's and B's in 48 KiB of static shared
// memory.
#define MMA_LORA_STEP 32
#define MMA_LORA_R 32

// B comes from a stage loader: `bstage.load(dst, k0, n0, batch)` fills one BK×BN tile of B
// in shared memory, laid out [n][k] (row stride BK + PAD) when TRANS_B, else [k][n] (row
// stride BN + PAD), zero past K and N; asynchronously (cp.async, counted by the pipeline's
// commit groups) or with plain stores (visible after the pipeline's barrier).
template <bool BF, bool TRANS_A, bool TRANS_B, class BStage, int LORA_RANK = -1>
__device__ void gemm_mma(const u16* __restrict__ A, const BStage& bstage, void* __restrict__ C,
                         int out_kind, int M, int N, int K, int lda, u64 stride_a,
                         const LoraArgs& lora = LoraArgs{}) {
#if __CUDA_ARCH__ >= 800
    static_assert((LORA_RANK <= MMA_LORA_R && LORA_RANK % 16 == 0) || LORA_RANK < 0, "in-kernel xa: rank padded to 16 or 32");
    static_assert(LORA_RANK <= 0 || !TRANS_A, "in-kernel xa reads A's tiles as [m][k]");
    if (LORA_RANK > 0 && lora.r > LORA_RANK) __trap();  // the launcher computes xa beforehand past LORA_RANK
    __shared__ __align__(128) u16 smem_a[2][MMA_TILE_HALVES];
    __shared__ __align__(128) u16 smem_b[2][MMA_TILE_HALVES];
    // A_lora's k-tiles as [j][k] (the layout of B's [n][k]); one element when unused.
    __shared__ __align__(128) u16 smem_la[2][LORA_RANK > 0 ? LORA_RANK * (MMA_BK + MMA_PAD) : 8];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warp_m = warp >> 2, warp_n = warp & 3;  // 2 × 4 warps, 64 × 32 each
    const int m0 = blockIdx.y * MMA_BM, n0 = blockIdx.x * MMA_BN;
    const u64 batch = blockIdx.z;
    A += batch * stride_a;

    // Loads k-tile `kt` into stage `s`. Shared layouts: A as [m][k] (or [k][m] if TRANS_A),
    // B as [n][k] (or [k][n] if !TRANS_B): each keeps the stored contiguous dimension.
    auto load_stage = [&](int s, int kt) {
        const int k0 = kt * MMA_BK;
        if (TRANS_A) load_tile_async<MMA_BK, MMA_BM>(smem_a[s], A, lda, k0, m0, K, M);
        else         load_tile_async<MMA_BM, MMA_BK>(smem_a[s], A, lda, m0, k0, M, K);
        bstage.load(smem_b[s], k0, n0, batch);
        if (LORA_RANK > 0) load_tile_async<(LORA_RANK > 0 ? LORA_RANK : 16), MMA_BK>(smem_la[s], (const u16*)lora.a, K, 0, k0, lora.r, K);
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.f;
    // In-kernel xa: warp (warp_m, warp_n) computes rows warp_m·64 + warp_n·16 .. +16 of the
    // tile against every rank column, as m16n8 tiles (the A fragments are the warp's own).
    constexpr int XA_TILES = LORA_RANK > 0 ? LORA_RANK / 8 : 1;
    float xa_acc[XA_TILES][4];
#pragma unroll
    for (int j = 0; j < XA_TILES; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) xa_acc[j][r] = 0.f;

    const int k_tiles = (K + MMA_BK - 1) / MMA_BK;
    load_stage(0, 0);
    cp_async_commit();

    // ldmatrix address pattern: lane supplies one row of one of four 8×8 matrices.
    const int quad = lane >> 3, row8 = lane & 7;

    for (int kt = 0; kt < k_tiles; kt++) {
        if (kt + 1 < k_tiles) load_stage((kt + 1) & 1, kt + 1);
        cp_async_commit();  // possibly empty, so the wait below counts the same way each time
        cp_async_wait<1>();
        __syncthreads();
        const u16* sa = smem_a[kt & 1];
        const u16* sb = smem_b[kt & 1];

#pragma unroll
        for (int kk = 0; kk < MMA_BK; kk += 16) {
            u32 af[4][4];
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                const int mb = warp_m * 64 + mi * 16;
                const u16* p;
                if (TRANS_A) {
                    // [k][m]: matrix q holds k rows (q >> 1) * 8.., m columns (q & 1) * 8..
                    p = sa + (kk + row8 + (quad >> 1) * 8) * (MMA_BM + MMA_PAD) + mb + (quad & 1) * 8;
                } else {
                    // [m][k]: lanes 0-15 rows 0-15 at k, lanes 16-31 rows 0-15 at k + 8.
                    p = sa + (mb + (lane & 15)) * (MMA_BK + MMA_PAD) + kk + (lane >> 4) * 8;
                }
                ldmatrix_x4<TRANS_A>(smem_addr(p), af[mi][0], af[mi][1], af[mi][2], af[mi][3]);
            }
            u32 bf[4][2];
#pragma unroll
            for (int nj = 0; nj < 2; nj++) {
                const int nb = warp_n * 32 + nj * 16;
                const u16* p;
                if (TRANS_B) {
                    // [n][k]: matrix q holds n rows (q >> 1) * 8.., k columns (q & 1) * 8..
                    p = sb + (nb + row8 + (quad >> 1) * 8) * (MMA_BK + MMA_PAD) + kk + (quad & 1) * 8;
                } else {
                    // [k][n]: matrix q holds k rows (q & 1) * 8.., n columns (q >> 1) * 8..
                    p = sb + (kk + row8 + (quad & 1) * 8) * (MMA_BN + MMA_PAD) + nb + (quad >> 1) * 8;
                }
                ldmatrix_x4<!TRANS_B>(smem_addr(p), bf[2 * nj][0], bf[2 * nj][1], bf[2 * nj + 1][0],
                                      bf[2 * nj + 1][1]);
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_16816<BF>(acc[mi][ni], af[mi], bf[ni][0], bf[ni][1]);
            if (LORA_RANK > 0) {
                // A_lora as [j][k], the [n][k] pattern above.
                u32 lf[XA_TILES][2];
#pragma unroll
                for (int nj = 0; nj < XA_TILES / 2; nj++) {
                    const u16* p = smem_la[kt & 1] + (nj * 16 + row8 + (quad >> 1) * 8) * (MMA_BK + MMA_PAD) + kk +
                                   (quad & 1) * 8;
                    ldmatrix_x4<false>(smem_addr(p), lf[2 * nj][0], lf[2 * nj][1], lf[2 * nj + 1][0],
                                       lf[2 * nj + 1][1]);
                }
#pragma unroll
                for (int mi = 0; mi < 4; mi++) {
                    if (mi != warp_n) continue;  // warp-uniform: one of the warp's four row tiles
#pragma unroll
                    for (int nj = 0; nj < XA_TILES; nj++) mma_16816<BF>(xa_acc[nj], af[mi], lf[nj][0], lf[nj][1]);
                }
            }
        }
        __syncthreads();
    }

    // Accumulator layout of m16n8: c0,c1 at (g, 2t..2t+1), c2,c3 at (g + 8, 2t..2t+1).
    const int g = lane >> 2, t = lane & 3;
    if (LORA_RANK >= 0) {
        // The delta as extra k-steps in f32, MMA_LORA_STEP rank columns at a time, staged
        // k-major in the freed A and B buffers: xs[jj][row] = s·xa, bs[jj][col] = B_lora.
        constexpr int LDX = MMA_BM + 4, LDB = MMA_BN + 4;
        static_assert(MMA_LORA_STEP * LDX * 4 <= sizeof(smem_a), "xa step must fit A's buffers");
        static_assert(MMA_LORA_STEP * LDB * 4 <= sizeof(smem_b), "B_lora step must fit B's buffers");
        float* xs = (float*)&smem_a[0][0];
        float* bs = (float*)&smem_b[0][0];
        for (int j0 = 0; j0 < lora.r; j0 += MMA_LORA_STEP) {
            if (LORA_RANK > 0) {
#pragma unroll
                for (int nj = 0; nj < XA_TILES; nj++)
#pragma unroll
                    for (int r = 0; r < 4; r++) {
                        const int row = warp_m * 64 + warp_n * 16 + g + (r >> 1) * 8;
                        const int j = nj * 8 + 2 * t + (r & 1);
                        xs[j * LDX + row] = lora.scale * xa_acc[nj][r];
                        if (blockIdx.x == 0 && m0 + row < M && j < lora.r)
                            lora.xa_out[(u64)(m0 + row) * lora.r + j] = xa_acc[nj][r];
                    }
            } else {
                for (int e = threadIdx.x; e < MMA_LORA_STEP * MMA_BM; e += 256) {
                    const int row = e / MMA_LORA_STEP, jj = e % MMA_LORA_STEP, j = j0 + jj;
                    xs[jj * LDX + row] =
                        (m0 + row < M && j < lora.r) ? lora.scale * lora.xa_in[(u64)(m0 + row) * lora.r + j] : 0.f;
                }
            }
            for (int e = threadIdx.x; e < MMA_LORA_STEP * MMA_BN; e += 256) {
                const int col = e / MMA_LORA_STEP, jj = e % MMA_LORA_STEP, j = j0 + jj;
                bs[jj * LDB + col] = (n0 + col < N && j < lora.r) ? lora.b[(u64)(n0 + col) * lora.r + j] : 0.f;
            }
            __syncthreads();
            const int steps = min(MMA_LORA_STEP, LORA_RANK > 0 ? LORA_RANK : lora.r - j0);
            for (int jj = 0; jj < steps; jj++) {
                float xv[4][2], bv[4][2];
#pragma unroll
                for (int mi = 0; mi < 4; mi++)
#pragma unroll
                    for (int h = 0; h < 2; h++) xv[mi][h] = xs[jj * LDX + warp_m * 64 + mi * 16 + g + h * 8];
#pragma unroll
                for (int ni = 0; ni < 4; ni++)
#pragma unroll
                    for (int e = 0; e < 2; e++) bv[ni][e] = bs[jj * LDB + warp_n * 32 + ni * 8 + 2 * t + e];
#pragma unroll
                for (int mi = 0; mi < 4; mi++)
#pragma unroll
                    for (int ni = 0; ni < 4; ni++)
#pragma unroll
                        for (int r = 0; r < 4; r++)
                            acc[mi][ni][r] = fmaf(xv[mi][r >> 1], bv[ni][r & 1], acc[mi][ni][r]);
            }
            __syncthreads();
        }
    }

    const u64 c_base = batch * (u64)M * N;
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int row = m0 + warp_m * 64 + mi * 16 + g + half * 8;
            if (row >= M) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const int col = n0 + warp_n * 32 + ni * 8 + 2 * t + e;
                    if (col >= N) continue;
                    float v = acc[mi][ni][half * 2 + e];
                    if (LORA_RANK >= 0 && lora.bias) v += lora.bias[col];
                    store_out(C, c_base + (u64)row * N + col, v, out_kind);
                }
            }
        }
    }
#else
    __trap();  // the launcher only picks this kernel on sm_80 and newer
#endif
}

// B dense in global memory, copied with cp.async: [K, N] (ldb = N), or [N, K] when TRANS_B.
template <bool TRANS_B>
struct DenseBStage {
    const u16* B;
    int ldb;
    u64 stride_b;
    int K, N;
    __device__ __forceinline__ void load(u16* dst, int k0, int n0, u64 batch) const {
        const u16* b = B + batch * stride_b;
        if (TRANS_B) load_tile_async<MMA_BN, MMA_BK>(dst, b, ldb, n0, k0, N, K);
        else         load_tile_async<MMA_BK, MMA_BN>(dst, b, ldb, k0, n0, K, N);
    }
};
