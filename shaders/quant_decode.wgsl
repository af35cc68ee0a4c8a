// Decoding quantized weights on the fly: `quant_weight(e)` is element e (row-major, flat)
// of an [out, in] quantized weight, bound as `w: array<u32>` (the raw bytes; see
// src/ops/quant/formats.rs for the formats). The including shader's `Params` holds
// `q: QuantParams`, and the Rust side prepends `const QUANT_FORMAT: u32` (the format's code):
// a pipeline per format, so every switch below folds away. Left to the uniform, a software
// rasterizer such as llvmpipe runs every case of a switch under a mask, NF4's table lookup
// included, for every weight. Each weight is `code · scale` rounded once in f32 (Q4_1: `+ min`, rounded
// again), as the CPU decodes it.

// The weight's format and the place of its NF4 state (QuantParams in src/ops/quant/wgpu.rs).
struct QuantParams {
    format: u32,         // 0 Q8_0, 1 Q4_0, 2 Q4_1, 3 NF4, 4 NF4 with double quantisation
    absmax_offset: u32,  // byte offsets of the NF4 state in `w`
    nested_offset: u32,
    code_offset: u32,
    offset: f32,         // the mean double quantisation subtracted from absmax
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

// Bytes of ggml's blocks (BlockQ8_0, BlockQ4_0, BlockQ4_1 in src/ops/quant/formats.rs).
const BLOCK_Q8_0_BYTES: u32 = 34u;
const BLOCK_Q4_0_BYTES: u32 = 18u;
const BLOCK_Q4_1_BYTES: u32 = 20u;

var<private> NF4: array<f32, 16> = array<f32, 16>(
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
);

fn byte_at(addr: u32) -> u32 {
    return (w[addr >> 2u] >> ((addr & 3u) * 8u)) & 0xffu;
}

// An f16 at an even byte address.
fn f16_at(addr: u32) -> f32 {
    return unpack2x16float(w[addr >> 2u])[(addr >> 1u) & 1u];
}

// An f32 at a 4-aligned byte address.
fn f32_at(addr: u32) -> f32 {
    return bitcast<f32>(w[addr >> 2u]);
}

fn block_size() -> u32 {
    return select(32u, 64u, QUANT_FORMAT >= 3u);
}

// The scale of block b.
fn block_scale(b: u32) -> f32 {
    switch QUANT_FORMAT {
        case 0u: { return f16_at(b * BLOCK_Q8_0_BYTES); }
        case 1u: { return f16_at(b * BLOCK_Q4_0_BYTES); }
        case 2u: { return f16_at(b * BLOCK_Q4_1_BYTES); }
        case 3u: { return f32_at(params.q.absmax_offset + 4u * b); }
        default: {
            let code = f32_at(params.q.code_offset + 4u * byte_at(params.q.absmax_offset + b));
            return code * f32_at(params.q.nested_offset + 4u * (b / 256u)) + params.q.offset;
        }
    }
}

// The minimum of block b, added to each of its weights: Q4_1's `m`, zero otherwise.
fn block_min(b: u32) -> f32 {
    if (QUANT_FORMAT == 2u) {
        return f16_at(b * BLOCK_Q4_1_BYTES + 2u);
    }
    return 0.0;
}

// The unscaled value of element e: the integer of Q8_0/Q4_0/Q4_1 (Q4_0's centred), the NF4
// code value.
fn block_code(e: u32) -> f32 {
    let j = e % 32u;
    switch QUANT_FORMAT {
        case 0u: {
            let q = byte_at((e / 32u) * BLOCK_Q8_0_BYTES + 2u + j);
            return f32(bitcast<i32>(q << 24u) >> 24u);
        }
        case 1u, 2u: {
            // ggml's 4-bit packing: byte i holds weight i (low nibble) and i + 16 (high).
            let q41 = QUANT_FORMAT == 2u;
            let start = (e / 32u) * select(BLOCK_Q4_0_BYTES, BLOCK_Q4_1_BYTES, q41) + select(2u, 4u, q41);
            let byte = byte_at(start + (j & 15u));
            let q = i32(select(byte & 15u, byte >> 4u, j >= 16u));
            return f32(select(q - 8, q, q41));
        }
        default: {
            let byte = byte_at(e >> 1u);
            return NF4[select(byte >> 4u, byte & 15u, (e & 1u) == 1u)];
        }
    }
}

// Weight of a code in a block of this scale and minimum. Only Q4_1 adds its minimum, so the
// others keep the sign of a zero product as the CPU does.
fn weight_of(code: f32, scale: f32, minimum: f32) -> f32 {
    let product = code * scale;
    if (QUANT_FORMAT == 2u) {
        return product + minimum;
    }
    return product;
}

fn quant_weight(e: u32) -> f32 {
    let b = e / block_size();
    return weight_of(block_code(e), block_scale(b), block_min(b));
}
