// RMSNorm over the last dimension, its fused residual add, and its backward
// (src/ops/norm/mod.rs holds the contract and the CPU reference). Statistics in f32.
//
// rms_norm_X_W          y = (x · rstd) · w, rstd = 1/√(Σx²/d + eps) per row.
// add_rms_norm_X_W      h = round(x + r) stored, then the norm of that stored h.
//                       One block per row (grid-stride over rows), 32 to 1024 threads
//                       (more for longer rows): each thread sums the squares of a strided
//                       slice of the row, the block adds them (warp shuffles, then one warp
//                       over the warp sums), and the row is read again (from cache) to
//                       write y.
// rms_norm_bwd_X_W      dx = rstd · (dy·w − x̂ · mean(dy·w·x̂)) with x̂ = x · rstd, and the
//                       block's partial dw. One block per group of R = rows_per_group rows:
//                       block b takes rows b·R .. (b + 1)·R in order, the mean of each row
//                       reduced as above; each thread owns columns tid, tid + blockDim, …
//                       and adds dy·x̂ into them in an accumulator: dynamic shared memory
//                       when d floats fit it (use_shared), else the block's own row of
//                       `partials` in global memory. The block's sum lands in
//                       partials[b·d ..].
// rms_norm_dw_W         dw[j] = Σ_b partials[b·d + j], b = 0, 1, … in order: one thread per
//                       column, grid-stride. The groups are fixed by the row count
//                       (dw_groups in src/ops/norm/mod.rs), so dw is the same bits on every
//                       run: no float atomics.
// X (x, r, h, y, dy, dx) and W (w, dw) each in {f32, f16, bf16}: every pair is a kernel.

// The sizes of one norm launch (NormParams in src/ops/norm/cuda.rs).
struct NormParams {
    u64 rows, d, rows_per_group;
    float eps;
    int use_shared;
};

// The sum of v over the block, returned to every thread. `scratch` holds 33 floats; the
// block is a multiple of 32 threads, at most 1024.
__device__ __forceinline__ float norm_block_sum(float v, float* scratch) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float t = lane < (int)(blockDim.x >> 5) ? scratch[lane] : 0.f;
        for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
        if (lane == 0) scratch[32] = t;
    }
    __syncthreads();
    const float total = scratch[32];
    // No thread may overwrite scratch for the next sum before every thread has read this one.
    __syncthreads();
    return total;
}

template <class X, class W, bool RESIDUAL>
__device__ void rms_norm_impl(const typename X::storage* x, const typename X::storage* res,
                              const typename W::storage* w, typename X::storage* y,
                              typename X::storage* h, float* rstd, NormParams p) {
    __shared__ float scratch[33];
    const u64 d = p.d;
    for (u64 row = blockIdx.x; row < p.rows; row += gridDim.x) {
        const u64 base = row * d;
        float ss = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            float v = X::load(x[base + j]);
            if (RESIDUAL) {
                const typename X::storage hv = X::store(v + X::load(res[base + j]));
                h[base + j] = hv;
                v = X::load(hv);
            }
            ss += v * v;
        }
        ss = norm_block_sum(ss, scratch);
        const float s = 1.f / sqrtf(ss / (float)d + p.eps);
        if (threadIdx.x == 0) rstd[row] = s;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            // This thread wrote h[base + j] above; it reads its own store back.
            const float v = RESIDUAL ? X::load(h[base + j]) : X::load(x[base + j]);
            y[base + j] = X::store((v * s) * W::load(w[j]));
        }
    }
}

template <class X, class W>
__device__ void rms_norm_bwd_impl(const typename X::storage* dy, const typename X::storage* x,
                                  const typename W::storage* w, const float* rstd,
                                  typename X::storage* dx, float* partials, NormParams p) {
    __shared__ float scratch[33];
    extern __shared__ float shared_acc[];
    const u64 d = p.d;
    float* acc = p.use_shared ? shared_acc : partials + blockIdx.x * d;
    // Each thread owns the same columns throughout, so no barrier guards acc.
    for (u64 j = threadIdx.x; j < d; j += blockDim.x) acc[j] = 0.f;
    const u64 first = blockIdx.x * p.rows_per_group;
    const u64 end = min(first + p.rows_per_group, p.rows);
    for (u64 row = first; row < end; row++) {
        const u64 base = row * d;
        const float s = rstd[row];
        float dot = 0.f;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            dot += (X::load(dy[base + j]) * W::load(w[j])) * (X::load(x[base + j]) * s);
        }
        const float c = norm_block_sum(dot, scratch) / (float)d;
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) {
            const float g = X::load(dy[base + j]);
            const float xh = X::load(x[base + j]) * s;
            dx[base + j] = X::store(s * (g * W::load(w[j]) - xh * c));
            acc[j] += g * xh;
        }
    }
    if (p.use_shared) {
        for (u64 j = threadIdx.x; j < d; j += blockDim.x) partials[blockIdx.x * d + j] = acc[j];
    }
}

template <class W>
__device__ void rms_norm_dw_impl(const float* partials, typename W::storage* dw, u64 groups, u64 d) {
    for (u64 j = blockIdx.x * (u64)blockDim.x + threadIdx.x; j < d; j += (u64)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (u64 b = 0; b < groups; b++) s += partials[b * d + j];
        dw[j] = W::store(s);
    }
}

#define KILN_NORM(X, XN, W, WN)                                                                    \
    extern "C" __global__ void __launch_bounds__(1024)                                           \
        rms_norm_##XN##_##WN(const X::storage* x, const W::storage* w, X::storage* y, float* rstd, \
                             NormParams p) {                                                      \
        rms_norm_impl<X, W, false>(x, nullptr, w, y, nullptr, rstd, p);                           \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(1024)                                           \
        add_rms_norm_##XN##_##WN(const X::storage* x, const X::storage* r, const W::storage* w,    \
                                 X::storage* y, X::storage* h, float* rstd, NormParams p) {       \
        rms_norm_impl<X, W, true>(x, r, w, y, h, rstd, p);                                        \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(1024)                                           \
        rms_norm_bwd_##XN##_##WN(const X::storage* dy, const X::storage* x, const W::storage* w,   \
                                 const float* rstd, X::storage* dx, float* partials, NormParams p) { \
        rms_norm_bwd_impl<X, W>(dy, x, w, rstd, dx, partials, p);                                 \
    }

#define KILN_NORM_W(W, WN)                                                                         \
    KILN_NORM(F32, f32, W, WN)                                                                     \
    KILN_NORM(F16, f16, W, WN)                                                                     \
    KILN_NORM(BF16, bf16, W, WN)                                                                   \
    extern "C" __global__ void rms_norm_dw_##WN(const float* partials, W::storage* dw, u64 groups, \
                                                u64 d) {                                          \
        rms_norm_dw_impl<W>(partials, dw, groups, d);                                             \
    }

KILN_NORM_W(F32, f32)
KILN_NORM_W(F16, f16)
KILN_NORM_W(BF16, bf16)
