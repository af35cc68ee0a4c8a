// Fisher accumulation: F ← F + (g² − F) · inv_count, one element per invocation, the
// running mean of squared gradients. The Rust side prepends `load_g(i) -> f32` (binding 1).
// Dispatch: 2-D, 256 elements per workgroup.

// OptimFisherParams in src/ops/optim/wgpu.rs.
struct OptimFisherParams {
    n: u32,
    groups_x: u32,
    inv_count: f32,
    pad0: u32,
}

@group(0) @binding(0) var<storage, read_write> fisher: array<f32>;
@group(0) @binding(2) var<uniform> params: OptimFisherParams;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = (wg.y * params.groups_x + wg.x) * 256u + li;
    if (i < params.n) {
        let g = load_g(i);
        fisher[i] = fisher[i] + (g * g - fisher[i]) * params.inv_count;
    }
}
