// Rotary position embeddings (contract and CPU reference: src/ops/rope/mod.rs).
//
// One workgroup of 64 invocations per token (2-D grid: groups_x × rows covering `tokens`).
// Each invocation writes whole 32-bit output words (one f32, or two packed f16/bf16), so no
// two invocations share a word, reading each element and its pair partner. The workgroup
// first fills a table of (cos, sign · sin) for the token's frequencies (a rotary dimension
// past 2·TABLE takes them per element instead). Angles are fl(f32(pos) · inv_freq[i]), the
// position rounded to nearest even; cos and sin come from an exact range reduction
// (Payne-Hanek: the angle's 24-bit mantissa times 96 bits of 2/π, integer arithmetic
// only) and minimax polynomials on [−π/4, π/4], within 2 ulp of 1: WGSL's cos and sin
// promise nothing outside [−π, π] and angles reach 10⁵ and more. `sign` is +1 forward,
// −1 backward. HalfSplit pairs feature i with i + half, Interleaved 2i with 2i + 1;
// features past 2·half pass through.
// The Rust side prepends `load_x(i) -> f32` (binding 0), and `ELEMS` (elements per word)
// and `store_word(w, v)` (binding 3) for the dtype.

// The call's sizes (RopeParams in src/ops/rope/wgpu.rs).
struct RopeParams {
    tokens: u32,
    heads: u32,
    head_dim: u32,
    half: u32,
    interleaved: u32,
    sign: f32,
    groups_x: u32,
    words: u32,
}

@group(0) @binding(1) var<storage, read> positions: array<u32>;
@group(0) @binding(2) var<storage, read> inv_freq: array<f32>;
@group(0) @binding(4) var<uniform> params: RopeParams;

const TABLE: u32 = 512u;
var<workgroup> table: array<vec2<f32>, 512>;

// 2/π: 256 bits after the binary point, most significant word first.
var<private> TWO_OVER_PI: array<u32, 8> = array<u32, 8>(
    0xa2f9836eu, 0x4e441529u, 0xfc2757d1u, 0xf534ddc0u, 0xdb629599u, 0x3c439041u, 0xfe5163abu, 0xdebbc561u
);

// a · b as (low word, high word).
fn mul_wide(a: u32, b: u32) -> vec2<u32> {
    let a0 = a & 0xffffu;
    let a1 = a >> 16u;
    let b0 = b & 0xffffu;
    let b1 = b >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let mid = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    return vec2<u32>((p00 & 0xffffu) | (mid << 16u), a1 * b1 + (p01 >> 16u) + (p10 >> 16u) + (mid >> 16u));
}

// a + b as (sum, carry).
fn add_carry(a: u32, b: u32) -> vec2<u32> {
    let s = a + b;
    return vec2<u32>(s, select(0u, 1u, s < a));
}

// 2^k for k in [-126, 127], exactly.
fn pow2(k: i32) -> f32 {
    return bitcast<f32>(u32(127 + k) << 23u);
}

// Bits [lo, lo + 32) of the 160-bit number p (least significant word first).
fn bits_at(p: ptr<function, array<u32, 5>>, lo: u32) -> u32 {
    let w = lo / 32u;
    let k = lo % 32u;
    if (k == 0u) {
        return (*p)[w];
    }
    let low = (*p)[w] >> k;
    if (w + 1u >= 5u) {
        return low;
    }
    return low | ((*p)[w + 1u] << (32u - k));
}

// The position as f32, rounded to nearest even (WGSL lets f32(u32) round either way).
fn position_f32(p: u32) -> f32 {
    if (p < 0x1000000u) {
        return f32(p);
    }
    let shift = 8u - countLeadingZeros(p);
    let rest = p & ((1u << shift) - 1u);
    let halfway = 1u << (shift - 1u);
    var m = p >> shift;
    if (rest > halfway || (rest == halfway && (m & 1u) == 1u)) {
        m += 1u;
    }
    return f32(m) * pow2(i32(shift));
}

