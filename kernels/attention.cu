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
