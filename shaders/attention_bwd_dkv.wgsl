// Attention backward, dk and dv: one invocation per key row (b, j, kh);
// dv += p_ij · dO_i and dk += scale · dS_ij · q_i over the query rows of every head in kh's
// group that see key j (grouped-query gradients summed into the shared head).
// attention_bwd_common.wgsl has the shared parts. Dispatch: 2-D, 64 rows per workgroup.

@group(0) @binding(4) var<storage, read> lse: array<f32>;
@group(0) @binding(5) var<storage, read> delta: array<f32>;
@group(0) @binding(6) var<storage, read> lens: array<u32>;
@group(0) @binding(7) var<storage, read_write> dk: array<f32>;
@group(0) @binding(8) var<storage, read_write> dv: array<f32>;
@group(0) @binding(9) var<uniform> params: AttentionParams;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = row_index(wg, li);
    if (r >= params.rows) {
        return;
    }
    let d = params.dim;
    let b = r / (params.kv_len * params.kv_heads);
    let j = (r / params.kv_heads) % params.kv_len;
    let kh = r % params.kv_heads;
    let group = params.heads / params.kv_heads;
    for (var c = 0u; c < d; c++) {
        dk[r * d + c] = 0.0;
        dv[r * d + c] = 0.0;
    }
    for (var h = kh * group; h < (kh + 1u) * group; h++) {
        for (var i = 0u; i < params.q_len; i++) {
            if (j >= visible(i, lens[b])) {
                continue;
            }
            let pd = pair(b, h, i, j);
            let qb = ((b * params.q_len + i) * params.heads + h) * d;
            for (var c = 0u; c < d; c++) {
                dv[r * d + c] = fma(pd.x, load_g(qb + c), dv[r * d + c]);
                dk[r * d + c] = fma(params.scale * pd.y, load_q(qb + c), dk[r * d + c]);
            }
        }
    }
}
