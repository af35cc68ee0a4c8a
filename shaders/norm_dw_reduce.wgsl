// RMSNorm backward, dw: dw[j] = Σ_g partials[g·d + j] over g = 0, 1, … in order, so the
// same inputs give the same bits on every run. One invocation per 32-bit word of dw (ELEMS
// columns), each looping `groups` (at most 1024) times.
//
// The Rust side prepends the bindings with `partials: array<f32>`, `store_dw(w, v2)`,
// `params: NormParams` and `ELEMS` for w's dtype. Dispatch: 2-D, (groups_x, rows) of 256.

// `params: NormParams` is prepended, generated from NormParams in src/ops/norm/wgpu.rs.

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let w = (wg.y * params.groups_x + wg.x) * 256u + li;
    if (w * ELEMS >= params.d) {
        return;
    }
    var v = vec2<f32>(0.0, 0.0);
    for (var e = 0u; e < ELEMS; e++) {
        let j = w * ELEMS + e;
        if (j < params.d) {
            var s = 0.0;
            for (var g = 0u; g < params.groups; g++) {
                s += partials[g * params.d + j];
            }
            v[e] = s;
        }
    }
    store_dw(w, v);
}
