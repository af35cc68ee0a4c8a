// y[t, o] = Σ_i x[t, i] · W[o, i] for a few token rows (t < params.gemv.tokens <= 8), W
// quantized (quant_decode.wgsl). Decoding is the expensive part, so every weight is decoded
// once and used for all token rows.
//
// One workgroup of 64 invocations takes 8 output rows, 8 invocations per row: lane l of a row
// takes blocks l, l + 8, … of it (neighbouring lanes read neighbouring blocks), decodes each
// with one scale (and minimum) lookup, and keeps one partial sum per token; a three-step tree
// in workgroup memory finishes the rows. Eight rows per workgroup rather than one keeps the
// workgroup count, and the barriers each workgroup pays, low: software rasterizers such as
// llvmpipe run workgroups one after another and pay for each barrier. Output is f32.
// The Rust side prepends `struct Params { gemv: QuantGemvParams, q: QuantParams }`, the `w`
// binding (0) with quant_decode.wgsl, and `x` (binding 1) with `load_x(i) -> f32`.
// Dispatch: 2-D, (groups_x, ceil(ceil(rows / 8) / groups_x)).

// The product's sizes (QuantGemvParams in src/ops/quant/wgpu.rs).
struct QuantGemvParams {
    rows: u32,
    cols: u32,
    tokens: u32,
    groups_x: u32,
}

@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

const ROWS_PER_GROUP: u32 = 8u;
const LANES: u32 = 8u;
// Per invocation, tokens 0–3 and 4–7.
var<workgroup> partial: array<array<vec4<f32>, 2>, 64>;

// x[t, c] for token rows t..t+3, zero past the last token row (read clamped in bounds).
fn x4(t: u32, c: u32) -> vec4<f32> {
    let n = params.gemv.tokens;
    let cols = params.gemv.cols;
    var v: vec4<f32>;
    for (var i = 0u; i < 4u; i++) {
        v[i] = select(0.0, load_x(min(t + i, n - 1u) * cols + c), t + i < n);
    }
    return v;
}

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let lane = li % LANES;
    let row = (wg.y * params.gemv.groups_x + wg.x) * ROWS_PER_GROUP + li / LANES;
    // Rows past the end compute nothing but still reach every barrier.
    let live = row < params.gemv.rows;
    let n = params.gemv.tokens;
    // Accumulators in registers, not an indexed array (which software rasterizers keep in
    // memory): one token row alone, or tokens 0–3 and 4–7 as two vectors.
    var acc1 = 0.0;
    var lo = vec4<f32>(0.0);
    var hi = vec4<f32>(0.0);
    let bs = block_size();
    let blocks = params.gemv.cols / bs;
    let end = select(0u, blocks, live);
    for (var b = lane; b < end; b += LANES) {
        let scale = block_scale(row * blocks + b);
        let minimum = block_min(row * blocks + b);
        let col0 = b * bs;
        let code0 = row * params.gemv.cols + col0;
        if (n == 1u) {
            for (var j = 0u; j < bs; j++) {
                acc1 = fma(weight_of(block_code(code0 + j), scale, minimum), load_x(col0 + j), acc1);
            }
        } else {
            for (var j = 0u; j < bs; j++) {
                let wv = vec4<f32>(weight_of(block_code(code0 + j), scale, minimum));
                lo = fma(wv, x4(0u, col0 + j), lo);
                if (n > 4u) {
                    hi = fma(wv, x4(4u, col0 + j), hi);
                }
            }
        }
    }
    if (n == 1u) {
        lo.x = acc1;
    }
    partial[li][0] = lo;
    partial[li][1] = hi;
    workgroupBarrier();
    for (var stride = LANES / 2u; stride > 0u; stride >>= 1u) {
        if (lane < stride) {
            partial[li][0] += partial[li + stride][0];
            partial[li][1] += partial[li + stride][1];
        }
        workgroupBarrier();
    }
    if (lane == 0u && live) {
        for (var t = 0u; t < n; t++) {
            y[t * params.gemv.rows + row] = partial[li][t / 4u][t % 4u];
        }
    }
}
