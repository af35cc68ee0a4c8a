// Many LoRA adapters in one batch, first pass (lora_adapters.wgsl is prepended).
//
// v[t, j] = x[t]·A_a[j] (0 past the adapter's rank). One workgroup of 64 per (t, j),
// workgroup g = t · rmax + j; a tree reduction finishes the dot product.
// Dispatch: 2-D, (groups_x, …) over tokens · rmax workgroups.

@group(0) @binding(0) var<storage, read> x: array<f32>;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<AdapterEntry>;
@group(0) @binding(3) var<storage, read> rows: array<i32>;
@group(0) @binding(4) var<storage, read_write> v: array<f32>;
@group(0) @binding(5) var<uniform> params: LoraBatchedParams;

var<workgroup> partial: array<f32, 64>;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let g = wg.y * params.groups_x + wg.x;
    // The whole workgroup leaves together, so the barriers below stay uniform.
    if (g >= params.tokens * params.rmax) {
        return;
    }
    let t = g / params.rmax;
    let j = g % params.rmax;
    let adapter = rows[t];
    var acc = 0.0;
    if (adapter >= 0 && j < table[adapter].rank) {
        let a0 = table[adapter].a_offset + j * params.inp;
        for (var i = li; i < params.inp; i += 64u) {
            acc = fma(x[t * params.inp + i], a[a0 + i], acc);
        }
    }
    partial[li] = acc;
    workgroupBarrier();
    for (var stride = 32u; stride > 0u; stride >>= 1u) {
        if (li < stride) {
            partial[li] += partial[li + stride];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        v[g] = partial[0];
    }
}

