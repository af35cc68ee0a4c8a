// Token embeddings (src/ops/embedding): rows of a table gathered by token id, and the
// deterministic scatter-add of the backward. The ids were checked against the vocabulary on
// the host before any launch; every kernel still tests `id < vocab`, so no id reads outside
// the table (a row failing the test would be written as zeros).
//
// embedding_gather_w{16,8,4,2}   out[t, :] = table[ids[t], :], a bit-for-bit copy in words of
//                                16, 8, 4 or 2 bytes (the widest dividing a row's bytes, so
//                                every word is aligned); one 128-thread block per token,
//                                grid-stride over tokens
// embedding_qgather              out[t, :] = the quantized table's row ids[t], decoded 8
//                                weights per thread (decode8 of quant.cuh, as dequantize
//                                decodes them) and stored as out_kind (0 f32, 1 f16, 2 bf16)
//                                with one 16- or 32-byte store; one 128-thread block per
//                                token, grid-stride over tokens
// embedding_backward_{f32,f16,bf16}
//                                d_table[v, c] = Σ dy[p, c] over the positions p of id v, in
//                                the order the host's counting sort lists them (increasing
//                                p), f32 additions from +0: no atomics, so every run and
//                                every backend gives the same bits. One thread per column,
//                                128 columns per block; grid (rows, column blocks), each
//                                grid-stride
// Indices are 64-bit.

// Sizes of an embedding launch (EmbeddingParams in src/ops/embedding/cuda.rs).
struct EmbeddingParams {
    u64 tokens;     // ids
    u64 dim;        // elements per row
    u64 vocab;      // table rows
    u64 row_words;  // embedding_gather_w*: words per row
    int out_kind;   // embedding_qgather: 0 f32, 1 f16, 2 bf16
    int pad0;
};

template <class W>
__device__ void gather_impl(const W* __restrict__ table, const u32* __restrict__ ids, W* __restrict__ out,
                            const EmbeddingParams p) {
    for (u64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        const u64 id = ids[t];
        W* dst = out + t * p.row_words;
        if (id < p.vocab) {
            const W* src = table + id * p.row_words;
            for (u64 i = threadIdx.x; i < p.row_words; i += blockDim.x) dst[i] = src[i];
        } else {
            for (u64 i = threadIdx.x; i < p.row_words; i += blockDim.x) dst[i] = W{};
        }
    }
}

#define GATHER(BYTES, W)                                                                          \
    extern "C" __global__ void __launch_bounds__(128) embedding_gather_w##BYTES(                 \
        const W* table, const u32* ids, W* out, const EmbeddingParams p) {                       \
        gather_impl<W>(table, ids, out, p);                                                       \
    }
GATHER(16, uint4)
GATHER(8, uint2)
GATHER(4, u32)
GATHER(2, u16)

extern "C" __global__ void __launch_bounds__(128) embedding_qgather(const u8* __restrict__ w,
                                                                    const u32* __restrict__ ids,
                                                                    void* __restrict__ out,
                                                                    const EmbeddingParams p,
                                                                    const QuantParams qp) {
    const QDesc q = qdesc(qp);  // every thread, before any exit: it fills the NF4 table
    const u64 chunks = p.dim / 8;  // rows hold whole blocks of 32 or 64
    for (u64 t = blockIdx.x; t < p.tokens; t += gridDim.x) {
        const u64 id = ids[t];
        for (u64 c = threadIdx.x; c < chunks; c += blockDim.x) {
            float v[8];
            if (id < p.vocab) {
                decode8(w, q, id * p.dim + c * 8, v);
            } else {
#pragma unroll
                for (int j = 0; j < 8; j++) v[j] = 0.f;
            }
            // Rows start at multiples of 32 elements: the stores are aligned.
            const u64 o = t * p.dim + c * 8;
            if (p.out_kind == 0) {
                float4* dst = (float4*)((float*)out + o);
                dst[0] = make_float4(v[0], v[1], v[2], v[3]);
                dst[1] = make_float4(v[4], v[5], v[6], v[7]);
            } else {
                u32 packed[4];
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const u32 lo = p.out_kind == 1 ? f32_to_f16(v[2 * j]) : f32_to_bf16(v[2 * j]);
                    const u32 hi = p.out_kind == 1 ? f32_to_f16(v[2 * j + 1]) : f32_to_bf16(v[2 * j + 1]);
                    packed[j] = lo | (hi << 16);
                }
                *(uint4*)((u16*)out + o) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
            }
        }
    }
}

template <class T>
__device__ void backward_impl(const typename T::storage* __restrict__ dy, const u32* __restrict__ offsets,
                              const u32* __restrict__ positions, float* __restrict__ out, const EmbeddingParams p) {
    for (u64 v = blockIdx.x; v < p.vocab; v += gridDim.x) {
        const u32 begin = offsets[v], end = offsets[v + 1];
        for (u64 c = blockIdx.y * (u64)blockDim.x + threadIdx.x; c < p.dim; c += (u64)gridDim.y * blockDim.x) {
            float acc = 0.f;
            for (u32 k = begin; k < end; k++) acc = __fadd_rn(acc, T::load(dy[(u64)positions[k] * p.dim + c]));
            out[v * p.dim + c] = acc;
        }
    }
}

#define BACKWARD(NAME, T)                                                                         \
    extern "C" __global__ void __launch_bounds__(128) embedding_backward_##NAME(                 \
        const T::storage* dy, const u32* offsets, const u32* positions, float* out,              \
        const EmbeddingParams p) {                                                                \
        backward_impl<T>(dy, offsets, positions, out, p);                                         \
    }
BACKWARD(f32, F32)
BACKWARD(f16, F16)
BACKWARD(bf16, BF16)
