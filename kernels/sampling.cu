// Token selection: argmax and seeded sampling with temperature, top-k and top-p.
//
// sample_T(logits [rows, vocab] T, ids [rows] u32, table [256] f32, SampleParams)
//     One 256-thread block per row (grid.x = rows). Thread j owns tokens j, j + 256, ...
//     1. argmax: the largest order key, lowest index (NaN keys 0, below -inf).
//        greedy (argmax, temperature 0) or a row of NaN stops here.
//     2. top-k (top_k > 0): the k-th largest key by bisection over the keys, each step a
//        pass counting keys >= mid and snapping to the nearest key either side (<= 33 passes).
//     3. top-p (top_p < 1): the smallest key v >= tau_k with mass(keys > v) < top_p * mass(top-k),
//        by the same snapping bisection over canonical sums (<= 33 passes).
//     4. the draw: r = u * W, descending the canonical tree of the kept weights, then the
//        chosen lane's tokens in order (warp 0 computes 32 weights, lane 0 adds them up).
// T in {f32, f16, bf16}.
//
// Every float operation here is one the CPU code (src/ops/sampling/mod.rs) does in the same
// order: weights from the exp2 table, the canonical sum (each thread's tokens in order from
// 0, then s[j] += s[j + h] for h = 128 ... 1) and the descent. __fmul_rn / __fadd_rn keep
// NVRTC from fusing a multiply into an add, which would round differently from the CPU.

// SampleParams in src/ops/sampling/cuda.rs.
struct SampleParams {
    u32 rows;
    u32 vocab;
    u32 top_k;
    u32 greedy;
    float top_p;
    float scale24;
    u32 key;
    u32 groups_x;  // WGSL's 2-D grid; unused here
};

#define SAMPLE_THREADS 256

__device__ __forceinline__ u32 sample_mix32(u32 h) {
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16);
}

