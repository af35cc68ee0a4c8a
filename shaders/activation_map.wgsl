// MLP activations, forward and backward, elementwise: outputs out0 (and out1) from the
// inputs a, b, c, each element computed in f32 by the formulas of
// src/ops/activation/mod.rs (the same operations in the same order) and rounded once.
//
// Each invocation writes one 32-bit word of each output (ELEMS elements: one f32 or two
// packed f16/bf16), so no two invocations share a word. The Rust side prepends the
// bindings with `load_a(i)`.. for the inputs, `store_out0(w, v2)` and `store_out1(w, v2)`
// (a no-op for a single output), `params: ActParams`, `ELEMS`, and
// `apply(i) -> vec2<f32>`, the op's outputs for element i, calling the functions below.
// Dispatch: 2-D, (groups_x, ceil(words / 256 / groups_x)) workgroups of 256.

// ActParams in src/ops/activation/wgpu.rs.
struct ActParams {
    len: u32,
    words: u32,
    groups_x: u32,
    pad0: u32,
}

// 2^k for k in [−126, 127], from its exponent bits.
fn pow2i(k: i32) -> f32 {
    return bitcast<f32>(u32(k + 127) << 23u);
}

// e^x as `exp` in src/ops/activation/mod.rs: x = n·ln 2 + r, e^r by its Taylor series to r⁷,
// 2^n applied in two halves. WGSL's own exp may err by 3 + 2|x| ulp; this stays within
// about 2 ulp.
fn kiln_exp(v: f32) -> f32 {
    let x = clamp(v, -104.0, 89.0);
    let n = round(x * 1.442695041);
    let k = i32(n);
    let r = (x - n * 0.693359375) - n * -2.1219444e-4;
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (0.16666667 + r * (0.041666668 + r * (0.008333334
        + r * (0.0013888889 + r * 0.0001984127))))));
    let h = k >> 1u;
    return p * pow2i(h) * pow2i(k - h);
}

// (sigmoid(v), 1 − sigmoid(v)) from e = e^−|v|, which never overflows.
fn sigmoid_pair(v: f32) -> vec2<f32> {
    let e = kiln_exp(-abs(v));
    let r = 1.0 / (1.0 + e);
    let er = e * r;
    return select(vec2<f32>(er, r), vec2<f32>(r, er), v >= 0.0);
}

fn swiglu(g: f32, u: f32) -> f32 {
    return (g * sigmoid_pair(g).x) * u;
}

// (dg, du).
fn swiglu_backward(dy: f32, g: f32, u: f32) -> vec2<f32> {
    let s = sigmoid_pair(g);
    return vec2<f32>((dy * u) * (s.x * (1.0 + g * s.y)), dy * (g * s.x));
}

const GELU_BETA: f32 = 0.7978846;
const GELU_KAPPA: f32 = 0.044715;

fn gelu_z2(x: f32) -> f32 {
    return 2.0 * (GELU_BETA * (x + GELU_KAPPA * (x * x * x)));
}

fn gelu(x: f32) -> f32 {
    return x * sigmoid_pair(gelu_z2(x)).x;
}

fn gelu_backward(dy: f32, x: f32) -> f32 {
    let s = sigmoid_pair(gelu_z2(x));
    return dy * (s.x + ((2.0 * x) * (s.x * s.y)) * (GELU_BETA * (1.0 + (3.0 * GELU_KAPPA) * (x * x))));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let w = (wg.y * params.groups_x + wg.x) * 256u + li;
    if (w >= params.words) {
        return;
    }
    var o0 = vec2<f32>(0.0, 0.0);
    var o1 = vec2<f32>(0.0, 0.0);
    for (var e = 0u; e < ELEMS; e++) {
        let i = w * ELEMS + e;
        if (i < params.len) {
            let r = apply(i);
            o0[e] = r.x;
            o1[e] = r.y;
        }
    }
    store_out0(w, o0);
    store_out1(w, o1);
}
