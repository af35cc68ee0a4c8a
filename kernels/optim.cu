// Fused optimizer kernels over a list of parameter tensors in one launch (multi-tensor).
//
// The launcher uploads a table with one OptimSlot per tensor (device pointers, sizes, dtype
// codes, the block where its chunks start). Blocks take chunks of CHUNK elements: block b
// serves the tensor whose chunk range holds b (binary search over `first_chunk`). 256
// threads per block.
//
// grad_sq_norm      per block: Σ g² in f64 (squares of f32 are exact in f64) and whether
//                   any g is NaN or inf, into partials[block] / flags[block]
// norm_finish       one block folds the partials in a fixed order (so the norm is the same
//                   every run) into out: {f64 Σ g², u32 flag}
// adamw_step        reads that result: a set flag skips the step (nothing written);
//                   otherwise clip = min(1, max_norm / (√Σg² + 1e-6)) and every element
//                   takes the update of src/ops/optim/mod.rs with the constants of
//                   AdamWParams, in the same order of f32 operations (explicit _rn
//                   intrinsics, so nothing is fused).
// fisher_accumulate F += (g² − F) · inv_count, one tensor, grid-stride.

#define CHUNK 8192

// One parameter tensor of a step (OptimSlot in src/ops/optim/cuda.rs): device pointers (0
// where absent), its element count, its first block, dtype codes of the gradient and the
// working copy, which optional parts it has, and its stochastic-rounding key.
struct OptimSlot {
    u64 master, m, v, grad, working, anchor, fisher;
    u64 n;
    u64 first_chunk;
    int grad_kind, working_kind;
    int has_working, has_anchor, has_fisher;
    int stochastic;
    u32 key;
    u32 pad0;
};

// The step's constants (AdamWParams in src/ops/optim/mod.rs, shared with optim_step.wgsl).
struct AdamWParams {
    float beta1, beta2;
    float one_minus_beta1, one_minus_beta2;
    float eps;
    float decay;      // 1 − lr·wd
    float step_size;  // lr / (1 − β1ᵗ)
    float bc2_sqrt;   // √(1 − β2ᵗ)
    float lambda;
    float max_norm;   // 0: no clipping
    u32 use_fisher;
    u32 pad0;
};

__device__ __forceinline__ float load_any(const void* p, u64 i, int kind) {
    if (kind == 0) return ((const float*)p)[i];
    if (kind == 1) return f16_to_f32(((const u16*)p)[i]);
    return bf16_to_f32(((const u16*)p)[i]);
}

// The tensor that block b works on, found by binary search over the first-chunk column.
__device__ __forceinline__ const OptimSlot& find_slot(const OptimSlot* table, int slots, u64 b) {
    int lo = 0, hi = slots - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (table[mid].first_chunk <= b) lo = mid; else hi = mid - 1;
    }
    return table[lo];
}

// murmur3's finaliser, as mix32 in src/ops/hash.rs.
__device__ __forceinline__ u32 mix32(u32 h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

// Stochastic rounding to bf16 (bf16_stochastic in src/ops/optim/mod.rs).
__device__ __forceinline__ u16 bf16_stochastic(float theta, u32 key, u32 index) {
    const u32 bits = __float_as_uint(theta);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (u16)((bits >> 16) | 0x40u);
    const u32 r = mix32(index * 0x9e3779b1u ^ key) & 0xffffu;
    return (u16)((bits + r) >> 16);
}

extern "C" __global__ void __launch_bounds__(256) grad_sq_norm(const OptimSlot* table, int slots, double* partials,
                                                               u32* flags) {
    __shared__ double warp_sums[8];
    const OptimSlot s = find_slot(table, slots, blockIdx.x);
    const void* grad = (const void*)s.grad;
    const u64 start = (blockIdx.x - s.first_chunk) * (u64)CHUNK;
    const u64 end = min(start + CHUNK, s.n);
    double acc = 0.0;
    bool bad = false;
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        const float g = load_any(grad, i, s.grad_kind);
        bad |= !isfinite(g);
        const double gd = (double)g;
        acc = __dadd_rn(acc, __dmul_rn(gd, gd));
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
    const bool any_bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int w = 0; w < 8; w++) total += warp_sums[w];
        partials[blockIdx.x] = total;
        flags[blockIdx.x] = any_bad ? 1u : 0u;
    }
}

