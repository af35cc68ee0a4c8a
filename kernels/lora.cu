// Many LoRA adapters in one batch (Punica's BGMV idea), f32. Each row t of x picks adapter
// rows[t] (−1: none). `table` holds per adapter: offset of its A and of its B in the packed
// a and b arrays (elements), its rank, its scale (f32 bits).
//
// lora_shrink   v[t, j] = x[t]·A_a[j] for j < rank(a), else 0. One warp per (t, j):
//               256 threads = 8 values of j, grid (tokens, ceil(max rank / 8)); lanes
//               stride over `in`, warp-shuffle reduction.
// lora_expand   out[t, o] = y[t, o] + s_a · v[t]·B_a[o]. One thread per element,
//               grid-stride.

extern "C" __global__ void __launch_bounds__(256) lora_shrink(const float* x, const float* a, const u32* table,
                                                              const int* rows, float* v, int in, int rmax) {
    const int t = blockIdx.x, lane = threadIdx.x & 31;
    const int j = blockIdx.y * 8 + (threadIdx.x >> 5);
    if (j >= rmax) return;  // whole warps leave; only warp shuffles follow
    const int adapter = rows[t];
    const int rank = adapter < 0 ? 0 : (int)table[4 * adapter + 2];
    float acc = 0.f;
    if (j < rank) {
        const float* xr = x + (u64)t * in;
        const float* ar = a + table[4 * adapter] + (u64)j * in;
        for (int i = lane; i < in; i += 32) acc = fmaf(xr[i], ar[i], acc);
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) v[(u64)t * rmax + j] = acc;
}

extern "C" __global__ void lora_expand(const float* v, const float* b, const u32* table, const int* rows,
                                       const float* y, float* out, u64 tokens, int outn, int rmax) {
    for (u64 e = blockIdx.x * (u64)blockDim.x + threadIdx.x; e < tokens * outn; e += (u64)gridDim.x * blockDim.x) {
        const u64 t = e / outn;
        const int o = (int)(e % outn);
        const int adapter = rows[t];
        float val = y[e];
        if (adapter >= 0) {
            const int rank = (int)table[4 * adapter + 2];
            const float s = __uint_as_float(table[4 * adapter + 3]);
            const float* br = b + table[4 * adapter + 1] + (u64)o * rank;
            const float* vt = v + t * rmax;
            float acc = 0.f;
            for (int j = 0; j < rank; j++) acc = fmaf(vt[j], br[j], acc);
            val += s * acc;
        }
        out[e] = val;
    }
}
