// y[t, o] = Σ_i x[t, i] · W[o, i] for a few token rows (t < params.gemv.tokens <= 8), W
// quantized (quant_decode.wgsl). Decoding is the expensive part, so every weight is decoded
// once and used for all token rows.
//
// One workgroup of 64 invocations per output row o: invocation l takes blocks l, l + 64, …
// of the row, decodes each with one scale (and minimum) lookup, and keeps one partial sum
// per token; a tree reduction in workgroup memory finishes the row. Output is f32.
// The Rust side prepends `struct Params { gemv: QuantGemvParams, q: QuantParams }`, the `w`
// binding (0) with quant_decode.wgsl, and `x` (binding 1) with `load_x(i) -> f32`.
// Dispatch: 2-D, (groups_x, ceil(rows / groups_x)).

// The product's sizes (QuantGemvParams in src/ops/quant/wgpu.rs).
struct QuantGemvParams {
    rows: u32,
    cols: u32,
    tokens: u32,
    groups_x: u32,
}

@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

const MAX_TOKENS: u32 = 8u;
var<workgroup> partial: array<array<f32, 8>, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.y * params.gemv.groups_x + wg.x;
    // The whole workgroup leaves together, so the barriers below stay uniform.
    if (row >= params.gemv.rows) {
        return;
    }
    var acc: array<f32, 8>;
    for (var t = 0u; t < MAX_TOKENS; t++) {
        acc[t] = 0.0;
    }
    let bs = block_size();
    let blocks = params.gemv.cols / bs;
    for (var b = li; b < blocks; b += 64u) {
        let scale = block_scale(row * blocks + b);
        let minimum = block_min(row * blocks + b);
        let col0 = b * bs;
        for (var j = 0u; j < bs; j++) {
            let wv = weight_of(block_code(row * params.gemv.cols + col0 + j), scale, minimum);
            for (var t = 0u; t < params.gemv.tokens; t++) {
                acc[t] = fma(wv, load_x(t * params.gemv.cols + col0 + j), acc[t]);
            }
        }
    }
    for (var t = 0u; t < MAX_TOKENS; t++) {
        partial[li][t] = acc[t];
    }
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            for (var t = 0u; t < MAX_TOKENS; t++) {
                partial[li][t] += partial[li + stride][t];
            }
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        for (var t = 0u; t < params.gemv.tokens; t++) {
            y[t * params.gemv.rows + row] = partial[0][t];
        }
    }
}
