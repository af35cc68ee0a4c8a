// Attention forward, one thread per query row (b, h, i), keys visited one at a time with an
// online softmax (running max, running sum, accumulator), so no score matrix is stored.
// Mirrors cpu_forward in src/ops/attention/mod.rs; q, k, v of dtype T, o and lse f32.
// Grid-stride over the batch·heads·q_len rows, 128 threads per block.
//
// attention_fwd_{f32,f16,bf16}

#define MAX_HEAD_DIM 256

__device__ __forceinline__ int visible_keys(int i, u32 len, int q_len, int kv_len, int causal) {
    if ((u32)i >= min(len, (u32)q_len)) return 0;
    const int kv_valid = (int)min(len, (u32)kv_len);
    if (!causal) return kv_valid;
    const int end = i + kv_len - q_len + 1;
    return min(max(end, 0), kv_valid);
}

template <class T>
__device__ void attention_fwd_impl(const typename T::storage* q, const typename T::storage* k,
                                   const typename T::storage* v, const u32* lens, float* o, float* lse,
                                   int q_len, int kv_len, int heads, int kv_heads, int dim, float scale,
                                   int causal, u64 rows) {
    for (u64 r = blockIdx.x * (u64)blockDim.x + threadIdx.x; r < rows; r += (u64)gridDim.x * blockDim.x) {
        const u64 b = r / ((u64)heads * q_len);
        const int h = (int)((r / q_len) % heads);
        const int i = (int)(r % q_len);
        const int kh = h / (heads / kv_heads);
        const u64 q_base = ((b * q_len + i) * heads + h) * (u64)dim;
        float acc[MAX_HEAD_DIM];
        for (int c = 0; c < dim; c++) acc[c] = 0.f;
        float m = -3.0e38f, l = 0.f;
        const int end = visible_keys(i, lens[b], q_len, kv_len, causal);
        for (int j = 0; j < end; j++) {
            const u64 kv_base = ((b * kv_len + j) * kv_heads + kh) * (u64)dim;
            float score = 0.f;
            for (int c = 0; c < dim; c++) score = fmaf(T::load(q[q_base + c]), T::load(k[kv_base + c]), score);
            score *= scale;
            const float m_new = fmaxf(m, score);
            const float correction = expf(m - m_new);
            const float p = expf(score - m_new);
            l = l * correction + p;
            for (int c = 0; c < dim; c++) acc[c] = acc[c] * correction + p * T::load(v[kv_base + c]);
            m = m_new;
        }
        for (int c = 0; c < dim; c++) o[q_base + c] = l > 0.f ? acc[c] / l : 0.f;
        lse[r] = l > 0.f ? m + logf(l) : __int_as_float(0xff800000);  // −∞
    }
}

#define KILN_ATTENTION(T, NAME)                                                                     \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_##NAME(                          \
        const T::storage* q, const T::storage* k, const T::storage* v, const u32* lens, float* o,     \
        float* lse, int q_len, int kv_len, int heads, int kv_heads, int dim, float scale, int causal,  \
        u64 rows) {                                                                                  \
        attention_fwd_impl<T>(q, k, v, lens, o, lse, q_len, kv_len, heads, kv_heads, dim, scale,      \
                              causal, rows);                                                         \
    }

KILN_ATTENTION(F32, f32)
KILN_ATTENTION(F16, f16)
KILN_ATTENTION(BF16, bf16)

// ---------------------------------------------------------------------------------------
// Forward on tensor cores (FlashAttention-2), sm_80+, f16/bf16, head dims 64, 80, 96, 128.
//
// attention_fwd_mma_{f16,bf16}_d{64,80,96,128}
//     128 threads (4 warps) per 64 query rows of one (batch, head); warp w owns rows
//     16w..16w+15. Q's fragments are loaded once and stay in registers. Per tile of 64
//     keys: K and V rows go global → shared with cp.async ([key][dim], rows padded by 8
//     halves so ldmatrix is conflict-free; V's copy overlaps S, the next K's overlaps P·V);
//     S = Q·Kᵀ with mma.m16n8k16 (K read with the
//     [n][k] ldmatrix pattern of gemm.cuh); masked scores are −∞; the online softmax runs
//     in the log2 domain on the accumulators (row max over the 4 lanes sharing a row);
//     P is repacked from the S accumulators straight into A fragments, and O += P·V with
//     V read by ldmatrix.trans. Rows past the block's last visible key are zero-filled, not
//     read, so padding may hold anything. The row sums stay per lane until the end. Output in q's
//     type, lse in natural log (−∞ and zeros for a row that sees no key).
//     Grid (ceil(q_len / 64), batch·heads).

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

