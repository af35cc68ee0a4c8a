// Shared by lora_shrink.wgsl and lora_expand.wgsl, the two passes of many LoRA adapters in
// one batch (Punica's BGMV idea; kernels/lora.cu has the same two passes). Each row t picks
// adapter rows[t] (−1: none).

// One adapter (AdapterEntry in src/ops/lora/mod.rs): where its A and B start in the packed
// arrays (elements), its rank and its scale.
struct AdapterEntry {
    a_offset: u32,
    b_offset: u32,
    rank: u32,
    scale: f32,
}

// The batch's sizes (LoraBatchedParams in src/ops/lora/wgpu.rs).
struct LoraBatchedParams {
    tokens: u32,
    inp: u32,
    outn: u32,
    rmax: u32,
    groups_x: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}
