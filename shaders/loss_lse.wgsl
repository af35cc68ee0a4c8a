// Folds a block of logits [rows, cols] (vocabulary columns col0..) into each row's
// statistics state[3r..3r+3] = (max, sum of exp(x - max), target logit): an online
// logsumexp, max and sum updated together.
//
// One workgroup of 256 invocations per row: each folds a strided slice of the row (cols/256
// iterations, far below lavapipe's 65k-iteration loop limit up to 16M columns), then a tree
// merge in workgroup memory; invocation 0 merges with the row's old state (unless fresh)
// and writes it. The Rust side prepends binding 0 with `load_x(i)`.
// Dispatch: 2-D, (groups_x, ceil(rows / groups_x)).

// `struct LossParams` is prepended, generated from LossParams in src/ops/loss/mod.rs.

@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> state: array<f32>;
@group(0) @binding(3) var<uniform> params: LossParams;

// The empty row's max: finite, so no inf - inf appears in a merge.
const LOWEST: f32 = -3.4028234e38;

var<workgroup> wmax: array<f32, 256>;
var<workgroup> wsum: array<f32, 256>;

// The pair (m, s) merged with (m2, s2).
fn merge(m: f32, s: f32, m2: f32, s2: f32) -> vec2<f32> {
    let mx = max(m, m2);
    return vec2<f32>(mx, s * exp(m - mx) + s2 * exp(m2 - mx));
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let row = wg.y * params.groups_x + wg.x;
    // The whole workgroup leaves together, so the barriers below stay uniform.
    if (row >= params.rows) {
        return;
    }
    var m = LOWEST;
    var s = 0.0;
    for (var j = li; j < params.cols; j += 256u) {
        let x = load_x(row * params.cols + j);
        if (x > m) {
            s = s * exp(m - x) + 1.0;
            m = x;
        } else {
            s += exp(x - m); // a NaN x lands here and poisons s
        }
    }
    wmax[li] = m;
    wsum[li] = s;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            let merged = merge(wmax[li], wsum[li], wmax[li + stride], wsum[li + stride]);
            wmax[li] = merged.x;
            wsum[li] = merged.y;
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        var total = vec2<f32>(wmax[0], wsum[0]);
        if (params.fresh == 0u) {
            total = merge(total.x, total.y, state[3u * row], state[3u * row + 1u]);
        } else {
            state[3u * row + 2u] = 0.0;
        }
        state[3u * row] = total.x;
        state[3u * row + 1u] = total.y;
        let t = targets[row];
        if (t >= 0) {
            let tu = u32(t);
            if (tu >= params.col0 && tu - params.col0 < params.cols) {
                state[3u * row + 2u] = load_x(row * params.cols + tu - params.col0);
            }
        }
    }
}
