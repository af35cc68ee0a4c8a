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

// ---------------------------------------------------------------------------------------
// SIMT

#define SIMT_TILE 64
#define SIMT_K 16

// B comes from a loader: `bload(batch, k, n)` is B(k, n) as f32. `trans_b` only orders the
// tile loads so consecutive threads walk B's stored rows.
template <class T, class BLoad>
__device__ void gemm_simt(const typename T::storage* __restrict__ A, const BLoad& bload,
                          void* __restrict__ C, int out_kind, int M, int N, int K, int lda,
                          u64 stride_a, int trans_a, int trans_b) {
    __shared__ float tile_a[SIMT_K][SIMT_TILE];
    __shared__ float tile_b[SIMT_K][SIMT_TILE];
    const int tx = threadIdx.x, ty = threadIdx.y, li = ty * 16 + tx;
    const int row0 = blockIdx.y * SIMT_TILE, col0 = blockIdx.x * SIMT_TILE;
    const u64 batch = blockIdx.z;
    A += batch * stride_a;

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) acc[i][j] = 0.f;

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
        __syncthreads();
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
        __syncthreads();
    }

    const u64 c_base = batch * (u64)M * N;
#pragma unroll
    for (int i = 0; i < 4; i++) {
        const int gi = row0 + ty * 4 + i;
        if (gi >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const int gj = col0 + tx * 4 + j;
            if (gj < N) store_out(C, c_base + (u64)gi * N + gj, acc[i][j], out_kind);
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

// Issues the cp.async copies of one ROWS×COLS tile (COLS contiguous in memory, a multiple
// of 8) whose element (r, c) is src[(r0 + r) * ld + c0 + c], into shared memory with row
// stride COLS + PAD. Rows at or past `rows_in` and 8-chunks at or past `cols_in` read
// nothing and are zero-filled; the launcher guarantees cols_in and ld are multiples of 8.
template <int ROWS, int COLS>
__device__ __forceinline__ void load_tile_async(u16* dst, const u16* src, u64 ld, int r0, int c0,
                                                int rows_in, int cols_in) {
    constexpr int CHUNKS_PER_ROW = COLS / 8;
    constexpr int CHUNKS = ROWS * CHUNKS_PER_ROW;
    static_assert(CHUNKS % 256 == 0, "tile must split evenly over 256 threads");
#pragma unroll
    for (int t = 0; t < CHUNKS / 256; t++) {
        const int chunk = threadIdx.x + t * 256;
        const int r = chunk / CHUNKS_PER_ROW;
        const int c = (chunk % CHUNKS_PER_ROW) * 8;
        const bool inside = (r0 + r) < rows_in && (c0 + c) < cols_in;
        const u16* g = inside ? src + (u64)(r0 + r) * ld + (c0 + c) : src;
        cp_async_16(smem_addr(dst + r * (COLS + MMA_PAD) + c), g, inside ? 16 : 0);
    }
}

// B comes from a stage loader: `bstage.load(dst, k0, n0, batch)` fills one BK×BN tile of B
// in shared memory, laid out [n][k] (row stride BK + PAD) when TRANS_B, else [k][n] (row
// stride BN + PAD), zero past K and N; asynchronously (cp.async, counted by the pipeline's
// commit groups) or with plain stores (visible after the pipeline's barrier).
template <bool BF, bool TRANS_A, bool TRANS_B, class BStage>
__device__ void gemm_mma(const u16* __restrict__ A, const BStage& bstage, void* __restrict__ C,
                         int out_kind, int M, int N, int K, int lda, u64 stride_a) {
#if __CUDA_ARCH__ >= 800
    __shared__ __align__(128) u16 smem_a[2][MMA_TILE_HALVES];
    __shared__ __align__(128) u16 smem_b[2][MMA_TILE_HALVES];

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
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) acc[i][j][r] = 0.f;

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
        }
        __syncthreads();
    }

    // Accumulator layout of m16n8: c0,c1 at (g, 2t..2t+1), c2,c3 at (g + 8, 2t..2t+1).
    const int g = lane >> 2, t = lane & 3;
    const u64 c_base = batch * (u64)M * N;
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int half = 0; half < 2; half++) {
            const int row = m0 + warp_m * 64 + mi * 16 + g + half * 8;
            if (row >= M) continue;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                const int col = n0 + warp_n * 32 + ni * 8 + 2 * t;
                if (col < N) store_out(C, c_base + (u64)row * N + col, acc[mi][ni][half * 2], out_kind);
                if (col + 1 < N) store_out(C, c_base + (u64)row * N + col + 1, acc[mi][ni][half * 2 + 1], out_kind);
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