template <bool BF, int D>
__device__ void attention_fwd_mma_impl(const u16* __restrict__ q, const u16* __restrict__ k,
                                       const u16* __restrict__ v, const u32* lens, u16* __restrict__ o,
                                       float* __restrict__ lse, int q_len, int kv_len, int heads, int kv_heads,
                                       float scale, int causal) {
#if __CUDA_ARCH__ >= 800
    static_assert(D % 16 == 0 && D <= 128, "head dim a multiple of 16 up to 128");
    constexpr int LD = D + 8;  // padded row, in halves
    __shared__ __align__(128) u16 s_k[FA_BN * LD];
    __shared__ __align__(128) u16 s_v[FA_BN * LD];  // holds Q's tile before the loop
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.x * FA_BM;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int kh = h / (heads / kv_heads);
    const u32 len = lens[b];
    const u64 q_stride = (u64)heads * D, kv_stride = (u64)kv_heads * D;
    const u16* qb = q + ((u64)b * q_len * heads + h) * D;
    const u16* kb = k + ((u64)b * kv_len * kv_heads + kh) * D;
    const u16* vb = v + ((u64)b * kv_len * kv_heads + kh) * D;

    fa_load_rows<FA_BM, D>(s_v, qb, q_stride, m0, q_len);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    u32 qf[D / 16][4];
#pragma unroll
    for (int kk = 0; kk < D / 16; kk++) fa_load_a(s_v + warp * 16 * LD, LD, kk * 16, qf[kk]);
    __syncthreads();

    // This lane's two rows (g and g + 8 of the warp's 16) and the keys each sees.
    const int i0 = m0 + warp * 16 + g, i1 = i0 + 8;
    const int vis0 = i0 < q_len ? visible_keys(i0, len, q_len, kv_len, causal) : 0;
    const int vis1 = i1 < q_len ? visible_keys(i1, len, q_len, kv_len, causal) : 0;
    // Keys any row of the block sees: visible_keys grows with the row up to the last real one.
    const int last = min(m0 + FA_BM, (int)min(len, (u32)q_len)) - 1;
    const int n_end = last >= m0 ? visible_keys(last, len, q_len, kv_len, causal) : 0;

    const float LOG2E = 1.4426950408889634f;
    const float scale2 = scale * LOG2E;
    const float NEG_INF = __int_as_float(0xff800000);
    float o_acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) o_acc[j][r] = 0.f;
    float m_run[2] = {NEG_INF, NEG_INF}, l_run[2] = {0.f, 0.f};

    // Copies overlap compute: V's tile arrives while S is computed, the next K tile while
    // P·V is. One K group (this tile's) is in flight at the top of each step.
    if (n_end > 0) fa_load_rows<FA_BN, D>(s_k, kb, kv_stride, 0, n_end);
    cp_async_commit();
    for (int n0 = 0; n0 < n_end; n0 += FA_BN) {
        fa_load_rows<FA_BN, D>(s_v, vb, kv_stride, n0, n_end);
        cp_async_commit();
        cp_async_wait<1>();  // K of this tile has landed; V may still be in flight
        __syncthreads();

        float s[FA_BN / 8][4];
#pragma unroll
        for (int j = 0; j < FA_BN / 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) s[j][r] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
            for (int nj = 0; nj < FA_BN / 16; nj++) fa_mma_nk<BF>(s[2 * nj], s[2 * nj + 1], qf[kk], s_k, LD, nj * 16, kk * 16);
        }

        // Online softmax, log2 domain. s[j][r]: row g + 8·(r >> 1), key n0 + 8j + 2t + (r & 1).
        float tile_max[2] = {NEG_INF, NEG_INF};
#pragma unroll
        for (int j = 0; j < FA_BN / 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int key = n0 + 8 * j + 2 * t + (r & 1);
                const float x = key < ((r >> 1) ? vis1 : vis0) ? s[j][r] * scale2 : NEG_INF;
                s[j][r] = x;
                tile_max[r >> 1] = fmaxf(tile_max[r >> 1], x);
            }
        float m_use[2], correction[2];
#pragma unroll
        for (int hf = 0; hf < 2; hf++) {
            tile_max[hf] = fmaxf(tile_max[hf], __shfl_xor_sync(0xffffffffu, tile_max[hf], 1));
            tile_max[hf] = fmaxf(tile_max[hf], __shfl_xor_sync(0xffffffffu, tile_max[hf], 2));
            const float m_new = fmaxf(m_run[hf], tile_max[hf]);
            // A row that has seen no key yet keeps −∞; subtract 0 then (exp2(−∞) = 0).
            m_use[hf] = m_new == NEG_INF ? 0.f : m_new;
            correction[hf] = exp2f(m_run[hf] - m_use[hf]);
            m_run[hf] = m_new;
            l_run[hf] *= correction[hf];
        }
#pragma unroll
        for (int j = 0; j < D / 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) o_acc[j][r] *= correction[r >> 1];
#pragma unroll
        for (int j = 0; j < FA_BN / 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                s[j][r] = exp2f(s[j][r] - m_use[r >> 1]);
                l_run[r >> 1] += s[j][r];
            }

        cp_async_wait<0>();  // V of this tile has landed
        __syncthreads();      // and every warp is done with K's tile
        if (n0 + FA_BN < n_end) fa_load_rows<FA_BN, D>(s_k, kb, kv_stride, n0 + FA_BN, n_end);
        cp_async_commit();

        // O += P·V: P's A fragments come from the S accumulators of keys 16kk..16kk+15.
#pragma unroll
        for (int kk = 0; kk < FA_BN / 16; kk++) {
            u32 pa[4];
            fa_acc_to_a<BF>(s[2 * kk], s[2 * kk + 1], pa);
            fa_mma_kn<BF, D>(o_acc, pa, s_v, kk * 16);
        }
        __syncthreads();
    }

