// MLP activations, forward and backward (src/ops/activation/mod.rs holds the contract, the
// formulas and the CPU reference). Each element is computed in f32 and rounded once.
//
// swiglu_T             y = (g·s) · u, s = sigmoid(g)
// swiglu_backward_T    dg = (dy·u) · s(1 + g(1 − s)), du = dy · (g·s)
// gelu_T               y = x · sigmoid(2z), z = √(2/π)(x + 0.044715x³): torch's tanh GELU
// gelu_backward_T      dx = dy · (s + 2x·s(1 − s) · √(2/π)(1 + 3·0.044715x²)), s = sigmoid(2z)
// sigmoid and 1 − sigmoid come as a pair from e^−|v| (act_sigmoid_pair).
// All grid-stride over n elements, 256 threads per block, any grid. T in {f32, f16, bf16}.
// expf is CUDA's full-precision exp (within 2 ulp), not __expf.

#define GELU_BETA 0.7978846f
#define GELU_KAPPA 0.044715f

// (sigmoid(v), 1 − sigmoid(v)) from e = e^−|v|, which never overflows (src/ops/activation).
__device__ __forceinline__ float2 act_sigmoid_pair(float v) {
    const float e = expf(-fabsf(v));
    const float r = 1.f / (1.f + e), er = e * r;
    return v >= 0.f ? make_float2(r, er) : make_float2(er, r);
}

__device__ __forceinline__ float act_gelu_z2(float x) { return 2.f * (GELU_BETA * (x + GELU_KAPPA * (x * x * x))); }

template <class T>
__device__ void swiglu_impl(const typename T::storage* g, const typename T::storage* u, typename T::storage* y,
                            u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gv = T::load(g[i]);
        y[i] = T::store((gv * act_sigmoid_pair(gv).x) * T::load(u[i]));
    }
}

template <class T>
__device__ void swiglu_backward_impl(const typename T::storage* dy, const typename T::storage* g,
                                     const typename T::storage* u, typename T::storage* dg,
                                     typename T::storage* du, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float d = T::load(dy[i]), gv = T::load(g[i]), uv = T::load(u[i]);
        const float2 s = act_sigmoid_pair(gv);
        dg[i] = T::store((d * uv) * (s.x * (1.f + gv * s.y)));
        du[i] = T::store(d * (gv * s.x));
    }
}

template <class T>
__device__ void gelu_impl(const typename T::storage* x, typename T::storage* y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = T::load(x[i]);
        y[i] = T::store(v * act_sigmoid_pair(act_gelu_z2(v)).x);
    }
}

template <class T>
__device__ void gelu_backward_impl(const typename T::storage* dy, const typename T::storage* x,
                                   typename T::storage* dx, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float v = T::load(x[i]);
        const float2 s = act_sigmoid_pair(act_gelu_z2(v));
        const float slope = s.x + ((2.f * v) * (s.x * s.y)) * (GELU_BETA * (1.f + (3.f * GELU_KAPPA) * (v * v)));
        dx[i] = T::store(T::load(dy[i]) * slope);
    }
}

#define KILN_ACTIVATION(T, NAME)                                                                   \
    extern "C" __global__ void swiglu_##NAME(const T::storage* g, const T::storage* u, T::storage* y, \
                                             u64 n) {                                             \
        swiglu_impl<T>(g, u, y, n);                                                               \
    }                                                                                             \
    extern "C" __global__ void swiglu_backward_##NAME(const T::storage* dy, const T::storage* g,   \
                                                      const T::storage* u, T::storage* dg,        \
                                                      T::storage* du, u64 n) {                    \
        swiglu_backward_impl<T>(dy, g, u, dg, du, n);                                             \
    }                                                                                             \
    extern "C" __global__ void gelu_##NAME(const T::storage* x, T::storage* y, u64 n) {          \
        gelu_impl<T>(x, y, n);                                                                    \
    }                                                                                             \
    extern "C" __global__ void gelu_backward_##NAME(const T::storage* dy, const T::storage* x,     \
                                                    T::storage* dx, u64 n) {                      \
        gelu_backward_impl<T>(dy, x, dx, n);                                                      \
    }

KILN_ACTIVATION(F32, f32)
KILN_ACTIVATION(F16, f16)
KILN_ACTIVATION(BF16, bf16)
