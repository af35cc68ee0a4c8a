// Many LoRA adapters in one batch, second pass (lora_adapters.wgsl is prepended):
// out[t, o] = y[t, o] + s_a · v[t]·B_a[o] with v from lora_shrink.wgsl. One invocation per
// element.
// Dispatch: 2-D, (groups_x, …) over elements / 64 workgroups.

@group(0) @binding(0) var<storage, read> v: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read> table: array<AdapterEntry>;
@group(0) @binding(3) var<storage, read> rows: array<i32>;
@group(0) @binding(4) var<storage, read> y: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@group(0) @binding(6) var<uniform> params: LoraBatchedParams;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let e = (wg.y * params.groups_x + wg.x) * 64u + li;
    if (e >= params.tokens * params.outn) {
        return;
    }
    let t = e / params.outn;
    let o = e % params.outn;
    let adapter = rows[t];
    var val = y[e];
    if (adapter >= 0) {
        let entry = table[adapter];
        let rank = entry.rank;
        let b0 = entry.b_offset + o * rank;
        var acc = 0.0;
        for (var j = 0u; j < rank; j++) {
            acc = fma(v[t * params.rmax + j], b[b0 + j], acc);
        }
        val += entry.scale * acc;
    }
    out[e] = val;
}
