// Rotary position embeddings (contract and CPU reference: src/ops/rope/mod.rs).
//
// rope_T_vN: out = x with each (token, head)'s first `2·half` features rotated in pairs by
//     the angles fl(f32(pos[token]) · inv_freq[i]) (sincosf: full range reduction, no fast
//     math), sines multiplied by `sign` (+1 forward, −1 backward); the features past 2·half
//     are copied. HalfSplit pairs i with i + half, Interleaved pairs 2i with 2i + 1.
//     Computed in f32, rounded once on store. The frequencies come by value in `freqs`
//     (rotary_dim ≤ 2·ROPE_PARAM_FREQS, so no upload precedes the launch) or from `inv_freq`.
//     Launch: one block per token (grid x = tokens), blockDim.x a multiple of 32 up to 256.
//     The block fills a cos/sin table of up to TABLE frequencies in shared memory, rotates
//     every head's pairs of those frequencies, and repeats for the next TABLE (one round for
//     any real head_dim); then copies the pass-through features.
//     Each thread moves N consecutive elements per access (one 2·N- or 4·N-byte vector):
//     HalfSplit needs half and head_dim multiples of N, Interleaved needs N ≥ 2 and
//     2·half and head_dim multiples of N.
// T in {f32, f16, bf16}; N in {1, 2, 4} for f32, {1, 2, 4, 8} for f16 and bf16 (at most 16
// bytes). Element offsets are 64-bit.

#define ROPE_TABLE 1024
// Inverse frequencies passed by value, in the launch, up to this many (rotary_dim ≤ 512);
// past it they are read from `inv_freq` (null otherwise), a buffer uploaded per call.
#define ROPE_PARAM_FREQS 256

struct RopeFreqs {
    float f[ROPE_PARAM_FREQS];
};

struct RopeParams {
    u32 tokens;
    u32 heads;
    u32 head_dim;
    u32 half;
    u32 interleaved;
    float sign;
    u32 pad0;
    u32 pad1;
};

// (a·cos − b·sin, b·cos + a·sin), each product and sum rounded on its own (no fused
// multiply-add), as the CPU computes it: both layouts give the same bits for the same pair.
__device__ __forceinline__ float2 rotate(float a, float b, float2 cs) {
    return make_float2(__fsub_rn(__fmul_rn(a, cs.x), __fmul_rn(b, cs.y)),
                       __fadd_rn(__fmul_rn(b, cs.x), __fmul_rn(a, cs.y)));
}

template <class S, int N>
struct __align__(sizeof(S) * N) Pack {
    S v[N];
};

template <class T, int N>
__device__ void rope_impl(const typename T::storage* __restrict__ x, const u32* __restrict__ pos,
                          const float* __restrict__ inv_freq, typename T::storage* __restrict__ out,
                          const RopeParams& p, const RopeFreqs& freqs) {
    typedef typename T::storage S;
    typedef Pack<S, N> P;
    __shared__ float2 table[ROPE_TABLE];  // (cos, sign · sin)
    const u64 token = blockIdx.x;
    // cvt.rn.f32.u32: nearest even, as torch's .float().
    const float position = (float)pos[token];
    const u64 base = token * (u64)p.heads * p.head_dim;
    const S* xt = x + base;
    S* ot = out + base;
    const u32 rot = 2 * p.half;
    for (u32 first = 0; first < p.half; first += ROPE_TABLE) {
        const u32 count = min((u32)ROPE_TABLE, p.half - first);
        __syncthreads();  // the previous round's table is consumed
        for (u32 i = threadIdx.x; i < count; i += blockDim.x) {
            float s, c;
            const float f = inv_freq ? inv_freq[first + i] : freqs.f[first + i];
            sincosf(__fmul_rn(position, f), &s, &c);
            table[i] = make_float2(c, p.sign * s);
        }
        __syncthreads();
        // Work items per head: vectors of N features (Interleaved: N/2 pairs; HalfSplit: N
        // pairs, one vector in each half).
        const u32 per_head = p.interleaved ? 2 * count / N : count / N;
        const u32 items = p.heads * per_head;
        for (u32 w = threadIdx.x; w < items; w += blockDim.x) {
            const u32 h = w / per_head;
            const u32 k = (w - h * per_head) * N;
            const u64 row = (u64)h * p.head_dim;
            if (p.interleaved) {
                const u64 at = row + 2 * first + k;
                P a = *(const P*)(xt + at), o;
#pragma unroll
                for (int e = 0; e < N; e += 2) {
                    const float2 cs = table[(k + e) / 2];
                    const float2 r = rotate(T::load(a.v[e]), T::load(a.v[e + 1]), cs);
                    o.v[e] = T::store(r.x);
                    o.v[e + 1] = T::store(r.y);
                }
                *(P*)(ot + at) = o;
            } else {
                const u64 at = row + first + k;
                P a = *(const P*)(xt + at), b = *(const P*)(xt + at + p.half), oa, ob;
#pragma unroll
                for (int e = 0; e < N; ++e) {
                    const float2 cs = table[k + e];
                    const float2 r = rotate(T::load(a.v[e]), T::load(b.v[e]), cs);
                    oa.v[e] = T::store(r.x);
                    ob.v[e] = T::store(r.y);
                }
                *(P*)(ot + at) = oa;
                *(P*)(ot + at + p.half) = ob;
            }
        }
    }
    const u32 pass_per_head = (p.head_dim - rot) / N;
    const u32 pass_items = p.heads * pass_per_head;
    for (u32 w = threadIdx.x; w < pass_items; w += blockDim.x) {
        const u32 h = w / pass_per_head;
        const u64 at = (u64)h * p.head_dim + rot + (w - h * pass_per_head) * N;
        *(P*)(ot + at) = *(const P*)(xt + at);
    }
}

#define KILN_ROPE(T, NAME, N)                                                                     \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        rope_##NAME##_v##N(const T::storage* x, const u32* pos, const float* inv_freq,            \
                           T::storage* out, RopeParams p, RopeFreqs freqs) {                      \
        rope_impl<T, N>(x, pos, inv_freq, out, p, freqs);                                         \
    }

KILN_ROPE(F32, f32, 1)
KILN_ROPE(F32, f32, 2)
KILN_ROPE(F32, f32, 4)
KILN_ROPE(F16, f16, 1)
KILN_ROPE(F16, f16, 2)
KILN_ROPE(F16, f16, 4)
KILN_ROPE(F16, f16, 8)
KILN_ROPE(BF16, bf16, 1)
KILN_ROPE(BF16, bf16, 2)
KILN_ROPE(BF16, bf16, 4)
KILN_ROPE(BF16, bf16, 8)
