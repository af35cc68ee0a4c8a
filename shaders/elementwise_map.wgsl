// Elementwise map: out[i] = apply(i) for every element, computed in f32.
//
// Each invocation writes one 32-bit word of the output: one f32, or two packed f16/bf16
// values, so no two invocations share a word. The Rust side prepends the input bindings
// with their `load_*(i) -> f32`, `apply(i) -> f32` for the op (add, mul, scale, cast),
// `ELEMS` (elements per word) and `store_word(w, v)` for the output dtype, and
// `struct Params` with `map: MapParams` (a decoding loader adds its own beside it).
// Dispatch: 2-D, (groups_x, rows) workgroups of 256 covering `words` invocations.

// The map's extent and the op's scalars (MapParams in src/ops/elementwise/wgpu.rs): `s` a
// factor, `u0` and `u1` integers (add_bias: the row length; dropout: key and threshold).
struct MapParams {
    len: u32,
    words: u32,
    groups_x: u32,
    s: f32,
    u0: u32,
    u1: u32,
    pad0: u32,
    pad1: u32,
}

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let w = (wg.y * params.map.groups_x + wg.x) * 256u + li;
    if (w >= params.map.words) {
        return;
    }
    var v = vec2<f32>(0.0, 0.0);
    for (var e = 0u; e < ELEMS; e++) {
        let i = w * ELEMS + e;
        if (i < params.map.len) {
            v[e] = apply(i);
        }
    }
    store_word(w, v);
}
