// Token embeddings, backward: d_table[v, c] = Σ dy[p, c] over the positions p of id v, in
// the order the host's counting sort lists them (increasing p), as f32 additions from +0.
// No atomics: every run and every backend adds the same values in the same order.
//
// One invocation per element of d_table (f32). Long sums are split into passes of at most
// `pass_len` positions, one dispatch each, every pass carrying on from the value the last
// one stored, so no invocation loops more than `pass_len` times (lavapipe stops loops past
// about 65k iterations) and the order of the additions stays the same.
// The Rust side prepends binding 0, `dy`, with `load_dy(i)`.
// Dispatch: 2-D, (groups_x, rows) workgroups of 256 covering `elems` invocations.

@group(0) @binding(1) var<storage, read> offsets: array<u32>;
@group(0) @binding(2) var<storage, read> positions: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<uniform> params: Params;

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let i = (wg.y * params.emb.groups_x + wg.x) * 256u + li;
    if (i >= params.emb.elems) {
        return;
    }
    let v = i / params.emb.dim;
    let c = i % params.emb.dim;
    let count = offsets[v + 1u] - offsets[v];
    let start = params.emb.pass_start;
    if (start > 0u && start >= count) {
        return;  // this row's sum ended in an earlier pass
    }
    var acc = 0.0;
    if (start > 0u) {
        acc = out[i];
    }
    let begin = offsets[v] + start;
    let end = begin + min(count - start, params.emb.pass_len);
    for (var k = begin; k < end; k++) {
        acc += load_dy(positions[k] * params.emb.dim + c);
    }
    out[i] = acc;
}
