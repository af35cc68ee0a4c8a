// Shared by the forward and backward attention shaders: the launch parameters and which
// keys a query row sees (AttnShape::visible in src/ops/attention/mod.rs).

// AttentionParams in src/ops/attention/wgpu.rs. `rows`: query rows (forward, dq) or key
// rows (dk, dv), one per invocation.
struct AttentionParams {
    q_len: u32,
    kv_len: u32,
    heads: u32,
    kv_heads: u32,
    dim: u32,
    scale: f32,
    causal: u32,
    rows: u32,
    groups_x: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// Keys 0..visible(i) of a sequence of length len (see AttnShape::visible).
fn visible(i: u32, len: u32) -> u32 {
    if (i >= min(len, params.q_len)) {
        return 0u;
    }
    let kv_valid = min(len, params.kv_len);
    if (params.causal == 0u) {
        return kv_valid;
    }
    let end = i32(i) + i32(params.kv_len) - i32(params.q_len) + 1;
    return min(u32(max(end, 0)), kv_valid);
}