extern "C" __global__ void __launch_bounds__(256) norm_finish(const double* partials, const u32* flags, u64 count,
                                                              double* sumsq, u32* nonfinite) {
    __shared__ double sums[256];
    __shared__ u32 bad[256];
    double acc = 0.0;
    u32 any = 0;
    for (u64 i = threadIdx.x; i < count; i += blockDim.x) {
        acc += partials[i];
        any |= flags[i];
    }
    sums[threadIdx.x] = acc;
    bad[threadIdx.x] = any;
    __syncthreads();
    for (int stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) {
            sums[threadIdx.x] += sums[threadIdx.x + stride];
            bad[threadIdx.x] |= bad[threadIdx.x + stride];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) {
        *sumsq = sums[0];
        *nonfinite = bad[0];
    }
}

extern "C" __global__ void __launch_bounds__(256) adamw_step(const OptimSlot* table, int slots, const double* sumsq,
                                                             const u32* nonfinite, const AdamWParams p) {
    if (*nonfinite) return;
    const float norm = (float)sqrt(*sumsq);
    const float clip = p.max_norm > 0.f ? fminf(__fdiv_rn(p.max_norm, __fadd_rn(norm, 1e-6f)), 1.f) : 1.f;
    const OptimSlot s = find_slot(table, slots, blockIdx.x);
    float* master = (float*)s.master;
    float* m = (float*)s.m;
    float* v = (float*)s.v;
    const void* grad = (const void*)s.grad;
    void* working = (void*)s.working;
    const float* anchor = (const float*)s.anchor;
    const float* fisher = (const float*)s.fisher;
    const float w1 = p.one_minus_beta1, w2 = p.one_minus_beta2;
    const u64 start = (blockIdx.x - s.first_chunk) * (u64)CHUNK;
    const u64 end = min(start + CHUNK, s.n);
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float theta = master[i];
        float g = __fmul_rn(load_any(grad, i, s.grad_kind), clip);
        if (s.has_anchor) {
            const float pull = __fmul_rn(p.lambda, __fsub_rn(theta, anchor[i]));
            g = __fadd_rn(g, p.use_fisher ? __fmul_rn(fisher[i], pull) : pull);
        }
        theta = __fmul_rn(theta, p.decay);
        float mi = m[i];
        mi = w1 < 0.5f ? __fadd_rn(mi, __fmul_rn(w1, __fsub_rn(g, mi)))
                       : __fsub_rn(g, __fmul_rn(__fsub_rn(g, mi), __fsub_rn(1.f, w1)));
        const float vi = __fadd_rn(__fmul_rn(v[i], p.beta2), __fmul_rn(__fmul_rn(w2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), p.bc2_sqrt), p.eps);
        theta = __fsub_rn(theta, __fmul_rn(p.step_size, __fdiv_rn(mi, denom)));
        master[i] = theta;
        m[i] = mi;
        v[i] = vi;
        if (s.stochastic) ((u16*)working)[i] = bf16_stochastic(theta, s.key, (u32)i);
        else if (s.has_working) store_out(working, i, theta, s.working_kind);
    }
}

extern "C" __global__ void fisher_accumulate(float* fisher, const void* grad, int grad_kind, u64 n, float inv_count) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float g = load_any(grad, i, grad_kind);
        fisher[i] = __fadd_rn(fisher[i], __fmul_rn(__fsub_rn(__fmul_rn(g, g), fisher[i]), inv_count));
    }
}