#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        l_run[hf] += __shfl_xor_sync(0xffffffffu, l_run[hf], 1);
        l_run[hf] += __shfl_xor_sync(0xffffffffu, l_run[hf], 2);
    }
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int i = hf ? i1 : i0;
        if (i >= q_len) continue;
        const float l = l_run[hf];
        const float inv = l > 0.f ? 1.f / l : 0.f;
        u16* orow = o + (((u64)b * q_len + i) * heads + h) * D;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            const int col = 8 * j + 2 * t;
            *(u32*)(orow + col) = pack_half2<BF>(o_acc[j][2 * hf] * inv, o_acc[j][2 * hf + 1] * inv);
        }
        if (t == 0) lse[((u64)b * heads + h) * q_len + i] = l > 0.f ? (m_run[hf] + log2f(l)) / LOG2E : NEG_INF;
    }
#else
    __trap();  // the launcher only picks this kernel on sm_80 and newer
#endif
}

#define KILN_ATTENTION_MMA(BF, NAME, D)                                                               \
    extern "C" __global__ void __launch_bounds__(128) attention_fwd_mma_##NAME##_d##D(               \
        const u16* q, const u16* k, const u16* v, const u32* lens, u16* o, float* lse, int q_len,       \
        int kv_len, int heads, int kv_heads, float scale, int causal) {                                 \
        attention_fwd_mma_impl<BF, D>(q, k, v, lens, o, lse, q_len, kv_len, heads, kv_heads, scale,  \
                                      causal);                                                          \
    }

KILN_ATTENTION_MMA(false, f16, 64)
KILN_ATTENTION_MMA(false, f16, 80)
KILN_ATTENTION_MMA(false, f16, 96)
KILN_ATTENTION_MMA(false, f16, 128)
KILN_ATTENTION_MMA(true, bf16, 64)
KILN_ATTENTION_MMA(true, bf16, 80)
KILN_ATTENTION_MMA(true, bf16, 96)
KILN_ATTENTION_MMA(true, bf16, 128)

// ---------------------------------------------------------------------------------------
// Backward (FlashAttention-2 scheme): scores recomputed from q, k and lse;
// p = exp(s − lse), dS = p · (dO_i · v_j − D_i), D = rowsum(dO ⊙ O) as [b, q_len, h]; dO is
// f32. One thread per output row, grid-stride, 128 threads per block.
//
// attention_bwd_dq_{f32,f16,bf16}    row (b, i, h): dq = scale · Σ_j dS_ij · k_j
// attention_bwd_dkv_{f32,f16,bf16}   row (b, j, kh): dv = Σ p_ij · dO_i, dk = scale · Σ dS_ij · q_i
//                                    over every head of kh's group and every row seeing j

template <class T>
struct AttnArgs {
    const typename T::storage *q, *k, *v;
    const float *d_o, *lse, *dvec;
    const u32* lens;
    int q_len, kv_len, heads, kv_heads, dim;
    float scale;
    int causal;

    // (p, dS) of query row (b, i, h) and key j.
    __device__ __forceinline__ float2 pair(u64 b, int h, int i, int j) const {
        const int kh = h / (heads / kv_heads);
        const u64 qb = ((b * q_len + i) * heads + h) * (u64)dim;
        const u64 kb = ((b * kv_len + j) * kv_heads + kh) * (u64)dim;
        float score = 0.f, dp = 0.f;
        for (int c = 0; c < dim; c++) {
            score = fmaf(T::load(q[qb + c]), T::load(k[kb + c]), score);
            dp = fmaf(d_o[qb + c], T::load(v[kb + c]), dp);
        }
        const float p = expf(score * scale - lse[(b * heads + h) * q_len + i]);
        return make_float2(p, p * (dp - dvec[(b * q_len + i) * heads + h]));
    }
};

template <class T>
__device__ void attention_bwd_dq_impl(const AttnArgs<T>& a, float* dq, u64 rows) {
    for (u64 r = blockIdx.x * (u64)blockDim.x + threadIdx.x; r < rows; r += (u64)gridDim.x * blockDim.x) {
        const u64 b = r / ((u64)a.q_len * a.heads);
        const int i = (int)((r / a.heads) % a.q_len);
        const int h = (int)(r % a.heads);
        const int kh = h / (a.heads / a.kv_heads);
        float* out = dq + r * a.dim;
        for (int c = 0; c < a.dim; c++) out[c] = 0.f;
        const int end = visible_keys(i, a.lens[b], a.q_len, a.kv_len, a.causal);
        for (int j = 0; j < end; j++) {
            const float ds = a.pair(b, h, i, j).y * a.scale;
            const u64 kb = ((b * a.kv_len + j) * a.kv_heads + kh) * (u64)a.dim;
            for (int c = 0; c < a.dim; c++) out[c] = fmaf(ds, T::load(a.k[kb + c]), out[c]);
        }
    }
}

