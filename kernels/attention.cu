// Attention forward, one thread per query row (b, h, i), keys visited one at a time with an
// online softmax (running max, running sum, accumulator), so no score matrix is stored.
// Mirrors cpu_forward in src/ops/attention/mod.rs; q, k, v of dtype T, o and lse f32.
// Grid-stride over the batch·heads·q_len rows, 128 threads per block.
//
// attention_fwd_{f32,f16,bf16}

#define MAX_HEAD_DIM 256

__device__ __forceinline__ int visible_keys(int i, u64 len, int q_len, int kv_len, int causal) {
    if ((u64)i >= min(len, (u64)q_len)) return 0;
    const int kv_valid = (int)min(len, (u64)kv_len);
    if (!causal) return kv_valid;
    const int end = i + kv_len - q_len + 1;
    return min(max(end, 0), kv_valid);
}

template <class T>
__device__ void attention_fwd_impl(const typename T::storage* q, const typename T::storage* k,
                                   const typename T::storage* v, const u64* lens, float* o, float* lse,
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
        const T::storage* q, const T::storage* k, const T::storage* v, const u64* lens, float* o,     \
        float* lse, int q_len, int kv_len, int heads, int kv_heads, int dim, float scale, int causal,  \
        u64 rows) {                                                                                  \
        attention_fwd_impl<T>(q, k, v, lens, o, lse, q_len, kv_len, heads, kv_heads, dim, scale,      \
                              causal, rows);                                                         \
    }

KILN_ATTENTION(F32, f32)
KILN_ATTENTION(F16, f16)
KILN_ATTENTION(BF16, bf16)
