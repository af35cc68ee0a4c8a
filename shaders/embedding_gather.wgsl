// Token embeddings, dense gather: out[t, :] = table[ids[t], :], copied bit for bit (f32, or
// f16/bf16 two to a word). The ids were checked against the vocabulary on the host; an id
// that is not below it still reads nothing and writes zeros.
//
// Each invocation writes one 32-bit word of the output, so no two share a word; a word of
// 16-bit elements may hold the end of one row and the start of the next.
// Dispatch: 2-D, (groups_x, rows) workgroups of 256 covering `words` invocations.

@group(0) @binding(0) var<storage, read> table: array<u32>;
@group(0) @binding(1) var<storage, read> ids: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@group(0) @binding(3) var<uniform> params: Params;

// The bits of output element e (a 16-bit element in the low half).
fn element_bits(e: u32) -> u32 {
    let id = ids[e / params.emb.dim];
    if (id >= params.emb.vocab) {
        return 0u;
    }
    let src = id * params.emb.dim + e % params.emb.dim;
    if (params.emb.half == 0u) {
        return table[src];
    }
    return (table[src >> 1u] >> ((src & 1u) * 16u)) & 0xffffu;
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let w = (wg.y * params.emb.groups_x + wg.x) * 256u + li;
    if (w >= params.emb.words) {
        return;
    }
    if (params.emb.half == 0u) {
        out[w] = element_bits(w);
        return;
    }
    let e = 2u * w;
    var word = element_bits(e);
    if (e + 1u < params.emb.elems) {
        word |= element_bits(e + 1u) << 16u;
    }
    out[w] = word;
}
