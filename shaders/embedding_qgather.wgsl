// Token embeddings, quantized gather: `apply(i)` of the elementwise map
// (shaders/elementwise_map.wgsl), element i of out[t, :] = row ids[t] of a quantized table,
// decoded by `quant_weight` (shaders/quant_decode.wgsl) as dequantize decodes it. The Rust
// side binds the table as `w`, the ids as `ids`, and the output words. The ids were checked
// against the vocabulary on the host; an id that is not below it still reads nothing and
// gives zeros.

fn apply(i: u32) -> f32 {
    let id = ids[i / params.emb.dim];
    if (id >= params.emb.vocab) {
        return 0.0;
    }
    return quant_weight(id * params.emb.dim + i % params.emb.dim);
}
