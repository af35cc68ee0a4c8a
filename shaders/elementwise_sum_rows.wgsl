// Row sums: out[r] = Σ_j x[r, j], accumulated in f32, written as f32.
//
// One workgroup of 256 invocations per row: each sums a strided slice of the row, then a
// tree reduction in workgroup memory. The Rust side prepends binding 0 with `load_x(i)`.
// Dispatch: 2-D, (groups_x, ceil(rows / groups_x)).

// SumRowsParams in src/ops/elementwise/wgpu.rs.
struct SumRowsParams {
    rows: u32,
    cols: u32,
    groups_x: u32,
    pad0: u32,
}

@group(0) @binding(1) var<storage, read_write> out: array<f32>;
@group(0) @binding(2) var<uniform> params: SumRowsParams;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.y * params.groups_x + wg.x;
    // The whole workgroup leaves together, so the barriers below stay uniform.
    if (row >= params.rows) {
        return;
    }
    var s = 0.0;
    for (var j = li; j < params.cols; j += 256u) {
        s += load_x(row * params.cols + j);
    }
    partial[li] = s;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            partial[li] += partial[li + stride];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        out[row] = partial[0];
    }
}