template <class T>
__device__ void attention_bwd_dkv_impl(const AttnArgs<T>& a, float* dk, float* dv, u64 rows) {
    for (u64 r = blockIdx.x * (u64)blockDim.x + threadIdx.x; r < rows; r += (u64)gridDim.x * blockDim.x) {
        const u64 b = r / ((u64)a.kv_len * a.kv_heads);
        const int j = (int)((r / a.kv_heads) % a.kv_len);
        const int kh = (int)(r % a.kv_heads);
        const int group = a.heads / a.kv_heads;
        float* dk_row = dk + r * a.dim;
        float* dv_row = dv + r * a.dim;
        for (int c = 0; c < a.dim; c++) dk_row[c] = dv_row[c] = 0.f;
        for (int h = kh * group; h < (kh + 1) * group; h++) {
            for (int i = 0; i < a.q_len; i++) {
                if (j >= visible_keys(i, a.lens[b], a.q_len, a.kv_len, a.causal)) continue;
                const float2 pd = a.pair(b, h, i, j);
                const u64 qb = ((b * a.q_len + i) * a.heads + h) * (u64)a.dim;
                for (int c = 0; c < a.dim; c++) {
                    dv_row[c] = fmaf(pd.x, a.d_o[qb + c], dv_row[c]);
                    dk_row[c] = fmaf(a.scale * pd.y, T::load(a.q[qb + c]), dk_row[c]);
                }
            }
        }
    }
}

#define ATTN_BWD_PARAMS(T)                                                                          \
    const T::storage *q, const T::storage *k, const T::storage *v, const float *d_o,                \
        const float *lse, const float *dvec, const u32 *lens, int q_len, int kv_len, int heads,     \
        int kv_heads, int dim, float scale, int causal
#define ATTN_BWD_ARGS(T) AttnArgs<T>{q, k, v, d_o, lse, dvec, lens, q_len, kv_len, heads, kv_heads, dim, scale, causal}

#define KILN_ATTENTION_BWD(T, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                \
        attention_bwd_dq_##NAME(ATTN_BWD_PARAMS(T), float* dq, u64 rows) {                           \
        attention_bwd_dq_impl<T>(ATTN_BWD_ARGS(T), dq, rows);                                        \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(128)                                                \
        attention_bwd_dkv_##NAME(ATTN_BWD_PARAMS(T), float* dk, float* dv, u64 rows) {               \
        attention_bwd_dkv_impl<T>(ATTN_BWD_ARGS(T), dk, dv, rows);                                   \
    }

KILN_ATTENTION_BWD(F32, f32)
KILN_ATTENTION_BWD(F16, f16)
KILN_ATTENTION_BWD(BF16, bf16)

// ---------------------------------------------------------------------------------------
// Backward on tensor cores (FlashAttention-2), sm_80+, f16/bf16, head dims 64/80/96/128.
// Same arithmetic as the kernels above, with q, k, v and dO in the half type (dO rounded
// to it by the launcher) and P and dS rounded to it as mma operands; f32 accumulation.
// Padding (keys past a sequence's length, query rows past it) is zero-filled, not read.
// Scores in the log2 domain: p = exp2(s·scale·log2 e − lse·log2 e).
//
// attention_bwd_dq_mma_{f16,bf16}_d{64,80,96,128}
//     128 threads (4 warps) per 64 query rows of one (batch, head); Q's and dO's fragments
//     stay in registers. Per tile of 32 keys: S = Q·Kᵀ and dP = dO·Vᵀ (K and V read as
//     [n][k]), P and dS = P ⊙ (dP − D) in the accumulators, dQ += dS·K (dS repacked into A
//     fragments, K read as [k][n] with ldmatrix.trans). dq = scale·dQ, f32.
//     Grid (ceil(q_len / 64), batch·heads).
// attention_bwd_dkv_mma_{f16,bf16}_d{64,80,96,128}
//     128 threads per 64 keys of one (batch, kv head), warp w owning keys 16w..16w+15; K
//     and V stay in shared memory. For every head of the kv head's group and every tile of
//     16 query rows that sees the keys: Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ, Pᵀ and dSᵀ in the
//     accumulators, dV += Pᵀ·dO and dK += dSᵀ·Q (Q and dO read as [k][n]). Summing the
//     group's heads in the block needs no atomics. dk = scale·dK, dv, f32.
//     Grid (ceil(kv_len / 64), batch·kv_heads).

#define FB_DQ_BN 32
#define FB_DKV_BM 16

template <bool BF, int D>
__device__ void attention_bwd_dq_mma_impl(const u16* __restrict__ q, const u16* __restrict__ k,
                                          const u16* __restrict__ v, const u16* __restrict__ d_o,
                                          const float* __restrict__ lse, const float* __restrict__ dvec,
                                          const u32* lens, float* __restrict__ dq, int q_len, int kv_len, int heads,
                                          int kv_heads, float scale, int causal) {
#if __CUDA_ARCH__ >= 800
    constexpr int LD = D + 8;
    __shared__ __align__(128) u16 s_k[FB_DQ_BN * LD];
    __shared__ __align__(128) u16 s_v[FB_DQ_BN * LD];
    __shared__ __align__(128) u16 s_stage[FA_BM * LD];  // Q's tile, then dO's
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.x * FA_BM;
    const int b = blockIdx.y / heads, h = blockIdx.y % heads;
    const int kh = h / (heads / kv_heads);
    const u32 len = lens[b];
    const u64 q_stride = (u64)heads * D, kv_stride = (u64)kv_heads * D;
    const u64 q_off = ((u64)b * q_len * heads + h) * D;
    const u16* kb = k + ((u64)b * kv_len * kv_heads + kh) * D;
    const u16* vb = v + ((u64)b * kv_len * kv_heads + kh) * D;

    u32 qf[D / 16][4], df[D / 16][4];
#pragma unroll
    for (int which = 0; which < 2; which++) {
        fa_load_rows<FA_BM, D>(s_stage, (which ? d_o : q) + q_off, q_stride, m0, (int)min(len, (u32)q_len));
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) fa_load_a(s_stage + warp * 16 * LD, LD, kk * 16, which ? df[kk] : qf[kk]);
        __syncthreads();
    }

    const float LOG2E = 1.4426950408889634f;
    const float scale2 = scale * LOG2E;
    int rows[2], vis[2];
    float lse2[2], dd[2];
