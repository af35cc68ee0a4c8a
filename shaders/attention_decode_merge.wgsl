// Merges the splits of attention_decode_split.wgsl: one invocation per query row r; with
// M the largest max among splits that saw a key, L = Σ e^(m − M)·l and
// o = Σ e^(m − M)·acc / L; lse = M + log L, or −∞ (and zeros) for a row that saw no key.
// o is f32 (rounded to q's dtype after). Dispatch: 2-D, 64 rows per workgroup.

// DecodeMergeParams in src/ops/attention/wgpu.rs.
struct DecodeMergeParams {
    q_len: u32,
    heads: u32,
    dim: u32,
    split_count: u32,
    rows: u32,
    groups_x: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<storage, read> part_ml: array<f32>;
@group(0) @binding(1) var<storage, read> part_acc: array<f32>;
@group(0) @binding(2) var<storage, read_write> o: array<f32>;
@group(0) @binding(3) var<storage, read_write> lse: array<f32>;
@group(0) @binding(4) var<uniform> params: DecodeMergeParams;

@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let r = (wg.y * params.groups_x + wg.x) * 64u + li;
    if (r >= params.rows) {
        return;
    }
    let first = r * params.split_count;
    var mm = -3.0e38;
    for (var s = 0u; s < params.split_count; s++) {
        if (part_ml[2u * (first + s) + 1u] > 0.0) {
            mm = max(mm, part_ml[2u * (first + s)]);
        }
    }
    var ll = 0.0;
    for (var s = 0u; s < params.split_count; s++) {
        let l = part_ml[2u * (first + s) + 1u];
        if (l > 0.0) {
            ll += exp(part_ml[2u * (first + s)] - mm) * l;
        }
    }
    let b = r / (params.heads * params.q_len);
    let h = (r / params.q_len) % params.heads;
    let i = r % params.q_len;
    let d = params.dim;
    let o_base = ((b * params.q_len + i) * params.heads + h) * d;
    for (var c = 0u; c < d; c++) {
        var a = 0.0;
        for (var s = 0u; s < params.split_count; s++) {
            if (part_ml[2u * (first + s) + 1u] > 0.0) {
                a += exp(part_ml[2u * (first + s)] - mm) * part_acc[(first + s) * d + c];
            }
        }
        o[o_base + c] = select(0.0, a / ll, ll > 0.0);
    }
    lse[r] = select(bitcast<f32>(0xff800000u), mm + log(ll), ll > 0.0);
}
