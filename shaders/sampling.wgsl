// Token selection: argmax and seeded sampling with temperature, top-k and top-p.
//
// One workgroup of 256 invocations per row; invocation j owns tokens j, j + 256, ...
// The steps, and every float operation in them, are those of `kernels/sampling.cu` and the
// CPU code (src/ops/sampling/mod.rs), in the same order: argmax by order key; top-k and
// top-p thresholds by snapping bisections (at most 33 passes each); the draw down the
// canonical tree, then along the chosen lane, 256 tokens at a time. A pass is vocab / 256
// loop iterations per invocation, which keeps lavapipe's loop limiter (about 65k) far off for
// any vocabulary under a million tokens.
// The Rust side prepends binding 0 with `load_x(i) -> f32` for the logits' dtype.
// Dispatch: 2-D, (groups_x, ceil(rows / groups_x)).

// SampleParams in src/ops/sampling/mod.rs.
struct SampleParams {
    rows: u32,
    vocab: u32,
    top_k: u32,
    greedy: u32,
    top_p: f32,
    scale24: f32,
    key: u32,
    groups_x: u32,
}

@group(0) @binding(1) var<storage, read> table: array<f32>;
@group(0) @binding(2) var<storage, read_write> ids: array<u32>;
@group(0) @binding(3) var<uniform> params: SampleParams;

const THREADS: u32 = 256u;

struct Reduced {
    sum: f32,
    cnt: u32,
    mn: u32,
    mx: u32,
}

// Level of size s at [512 - 2s, 512 - s); the root at 510.
var<workgroup> tree: array<f32, 512>;
var<workgroup> red_cnt: array<u32, 256>;
var<workgroup> red_lo: array<u32, 256>;
var<workgroup> red_hi: array<u32, 256>;
var<workgroup> chunk: array<f32, 256>;
var<workgroup> reduced: Reduced;

fn mix32(x: u32) -> u32 {
    var h = x;
    h ^= h >> 16u;
    h *= 0x85ebca6bu;
    h ^= h >> 13u;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16u);
}

fn order_key(x: f32) -> u32 {
    var b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return 0u;
    }
    if (b == 0x80000000u) {
        b = 0u;
    }
    return select(b | 0x80000000u, ~b, (b & 0x80000000u) != 0u);
}

fn weight(x: f32, key: u32, mx: f32, max_key: u32) -> f32 {
    if (key == max_key) {
        return 1.0;
    }
    if (key <= 0x007fffffu) {
        return 0.0; // -inf and NaN
    }
    let tf = (x - mx) * params.scale24;
    if (!(tf > -2113929216.0)) {
        return 0.0;
    }
    let i = i32(tf);
    let n = i >> 24u;
    let q = u32(i) & 0xffffffu;
    let mant = table[q >> 18u] * table[64u + ((q >> 12u) & 63u)] * table[128u + ((q >> 6u) & 63u)]
        * table[192u + (q & 63u)];
    return mant * bitcast<f32>(u32(n + 127) << 23u);
}