#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        rows[hf] = m0 + warp * 16 + g + 8 * hf;
        const bool real = rows[hf] < q_len;
        vis[hf] = real ? visible_keys(rows[hf], len, q_len, kv_len, causal) : 0;
        lse2[hf] = vis[hf] > 0 ? lse[((u64)b * heads + h) * q_len + rows[hf]] * LOG2E : 0.f;
        dd[hf] = vis[hf] > 0 ? dvec[((u64)b * q_len + rows[hf]) * heads + h] : 0.f;
    }
    const int last = min(m0 + FA_BM, (int)min(len, (u32)q_len)) - 1;
    const int n_end = last >= m0 ? visible_keys(last, len, q_len, kv_len, causal) : 0;

    float acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) acc[j][r] = 0.f;

    for (int n0 = 0; n0 < n_end; n0 += FB_DQ_BN) {
        fa_load_rows<FB_DQ_BN, D>(s_k, kb, kv_stride, n0, n_end);
        fa_load_rows<FB_DQ_BN, D>(s_v, vb, kv_stride, n0, n_end);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();

        float sc[FB_DQ_BN / 8][4], dp[FB_DQ_BN / 8][4];
#pragma unroll
        for (int j = 0; j < FB_DQ_BN / 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) sc[j][r] = dp[j][r] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; kk++) {
#pragma unroll
            for (int nj = 0; nj < FB_DQ_BN / 16; nj++) {
                fa_mma_nk<BF>(sc[2 * nj], sc[2 * nj + 1], qf[kk], s_k, LD, nj * 16, kk * 16);
                fa_mma_nk<BF>(dp[2 * nj], dp[2 * nj + 1], df[kk], s_v, LD, nj * 16, kk * 16);
            }
        }
        // dS = P ⊙ (dP − D), in sc. sc[j][r]: row half r >> 1, key n0 + 8j + 2t + (r & 1).
#pragma unroll
        for (int j = 0; j < FB_DQ_BN / 8; j++)
#pragma unroll
            for (int r = 0; r < 4; r++) {
                const int hf = r >> 1, key = n0 + 8 * j + 2 * t + (r & 1);
                const float p = key < vis[hf] ? exp2f(sc[j][r] * scale2 - lse2[hf]) : 0.f;
                sc[j][r] = p * (dp[j][r] - dd[hf]);
            }
        // dQ += dS·K: K as [k][n] (keys × dims), ldmatrix.trans.
#pragma unroll
        for (int kk = 0; kk < FB_DQ_BN / 16; kk++) {
            u32 a[4];
            fa_acc_to_a<BF>(sc[2 * kk], sc[2 * kk + 1], a);
            fa_mma_kn<BF, D>(acc, a, s_k, kk * 16);
        }
        __syncthreads();
    }

#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        if (rows[hf] >= q_len) continue;
        float* out = dq + ((u64)b * q_len + rows[hf]) * q_stride + (u64)h * D;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            out[8 * j + 2 * t] = scale * acc[j][2 * hf];
            out[8 * j + 2 * t + 1] = scale * acc[j][2 * hf + 1];
        }
    }
#else
    __trap();  // the launcher only picks this kernel on sm_80 and newer
#endif
}

