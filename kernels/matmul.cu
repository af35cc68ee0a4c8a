// Dense matmul: C[b] = op(A[b]) · op(B[b]) through the engines of gemm.cuh.
// A is stored [M, K] (lda = K), or [K, M] when trans_a (lda = M); B is stored [K, N]
// (ldb = N), or [N, K] when trans_b (ldb = K). Batch b starts at b * stride_a / stride_b
// (0 for an operand shared by every batch) and at b * M * N in C.
//
// matmul_simt_{f32,f16,bf16}             gemm_simt with B read densely
// matmul_mma_{f16,bf16}_{nn,nt,tn,tt}    gemm_mma with B copied by cp.async; the launcher
//                                         picks it on sm_80+ when lda and ldb are multiples
//                                         of 8 (16-byte rows)

// The scalars of every matmul kernel (MatmulParams in src/ops/matmul/cuda.rs). The mma
// kernels take the transposes from their names.
struct MatmulParams {
    u64 stride_a, stride_b;
    int m, n, k, lda, ldb;
    int trans_a, trans_b;
    int out_kind;
};

#define KILN_MATMUL_SIMT(T, NAME)                                                                  \
    extern "C" __global__ void __launch_bounds__(256) matmul_simt_##NAME(                          \
        const T::storage* A, const T::storage* B, void* C, const MatmulParams p) {                 \
        const DenseB<T> bload{B, p.ldb, p.stride_b, p.trans_b};                                    \
        gemm_simt<T>(A, bload, C, p.out_kind, p.m, p.n, p.k, p.lda, p.stride_a, p.trans_a, p.trans_b); \
    }

KILN_MATMUL_SIMT(F32, f32)
KILN_MATMUL_SIMT(F16, f16)
KILN_MATMUL_SIMT(BF16, bf16)

#define KILN_MATMUL_MMA(BF, NAME, TA, TB, LAYOUT)                                                  \
    extern "C" __global__ void __launch_bounds__(256) matmul_mma_##NAME##_##LAYOUT(                \
        const u16* A, const u16* B, void* C, const MatmulParams p) {                               \
        const DenseBStage<TB> bstage{B, p.ldb, p.stride_b, p.k, p.n};                              \
        gemm_mma<BF, TA, TB>(A, bstage, C, p.out_kind, p.m, p.n, p.k, p.lda, p.stride_a);          \
    }

KILN_MATMUL_MMA(false, f16, false, false, nn)
KILN_MATMUL_MMA(false, f16, false, true, nt)
KILN_MATMUL_MMA(false, f16, true, false, tn)
KILN_MATMUL_MMA(false, f16, true, true, tt)
KILN_MATMUL_MMA(true, bf16, false, false, nn)
KILN_MATMUL_MMA(true, bf16, false, true, nt)
KILN_MATMUL_MMA(true, bf16, true, false, tn)
KILN_MATMUL_MMA(true, bf16, true, true, tt)
