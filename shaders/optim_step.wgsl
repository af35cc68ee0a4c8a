// The fused AdamW step for a group of up to 16 tensors (src/ops/optim/mod.rs has the
// update; this follows its order of f32 operations).
//
// Each invocation updates one pair of elements, so a packed f16/bf16 working copy is
// written a whole 32-bit word at a time. The step reads `result` (optim_reduce.wgsl): a set
// non-finite flag skips it, else the clip factor comes from the norm.
// The Rust side prepends the per-tensor bindings and `fn slot_j(w: u32, clip: f32)` for
// each tensor j, `result`, `Params` (the step constants, then `info` as in
// optim_norm.wgsl, z = stochastic-rounding key) and `fn dispatch(g: u32, li: u32, clip: f32)`, which picks the tensor
// of workgroup g.
// Dispatch: 2-D, one workgroup per 512 elements of every tensor.

fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if (w < 0.5) {
        return start + w * (end - start);
    }
    return end - (end - start) * (1.0 - w);
}

// (θ, m, v) after one step with gradient g.
fn update(theta_in: f32, m_in: f32, v_in: f32, g: f32) -> vec3<f32> {
    let theta = theta_in * params.decay;
    let m = lerp(m_in, g, 1.0 - params.beta1);
    let v = v_in * params.beta2 + (1.0 - params.beta2) * (g * g);
    let denom = sqrt(v) / params.bc2_sqrt + params.eps;
    return vec3<f32>(theta - params.step_size * (m / denom), m, v);
}

fn to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// murmur3's finaliser and stochastic rounding to bf16, as in src/ops/optim/mod.rs.
fn mix32(x: u32) -> u32 {
    var h = x;
    h ^= h >> 16u;
    h *= 0x85ebca6bu;
    h ^= h >> 13u;
    h *= 0xc2b2ae35u;
    return h ^ (h >> 16u);
}

fn bf16_stochastic(theta: f32, key: u32, index: u32) -> u32 {
    let bits = bitcast<u32>(theta);
    if ((bits & 0x7fffffffu) > 0x7f800000u) {
        return (bits >> 16u) | 0x40u;
    }
    let r = mix32((index * 0x9e3779b1u) ^ key) & 0xffffu;
    return (bits + r) >> 16u;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    if (result[1] != 0u) {
        return;
    }
    let norm = sqrt(bitcast<f32>(result[0]));
    let clip = select(1.0, min(params.max_norm / (norm + 1e-6), 1.0), params.max_norm > 0.0);
    dispatch(wg.y * nwg.x + wg.x, li, clip);
}