template <bool BF, int D>
__device__ void attention_bwd_dkv_mma_impl(const u16* __restrict__ q, const u16* __restrict__ k,
                                           const u16* __restrict__ v, const u16* __restrict__ d_o,
                                           const float* __restrict__ lse, const float* __restrict__ dvec,
                                           const u32* lens, float* __restrict__ dk, float* __restrict__ dv, int q_len,
                                           int kv_len, int heads, int kv_heads, float scale, int causal) {
#if __CUDA_ARCH__ >= 800
    constexpr int LD = D + 8;
    __shared__ __align__(128) u16 s_k[FA_BN * LD];
    __shared__ __align__(128) u16 s_v[FA_BN * LD];
    __shared__ __align__(128) u16 s_q[FB_DKV_BM * LD];
    __shared__ __align__(128) u16 s_do[FB_DKV_BM * LD];
    __shared__ float s_lse2[FB_DKV_BM], s_d[FB_DKV_BM];
    __shared__ int s_vis[FB_DKV_BM];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int n0 = blockIdx.x * FA_BN;
    const int b = blockIdx.y / kv_heads, kh = blockIdx.y % kv_heads;
    const int group = heads / kv_heads;
    const u32 len = lens[b];
    const u64 q_stride = (u64)heads * D, kv_stride = (u64)kv_heads * D;
    const u64 kv_off = ((u64)b * kv_len * kv_heads + kh) * D;
    const float LOG2E = 1.4426950408889634f;
    const float scale2 = scale * LOG2E;

    const int kv_valid = (int)min(len, (u32)kv_len);
    fa_load_rows<FA_BN, D>(s_k, k + kv_off, kv_stride, n0, kv_valid);
    fa_load_rows<FA_BN, D>(s_v, v + kv_off, kv_stride, n0, kv_valid);
    cp_async_commit();

    float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
    for (int j = 0; j < D / 8; j++)
#pragma unroll
        for (int r = 0; r < 4; r++) dk_acc[j][r] = dv_acc[j][r] = 0.f;

    // Query rows that may see key n0: causal row i sees keys < i + kv_len − q_len + 1.
    const int valid_rows = (int)min(len, (u32)q_len);
    const int first = causal ? max(0, n0 - (kv_len - q_len)) / FB_DKV_BM * FB_DKV_BM : 0;
    const bool any_key = n0 < kv_valid;
    for (int hh = 0; hh < group && any_key; hh++) {
        const int h = kh * group + hh;
        const u64 q_off = ((u64)b * q_len * heads + h) * D;
        for (int m0 = first; m0 < valid_rows; m0 += FB_DKV_BM) {
            fa_load_rows<FB_DKV_BM, D>(s_q, q + q_off, q_stride, m0, valid_rows);
            fa_load_rows<FB_DKV_BM, D>(s_do, d_o + q_off, q_stride, m0, valid_rows);
            cp_async_commit();
            if (threadIdx.x < FB_DKV_BM) {
                const int i = m0 + threadIdx.x;
                const int vis = i < q_len ? visible_keys(i, len, q_len, kv_len, causal) : 0;
                s_vis[threadIdx.x] = vis;
                s_lse2[threadIdx.x] = vis > 0 ? lse[((u64)b * heads + h) * q_len + i] * LOG2E : 0.f;
                s_d[threadIdx.x] = vis > 0 ? dvec[((u64)b * q_len + i) * heads + h] : 0.f;
            }
            cp_async_wait<0>();
            __syncthreads();

            // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for the warp's 16 keys × 16 query rows.
            float st[2][4], dpt[2][4];
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) st[j][r] = dpt[j][r] = 0.f;
#pragma unroll
            for (int kk = 0; kk < D / 16; kk++) {
                // K and V as A ([m][k]); Q and dO as [n][k] (query rows × dims).
                u32 ka[4], va[4];
                fa_load_a(s_k + warp * 16 * LD, LD, kk * 16, ka);
                fa_load_a(s_v + warp * 16 * LD, LD, kk * 16, va);
                fa_mma_nk<BF>(st[0], st[1], ka, s_q, LD, 0, kk * 16);
                fa_mma_nk<BF>(dpt[0], dpt[1], va, s_do, LD, 0, kk * 16);
            }
            // Pᵀ and dSᵀ. st[j][r]: key n0 + 16·warp + g + 8·(r >> 1), query m0 + 8j + 2t + (r & 1).
#pragma unroll
            for (int j = 0; j < 2; j++)
#pragma unroll
                for (int r = 0; r < 4; r++) {
                    const int key = n0 + warp * 16 + g + 8 * (r >> 1), qi = 8 * j + 2 * t + (r & 1);
                    const float p = key < s_vis[qi] ? exp2f(st[j][r] * scale2 - s_lse2[qi]) : 0.f;
                    st[j][r] = p;
                    dpt[j][r] = p * (dpt[j][r] - s_d[qi]);
                }
            // dV += Pᵀ·dO and dK += dSᵀ·Q: dO and Q as [k][n] (query rows × dims).
            u32 pa[4], sa[4];
            fa_acc_to_a<BF>(st[0], st[1], pa);
            fa_acc_to_a<BF>(dpt[0], dpt[1], sa);
            fa_mma_kn<BF, D>(dv_acc, pa, s_do, 0);
            fa_mma_kn<BF, D>(dk_acc, sa, s_q, 0);
            __syncthreads();
        }
    }
    cp_async_wait<0>();  // when no row sees these keys, the K and V copies are still in flight

#pragma unroll
    for (int hf = 0; hf < 2; hf++) {
        const int key = n0 + warp * 16 + g + 8 * hf;
        if (key >= kv_len) continue;
        const u64 at = kv_off + (u64)key * kv_stride;
#pragma unroll
        for (int j = 0; j < D / 8; j++) {
            const int col = 8 * j + 2 * t;
            dk[at + col] = scale * dk_acc[j][2 * hf];
            dk[at + col + 1] = scale * dk_acc[j][2 * hf + 1];
            dv[at + col] = dv_acc[j][2 * hf];
            dv[at + col + 1] = dv_acc[j][2 * hf + 1];
        }
    }
#else
    __trap();  // the launcher only picks this kernel on sm_80 and newer
#endif
}

