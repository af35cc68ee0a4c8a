// Attention backward (prepended: common.cuh, gemm.cuh, attention.cuh).
//
// FlashAttention-2 scheme: scores recomputed from q, k and lse;
// p = exp(s − lse), dS = p · (dO_i · v_j − D_i), D = rowsum(dO ⊙ O) as [b, q_len, h]; dO is
// f32. One thread per output row, grid-stride, 128 threads per block.
//
// attention_bwd_dq_{f32,f16,bf16}    row (b, i, h): dq = scale · Σ_j dS_ij · k_j
// attention_bwd_dkv_{f32,f16,bf16}   row (b, j, kh): dv = Σ p_ij · dO_i, dk = scale · Σ dS_ij · q_i
//                                    over every head of kh's group and every row seeing j

template <class T>
struct AttnArgs {
    const typename T::storage *q, *k, *v;
    const float *d_o, *lse, *delta;
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
        return make_float2(p, p * (dp - delta[(b * q_len + i) * heads + h]));
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

#define ATTN_BWD_INPUTS(T)                                                                          \
    const T::storage *q, const T::storage *k, const T::storage *v, const float *d_o,                \
        const float *lse, const float *delta, const u32 *lens
#define ATTN_BWD_ARGS(T)                                                                            \
    AttnArgs<T>{q, k, v, d_o, lse, delta, lens, p.q_len, p.kv_len, p.heads, p.kv_heads, p.dim, p.scale, p.causal}

#define KILN_ATTENTION_BWD(T, NAME)                                                                 \
    extern "C" __global__ void __launch_bounds__(128)                                                \
        attention_bwd_dq_##NAME(ATTN_BWD_INPUTS(T), float* dq, const AttentionParams p) {           \
        attention_bwd_dq_impl<T>(ATTN_BWD_ARGS(T), dq, p.rows);                                      \
    }                                                                                                \
    extern "C" __global__ void __launch_bounds__(128)                                                \
        attention_bwd_dkv_##NAME(ATTN_BWD_INPUTS(T), float* dk, float* dv, const AttentionParams p) { \
        attention_bwd_dkv_impl<T>(ATTN_BWD_ARGS(T), dk, dv, p.rows);                                 \
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
                                          const float* __restrict__ lse, const float* __restrict__ delta,
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
        dd[hf] = vis[hf] > 0 ? delta[((u64)b * q_len + rows[hf]) * heads + h] : 0.f;
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
                                           const float* __restrict__ lse, const float* __restrict__ delta,
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
                s_d[threadIdx.x] = vis > 0 ? delta[((u64)b * q_len + i) * heads + h] : 0.f;
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
        const u16* q, const u16* k, const u16* v, const u16* d_o, const float* lse, const float* delta, \
        const u32* lens, float* dq, const AttentionParams p) {                                         \
        attention_bwd_dq_mma_impl<BF, D>(q, k, v, d_o, lse, delta, lens, dq, p.q_len, p.kv_len,      \
                                         p.heads, p.kv_heads, p.scale, p.causal);                      \
    }                                                                                                  \
    extern "C" __global__ void __launch_bounds__(128) attention_bwd_dkv_mma_##NAME##_d##D(         \
        const u16* q, const u16* k, const u16* v, const u16* d_o, const float* lse, const float* delta, \
        const u32* lens, float* dk, float* dv, const AttentionParams p) {                              \
        attention_bwd_dkv_mma_impl<BF, D>(q, k, v, d_o, lse, delta, lens, dk, dv, p.q_len, p.kv_len, \
                                          p.heads, p.kv_heads, p.scale, p.causal);                     \
    }

KILN_ATTENTION_BWD_MMA(false, f16, 64)
KILN_ATTENTION_BWD_MMA(false, f16, 80)
KILN_ATTENTION_BWD_MMA(false, f16, 96)
KILN_ATTENTION_BWD_MMA(false, f16, 128)
KILN_ATTENTION_BWD_MMA(true, bf16, 64)
KILN_ATTENTION_BWD_MMA(true, bf16, 80)
KILN_ATTENTION_BWD_MMA(true, bf16, 96)
KILN_ATTENTION_BWD_MMA(true, bf16, 128)
