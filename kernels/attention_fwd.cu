// Attention forward (prepended: common.cuh, gemm.cuh, attention.cuh).
//
// attention_fwd_{f32,f16,bf16}
//     One thread per query row (b, h, i), keys visited one at a time with an online softmax
//     (running max, running sum, accumulator), so no score matrix is stored. Mirrors
//     cpu_forward in src/ops/attention/mod.rs; q, k, v of dtype T, o and lse f32.
//     Grid-stride over the batch·heads·q_len rows, 128 threads per block.

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
        float* lse, const AttentionParams p) {                                                       \
        attention_fwd_impl<T>(q, k, v, lens, o, lse, p.q_len, p.kv_len, p.heads, p.kv_heads, p.dim,   \
                              p.scale, p.causal, p.rows);                                            \
    }

KILN_ATTENTION(F32, f32)
KILN_ATTENTION(F16, f16)
KILN_ATTENTION(BF16, bf16)

// ---------------------------------------------------------------------------------------
// On tensor cores (FlashAttention-2), sm_80+, f16/bf16, head dims 64, 80, 96, 128.
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
        const u16* q, const u16* k, const u16* v, const u32* lens, u16* o, float* lse,                  \
        const AttentionParams p) {                                                                      \
        attention_fwd_mma_impl<BF, D>(q, k, v, lens, o, lse, p.q_len, p.kv_len, p.heads, p.kv_heads, \
                                      p.scale, p.causal);                                               \
    }

KILN_ATTENTION_MMA(false, f16, 64)
KILN_ATTENTION_MMA(false, f16, 80)
KILN_ATTENTION_MMA(false, f16, 96)
KILN_ATTENTION_MMA(false, f16, 128)
KILN_ATTENTION_MMA(true, bf16, 64)
KILN_ATTENTION_MMA(true, bf16, 80)
KILN_ATTENTION_MMA(true, bf16, 96)
KILN_ATTENTION_MMA(true, bf16, 128)
