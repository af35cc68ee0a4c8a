// Σ g² and a non-finite flag over a group of gradients, one partial per workgroup.
//
// The Rust side prepends optim_slots.wgsl, per tensor j of the group `load_gj(i) -> f32`
// (binding j), the `partials` binding (array<f32>: sum, flag per workgroup) and the uniform
// `params: OptimNormParams`, and `fn partial(g: u32, li: u32) -> vec2<f32>`, which picks the
// tensor of workgroup g and returns Σ g² over elements start + li, start + li + 256, … of
// its chunk (x) and whether any was not finite (y: 0 or 1).
// Dispatch: 2-D, one workgroup per CHUNK elements of every tensor.

// OptimNormParams in src/ops/optim/wgpu.rs: the group's tensors, its workgroups and where
// its partials start.
struct OptimNormParams {
    info: array<SlotInfo, 16>,
    groups: u32,
    base: u32,
    pad0: u32,
    pad1: u32,
}

const CHUNK: u32 = 4096u;
var<workgroup> sums: array<vec2<f32>, 256>;

fn not_finite(x: f32) -> bool {
    return (bitcast<u32>(x) & 0x7f800000u) == 0x7f800000u;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_index) li: u32) {
    let g = wg.y * nwg.x + wg.x;
    sums[li] = partial(g, li);
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            sums[li] = vec2<f32>(sums[li].x + sums[li + stride].x, max(sums[li].y, sums[li + stride].y));
        }
        workgroupBarrier();
    }
    if (li == 0u && g < params.groups) {
        partials[2u * (params.base + g)] = sums[0].x;
        partials[2u * (params.base + g) + 1u] = sums[0].y;
    }
}
