// Shared by the attention programs' forward and backward (prepended after common.cuh and
// gemm.cuh): which keys a query row sees, and the warp-level tensor-core pieces of the
// FlashAttention-2 kernels in attention_fwd.cu and attention_bwd.cu.

#define MAX_HEAD_DIM 256

// The scalars of every forward and backward kernel (AttentionParams in
// src/ops/attention/cuda.rs). `rows` counts what the one-row-per-thread kernels walk: query
// rows (forward, dq) or key rows (dk, dv); the tensor-core kernels ignore it and `dim`.
struct AttentionParams {
    u64 rows;
    int q_len, kv_len, heads, kv_heads, dim;
    float scale;
    int causal;
    int pad0;
};

__device__ __forceinline__ int visible_keys(int i, u32 len, int q_len, int kv_len, int causal) {
    if ((u32)i >= min(len, (u32)q_len)) return 0;
    const int kv_valid = (int)min(len, (u32)kv_len);
    if (!causal) return kv_valid;
    const int end = i + kv_len - q_len + 1;
    return min(max(end, 0), kv_valid);
}

// Tiles of the tensor-core kernels: 64 query rows per block, keys in tiles of 64.
#define FA_BM 64
#define FA_BN 64


// Copies rows r0..r0+ROWS of a [rows][D] half operand (row stride `stride` halves) into a
// shared tile with rows of D + 8 halves, with cp.async by 128 threads; rows at or past
// `rows_in` are zero-filled.
template <int ROWS, int D>
__device__ __forceinline__ void fa_load_rows(u16* dst, const u16* src, u64 stride, int r0, int rows_in) {
    constexpr int CHUNKS = ROWS * D / 8;
    for (int c = threadIdx.x; c < CHUNKS; c += 128) {
        const int r = c / (D / 8), col = (c % (D / 8)) * 8;
        const bool inside = r0 + r < rows_in;
        cp_async_16(smem_addr(dst + r * (D + 8) + col), inside ? src + (u64)(r0 + r) * stride + col : src,
                    inside ? 16 : 0);
    }
}

// Warp-level pieces of the tensor-core kernels below (lane = threadIdx.x % 32; tiles in
// shared memory with rows of `ld` halves; fragment layouts as in gemm.cuh).

// A fragments of the 16×16 tile at column k0 of a [m][k] tile: lanes 0-15 give rows 0-15
// at k0, lanes 16-31 the same rows at k0 + 8.
__device__ __forceinline__ void fa_load_a(const u16* tile, int ld, int k0, u32 (&a)[4]) {
    const int lane = threadIdx.x & 31;
    ldmatrix_x4<false>(smem_addr(tile + (lane & 15) * ld + k0 + (lane >> 4) * 8), a[0], a[1], a[2], a[3]);
}

// c0, c1 += a · Bᵀ for rows n0..n0+15 (two n-tiles of 8) and columns k0..k0+15 of a [n][k]
// tile: matrix q of the ldmatrix holds rows (q >> 1)·8.., columns (q & 1)·8...
template <bool BF>
__device__ __forceinline__ void fa_mma_nk(float (&c0)[4], float (&c1)[4], const u32 (&a)[4], const u16* tile, int ld,
                                          int n0, int k0) {
    const int lane = threadIdx.x & 31, quad = lane >> 3, row8 = lane & 7;
    u32 b0, b1, b2, b3;
    ldmatrix_x4<false>(smem_addr(tile + (n0 + row8 + (quad >> 1) * 8) * ld + k0 + (quad & 1) * 8), b0, b1, b2, b3);
    mma_16816<BF>(c0, a, b0, b1);
    mma_16816<BF>(c1, a, b2, b3);
}

// acc += a · rows k0..k0+15 of a [k][n] tile with D columns (rows of D + 8 halves), read
// by ldmatrix.trans: matrix q holds rows (q & 1)·8.., columns (q >> 1)·8...
template <bool BF, int D>
__device__ __forceinline__ void fa_mma_kn(float (&acc)[D / 8][4], const u32 (&a)[4], const u16* tile, int k0) {
    const int lane = threadIdx.x & 31, quad = lane >> 3, row8 = lane & 7;
#pragma unroll
    for (int nj = 0; nj < D / 16; nj++) {
        u32 b0, b1, b2, b3;
        ldmatrix_x4<true>(smem_addr(tile + (k0 + row8 + (quad & 1) * 8) * (D + 8) + nj * 16 + (quad >> 1) * 8), b0,
                          b1, b2, b3);
        mma_16816<BF>(acc[2 * nj], a, b0, b1);
        mma_16816<BF>(acc[2 * nj + 1], a, b2, b3);
    }
}

// The A fragment made of two m16n8 accumulator tiles side by side (columns 0-7 and 8-15),
// rounded to the half type: P and dS go from one product into the next in registers.
template <bool BF>
__device__ __forceinline__ void fa_acc_to_a(const float (&c0)[4], const float (&c1)[4], u32 (&a)[4]) {
    a[0] = pack_half2<BF>(c0[0], c0[1]);
    a[1] = pack_half2<BF>(c0[2], c0[3]);
    a[2] = pack_half2<BF>(c1[0], c1[1]);
    a[3] = pack_half2<BF>(c1[2], c1[3]);
}