#define KILN_ATTENTION_BWD_MMA(BF, NAME, D)                                                          \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dq_mma_##NAME##_d##D(          \
        const u16* q, const u16* k, const u16* v, const u16* d_o, const float* lse, const float* dvec, \
        const u32* lens, float* dq, int q_len, int kv_len, int heads, int kv_heads, float scale,       \
        int causal) {                                                                                  \
        attention_bwd_dq_mma_impl<BF, D>(q, k, v, d_o, lse, dvec, lens, dq, q_len, kv_len, heads,    \
                                         kv_heads, scale, causal);                                     \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dkv_mma_##NAME##_d##D(         \
        const u16* q, const u16* k, const u16* v, const u16* d_o, const float* lse, const float* dvec, \
        const u32* lens, float* dk, float* dv, int q_len, int kv_len, int heads, int kv_heads,         \
        float scale, int causal) {                                                                     \
        attention_bwd_dkv_mma_impl<BF, D>(q, k, v, d_o, lse, dvec, lens, dk, dv, q_len, kv_len,      \
                                          heads, kv_heads, scale, causal);                             \
    }

KILN_ATTENTION_BWD_MMA(false, f16, 64)
KILN_ATTENTION_BWD_MMA(false, f16, 80)
KILN_ATTENTION_BWD_MMA(false, f16, 96)
KILN_ATTENTION_BWD_MMA(false, f16, 128)
KILN_ATTENTION_BWD_MMA(true, bf16, 64)
KILN_ATTENTION_BWD_MMA(true, bf16, 80)
KILN_ATTENTION_BWD_MMA(true, bf16, 96)
KILN_ATTENTION_BWD_MMA(true, bf16, 128)

// ---------------------------------------------------------------------------------------
// Decoding against a KV cache, split along the cache (flash-decoding). Mirrors cpu_decode.
// The cache is [batch, capacity, kv_heads, dim]; query row i of sequence b (q_valid real
// rows, len cached) sees keys 0..len − q_valid + i. Partials: ml [rows, splits, 2] (max,
// sum; sum 0 when the split saw no key), acc [rows, splits, dim] (Σ p·v), with row
// r = (b·heads + h)·q_len + i.
//
// attention_decode_split_{f32,f16,bf16}_d{64,128,256}
//     128 threads (4 warps) per (split, sequence and kv head, group of up to 8 of the kv
//     head's group·q_len query rows): grid (splits, batch·kv_heads, ceil(group·q_len / 8)).
//     Warps take keys j ≡ warp (mod 4) of the split's split_keys, two at a time; lane holds dims
//     lane + 32e (e < D / 32), so each key and value row is read once for all the block's
//     query rows (grouped-query heads share it). Per key and row: a warp-shuffle dot
//     product and the online-softmax update. The warps merge in shared memory.
// attention_decode_merge
//     One warp per query row, 256 threads per block: merges the splits by their maxima,
//     writes o (out_kind) and lse (−∞ for a row that saw no key).

#define DECODE_ROWS 8

__device__ __forceinline__ u32 decode_visible(int i, u32 len, u32 q_valid) {
    return (u32)i >= q_valid ? 0u : len - q_valid + (u32)i + 1u;
}

