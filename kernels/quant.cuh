// Quantized weights as the kernels read them (prepended after common.cuh and gemm.cuh, for
// quant.cu and lora.cu): the decoders, the GEMV body, and the B-loaders through which the
// GEMM engines read W. Formats in src/ops/quant/formats.rs. Every weight is `code · scale`
// rounded once in f32 (Q4_1: `+ min`, rounded again), as the CPU decodes it (explicit _rn
// ops, no fusing).

// Bytes of ggml's blocks (BlockQ8_0, BlockQ4_0, BlockQ4_1 in src/ops/quant/formats.rs).
#define BLOCK_Q8_0_BYTES 34
#define BLOCK_Q4_0_BYTES 18
#define BLOCK_Q4_1_BYTES 20

// The weight's format and the place of its NF4 state, as every quant kernel takes it
// (QuantParams in src/ops/quant/cuda.rs).
struct QuantParams {
    u64 absmax_offset, nested_offset, code_offset;  // bytes into w
    int format;    // 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 NF4, 4 NF4 with double quantisation
    float offset;  // the mean double quantisation subtracted from absmax
};

// The sizes of a product through W (QuantProductParams in src/ops/quant/cuda.rs): x is
// [m, k], the result [m, n]; W is [rows, cols] with cols its row length; direction 0 is
// x·Wᵀ (n = rows, k = cols), 1 is dy·W (n = cols, k = rows). The GEMV has m ≤ 8.
struct QuantProductParams {
    int m, n, k, cols;
    int direction;
    int out_kind;
};

__constant__ float kNF4[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// kNF4 copied into shared memory: lanes look codes up at different indices, which
// __constant__ memory would serialize. Every thread of the block calls it once, before any
// early exit.
__device__ __forceinline__ const float* nf4_shared() {
    __shared__ float table[16];
    const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (tid < 16) table[tid] = kNF4[tid];
    __syncthreads();
    return table;
}

// One quantized weight as the decoders read it: its QuantParams and the NF4 table.
struct QDesc {
    int format;
    u64 absmax_off, nested_off, code_off;
    float offset;
    const float* nf4;  // kNF4 in shared memory (nf4_shared)
    __device__ __forceinline__ int block_size() const { return format >= 3 ? 64 : 32; }
};

// The QDesc of a kernel's QuantParams. Every thread of the block calls it, before any early
// exit (it fills the shared NF4 table).
__device__ __forceinline__ QDesc qdesc(const QuantParams& p) {
    return QDesc{p.format, p.absmax_offset, p.nested_offset, p.code_offset, p.offset, nf4_shared()};
}

__device__ __forceinline__ float f32_at(const u8* w, u64 at) { return *(const float*)(w + at); }
__device__ __forceinline__ float f16_at(const u8* w, u64 at) { return f16_to_f32(*(const u16*)(w + at)); }

__device__ __forceinline__ float block_scale(const u8* w, const QDesc& q, u64 b) {
    switch (q.format) {
        case 0: return f16_at(w, b * BLOCK_Q8_0_BYTES);
        case 1: return f16_at(w, b * BLOCK_Q4_0_BYTES);
        case 2: return f16_at(w, b * BLOCK_Q4_1_BYTES);
        case 3: return f32_at(w, q.absmax_off + 4 * b);
        default: {
            const float code = f32_at(w, q.code_off + 4 * (u64)w[q.absmax_off + b]);
            return __fadd_rn(__fmul_rn(code, f32_at(w, q.nested_off + 4 * (b / 256))), q.offset);
        }
    }
}

// A ggml 4-bit block (Q4_0, Q4_1; byte i holds weight i in its low nibble and weight i + 16
// in its high one) and how one of its codes becomes a weight: Q4_0 (q − 8)·d, Q4_1 q·d + m
// rounded twice (product, then sum), as the CPU and gguf-py decode it.
struct Q4Block {
    const u8* qs;  // the 16 code bytes
    float d, m;
    bool has_min;
    __device__ __forceinline__ float weight(u32 code) const {
        return has_min ? __fadd_rn(__fmul_rn((float)code, d), m) : __fmul_rn((float)((int)code - 8), d);
    }
};

// Block b of a Q4_0 or Q4_1 weight, whose scale is d.
__device__ __forceinline__ Q4Block q4_block(const u8* w, const QDesc& q, u64 b, float d) {
    const bool q41 = q.format == 2;
    const u8* blk = w + b * (q41 ? BLOCK_Q4_1_BYTES : BLOCK_Q4_0_BYTES);
    return Q4Block{blk + (q41 ? 4 : 2), d, q41 ? f16_at(blk, 2) : 0.f, q41};
}

// Decodes the 8 weights at flat indices e0..e0+8 (e0 a multiple of 8: never across blocks).
__device__ __forceinline__ void decode8(const u8* w, const QDesc& q, u64 e0, float out[8]) {
    const u64 b = e0 / q.block_size();
    const float s = block_scale(w, q, b);
    if (q.format == 0) {
        const u8* qs = w + b * BLOCK_Q8_0_BYTES + 2 + (e0 & 31);
#pragma unroll
        for (int j = 0; j < 8; j++) out[j] = __fmul_rn((float)(signed char)qs[j], s);
    } else if (q.format <= 2) {
        const Q4Block blk = q4_block(w, q, b, s);
        const int j0 = (int)(e0 & 31);
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const int jj = j0 + j;
            const u32 byte = blk.qs[jj & 15];
            out[j] = blk.weight(jj < 16 ? byte & 15 : byte >> 4);
        }
    } else {
        const u8* p = w + (e0 >> 1);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            out[2 * j] = __fmul_rn(q.nf4[p[j] >> 4], s);
            out[2 * j + 1] = __fmul_rn(q.nf4[p[j] & 15], s);
        }
    }
}

