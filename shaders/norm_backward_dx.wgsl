// RMSNorm backward, dx: one workgroup of 256 invocations per row.
//
// dx = rstd · (dy·w − x̂ · c) with x̂ = x · rstd and c = mean(dy·w·x̂): each invocation sums
// dy·w·x̂ over words li, li + 256, … of the row, a tree in workgroup memory adds the sums,
// and a second walk writes dx. Mirrors cpu_backward in src/ops/norm/mod.rs.
//
// The Rust side prepends the bindings with `load_dy(i)`, `load_x(i)`, `load_w(j)`,
// `rstd: array<f32>`, `store_dx(w, v2)`, `params: NormParams` and `ELEMS` (as in
// norm_forward.wgsl). Dispatch: 2-D, (groups_x, ceil(rows / groups_x)) workgroups.

// `params: NormParams` is prepended, generated from NormParams in src/ops/norm/wgpu.rs.

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.y * params.groups_x + wg.x;
    if (row >= params.rows) {
        return;
    }
    let words = params.d / ELEMS;
    let base = row * words;
    let s = rstd[row];
    var dot = 0.0;
    for (var w = li; w < words; w += 256u) {
        for (var e = 0u; e < ELEMS; e++) {
            let i = (base + w) * ELEMS + e;
            dot += (load_dy(i) * load_w(w * ELEMS + e)) * (load_x(i) * s);
        }
    }
    partial[li] = dot;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            partial[li] += partial[li + stride];
        }
        workgroupBarrier();
    }
    let c = partial[0] / f32(params.d);
    for (var w = li; w < words; w += 256u) {
        var dx = vec2<f32>(0.0, 0.0);
        for (var e = 0u; e < ELEMS; e++) {
            let i = (base + w) * ELEMS + e;
            dx[e] = s * (load_dy(i) * load_w(w * ELEMS + e) - (load_x(i) * s) * c);
        }
        store_dx(base + w, dx);
    }
}
