// LoRA kernels (prepended: common.cuh, gemm.cuh, quant.cuh).
//
// The fused layer y = x·Wᵀ + bias + s·xa·B_loraᵀ with xa = x·A_loraᵀ, W [N, K] dense (x's
// type) or quantized, x [M, K], A_lora [r, K] in x's type, B_lora [N, r] and bias [N] f32,
// y in out_kind. The GEMM engines of gemm.cuh with their LoRA extension (LoraArgs). Every
// fused kernel takes the buffers, then LoraParams (and QuantParams for a quantized W):
//
// lora_fused_simt_{f32,f16,bf16}_{dense,quant}_{pre,xa}
//     gemm_simt; `xa`: xa computed from the staged x tiles (r ≤ 32) and written to xa_out;
//     `pre`: xa_in computed beforehand (dropout on the LoRA input, or r > 32).
// lora_fused_mma_{f16,bf16}_{dense,quant}_{pre,xa16,xa32}
//     gemm_mma (sm_80+, K a multiple of 8); `xa16`/`xa32`: xa on the tensor cores from
//     the x fragments already loaded, rank padded to 16 or 32.
// lora_gemv_{f32,f16,bf16}
//     quantized W, up to 8 tokens: the quant GEMV with xa_in (decoding).
//
// Many adapters in one batch (Punica's BGMV idea), f32. Each row t of x picks adapter
// rows[t] (−1: none); `table` holds an AdapterEntry per adapter.
//
// lora_shrink   v[t, j] = x[t]·A_a[j] for j < rank(a), else 0. One warp per (t, j):
//               256 threads = 8 values of j, grid (tokens, ceil(max rank / 8)); lanes
//               stride over `in`, warp-shuffle reduction. Also the shrink of the decoding
//               path (one adapter, every row 0).
// lora_expand   out[t, o] = y[t, o] + s_a · v[t]·B_a[o]. One thread per element,
//               grid-stride.

// The fused layer's sizes, rank and scale (LoraParams in src/ops/lora/cuda.rs).
struct LoraParams {
    int m, n, k;
    int rank;
    float scale;
    int out_kind;
};

// One adapter of a batch (AdapterEntry in src/ops/lora/mod.rs): where its A and B start in
// the packed arrays (elements), its rank and its scale.
struct AdapterEntry {
    u32 a_offset, b_offset, rank;
    float scale;
};

#define LORA_BUFFERS const void *la, const float *xa_in, float *xa_out, const float *lb, const float *bias
#define LORA LoraArgs{la, xa_in, xa_out, lb, bias, p.rank, p.scale}

#define KILN_LORA_SIMT(T, NAME, LORA_RANK, MODE)                                                                     \
    extern "C" __global__ void __launch_bounds__(256) lora_fused_simt_##NAME##_dense_##MODE(                  \
        const T::storage* x, const T::storage* w, void* y, LORA_BUFFERS, const LoraParams p) {                \
        const DenseB<T> bload{w, p.k, 0, 1};                                                                   \
        gemm_simt<T, DenseB<T>, LORA_RANK>(x, bload, y, p.out_kind, p.m, p.n, p.k, p.k, 0, 0, 1, LORA);               \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) lora_fused_simt_##NAME##_quant_##MODE(                  \
        const T::storage* x, const u8* w, void* y, LORA_BUFFERS, const LoraParams p, const QuantParams qp) {  \
        const QuantB bload{w, qdesc(qp), p.k, 0};                                                              \
        gemm_simt<T, QuantB, LORA_RANK>(x, bload, y, p.out_kind, p.m, p.n, p.k, p.k, 0, 0, 1, LORA);                  \
    }

KILN_LORA_SIMT(F32, f32, 0, pre)
KILN_LORA_SIMT(F32, f32, SIMT_LORA_R, xa)
KILN_LORA_SIMT(F16, f16, 0, pre)
KILN_LORA_SIMT(F16, f16, SIMT_LORA_R, xa)
KILN_LORA_SIMT(BF16, bf16, 0, pre)
KILN_LORA_SIMT(BF16, bf16, SIMT_LORA_R, xa)

