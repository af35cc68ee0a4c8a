// Decoding against a KV cache, split along the cache (flash-decoding); mirrors cpu_decode in
// src/ops/attention/mod.rs. One invocation per (query row r, split): the online softmax
// over the split's KEYS_PER_SPLIT keys that row r sees, written as a partial (max, sum, Σ p·v) at
// item r·split_count + split. Row r = (b·heads + h)·q_len + i; the cache is
// [batch, capacity, kv_heads, dim]; query row i of sequence b (q_valid real rows, len
// cached) sees keys 0..len − q_valid + i.
//
// The Rust side prepends `load_q`, `load_k`, `load_v` (bindings 0-2) and `const KEYS_PER_SPLIT`.
// Dispatch: 2-D, 64 items per workgroup.

// DecodeSplitParams in src/ops/attention/wgpu.rs.
struct DecodeSplitParams {
    q_len: u32,
    capacity: u32,
    heads: u32,
    kv_heads: u32,
    dim: u32,
    scale: f32,
    split_count: u32,
    batch: u32,
    items: u32,
    groups_x: u32,
    pad0: u32,
    pad1: u32,
}

// lens[b]: cached rows of sequence b; lens[batch + b]: its real query rows.
@group(0) @binding(3) var<storage, read> lens: array<u32>;
@group(0) @binding(4) var<storage, read_write> part_ml: array<f32>;
@group(0) @binding(5) var<storage, read_write> part_acc: array<f32>;
@group(0) @binding(6) var<uniform> params: DecodeSplitParams;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let item = (wg.y * params.groups_x + wg.x) * 64u + li;
    if (item >= params.items) {
        return;
    }
    let r = item / params.split_count;
    let split = item % params.split_count;
    let b = r / (params.heads * params.q_len);
    let h = (r / params.q_len) % params.heads;
    let i = r % params.q_len;
    let kh = h / (params.heads / params.kv_heads);
    let d = params.dim;
    let len = lens[b];
    let q_valid = lens[params.batch + b];
    var visible = 0u;
    if (i < q_valid) {
        visible = len - q_valid + i + 1u;
    }
    let q_base = ((b * params.q_len + i) * params.heads + h) * d;
    // Σ p·v accumulates in place in the item's slice of part_acc.
    let acc = item * d;
    for (var c = 0u; c < d; c++) {
        part_acc[acc + c] = 0.0;
    }
    var m = -3.0e38;
    var l = 0.0;
    for (var j = split * KEYS_PER_SPLIT; j < min(split * KEYS_PER_SPLIT + KEYS_PER_SPLIT, visible); j++) {
        let kv_base = ((b * params.capacity + j) * params.kv_heads + kh) * d;
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
            part_acc[acc + c] = part_acc[acc + c] * correction + p * load_v(kv_base + c);
        }
        m = m_new;
    }
    part_ml[2u * item] = m;
    part_ml[2u * item + 1u] = l;
}