template <class T, int D>
__device__ void decode_split_impl(const typename T::storage* __restrict__ q, const typename T::storage* __restrict__ k,
                                  const typename T::storage* __restrict__ v, const u32* lens, const u32* q_lens,
                                  float* part_ml, float* part_acc, int q_len, int capacity, int heads, int kv_heads,
                                  int dim, float scale, int split_keys, int splits) {
    constexpr int E = D / 32;
    __shared__ float s_ml[4][DECODE_ROWS][2];
    __shared__ float s_acc[4][DECODE_ROWS][D];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int split = blockIdx.x;
    const int b = blockIdx.y / kv_heads, kh = blockIdx.y % kv_heads;
    const int group = heads / kv_heads;
    const int row0 = blockIdx.z * DECODE_ROWS;
    const int nrows = min(DECODE_ROWS, group * q_len - row0);
    const u32 len = lens[b], q_valid = q_lens[b];

    float qr[DECODE_ROWS][E], acc[DECODE_ROWS][E], m[DECODE_ROWS], l[DECODE_ROWS];
    u32 vis[DECODE_ROWS];
    u32 max_vis = 0;
#pragma unroll
    for (int rr = 0; rr < DECODE_ROWS; rr++) {
        // Local row row0 + rr: head kh·group + (row0 + rr) / q_len, query (row0 + rr) % q_len.
        const int h = kh * group + (row0 + rr) / q_len, i = (row0 + rr) % q_len;
        vis[rr] = rr < nrows ? decode_visible(i, len, q_valid) : 0u;
        max_vis = max(max_vis, vis[rr]);
        const u64 q_base = (((u64)b * q_len + i) * heads + h) * dim;
#pragma unroll
        for (int e = 0; e < E; e++) {
            const int c = lane + 32 * e;
            qr[rr][e] = (rr < nrows && c < dim) ? T::load(q[q_base + c]) * scale : 0.f;
            acc[rr][e] = 0.f;
        }
        m[rr] = -3.0e38f;
        l[rr] = 0.f;
    }
    const int j_end = min((split + 1) * split_keys, (int)max_vis);
    // Two keys per warp and step (j and j + 4), both rows loaded before either is used, so
    // more of the cache is in flight.
    for (int j = split * split_keys + warp; j < j_end; j += 8) {
        float kj[2][E], vj[2][E];
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const bool valid = j + 4 * u < j_end;
            const u64 kv_base = (((u64)b * capacity + j + 4 * u) * kv_heads + kh) * dim;
#pragma unroll
            for (int e = 0; e < E; e++) {
                const int c = lane + 32 * e;
                kj[u][e] = valid && c < dim ? T::load(k[kv_base + c]) : 0.f;
                vj[u][e] = valid && c < dim ? T::load(v[kv_base + c]) : 0.f;
            }
        }
#pragma unroll
        for (int u = 0; u < 2; u++) {
            const u32 key = (u32)(j + 4 * u);
#pragma unroll
            for (int rr = 0; rr < DECODE_ROWS; rr++) {
                if (key >= vis[rr]) continue;  // warp-uniform; also past j_end
                float s = 0.f;
#pragma unroll
                for (int e = 0; e < E; e++) s = fmaf(qr[rr][e], kj[u][e], s);
                for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
                const float m_new = fmaxf(m[rr], s);
                const float correction = expf(m[rr] - m_new), p = expf(s - m_new);
                l[rr] = l[rr] * correction + p;
#pragma unroll
                for (int e = 0; e < E; e++) acc[rr][e] = acc[rr][e] * correction + p * vj[u][e];
                m[rr] = m_new;
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < DECODE_ROWS; rr++) {
        if (lane == 0) {
            s_ml[warp][rr][0] = m[rr];
            s_ml[warp][rr][1] = l[rr];
        }
#pragma unroll
        for (int e = 0; e < E; e++) s_acc[warp][rr][lane + 32 * e] = acc[rr][e];
    }
    __syncthreads();
    for (int x = threadIdx.x; x < nrows * dim; x += blockDim.x) {
        const int rr = x / dim, c = x % dim;
        float mm = -3.0e38f;
#pragma unroll
        for (int w = 0; w < 4; w++)
            if (s_ml[w][rr][1] > 0.f) mm = fmaxf(mm, s_ml[w][rr][0]);
        float ll = 0.f, aa = 0.f;
#pragma unroll
        for (int w = 0; w < 4; w++) {
            if (s_ml[w][rr][1] > 0.f) {
                const float wt = expf(s_ml[w][rr][0] - mm);
                ll += wt * s_ml[w][rr][1];
                aa += wt * s_acc[w][rr][c];
            }
        }
        const int h = kh * group + (row0 + rr) / q_len, i = (row0 + rr) % q_len;
        const u64 part = (((u64)b * heads + h) * q_len + i) * splits + split;
        part_acc[part * dim + c] = aa;
        if (c == 0) {
            part_ml[2 * part] = mm;
            part_ml[2 * part + 1] = ll;
        }
    }
}

#define KILN_DECODE_SPLIT(T, NAME, D)                                                                 \
    extern "C" __global__ void __launch_bounds__(128) attention_decode_split_##NAME##_d##D(          \
        const T::storage* q, const T::storage* k, const T::storage* v, const u32* lens,               \
        const u32* q_lens, float* part_ml, float* part_acc, int q_len, int capacity, int heads,        \
        int kv_heads, int dim, float scale, int split_keys, int splits) {                              \
        decode_split_impl<T, D>(q, k, v, lens, q_lens, part_ml, part_acc, q_len, capacity, heads,    \
                                kv_heads, dim, scale, split_keys, splits);                              \
    }

KILN_DECODE_SPLIT(F32, f32, 64)
KILN_DECODE_SPLIT(F32, f32, 128)
KILN_DECODE_SPLIT(F32, f32, 256)
KILN_DECODE_SPLIT(F16, f16, 64)
KILN_DECODE_SPLIT(F16, f16, 128)
KILN_DECODE_SPLIT(F16, f16, 256)
KILN_DECODE_SPLIT(BF16, bf16, 64)
KILN_DECODE_SPLIT(BF16, bf16, 128)
KILN_DECODE_SPLIT(BF16, bf16, 256)

extern "C" __global__ void __launch_bounds__(256) attention_decode_merge(const float* part_ml, const float* part_acc,
                                                                         void* o, float* lse, int out_kind, int q_len,
                                                                         int heads, int dim, int splits, u64 rows) {
    const u64 r = (u64)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float* ml = part_ml + 2 * r * splits;
    float mm = -3.0e38f;
    for (int s = 0; s < splits; s++)
        if (ml[2 * s + 1] > 0.f) mm = fmaxf(mm, ml[2 * s]);
    float ll = 0.f;
    for (int s = 0; s < splits; s++)
        if (ml[2 * s + 1] > 0.f) ll += expf(ml[2 * s] - mm) * ml[2 * s + 1];
    const u64 b = r / ((u64)heads * q_len);
    const int h = (int)((r / q_len) % heads), i = (int)(r % q_len);
    const u64 o_base = ((b * q_len + i) * heads + h) * dim;
    for (int c = lane; c < dim; c += 32) {
        float a = 0.f;
        for (int s = 0; s < splits; s++)
            if (ml[2 * s + 1] > 0.f) a += expf(ml[2 * s] - mm) * part_acc[(r * splits + s) * dim + c];
        store_out(o, o_base + c, ll > 0.f ? a / ll : 0.f, out_kind);
    }
    if (lane == 0) lse[r] = ll > 0.f ? mm + logf(ll) : __int_as_float(0xff800000);  // −∞
}
