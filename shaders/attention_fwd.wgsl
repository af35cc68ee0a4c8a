// Attention forward, one invocation per query row (b, h, i), keys visited one at a time
// with an online softmax (running max m, running sum l, accumulator acc), so no score
// matrix is stored. Mirrors cpu_forward in src/ops/attention/mod.rs.
//
// The Rust side prepends `load_q`, `load_k`, `load_v` (bindings 0-2) for the dtype and
// attention_common.wgsl.
// Output o is f32 (rounded to q's dtype after), lse is f32 with −∞ for a row that sees no
// key. Dispatch: 2-D, 64 rows per workgroup.


@group(0) @binding(3) var<storage, read> lens: array<u32>;
@group(0) @binding(4) var<storage, read_write> o: array<f32>;
@group(0) @binding(5) var<storage, read_write> lse: array<f32>;
@group(0) @binding(6) var<uniform> params: AttentionParams;


@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = (wg.y * params.groups_x + wg.x) * 64u + li;
    if (r >= params.rows) {
        return;
    }
    let b = r / (params.heads * params.q_len);
    let h = (r / params.q_len) % params.heads;
    let i = r % params.q_len;
    let kh = h / (params.heads / params.kv_heads);
    let d = params.dim;
    let q_base = ((b * params.q_len + i) * params.heads + h) * d;
    var acc: array<f32, 256>;
    for (var c = 0u; c < d; c++) {
        acc[c] = 0.0;
    }
    var m = -3.0e38;
    var l = 0.0;
    let end = visible(i, lens[b]);
    for (var j = 0u; j < end; j++) {
        let kv_base = ((b * params.kv_len + j) * params.kv_heads + kh) * d;
        var score = 0.0;
        for (var c = 0u; c < d; c++) {
            score = fma(load_q(q_base + c), load_k(kv_base + c), score);
        }
        score = score * params.scale;
        let m_new = max(m, score);
        let correction = exp(m - m_new);
        let p = exp(score - m_new);
        l = l * correction + p;
        for (var c = 0u; c < d; c++) {
            acc[c] = acc[c] * correction + p * load_v(kv_base + c);
        }
        m = m_new;
    }
    for (var c = 0u; c < d; c++) {
        o[q_base + c] = select(0.0, acc[c] / l, l > 0.0);
    }
    lse[r] = select(bitcast<f32>(0xff800000u), m + log(l), l > 0.0);
}
