// Quantized weights: decoding, dequantize, and the products y = x·Wᵀ and dx = dy·W with W
// an [out, in] quantized weight (formats in src/ops/quant/formats.rs). Every kernel takes
// the weight's QuantParams; the products take QuantProductParams (quant.cuh). Every weight is
// `code · scale` rounded once in f32 (Q4_1: `+ min`, rounded again), as the CPU decodes it
// (explicit _rn ops, no fusing); the tensor-core GEMM then rounds it once more to the
// activations' half type (the launcher keeps f16 off that path when |w| could exceed f16's
// range).
//
// dequantize                        one element per thread, grid-stride; out_kind picks the
//                                    output dtype
// quant_gemv_{f32,f16,bf16}         y = x·Wᵀ for up to 8 token rows: one warp per output
//                                    row, lanes on consecutive blocks (the warp reads the
//                                    row contiguously), every weight decoded once for all
//                                    token rows; warp-shuffle reduction. 256 threads,
//                                    grid ceil(out / 8)
// quant_gemm_simt_{f32,f16,bf16}    gemm_simt with B decoded from W as tiles are staged;
//                                    `direction` 0: B = Wᵀ (forward), 1: B = W (input grad)
// quant_gemm_mma_{f16,bf16}_{fwd,bwd}
//                                    gemm_mma with tiles of W decoded 8 weights at a time to
//                                    the activations' half type in shared memory; sm_80+,
//                                    A rows 16-byte aligned

extern "C" __global__ void dequantize(const u8* w, void* out, int out_kind, u64 n, const QuantParams qp) {
    const QDesc q = qdesc(qp);
    for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < n; e += (u64)gridDim.x * blockDim.x) {
        store_out(out, e, decode1(w, q, e), out_kind);
    }
}

#define KILN_QUANT_GEMV(TX, NAME)                                                                   \
    extern "C" __global__ void __launch_bounds__(256) quant_gemv_##NAME(                            \
        const u8* w, const TX::storage* x, void* y, const QuantProductParams p, const QuantParams qp) { \
        quant_gemv_impl<TX>(w, qdesc(qp), x, y, p.out_kind, p.n, p.k, p.m);                         \
    }

KILN_QUANT_GEMV(F32, f32)
KILN_QUANT_GEMV(F16, f16)
KILN_QUANT_GEMV(BF16, bf16)
#define KILN_QUANT_GEMM_SIMT(TX, NAME)                                                              \
    extern "C" __global__ void __launch_bounds__(256) quant_gemm_simt_##NAME(                       \
        const TX::storage* x, const u8* w, void* y, const QuantProductParams p, const QuantParams qp) { \
        const QuantB bload{w, qdesc(qp), p.cols, p.direction};                                       \
        gemm_simt<TX>(x, bload, y, p.out_kind, p.m, p.n, p.k, p.k, 0, 0, p.direction == 0);          \
    }

KILN_QUANT_GEMM_SIMT(F32, f32)
KILN_QUANT_GEMM_SIMT(F16, f16)
KILN_QUANT_GEMM_SIMT(BF16, bf16)

#define KILN_QUANT_GEMM_MMA(T, BF, NAME, TB, DIR)                                                   \
    extern "C" __global__ void __launch_bounds__(256) quant_gemm_mma_##NAME##_##DIR(                \
        const u16* x, const u8* w, void* y, const QuantProductParams p, const QuantParams qp) {      \
        const QuantBStage<T, TB> bstage{w, qdesc(qp), p.cols, p.k, p.n};                             \
        gemm_mma<BF, false, TB>(x, bstage, y, p.out_kind, p.m, p.n, p.k, p.k, 0);                    \
    }

KILN_QUANT_GEMM_MMA(F16, false, f16, true, fwd)
KILN_QUANT_GEMM_MMA(F16, false, f16, false, bwd)
KILN_QUANT_GEMM_MMA(BF16, true, bf16, true, fwd)
KILN_QUANT_GEMM_MMA(BF16, true, bf16, false, bwd)