#define KILN_LORA_MMA(T, BF, NAME, LORA_RANK, MODE)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) lora_fused_mma_##NAME##_dense_##MODE(                   \
        const u16* x, const u16* w, void* y, LORA_BUFFERS, const LoraParams p) {                              \
        const DenseBStage<true> bstage{w, p.k, 0, p.k, p.n};                                                   \
        gemm_mma<BF, false, true, DenseBStage<true>, LORA_RANK>(x, bstage, y, p.out_kind, p.m, p.n, p.k, p.k, 0, LORA); \
    }                                                                                                          \
    extern "C" __global__ void __launch_bounds__(256) lora_fused_mma_##NAME##_quant_##MODE(                   \
        const u16* x, const u8* w, void* y, LORA_BUFFERS, const LoraParams p, const QuantParams qp) {         \
        const QuantBStage<T, true> bstage{w, qdesc(qp), p.k, p.k, p.n};                                        \
        gemm_mma<BF, false, true, QuantBStage<T, true>, LORA_RANK>(x, bstage, y, p.out_kind, p.m, p.n, p.k, p.k, 0, LORA); \
    }

KILN_LORA_MMA(F16, false, f16, 0, pre)
KILN_LORA_MMA(F16, false, f16, 16, xa16)
KILN_LORA_MMA(F16, false, f16, 32, xa32)
KILN_LORA_MMA(BF16, true, bf16, 0, pre)
KILN_LORA_MMA(BF16, true, bf16, 16, xa16)
KILN_LORA_MMA(BF16, true, bf16, 32, xa32)

#define KILN_LORA_GEMV(TX, NAME)                                                                              \
    extern "C" __global__ void __launch_bounds__(256) lora_gemv_##NAME(                                       \
        const u8* w, const TX::storage* x, void* y, LORA_BUFFERS, const LoraParams p, const QuantParams qp) {  \
        quant_gemv_impl<TX, true>(w, qdesc(qp), x, y, p.out_kind, p.n, p.k, p.m, LORA);                       \
    }

KILN_LORA_GEMV(F32, f32)
KILN_LORA_GEMV(F16, f16)
KILN_LORA_GEMV(BF16, bf16)

extern "C" __global__ void __launch_bounds__(256) lora_shrink(const float* x, const float* a,
                                                              const AdapterEntry* table, const int* rows, float* v,
                                                              int in, int rmax) {
    const int t = blockIdx.x, lane = threadIdx.x & 31;
    const int j = blockIdx.y * 8 + (threadIdx.x >> 5);
    if (j >= rmax) return;  // whole warps leave; only warp shuffles follow
    const int adapter = rows[t];
    const int rank = adapter < 0 ? 0 : (int)table[adapter].rank;
    float acc = 0.f;
    if (j < rank) {
        const float* xr = x + (u64)t * in;
        const float* ar = a + table[adapter].a_offset + (u64)j * in;
        for (int i = lane; i < in; i += 32) acc = fmaf(xr[i], ar[i], acc);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) v[(u64)t * rmax + j] = acc;
}

extern "C" __global__ void lora_expand(const float* v, const float* b, const AdapterEntry* table, const int* rows,
                                       const float* y, float* out, u64 tokens, int outn, int rmax) {
    for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < tokens * outn; e += (u64)gridDim.x * blockDim.x) {
        const u64 t = e / outn;
        const int o = (int)(e % outn);
        const int adapter = rows[t];
        float val = y[e];
        if (adapter >= 0) {
            const AdapterEntry entry = table[adapter];
            const int rank = (int)entry.rank;
            const float* br = b + entry.b_offset + (u64)o * rank;
            const float* vt = v + t * rmax;
            float acc = 0.f;
            for (int j = 0; j < rank; j++) acc = fmaf(vt[j], br[j], acc);
            val += entry.scale * acc;
        }
        out[e] = val;
    }
}