__device__ __forceinline__ u32 order_key(float x) {
    u32 b = __float_as_uint(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) return 0u;
    if (b == 0x80000000u) b = 0u;
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float sample_weight(float x, u32 key, float mx, u32 max_key, float scale24,
                                               const float* table) {
    if (key == max_key) return 1.f;
    if (key <= 0x007fffffu) return 0.f;  // -inf and NaN
    float tf = __fmul_rn(__fsub_rn(x, mx), scale24);
    if (!(tf > -2113929216.f)) return 0.f;
    int i = (int)tf;  // toward zero
    int n = i >> 24;
    u32 q = (u32)i & 0xffffffu;
    float mant = __fmul_rn(__fmul_rn(__fmul_rn(table[q >> 18], table[64 + ((q >> 12) & 63u)]),
                                     table[128 + ((q >> 6) & 63u)]),
                           table[192 + (q & 63u)]);
    return __fmul_rn(mant, __uint_as_float((u32)(n + 127) << 23));
}

struct SampleShared {
    float tree[2 * SAMPLE_THREADS];  // level of size s at [512 - 2s, 512 - s); root at 510
    u32 cnt[SAMPLE_THREADS];
    u32 lo[SAMPLE_THREADS];
    u32 hi[SAMPLE_THREADS];
    float chunk[32];
    int found;
};

// The canonical sum of each thread's `acc` (left in sh.tree, levels kept) and the sum, min and
// max of the integer reductions. Every thread gets the results.
__device__ void sample_reduce(SampleShared& sh, float acc, u32& cnt, u32& mn, u32& mx, float& sum) {
    const u32 t = threadIdx.x;
    __syncthreads();  // the previous results have been read
    sh.tree[t] = acc;
    sh.cnt[t] = cnt;
    sh.lo[t] = mn;
    sh.hi[t] = mx;
    __syncthreads();
    for (u32 h = SAMPLE_THREADS / 2; h > 0; h >>= 1) {
        if (t < h) {
            const u32 src = 2 * SAMPLE_THREADS - 4 * h, dst = 2 * SAMPLE_THREADS - 2 * h;
            sh.tree[dst + t] = __fadd_rn(sh.tree[src + t], sh.tree[src + t + h]);
            sh.cnt[t] += sh.cnt[t + h];
            sh.lo[t] = min(sh.lo[t], sh.lo[t + h]);
            sh.hi[t] = max(sh.hi[t], sh.hi[t + h]);
        }
        __syncthreads();
    }
    sum = sh.tree[2 * SAMPLE_THREADS - 2];
    cnt = sh.cnt[0];
    mn = sh.lo[0];
    mx = sh.hi[0];
}

// The canonical sum of the weights of the row's tokens whose key is at least `tau` (left in
// sh.tree, levels kept, for the draw's walk down it).
template <class T>
__device__ float sample_kept_mass(SampleShared& sh, const typename T::storage* x, u32 V, u32 tau, float mx,
                                  u32 max_key, float scale24, const float* table) {
    float acc = 0.f, total;
    u32 c0 = 0, m0 = 0, x0 = 0;
    for (u32 i = threadIdx.x; i < V; i += SAMPLE_THREADS) {
        const float v = T::load(x[i]);
        const u32 k = order_key(v);
        if (k >= tau) acc = __fadd_rn(acc, sample_weight(v, k, mx, max_key, scale24, table));
    }
    sample_reduce(sh, acc, c0, m0, x0, total);
    return total;
}

template <class T>
__device__ void sample_impl(const typename T::storage* logits, u32* ids, const float* table, SampleParams p) {
    __shared__ SampleShared sh;
    __shared__ unsigned long long best_shared[SAMPLE_THREADS / 32];
    const u32 t = threadIdx.x, V = p.vocab;
    const u32 row = blockIdx.x;
    if (row >= p.rows) return;
    const typename T::storage* x = logits + (u64)row * V;

    // 1. argmax: largest key, then lowest index, as one 64-bit maximum.
    unsigned long long best = 0;
    for (u32 i = t; i < V; i += SAMPLE_THREADS) {
        unsigned long long c = ((unsigned long long)order_key(T::load(x[i])) << 32) | (u32)(~i);
        best = c > best ? c : best;
    }
    for (int off = 16; off > 0; off >>= 1) {
        unsigned long long o = __shfl_xor_sync(0xffffffffu, best, off);
        best = o > best ? o : best;
    }
    if ((t & 31) == 0) best_shared[t >> 5] = best;
    __syncthreads();
    best = best_shared[0];
    for (int w = 1; w < SAMPLE_THREADS / 32; ++w) best = best_shared[w] > best ? best_shared[w] : best;
    const u32 max_key = (u32)(best >> 32), best_i = ~(u32)best;
    if (p.greedy || max_key == 0u) {
        if (t == 0) ids[row] = best_i;
        return;
    }
    const float mx = T::load(x[best_i]);

    // 2. top-k: tau_k = the largest key t with count(keys >= t) >= k.
    u32 tau = 0;
    if (p.top_k > 0) {
        u32 lo = 0, hi = max_key;
        while (lo < hi) {
            const u32 mid = lo + ((hi - lo + 1) >> 1);
            u32 cnt = 0, above = 0xffffffffu, below = 0;
            for (u32 i = t; i < V; i += SAMPLE_THREADS) {
                const u32 k = order_key(T::load(x[i]));
                if (k >= mid) {
                    ++cnt;
                    above = min(above, k);
                } else {
                    below = max(below, k);
                }
            }
            float unused;
            sample_reduce(sh, 0.f, cnt, above, below, unused);
            if (cnt >= p.top_k) lo = above; else hi = below;
        }
        tau = lo;
    }

    // 3. top-p over the top-k survivors.
    if (p.top_p < 1.f) {
        const float total = sample_kept_mass<T>(sh, x, V, tau, mx, max_key, p.scale24, table);
        const float bound = __fmul_rn(p.top_p, total);
        u32 lo = tau, hi = max_key;
        while (lo < hi) {
            const u32 mid = lo + ((hi - lo) >> 1);
            float a = 0.f, mass;
            u32 cnt = 0, above = 0xffffffffu, below = 0;
            for (u32 i = t; i < V; i += SAMPLE_THREADS) {
                const float v = T::load(x[i]);
                const u32 k = order_key(v);
                if (k > mid) {
                    a = __fadd_rn(a, sample_weight(v, k, mx, max_key, p.scale24, table));
                    above = min(above, k);
                } else {
                    below = max(below, k);
                }
            }
            sample_reduce(sh, a, cnt, above, below, mass);
            if (mass < bound) hi = below; else lo = above;
        }
        tau = lo;
    }

    // 4. the draw over the kept weights.
    const float total = sample_kept_mass<T>(sh, x, V, tau, mx, max_key, p.scale24, table);
    const u32 h = sample_mix32(p.key ^ sample_mix32((row * 0x9e3779b1u) ^ 0x165667b1u));
    const float r = __fmul_rn(__fmul_rn((float)(h >> 8), 1.f / 16777216.f), total);
    u32 lane = 0;
    float offset = 0.f;
    for (u32 s = 1; s < SAMPLE_THREADS; s <<= 1) {
        const u32 children = 2 * SAMPLE_THREADS - 4 * s;
        const float left = sh.tree[children + lane], right = sh.tree[children + lane + s];
        const float through_left = __fadd_rn(offset, left);
        if (!(r < through_left || right == 0.f)) {
            offset = through_left;
            lane += s;
        }
    }
    if (t >= 32) return;
    // Warp 0 walks the lane's tokens 32 at a time; lane 0 adds them in order.
    u32 last = lane;
    for (u32 base = lane; base < V; base += 32 * SAMPLE_THREADS) {
        const u32 i = base + t * SAMPLE_THREADS;
        float w = 0.f;
        if (i < V) {
            const float v = T::load(x[i]);
            const u32 k = order_key(v);
            if (k >= tau) w = sample_weight(v, k, mx, max_key, p.scale24, table);
        }
        sh.chunk[t] = w;
        __syncwarp();
        int found = 0;
        if (t == 0) {
            for (u32 j = 0; j < 32; ++j) {
                const float wj = sh.chunk[j];
                if (wj > 0.f) {
                    offset = __fadd_rn(offset, wj);
                    last = base + j * SAMPLE_THREADS;
                    if (r < offset) {
                        found = 1;
                        break;
                    }
                }
            }
        }
        found = __shfl_sync(0xffffffffu, found, 0);
        __syncwarp();
        if (found) break;
    }
    if (t == 0) ids[row] = last;
}

#define KILN_SAMPLE(T, NAME)                                                                        \
    extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS)                                   \
        sample_##NAME(const T::storage* logits, u32* ids, const float* table, SampleParams p) {   \
        sample_impl<T>(logits, ids, table, p);                                                     \
    }

KILN_SAMPLE(F32, f32)
KILN_SAMPLE(F16, f16)
KILN_SAMPLE(BF16, bf16)
