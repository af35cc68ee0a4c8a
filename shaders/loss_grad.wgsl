// The gradient of a block of logits [rows, cols] (vocabulary columns col0..):
// g[r, j] = scale * (exp(x[r, j] - lse_r) - [col0 + j == target_r]), 0 on ignored rows
// (target -100), with lse_r = max + ln(sum) from state.
//
// A map over the output's 32-bit words, one word (one f32, or two f16/bf16 elements, which
// may belong to two rows) per invocation; no loop. The Rust side prepends binding 0 with
// `load_x(i)` and binding 3 with `out`, `ELEMS` and `store_word`.
// Dispatch: 2-D, (groups_x, ceil(words / 256 / groups_x)).

// `struct LossParams` is prepended, generated from LossParams in src/ops/loss/mod.rs.

@group(0) @binding(1) var<storage, read> targets: array<i32>;
@group(0) @binding(2) var<storage, read> state: array<f32>;
@group(0) @binding(4) var<uniform> params: LossParams;

fn grad_at(i: u32) -> f32 {
    let r = i / params.cols;
    let c = i - r * params.cols;
    let t = targets[r];
    if (t == -100) {
        return 0.0;
    }
    let lse = state[3u * r] + log(state[3u * r + 1u]);
    let onehot = select(0.0, 1.0, t >= 0 && u32(t) == params.col0 + c);
    return (exp(load_x(i) - lse) - onehot) * params.scale;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let w = (wg.y * params.groups_x + wg.x) * 256u + li;
    let total = params.rows * params.cols;
    if (w >= (total + ELEMS - 1u) / ELEMS) {
        return;
    }
    var v = vec2<f32>(0.0, 0.0);
    for (var e = 0u; e < ELEMS; e++) {
        let i = w * ELEMS + e;
        if (i < total) {
            v[e] = grad_at(i);
        }
    }
    store_word(w, v);
}
