// Token embeddings (src/ops/embedding): the sizes every embedding shader reads, prepended to
// each of them. The including shader's `Params` holds `emb: EmbeddingParams`.

// EmbeddingParams in src/ops/embedding/wgpu.rs.
struct EmbeddingParams {
    tokens: u32,      // ids
    dim: u32,         // elements per row
    vocab: u32,       // table rows
    elems: u32,       // elements written: tokens · dim (gathers), vocab · dim (backward)
    words: u32,       // gather: 32-bit words of the output
    groups_x: u32,    // workgroups along x of the 2-D dispatch
    half: u32,        // gather: 1 for 16-bit elements (two per word), 0 for f32
    pass_start: u32,  // backward: where this pass starts in each row's list of positions
    pass_len: u32,    // backward: positions one pass adds at most
    pad0: u32,
    pad1: u32,
    pad2: u32,
}