// (cos a, sin a) for a finite a ≥ 0.
fn cos_sin(a: f32) -> vec2<f32> {
    var r = a;
    var q = 0u;
    if (a > 0.78539816) {
        // a = m · 2^s; a · 2/π's bits worth less than 4 (quarter turns) are those from word
        // j0 on, and three words leave 63 or more bits after the binary point.
        let bits = bitcast<u32>(a);
        let s = i32((bits >> 23u) & 0xffu) - 150;
        let m = (bits & 0x7fffffu) | 0x800000u;
        var j0 = 0;
        if (s >= 2) {
            j0 = (s - 2) / 32;
        }
        let t0 = mul_wide(m, TWO_OVER_PI[j0]);
        let t1 = mul_wide(m, TWO_OVER_PI[j0 + 1]);
        let t2 = mul_wide(m, TWO_OVER_PI[j0 + 2]);
        // The product, shifted up one word so every field below starts at bit 31 or above.
        var p: array<u32, 5>;
        p[0] = 0u;
        p[1] = t2.x;
        let c1 = add_carry(t2.y, t1.x);
        p[2] = c1.x;
        let c2 = add_carry(t1.y, t0.x);
        let c3 = add_carry(c2.x, c1.y);
        p[3] = c3.x;
        p[4] = t0.y + c2.y + c3.y;
        let point = u32(32 * (j0 + 4) - s);
        q = bits_at(&p, point) & 3u;
        var hi = bits_at(&p, point - 32u);
        var lo = bits_at(&p, point - 64u);
        // Round to the nearest quarter turn: a fraction of one half or more counts down
        // from the next.
        let negative = hi >= 0x80000000u;
        if (negative) {
            q += 1u;
            hi = ~hi;
            lo = ~lo + 1u;
            if (lo == 0u) {
                hi += 1u;
            }
        }
        var f = 0.0;
        if (hi != 0u) {
            let n = countLeadingZeros(hi);
            let top = select(hi, (hi << n) | (lo >> (32u - n)), n > 0u);
            f = f32(top) * pow2(-32 - i32(n));
        } else if (lo != 0u) {
            let n = countLeadingZeros(lo);
            f = f32(lo << n) * pow2(-64 - i32(n));
        }
        r = select(f, -f, negative) * 1.5707963267948966;
    }
    let z = r * r;
    let sin_r = ((-1.9515295891e-4 * z + 8.3321608736e-3) * z - 1.6666654611e-1) * z * r + r;
    let cos_r = ((2.443315711809948e-5 * z - 1.388731625493765e-3) * z + 4.166664568298827e-2) * z * z - 0.5 * z + 1.0;
    switch (q & 3u) {
        case 0u: {
            return vec2<f32>(cos_r, sin_r);
        }
        case 1u: {
            return vec2<f32>(-sin_r, cos_r);
        }
        case 2u: {
            return vec2<f32>(-cos_r, -sin_r);
        }
        default: {
            return vec2<f32>(sin_r, -cos_r);
        }
    }
}

// (cos, sign · sin) of frequency i at `position`.
fn rotation(position: f32, i: u32) -> vec2<f32> {
    let cs = cos_sin(position * inv_freq[i]);
    return vec2<f32>(cs.x, params.sign * cs.y);
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let token = wg.y * params.groups_x + wg.x;
    if (token >= params.tokens) {
        return;
    }
    let position = position_f32(positions[token]);
    let tabled = params.half <= TABLE;
    if (tabled) {
        for (var i = li; i < params.half; i += 64u) {
            table[i] = rotation(position, i);
        }
    }
    workgroupBarrier();
    let rot = 2u * params.half;
    let row = token * params.heads * params.head_dim;
    for (var w = li; w < params.words; w += 64u) {
        var v = vec2<f32>(0.0, 0.0);
        for (var e = 0u; e < ELEMS; e++) {
            let j = w * ELEMS + e;
            let d = j % params.head_dim;
            let x = load_x(row + j);
            if (d >= rot) {
                v[e] = x;
                continue;
            }
            // The pair's frequency, whether this feature comes first, and its partner.
            var i = d >> 1u;
            var first = (d & 1u) == 0u;
            var partner = d ^ 1u;
            if (params.interleaved == 0u) {
                first = d < params.half;
                i = select(d - params.half, d, first);
                partner = select(d - params.half, d + params.half, first);
            }
            var cs: vec2<f32>;
            if (tabled) {
                cs = table[i];
            } else {
                cs = rotation(position, i);
            }
            let y = load_x(row + j - d + partner);
            v[e] = select(x * cs.x + y * cs.y, x * cs.x - y * cs.y, first);
        }
        store_word(token * params.words + w, v);
    }
}
