// RMSNorm forward, and the fused residual add: one workgroup of 256 invocations per row.
//
// y = (v · rstd) · w with rstd = 1/√(Σv²/d + eps), where v = x, or with the residual
// v = round(x + r), which is also stored as h. Each invocation walks words w = li, li + 256,
// … of the row (ELEMS elements per 32-bit word of the output), summing v²; a tree in
// workgroup memory adds the 256 sums; the second walk writes y. Mirrors cpu_forward in
// src/ops/norm/mod.rs. Each invocation loops d / (256 · ELEMS) times per walk, far under
// lavapipe's 65k loop limit for any d a model has.
//
// The Rust side prepends: the bindings with `load_in(i) -> f32` (v of element i, rounded as
// h is stored), `load_w(j) -> f32`, `store_y(w, v2)` and `store_h(w, v2)` (a no-op without
// a residual), `rstd: array<f32>`, `params: NormParams`, and `ELEMS`, 1 or 2 (2 only when d
// is even, so no word straddles two rows; odd rows of f16/bf16 are written as f32 and
// rounded by a cast after).
// Dispatch: 2-D, (groups_x, ceil(rows / groups_x)) workgroups.

// `params: NormParams` is prepended, generated from NormParams in src/ops/norm/wgpu.rs.

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.y * params.groups_x + wg.x;
    // The whole workgroup leaves together, so the barriers below stay uniform.
    if (row >= params.rows) {
        return;
    }
    let words = params.d / ELEMS;
    let base = row * words;
    var ss = 0.0;
    for (var w = li; w < words; w += 256u) {
        var h = vec2<f32>(0.0, 0.0);
        for (var e = 0u; e < ELEMS; e++) {
            let v = load_in((base + w) * ELEMS + e);
            h[e] = v;
            ss += v * v;
        }
        store_h(base + w, h);
    }
    partial[li] = ss;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            partial[li] += partial[li + stride];
        }
        workgroupBarrier();
    }
    let s = 1.0 / sqrt(partial[0] / f32(params.d) + params.eps);
    if (li == 0u) {
        rstd[row] = s;
    }
    for (var w = li; w < words; w += 256u) {
        var y = vec2<f32>(0.0, 0.0);
        for (var e = 0u; e < ELEMS; e++) {
            y[e] = (load_in((base + w) * ELEMS + e) * s) * load_w(w * ELEMS + e);
        }
        store_y(base + w, y);
    }
}
