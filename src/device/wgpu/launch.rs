//! What every WGSL launcher needs: bindings and loaders for an operand's dtype, output
//! stores, grid shapes and checked conversions of sizes to the shaders' u32 indices.

use crate::{Error, Result};

/// WGSL that binds input `name` at `binding` and defines `load_<name>(i: u32) -> f32`
/// reading element `i` as f32: f32 directly; f16 natively (`array<f16>`, needs the device's
/// SHADER_F16 and `enable f16;`) or packed two per u32; bf16 packed two per u32. Element 0
/// of a packed word is its low half (little-endian, as the host stores it). Integer operands
/// load as their f32 value; the float ops refuse integer tensors before they get here.
pub(crate) fn wgsl_input(name: &str, binding: u32, dtype: crate::DType, native_f16: bool) -> String {
    use crate::DType;
    let decl = |ty: &str| format!("@group(0) @binding({binding}) var<storage, read> {name}: array<{ty}>;\n");
    match dtype {
        DType::F32 => decl("f32") + &format!("fn load_{name}(i: u32) -> f32 {{ return {name}[i]; }}\n"),
        DType::F16 if native_f16 => {
            decl("f16") + &format!("fn load_{name}(i: u32) -> f32 {{ return f32({name}[i]); }}\n")
        }
        DType::F16 => {
            decl("u32")
                + &format!("fn load_{name}(i: u32) -> f32 {{ return unpack2x16float({name}[i >> 1u])[i & 1u]; }}\n")
        }
        DType::BF16 => {
            decl("u32")
                + &format!(
                    "fn load_{name}(i: u32) -> f32 {{\n    let w = {name}[i >> 1u];\n    \
                     return bitcast<f32>(select(w << 16u, w & 0xffff0000u, (i & 1u) == 1u));\n}}\n"
                )
        }
        DType::U32 => decl("u32") + &format!("fn load_{name}(i: u32) -> f32 {{ return f32({name}[i]); }}\n"),
        DType::I32 => decl("i32") + &format!("fn load_{name}(i: u32) -> f32 {{ return f32({name}[i]); }}\n"),
    }
}

/// WGSL that binds the output at `binding` as 32-bit words and defines `ELEMS` (elements
/// per word) and `store_word(w: u32, v: vec2<f32>)`, rounding to the output dtype.
/// bf16 rounds to nearest even in integer arithmetic; NaN stays NaN. Integer outputs store
/// the value rounded toward zero (the float ops refuse integer tensors before they get here).
pub(crate) fn wgsl_output_words(binding: u32, dtype: crate::DType) -> String {
    use crate::DType;
    let decl = |ty: &str| format!("@group(0) @binding({binding}) var<storage, read_write> out: array<{ty}>;\n");
    match dtype {
        DType::F32 => decl("f32") + "const ELEMS: u32 = 1u;\nfn store_word(w: u32, v: vec2<f32>) { out[w] = v.x; }\n",
        DType::F16 => {
            decl("u32") + "const ELEMS: u32 = 2u;\nfn store_word(w: u32, v: vec2<f32>) { out[w] = pack2x16float(v); }\n"
        }
        DType::BF16 => {
            decl("u32")
                + "const ELEMS: u32 = 2u;\n\
                   fn to_bf16(x: f32) -> u32 {\n    let b = bitcast<u32>(x);\n    \
                   if ((b & 0x7fffffffu) > 0x7f800000u) { return (b >> 16u) | 0x40u; }\n    \
                   return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;\n}\n\
                   fn store_word(w: u32, v: vec2<f32>) { out[w] = to_bf16(v.x) | (to_bf16(v.y) << 16u); }\n"
        }
        DType::U32 => {
            decl("u32") + "const ELEMS: u32 = 1u;\nfn store_word(w: u32, v: vec2<f32>) { out[w] = u32(v.x); }\n"
        }
        DType::I32 => {
            decl("i32") + "const ELEMS: u32 = 1u;\nfn store_word(w: u32, v: vec2<f32>) { out[w] = i32(v.x); }\n"
        }
    }
}

/// Splits `groups` workgroups over x and y so neither exceeds the per-dimension limit;
/// returns (groups_x, groups_y).
pub(crate) fn grid_2d(groups: usize) -> (u32, u32) {
    const MAX_X: usize = 65535;
    let x = groups.clamp(1, MAX_X);
    (x as u32, groups.div_ceil(x).max(1).min(u32::MAX as usize) as u32)
}

/// `Err(Unsupported)` unless `v` fits the u32 indices WGSL shaders use.
pub(crate) fn fits_u32(what: &str, v: usize) -> Result<u32> {
    u32::try_from(v).map_err(|_| Error::Unsupported(format!("{what} = {v} exceeds WGSL's 32-bit indexing")))
}

/// WGSL of the roundings the word stores below use: `bf16_bits(x)`, x rounded to bf16 to
/// nearest even in integer arithmetic (NaN stays NaN), and `round_to_f16(x)` and
/// `round_to_bf16(x)`, x rounded and widened back to f32. Included once per shader that
/// uses [`wgsl_word_output`].
pub(crate) const WGSL_ROUNDING: &str = "fn bf16_bits(x: f32) -> u32 {\n    let b = bitcast<u32>(x);\n    \
     if ((b & 0x7fffffffu) > 0x7f800000u) { return (b >> 16u) | 0x40u; }\n    \
     return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;\n}\n\
     fn round_to_f16(x: f32) -> f32 { return unpack2x16float(pack2x16float(vec2<f32>(x, 0.0))).x; }\n\
     fn round_to_bf16(x: f32) -> f32 { return bitcast<f32>(bf16_bits(x) << 16u); }\n";

/// Elements of `dtype` in one 32-bit word: 1 for f32, 2 for the packed halves.
pub(crate) fn elems_per_word(dtype: crate::DType) -> u32 {
    (4 / dtype.size_in_bytes()) as u32
}

/// WGSL that binds output `name` at `binding` as 32-bit words of `dtype` and defines
/// `store_<name>(w: u32, v: vec2<f32>)` writing word w: v.x alone for f32, v.x in the low
/// half and v.y in the high half for f16 and bf16, rounded to nearest even. Needs
/// [`WGSL_ROUNDING`] in the shader. (Integer outputs store v.x truncated; the float ops
/// refuse integer tensors before they get here.)
pub(crate) fn wgsl_word_output(name: &str, binding: u32, dtype: crate::DType) -> String {
    use crate::DType;
    let (ty, body) = match dtype {
        DType::F32 => ("f32", "v.x"),
        DType::F16 => ("u32", "pack2x16float(v)"),
        DType::BF16 => ("u32", "bf16_bits(v.x) | (bf16_bits(v.y) << 16u)"),
        DType::U32 => ("u32", "u32(v.x)"),
        DType::I32 => ("i32", "i32(v.x)"),
    };
    format!(
        "@group(0) @binding({binding}) var<storage, read_write> {name}: array<{ty}>;\n\
         fn store_{name}(w: u32, v: vec2<f32>) {{ {name}[w] = {body}; }}\n"
    )
}

/// The WGSL expression rounding the f32 expression `v` to `dtype` and back (for a value
/// a shader stores in that dtype and then computes with). Needs [`WGSL_ROUNDING`].
pub(crate) fn wgsl_round(dtype: crate::DType, v: &str) -> String {
    use crate::DType;
    match dtype {
        DType::F32 | DType::U32 | DType::I32 => v.to_string(),
        DType::F16 => format!("round_to_f16({v})"),
        DType::BF16 => format!("round_to_bf16({v})"),
    }
}