// Decodes the 32 weights at flat indices e0..e0+32 (e0 a multiple of 32) with wide loads:
// a ggml block's codes as 2-byte words (blocks are 2-byte aligned), 32 NF4 codes as one
// 16-byte load. The GEMV's unit of work.
__device__ __forceinline__ void decode32(const u8* w, const QDesc& q, u64 e0, float out[32]) {
    const u64 b = e0 / q.block_size();
    const float s = block_scale(w, q, b);
    if (q.format == 0) {
        const u16* qs = (const u16*)(w + b * BLOCK_Q8_0_BYTES + 2);
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const u32 word = qs[j];
            out[2 * j] = __fmul_rn((float)(signed char)(word & 0xff), s);
            out[2 * j + 1] = __fmul_rn((float)(signed char)(word >> 8), s);
        }
    } else if (q.format <= 2) {
        const Q4Block blk = q4_block(w, q, b, s);
        const u16* qs = (const u16*)blk.qs;
#pragma unroll
        for (int j = 0; j < 8; j++) {
            const u32 word = qs[j];
            out[2 * j] = blk.weight(word & 15);
            out[2 * j + 1] = blk.weight((word >> 8) & 15);
            out[2 * j + 16] = blk.weight((word >> 4) & 15);
            out[2 * j + 17] = blk.weight(word >> 12);
        }
    } else {
        const uint4 v = *(const uint4*)(w + (e0 >> 1));
        const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int j = 0; j < 16; j++) {
            const u32 byte = (words[j >> 2] >> (8 * (j & 3))) & 0xff;
            out[2 * j] = __fmul_rn(q.nf4[byte >> 4], s);
            out[2 * j + 1] = __fmul_rn(q.nf4[byte & 15], s);
        }
    }
}

__device__ __forceinline__ float decode1(const u8* w, const QDesc& q, u64 e) {
    float v[8];
    decode8(w, q, e & ~(u64)7, v);
    return v[e & 7];
}

// ---------------------------------------------------------------------------------------
// GEMV

#define GEMV_MAX_TOKENS 8