// The canonical sum of each invocation's `acc` (levels left in `tree`), and the sum, min and
// max of the integer parts; uniform results.
fn reduce(li: u32, acc: f32, cnt: u32, mn: u32, mx: u32) -> Reduced {
    workgroupBarrier();
    tree[li] = acc;
    red_cnt[li] = cnt;
    red_lo[li] = mn;
    red_hi[li] = mx;
    workgroupBarrier();
    for (var h = THREADS / 2u; h > 0u; h >>= 1u) {
        if (li < h) {
            let src = 2u * THREADS - 4u * h;
            let dst = 2u * THREADS - 2u * h;
            tree[dst + li] = tree[src + li] + tree[src + li + h];
            red_cnt[li] += red_cnt[li + h];
            red_lo[li] = min(red_lo[li], red_lo[li + h]);
            red_hi[li] = max(red_hi[li], red_hi[li + h]);
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        reduced = Reduced(tree[2u * THREADS - 2u], red_cnt[0], red_lo[0], red_hi[0]);
    }
    return workgroupUniformLoad(&reduced);
}

// The canonical sum of the weights of the row's tokens whose key is at least `tau` (left in
// `tree`, levels kept, for the draw's walk down it).
fn kept_mass(li: u32, base: u32, V: u32, tau: u32, mx: f32, max_key: u32) -> f32 {
    var acc = 0.0;
    for (var i = li; i < V; i += THREADS) {
        let v = load_x(base + i);
        let k = order_key(v);
        if (k >= tau) {
            acc += weight(v, k, mx, max_key);
        }
    }
    return reduce(li, acc, 0u, 0u, 0u).sum;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.y * params.groups_x + wg.x;
    // The whole workgroup leaves together, so the barriers below stay uniform.
    if (row >= params.rows) {
        return;
    }
    let V = params.vocab;
    let base = row * V;

    // 1. argmax: the largest key, then the lowest index.
    var best_key = 0u;
    var best_i = 0xffffffffu;
    for (var i = li; i < V; i += THREADS) {
        let k = order_key(load_x(base + i));
        if (k > best_key || best_i == 0xffffffffu) {
            best_key = k;
            best_i = i;
        }
    }
    workgroupBarrier();
    red_hi[li] = best_key;
    red_lo[li] = best_i;
    workgroupBarrier();
    for (var h = THREADS / 2u; h > 0u; h >>= 1u) {
        if (li < h) {
            let k2 = red_hi[li + h];
            let i2 = red_lo[li + h];
            if (k2 > red_hi[li] || (k2 == red_hi[li] && i2 < red_lo[li])) {
                red_hi[li] = k2;
                red_lo[li] = i2;
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        reduced = Reduced(0.0, 0u, red_lo[0], red_hi[0]);
    }
    let top = workgroupUniformLoad(&reduced);
    let max_key = top.mx;
    if (params.greedy != 0u || max_key == 0u) {
        if (li == 0u) {
            ids[row] = top.mn;
        }
        return;
    }
    let mx = load_x(base + top.mn);

    // 2. top-k: the largest key t with count(keys >= t) >= k.
    var tau = 0u;
    if (params.top_k > 0u) {
        var lo = 0u;
        var hi = max_key;
        while (lo < hi) {
            let mid = lo + ((hi - lo + 1u) >> 1u);
            var cnt = 0u;
            var above = 0xffffffffu;
            var below = 0u;
            for (var i = li; i < V; i += THREADS) {
                let k = order_key(load_x(base + i));
                if (k >= mid) {
                    cnt += 1u;
                    above = min(above, k);
                } else {
                    below = max(below, k);
                }
            }
            let r = reduce(li, 0.0, cnt, above, below);
            if (r.cnt >= params.top_k) {
                lo = r.mn;
            } else {
                hi = r.mx;
            }
        }
        tau = lo;
    }

    // 3. top-p: the smallest key v >= tau_k with mass(keys > v) < top_p * mass(top-k).
    if (params.top_p < 1.0) {
        let bound = params.top_p * kept_mass(li, base, V, tau, mx, max_key);
        var lo = tau;
        var hi = max_key;
        while (lo < hi) {
            let mid = lo + ((hi - lo) >> 1u);
            var a = 0.0;
            var above = 0xffffffffu;
            var below = 0u;
            for (var i = li; i < V; i += THREADS) {
                let v = load_x(base + i);
                let k = order_key(v);
                if (k > mid) {
                    a += weight(v, k, mx, max_key);
                    above = min(above, k);
                } else {
                    below = max(below, k);
                }
            }
            let r = reduce(li, a, 0u, above, below);
            if (r.sum < bound) {
                hi = r.mx;
            } else {
                lo = r.mn;
            }
        }
        tau = lo;
    }

    // 4. the draw: down the canonical tree of the kept weights, then along one lane.
    let total = kept_mass(li, base, V, tau, mx, max_key);
    let h = mix32(params.key ^ mix32((row * 0x9e3779b1u) ^ 0x165667b1u));
    let r = (f32(h >> 8u) * (1.0 / 16777216.0)) * total;
    if (li == 0u) {
        var lane = 0u;
        var offset = 0.0;
        for (var s = 1u; s < THREADS; s <<= 1u) {
            let children = 2u * THREADS - 4u * s;
            let left = tree[children + lane];
            let right = tree[children + lane + s];
            let through_left = offset + left;
            if (!(r < through_left || right == 0.0)) {
                offset = through_left;
                lane += s;
            }
        }
        reduced = Reduced(offset, 0u, lane, lane);
    }
    let picked = workgroupUniformLoad(&reduced);
    let lane = picked.mn;
    var offset = picked.sum;
    var last = lane;
    for (var start = lane; start < V; start += THREADS * THREADS) {
        let i = start + li * THREADS;
        var w = 0.0;
        if (i < V) {
            let v = load_x(base + i);
            let k = order_key(v);
            if (k >= tau) {
                w = weight(v, k, mx, max_key);
            }
        }
        chunk[li] = w;
        workgroupBarrier();
        if (li == 0u) {
            var found = 0u;
            for (var j = 0u; j < THREADS; j++) {
                let wj = chunk[j];
                if (wj > 0.0) {
                    offset += wj;
                    last = start + j * THREADS;
                    if (r < offset) {
                        found = 1u;
                        break;
                    }
                }
            }
            reduced = Reduced(0.0, found, 0u, 0u);
        }
        if (workgroupUniformLoad(&reduced).cnt != 0u) {
            break;
        }
    }
    if (li == 0u) {
        ids[row] = last;
    }
}
