// Folds the per-workgroup partials of optim_norm.wgsl into result = {Σ g² (f32 bits),
// non-finite flag}. One workgroup of 256 invocations. WGSL has no f64: a sum that leaves
// f32's range also sets the flag, so such a step is skipped, never silently zeroed.

// OptimReduceParams in src/ops/optim/wgpu.rs: the partials to fold.
struct OptimReduceParams {
    count: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<storage, read> partials: array<f32>;
@group(0) @binding(1) var<storage, read_write> result: array<u32>;
@group(0) @binding(2) var<uniform> params: OptimReduceParams;

var<workgroup> sums: array<vec2<f32>, 256>;

@compute @workgroup_size(256)
fn main(@builtin(local_invocation_index) li: u32) {
    var acc = vec2<f32>(0.0, 0.0);
    for (var i = li; i < params.count; i += 256u) {
        acc = vec2<f32>(acc.x + partials[2u * i], max(acc.y, partials[2u * i + 1u]));
    }
    sums[li] = acc;
    workgroupBarrier();
    for (var stride = 128u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            sums[li] = vec2<f32>(sums[li].x + sums[li + stride].x, max(sums[li].y, sums[li + stride].y));
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        result[0] = bitcast<u32>(sums[0].x);
        let overflow = (bitcast<u32>(sums[0].x) & 0x7f800000u) == 0x7f800000u;
        result[1] = select(0u, 1u, sums[0].y > 0.0 || overflow);
    }
}
