// RMSNorm backward, dw's partial sums: partials[g·d + j] = Σ dy[r, j] · x[r, j] · rstd[r]
// over the rows r of group g (rows g·rows_per_group .. , in order; the groups are fixed by
// the row count, dw_groups in src/ops/norm/mod.rs). One invocation per (column, group):
// workgroups of 256 columns along x, one group per y. Each invocation loops rows_per_group
// times (at most rows / 1024 + 8), under lavapipe's loop limit.
//
// The Rust side prepends the bindings with `load_dy(i)`, `load_x(i)`, `rstd: array<f32>`,
// `partials: array<f32>` and `params: NormParams`.

// `params: NormParams` is prepended, generated from NormParams in src/ops/norm/wgpu.rs.

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let j = wg.x * 256u + li;
    let g = wg.y;
    if (j >= params.d || g >= params.groups) {
        return;
    }
    let first = g * params.rows_per_group;
    let end = min(first + params.rows_per_group, params.rows);
    var acc = 0.0;
    for (var r = first; r < end; r++) {
        let i = r * params.d + j;
        acc += load_dy(i) * (load_x(i) * rstd[r]);
    }
    partials[g * params.d + j] = acc;
}
