// Elementwise map: out[i] = apply(i) for every element, computed in f32.
//
// Each invocation writes one 32-bit word of the output: one f32, or two packed f16/bf16
// values, so no two invocations share a word. The Rust side prepends the input bindings
// with their `load_*(i) -> f32`, `apply(i) -> f32` for the op (add, mul, scale, cast),
// `ELEMS` (elements per word) and `store_word(w, v)` for the output dtype.
// Dispatch: 2-D, (groups_x, rows) workgroups of 256 covering `words` invocations.

@compute @workgroup_size(256)
fn main(@builtin(workgroup_id) wg: vec3<u32>, @builtin(local_invocation_index) li: u32) {
    let w = (wg.y * params.groups_x + wg.x) * 256u + li;
    if (w >= params.words) {
        return;
    }
    var v = vec2<f32>(0.0, 0.0);
    for (var e = 0u; e < ELEMS; e++) {
        let i = w * ELEMS + e;
        if (i < params.len) {
            v[e] = apply(i);
        }
    }
    store_word(w, v);
}
