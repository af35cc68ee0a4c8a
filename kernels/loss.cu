// Cross-entropy over a vocabulary (src/ops/loss/mod.rs holds the CPU reference).
//
// Per-row statistics live in `state` as (max, sum of exp(x - max), target logit), f32, and
// are folded together as columns stream by (an online logsumexp: max and sum updated in one
// step, merged across threads by the same rule). Targets are int32, -100 = ignored row.
//
// ce_rows_T:      the fused pass of cross_entropy: one 256-thread block per row (grid-stride
//                 over rows) computes the row's statistics, then writes the row's gradient
//                 g = scale * (softmax - onehot) (0 on ignored rows) and its state.
// ce_lse:         folds a chunk of f32 logits [rows, cols] (vocabulary columns col0..) into
//                 state (fresh != 0 starts it): one 256-thread block per row, grid-stride.
// ce_grad_O:      g[r, j] = scale * (exp(x[r, j] - lse_r) - [col0 + j == target_r]) from a
//                 chunk of f32 logits, written as O; grid-stride over elements.
// ce_finish:      loss[0] = inv_count * sum over counted rows of (max + ln sum - target
//                 logit); one 256-thread block.
// T, O in {f32, f16, bf16}. Element indices are 64-bit; sizes are 32-bit (LossParams).

#define CE_IGNORE (-100)

// LossParams in src/ops/loss/cuda.rs.
struct LossParams {
    u32 rows;
    u32 cols;
    u32 col0;
    u32 fresh;
    float scale;
    float inv_count;
    u32 groups_x;
    u32 pad0;
};

__device__ __forceinline__ float ce_neg_inf() { return __int_as_float(0xff800000); }

// Folds one value into (m, s).
__device__ __forceinline__ void ce_push(float& m, float& s, float x) {
    if (x > m) {
        s = s * expf(m - x) + 1.f;
        m = x;
    } else if (x != ce_neg_inf()) {  // NaN passes and poisons s
        s += expf(x - m);
    }
}

// Merges (m2, s2) into (m, s).
__device__ __forceinline__ void ce_merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (m != m || m2 != m2) {
        m = m != m ? m : m2;
        s = m;  // NaN
        return;
    }
    if (mx == ce_neg_inf()) {
        s = s + s2;
        m = mx;
        return;
    }
    s = s * expf(m - mx) + s2 * expf(m2 - mx);
    m = mx;
}

// Block-wide merge of every thread's (m, s); every thread returns with the row's pair.
// blockDim.x is 256. Ends with a barrier, so the shared arrays can be reused at once.
__device__ __forceinline__ void ce_block_merge(float& m, float& s) {
    __shared__ float ms[8], ss[8];
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, off);
        float s2 = __shfl_xor_sync(0xffffffffu, s, off);
        ce_merge(m, s, m2, s2);
    }
    if ((threadIdx.x & 31) == 0) {
        ms[threadIdx.x >> 5] = m;
        ss[threadIdx.x >> 5] = s;
    }
    __syncthreads();
    m = ms[0];
    s = ss[0];
    for (int w = 1; w < 8; ++w) ce_merge(m, s, ms[w], ss[w]);
    __syncthreads();
}

template <class T>
__device__ void ce_rows_impl(const typename T::storage* x, const int* targets, typename T::storage* g,
                             float* state, LossParams p) {
    for (u64 r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const typename T::storage* row = x + r * p.cols;
        float m = ce_neg_inf(), s = 0.f;
        for (u32 j = threadIdx.x; j < p.cols; j += blockDim.x) ce_push(m, s, T::load(row[j]));
        ce_block_merge(m, s);
        int target = targets[r];
        float lse = m + logf(s);
        if (threadIdx.x == 0) {
            state[3 * r] = m;
            state[3 * r + 1] = s;
            state[3 * r + 2] = target >= 0 ? T::load(row[target]) : 0.f;
        }
        typename T::storage* grow = g + r * p.cols;
        for (u32 j = threadIdx.x; j < p.cols; j += blockDim.x) {
            float v = 0.f;
            if (target != CE_IGNORE) v = (expf(T::load(row[j]) - lse) - ((int)j == target ? 1.f : 0.f)) * p.scale;
            grow[j] = T::store(v);
        }
    }
}

extern "C" __global__ void ce_lse(const float* x, const int* targets, float* state, LossParams p) {
    for (u64 r = blockIdx.x; r < p.rows; r += gridDim.x) {
        const float* row = x + r * p.cols;
        float m = ce_neg_inf(), s = 0.f;
        for (u32 j = threadIdx.x; j < p.cols; j += blockDim.x) ce_push(m, s, row[j]);
        ce_block_merge(m, s);
        if (threadIdx.x == 0) {
            if (!p.fresh) ce_merge(m, s, state[3 * r], state[3 * r + 1]);
            state[3 * r] = m;
            state[3 * r + 1] = s;
            long long t = targets[r];
            if (t >= (long long)p.col0 && t < (long long)p.col0 + p.cols) {
                state[3 * r + 2] = row[t - p.col0];
            } else if (p.fresh) {
                state[3 * r + 2] = 0.f;
            }
        }
    }
}

template <class O>
__device__ void ce_grad_impl(const float* x, const int* targets, const float* state, typename O::storage* g,
                             LossParams p) {
    u64 n = (u64)p.rows * p.cols;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / p.cols;
        long long col = (long long)(i - r * p.cols) + p.col0;
        int target = targets[r];
        float v = 0.f;
        if (target != CE_IGNORE) {
            float lse = state[3 * r] + logf(state[3 * r + 1]);
            v = (expf(x[i] - lse) - (col == target ? 1.f : 0.f)) * p.scale;
        }
        g[i] = O::store(v);
    }
}

extern "C" __global__ void ce_finish(const float* state, const int* targets, float* loss, LossParams p) {
    __shared__ float partial[256];
    float acc = 0.f;
    for (u32 r = threadIdx.x; r < p.rows; r += blockDim.x) {
        if (targets[r] != CE_IGNORE) acc += state[3 * r] + logf(state[3 * r + 1]) - state[3 * r + 2];
    }
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (u32 stride = 128; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) loss[0] = partial[0] * p.inv_count;
}

#define KILN_LOSS(T, NAME)                                                                                    \
    extern "C" __global__ void ce_rows_##NAME(const T::storage* x, const int* targets, T::storage* g,         \
                                              float* state, LossParams p) {                                  \
        ce_rows_impl<T>(x, targets, g, state, p);                                                            \
    }                                                                                                         \
    extern "C" __global__ void ce_grad_##NAME(const float* x, const int* targets, const float* state,        \
                                              T::storage* g, LossParams p) {                                 \
        ce_grad_impl<T>(x, targets, state, g, p);                                                            \
    }

KILN_LOSS(F32, f32)
KILN_LOSS(F16, f16)
KILN_LOSS(BF16, bf16)
