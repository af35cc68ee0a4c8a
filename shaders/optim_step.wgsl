// The fused AdamW step for a group of up to 16 tensors (src/ops/optim/mod.rs has the
// update; this follows its order of f32 operations).
//
// Each invocation updates one pair of elements, so a packed f16/bf16 working copy is
// written a whole 32-bit word at a time. The step reads `result` (optim_reduce.wgsl): a set
// non-finite flag skips it, else the clip factor comes from the norm.
// The Rust side prepends optim_slots.wgsl, the per-tensor bindings and
// `fn slot_j(w: u32, clip: f32)` for each tensor j, `result`, the uniform
// `params: OptimStepParams` and `fn dispatch(g: u32, li: u32, clip: f32)`, which picks the
// tensor of workgroup g.
// Dispatch: 2-D, one workgroup per 512 elements of every tensor.

// The step's constants (AdamWParams in src/ops/optim/mod.rs, shared with kernels/optim.cu).
struct AdamWParams {
    beta1: f32,
    beta2: f32,
    one_minus_beta1: f32,
    one_minus_beta2: f32,
    eps: f32,
    decay: f32,      // 1 − lr·wd
    step_size: f32,  // lr / (1 − β1ᵗ)
    bc2_sqrt: f32,   // √(1 − β2ᵗ)
    lambda: f32,
    max_norm: f32,   // 0: no clipping
    use_fisher: u32,
    pad0: u32,
}

// OptimStepParams in src/ops/optim/wgpu.rs.
struct OptimStepParams {
    adamw: AdamWParams,
    info: array<SlotInfo, 16>,
}

fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if (w < 0.5) {
        return start + w * (end - start);
    }
    return end - (end - start) * (1.0 - w);
}

// (θ, m, v) after one step with gradient g.
fn update(theta_in: f32, m_in: f32, v_in: f32, g: f32) -> vec3<f32> {
    let c = params.adamw;
    let theta = theta_in * c.decay;
    let m = lerp(m_in, g, c.one_minus_beta1);
    let v = v_in * c.beta2 + c.one_minus_beta2 * g * g;
    let denom = sqrt(v) / c.bc2_sqrt + c.eps;
    return vec3<f32>(theta - c.step_size * (m / denom), m, v);
}

fn to_bf16(x: f32) -> u32 {
    let b = bitcast<u32>(x);
    if ((b & 0x7fffffffu) > 0x7f800000u) {
        return (b >> 16u) | 0x40u;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// murmur3's finaliser (src/ops/hash.rs) and stochastic rounding to bf16 (src/ops/optim/mod.rs).
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
    let max_norm = params.adamw.max_norm;
    let clip = select(1.0, min(max_norm / (norm + 1e-6), 1.0), max_norm > 0.0);
    dispatch(wg.y * nwg.x + wg.x, li, clip);
}
