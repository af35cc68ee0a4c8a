// Attention backward, dq: one invocation per query row (b, i, h);
// dq += scale · dS_ij · k_j over the keys the row sees. attention_bwd_common.wgsl has the
// shared parts. Dispatch: 2-D, 64 rows per workgroup.

@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read> lens: array<u32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<uniform> params: AttentionParams;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = row_index(wg, li);
    if (r >= params.rows) {
        return;
    }
    let d = params.dim;
    let b = r / (params.q_len * params.heads);
    let i = (r / params.heads) % params.q_len;
    let h = r % params.heads;
    let kh = h / (params.heads / params.kv_heads);
    for (var c = 0u; c < d; c++) {
        dk[r * d + c] = 0.0;
    }
    let end = visible(i, lens[b]);
    for (var j = 0u; j < end; j++) {
        let ds = pair(b, h, i, j).y * params.scale;
        let kb = ((b * params.kv_len + j) * params.kv_heads + kh) * d;
        for (var c = 0u; c < d; c++) {
            dk[r * d + c] = fma(ds, load_k(kb + c), dk[r * d + c]);
        }
    }
}

