// Elementwise kernels and a row-wise sum. Each computes in f32 and rounds once on store.
//
// add_T, mul_T:        out[i] = x[i] (+|*) y[i]             grid-stride, any grid
// scale_T:             out[i] = s * x[i]                     grid-stride, any grid
// cast_T_U:            out[i] = (U) x[i]                     grid-stride, any grid
// add_bias_T:          out[i] = x[i] + bias[i mod cols]                grid-stride
// dropout_T:           out[i] = keep(i) ? x[i] · scale : 0             grid-stride; keep(i) is
//                      mix32(i · 0x9e3779b1 ^ key) < threshold (src/ops/elementwise/mod.rs)
// sum_rows_T:          out[r] = sum_j x[r, j]                one 256-thread block per row,
//                                                            grid-stride over rows
// T, U in {f32, f16, bf16}. Indices are 64-bit.

template <class T, int OP>
__device__ void binary_impl(const typename T::storage* x, const typename T::storage* y,
                            typename T::storage* out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float a = T::load(x[i]), b = T::load(y[i]);
        out[i] = T::store(OP == 0 ? a + b : a * b);
    }
}

template <class T>
__device__ void scale_impl(const typename T::storage* x, typename T::storage* out, u64 n, float s) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = T::store(s * T::load(x[i]));
    }
}

template <class T, class U>
__device__ void cast_impl(const typename T::storage* x, typename U::storage* out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = U::store(T::load(x[i]));
    }
}

template <class T>
__device__ void add_bias_impl(const typename T::storage* x, const typename T::storage* bias,
                              typename T::storage* out, u64 n, u64 cols) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        out[i] = T::store(T::load(x[i]) + T::load(bias[i % cols]));
    }
}

template <class T>
__device__ void dropout_impl(const typename T::storage* x, typename T::storage* out, u64 n, u32 key,
                             u32 threshold, float scale) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        u32 h = ((u32)i * 0x9e3779b1u) ^ key;
        h ^= h >> 16;
        h *= 0x85ebca6bu;
        h ^= h >> 13;
        h *= 0xc2b2ae35u;
        h ^= h >> 16;
        out[i] = T::store(h < threshold ? T::load(x[i]) * scale : 0.f);
    }
}

template <class T>
__device__ void sum_rows_impl(const typename T::storage* x, typename T::storage* out, u64 rows, u64 cols) {
    __shared__ float warp_sums[8];
    for (u64 r = blockIdx.x; r < rows; r += gridDim.x) {
        const typename T::storage* row = x + r * cols;
        float s = 0.f;
        for (u64 j = threadIdx.x; j < cols; j += blockDim.x) s += T::load(row[j]);
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = s;
        __syncthreads();
        if (threadIdx.x < 32) {
            float t = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : 0.f;
            for (int off = 16; off > 0; off >>= 1) t += __shfl_xor_sync(0xffffffffu, t, off);
            if (threadIdx.x == 0) out[r] = T::store(t);
        }
        __syncthreads();
    }
}

#define KILN_ELEMENTWISE(T, NAME)                                                                 \
    extern "C" __global__ void add_##NAME(const T::storage* x, const T::storage* y, T::storage* out, \
                                          u64 n) {                                                \
        binary_impl<T, 0>(x, y, out, n);                                                          \
    }                                                                                             \
    extern "C" __global__ void mul_##NAME(const T::storage* x, const T::storage* y, T::storage* out, \
                                          u64 n) {                                                \
        binary_impl<T, 1>(x, y, out, n);                                                          \
    }                                                                                             \
    extern "C" __global__ void scale_##NAME(const T::storage* x, T::storage* out, u64 n, float s) { \
        scale_impl<T>(x, out, n, s);                                                              \
    }                                                                                             \
    extern "C" __global__ void add_bias_##NAME(const T::storage* x, const T::storage* bias,        \
                                               T::storage* out, u64 n, u64 cols) {                \
        add_bias_impl<T>(x, bias, out, n, cols);                                                  \
    }                                                                                             \
    extern "C" __global__ void dropout_##NAME(const T::storage* x, T::storage* out, u64 n, u32 key, \
                                              u32 threshold, float scale) {                       \
        dropout_impl<T>(x, out, n, key, threshold, scale);                                        \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(256)                                             \
        sum_rows_##NAME(const T::storage* x, T::storage* out, u64 rows, u64 cols) {               \
        sum_rows_impl<T>(x, out, rows, cols);                                                     \
    }

KILN_ELEMENTWISE(F32, f32)
KILN_ELEMENTWISE(F16, f16)
KILN_ELEMENTWISE(BF16, bf16)

#define KILN_CAST(T, TN, U, UN)                                                                    \
    extern "C" __global__ void cast_##TN##_##UN(const T::storage* x, U::storage* out, u64 n) {     \
        cast_impl<T, U>(x, out, n);                                                                \
    }

KILN_CAST(F32, f32, F16, f16)
KILN_CAST(F32, f32, BF16, bf16)
KILN_CAST(F16, f16, F32, f32)
KILN_CAST(F16, f16, BF16, bf16)
KILN_CAST(BF16, bf16, F32, f32)
KILN_CAST(BF16, bf16, F16, f16)
