// Attention decoding (prepended: common.cuh).
//
// Decoding against a KV cache, split along the cache (flash-decoding). Mirrors cpu_decode.
// The cache is [batch, capacity, kv_heads, dim]; query row i of sequence b (q_valid real
// rows, len cached) sees keys 0..len − q_valid + i. Partials: ml [rows, split_count, 2] (max,
// sum; sum 0 when the split saw no key), acc [rows, split_count, dim] (Σ p·v), with row
// r = (b·heads + h)·q_len + i.
//
// attention_decode_split_{f32,f16,bf16}_d{64,128,256}
//     128 threads (4 warps) per (split, sequence and kv head, group of up to 8 of the kv
//     head's group·q_len query rows): grid (split_count, batch·kv_heads, ceil(group·q_len / 8)).
//     Warps take keys j ≡ warp (mod 4) of the split, two at a time; lane holds dims
//     lane + 32e (e < D / 32), so each key and value row is read once for all the block's
//     query rows (grouped-query heads share it). Per key and row: a warp-shuffle dot
//     product and the online-softmax update. The warps merge in shared memory.
// attention_decode_merge
//     One warp per query row, 256 threads per block: merges the splits by their maxima,
//     writes o (out_kind) and lse (−∞ for a row that saw no key).

#define DECODE_ROWS 8

// The split kernel's scalars (DecodeSplitParams in src/ops/attention/cuda.rs).
struct DecodeSplitParams {
    int q_len, capacity, heads, kv_heads, dim;
    float scale;
    int keys_per_split, split_count;
};

// The merge kernel's scalars (DecodeMergeParams in src/ops/attention/cuda.rs).
struct DecodeMergeParams {
    u64 rows;
    int q_len, heads, dim, split_count;
    int out_kind;
    int pad0;
};

__device__ __forceinline__ u32 decode_visible(int i, u32 len, u32 q_valid) {
    return (u32)i >= q_valid ? 0u : len - q_valid + (u32)i + 1u;
}

template <class T, int D>
__device__ void decode_split_impl(const typename T::storage* __restrict__ q, const typename T::storage* __restrict__ k,
                                  const typename T::storage* __restrict__ v, const u32* lens, const u32* q_lens,
                                  float* part_ml, float* part_acc, int q_len, int capacity, int heads, int kv_heads,
                                  int dim, float scale, int keys_per_split, int split_count) {
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
    const int j_end = min((split + 1) * keys_per_split, (int)max_vis);
    // Two keys per warp and step (j and j + 4), both rows loaded before either is used, so
    // more of the cache is in flight.
    for (int j = split * keys_per_split + warp; j < j_end; j += 8) {
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
        const u64 part = (((u64)b * heads + h) * q_len + i) * split_count + split;
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
        const u32* q_lens, float* part_ml, float* part_acc, const DecodeSplitParams p) {              \
        decode_split_impl<T, D>(q, k, v, lens, q_lens, part_ml, part_acc, p.q_len, p.capacity,       \
                                p.heads, p.kv_heads, p.dim, p.scale, p.keys_per_split, p.split_count); \
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
                                                                         void* o, float* lse,
                                                                         const DecodeMergeParams p) {
    const u64 rows = p.rows;
    const int q_len = p.q_len, heads = p.heads, dim = p.dim, split_count = p.split_count;
    const u64 r = (u64)blockIdx.x * 8 + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (r >= rows) return;
    const float* ml = part_ml + 2 * r * split_count;
    float mm = -3.0e38f;
    for (int s = 0; s < split_count; s++)
        if (ml[2 * s + 1] > 0.f) mm = fmaxf(mm, ml[2 * s]);
    float ll = 0.f;
    for (int s = 0; s < split_count; s++)
        if (ml[2 * s + 1] > 0.f) ll += expf(ml[2 * s] - mm) * ml[2 * s + 1];
    const u64 b = r / ((u64)heads * q_len);
    const int h = (int)((r / q_len) % heads), i = (int)(r % q_len);
    const u64 o_base = ((b * q_len + i) * heads + h) * dim;
    for (int c = lane; c < dim; c += 32) {
        float a = 0.f;
        for (int s = 0; s < split_count; s++)
            if (ml[2 * s + 1] > 0.f) a += expf(ml[2 * s] - mm) * part_acc[(r * split_count + s) * dim + c];
        store_out(o, o_base + c, ll > 0.f ? a / ll : 0.f, p.out_kind);
    }
    if (lane == 0) lse[r] = ll > 0.f ? mm + logf(ll) : __int_as_float(0xff800000);  // −∞
}
