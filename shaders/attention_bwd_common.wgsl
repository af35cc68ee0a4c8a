// Shared by attention_bwd_dq.wgsl and attention_bwd_dkv.wgsl (FlashAttention-2 scheme):
// scores recomputed from q, k and lse, p = exp(s − lse), dS = p · (dO_i · v_j − D_i) with
// D = rowsum(dO ⊙ O) ([b, q_len, h]). The including shader declares `lse`, `delta`, `lens`
// and `params`; the Rust side prepends `load_q`, `load_k`, `load_v`, `load_g` (dO) at
// bindings 0-3, and attention_common.wgsl before this file.

// (p, dS) of query row (b, i, h) and key j.
fn pair(b: u32, h: u32, i: u32, j: u32) -> vec2<f32> {
    let d = params.dim;
    let kh = h / (params.heads / params.kv_heads);
    let qb = ((b * params.q_len + i) * params.heads + h) * d;
    let kb = ((b * params.kv_len + j) * params.kv_heads + kh) * d;
    var score = 0.0;
    var dp = 0.0;
    for (var c = 0u; c < d; c++) {
        score = fma(load_q(qb + c), load_k(kb + c), score);
        dp = fma(load_g(qb + c), load_v(kb + c), dp);
    }
    let p = exp(score * params.scale - lse[(b * params.heads + h) * params.q_len + i]);
    return vec2<f32>(p, p * (dp - delta[(b * params.q_len + i) * params.heads + h]));
}

fn row_index(wg: vec3<u32>, li: u32) -> u32 {
    return (wg.y * params.groups_x + wg.x) * 64u + li;
}

