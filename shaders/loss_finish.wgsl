// The mean loss: loss[0] = inv_count * sum over rows with target != -100 of
// (max + ln(sum) - target logit), from state [rows, 3].
//
// One workgroup of 256 invocations: each sums a strided slice of the rows (rows/256
// iterations), then a tree reduction in workgroup memory. Dispatch: (1, 1, 1).

// `struct LossParams` is prepended, generated from LossParams in src/ops/loss/mod.rs.

@group(0) @binding(0) var<storage, read> state: array<f32>;
@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read_write> loss: array<f32>;
@group(0) @binding(3) var<uniform> params: LossParams;

var<workgroup> partial: array<f32, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    var acc = 0.0;
    for (var r = li; r < params.rows; r += 256u) {
        if (targets[r] != -100) {
            acc += state[3u * r] + log(state[3u * r + 1u]) - state[3u * r + 2u];
        }
    }
    partial[li] = acc;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            partial[li] += partial[li + stride];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        loss[0] = partial[0] * params.inv_count;
    }
}