// With LORA, `bias + s·xa·B_loraᵀ` joins each output (xa [tokens, r] from global memory,
// see LoraArgs in gemm.cuh): the lanes split the rank before the warp's reduction.
template <class TX, bool LORA = false>
__device__ void quant_gemv_impl(const u8* __restrict__ w, const QDesc q, const typename TX::storage* __restrict__ x,
                                void* __restrict__ y, int out_kind, int rows, int cols, int tokens,
                                const LoraArgs& lora = LoraArgs{}) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * 8 + warp;
    if (row >= rows) return;  // whole warps leave; only warp shuffles follow
    float acc[GEMV_MAX_TOKENS];
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOKENS; t++) acc[t] = 0.f;
    // Lanes take consecutive 32-weight chunks of the row, so the warp reads it in order.
    for (int c = lane; c < cols / 32; c += 32) {
        const u64 col0 = (u64)c * 32;
        float wv[32];
        decode32(w, q, (u64)row * cols + col0, wv);
#pragma unroll
        for (int t = 0; t < GEMV_MAX_TOKENS; t++) {
            if (t < tokens) {
                const typename TX::storage* xr = x + (u64)t * cols + col0;
#pragma unroll
                for (int j = 0; j < 32; j++) acc[t] = fmaf(wv[j], TX::load(xr[j]), acc[t]);
            }
        }
    }
    if (LORA) {
#pragma unroll
        for (int t = 0; t < GEMV_MAX_TOKENS; t++) {
            if (t >= tokens) continue;
            for (int j = lane; j < lora.r; j += 32)
                acc[t] = fmaf(lora.scale * lora.xa_in[(u64)t * lora.r + j], lora.b[(u64)row * lora.r + j], acc[t]);
        }
    }
#pragma unroll
    for (int t = 0; t < GEMV_MAX_TOKENS; t++) {
        float s = acc[t];
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        if (LORA && lora.bias) s += lora.bias[row];
        if (lane == 0 && t < tokens) store_out(y, (u64)t * rows + row, s, out_kind);
    }
}

// ---------------------------------------------------------------------------------------
// GEMM: B decoded from W. W is [rows, cols]; forward B(k, n) = W[n, k], input grad
// B(k, n) = W[k, n]; either way element (r, c) of W is flat index r * cols + c.

struct QuantB {
    const u8* w;
    QDesc q;
    int cols;
    int direction;  // 0: B = Wᵀ, 1: B = W
    __device__ __forceinline__ float operator()(u64, int k, int n) const {
        return direction == 0 ? decode1(w, q, (u64)n * cols + k) : decode1(w, q, (u64)k * cols + n);
    }
};

// Decodes a BK×BN tile of B into shared memory as the activations' half type, 8 weights
// (one 16-byte store) per chunk: [n][k] for the forward product (rows of W), [k][n] for the
// input gradient (column ranges of W rows). Chunks past K or N are zero.
template <class T, bool TRANS_B>
struct QuantBStage {
    const u8* w;
    QDesc q;
    int cols;
    int K, N;
    __device__ __forceinline__ void load(u16* dst, int k0, int n0, u64) const {
        constexpr int ROWS = TRANS_B ? MMA_BN : MMA_BK;
        constexpr int COLS = TRANS_B ? MMA_BK : MMA_BN;
        constexpr int CHUNKS_PER_ROW = COLS / 8;
#pragma unroll
        for (int t = 0; t < ROWS * CHUNKS_PER_ROW / 256; t++) {
            const int chunk = threadIdx.x + t * 256;
            const int r = chunk / CHUNKS_PER_ROW;
            const int c = (chunk % CHUNKS_PER_ROW) * 8;
            // (W row, W column) of the chunk's first weight.
            const int wr = TRANS_B ? n0 + r : k0 + r;
            const int wc = TRANS_B ? k0 + c : n0 + c;
            const bool inside = TRANS_B ? (wr < N && wc < K) : (wr < K && wc < N);
            u32 packed[4] = {0, 0, 0, 0};
            if (inside) {
                float v[8];
                decode8(w, q, (u64)wr * cols + wc, v);
#pragma unroll
                for (int j = 0; j < 4; j++) packed[j] = (u32)T::store(v[2 * j]) | ((u32)T::store(v[2 * j + 1]) << 16);
            }
            *(uint4*)(dst + r * (COLS + MMA_PAD) + c) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
    }
};

