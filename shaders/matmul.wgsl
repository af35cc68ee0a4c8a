// C[batch] = op(A[batch]) · op(B[batch]), f32 accumulation, f32 output.
//
// One workgroup of 16×16 invocations computes a 64×64 tile of C; each invocation keeps a
// 4×4 block of it in registers. Per 16-deep step the workgroup stages a 64×16 tile of A and
// a 16×64 tile of B in workgroup memory (zero past the matrix edges), converted to f32.
// Transposes only change how the tiles are loaded (coalesced along the stored rows).
//
// The Rust side prepends the bindings of A and B (0 and 1) with `load_a(i) -> f32` and
// `load_b(i) -> f32`, which read element i whatever the stored form (f32; f16 natively or
// packed in u32; bf16 packed in u32; quantized blocks decoded on the fly), and
// `struct Params` with `mm: MatmulParams` (below; a loader or an epilogue adds its own
// parameters beside it: src/ops/matmul/wgpu.rs).
// It also prepends four hooks through which an epilogue joins the product (plain matmul:
// empty ones; the fused LoRA layer: shaders/lora_fused.wgsl):
//     extra_load(k0, li)     stage more of the k-tile, before the barrier
//     extra_mac(li)          use the staged k-tile, after it
//     extra_epilogue(row0, col0, first_col, lid, &acc)
//                            after the k-loop; may run more k-steps through `mac_tile`
//     finish(v, gj) -> f32   the value written at column gj
// Dispatch: (ceil(n / 64), ceil(m / 64), batch).

// The product's sizes (MatmulParams in src/ops/matmul/wgpu.rs).
struct MatmulParams {
    m: u32,
    n: u32,
    k: u32,
    lda: u32,
    ldb: u32,
    stride_a: u32,
    stride_b: u32,
    trans_a: u32,
    trans_b: u32,
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(2) var<storage, read_write> c: array<f32>;
@group(0) @binding(3) var<uniform> params: Params;

const TILE_M: u32 = 64u;
const TILE_N: u32 = 64u;
const TILE_K: u32 = 16u;
const THREADS: u32 = 256u;

// Both tiles are stored k-major: tile_a[kk * TILE_M + mm], tile_b[kk * TILE_N + nn].
var<workgroup> tile_a: array<f32, 1024>;
var<workgroup> tile_b: array<f32, 1024>;

// acc += the staged tiles' product over one TILE_K-deep step.
fn mac_tile(lid: vec3<u32>, acc: ptr<function, array<array<f32, 4>, 4>>) {
    for (var kk = 0u; kk < TILE_K; kk++) {
        var av: array<f32, 4>;
        var bv: array<f32, 4>;
        for (var i = 0u; i < 4u; i++) {
            av[i] = tile_a[kk * TILE_M + lid.y * 4u + i];
            bv[i] = tile_b[kk * TILE_N + lid.x * 4u + i];
        }
        for (var i = 0u; i < 4u; i++) {
            for (var j = 0u; j < 4u; j++) {
                (*acc)[i][j] = fma(av[i], bv[j], (*acc)[i][j]);
            }
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn main(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) li: u32,
) {
    let batch = wg.z;
    let row0 = wg.y * TILE_M;
    let col0 = wg.x * TILE_N;
    let a_base = batch * params.mm.stride_a;
    let b_base = batch * params.mm.stride_b;

    var acc: array<array<f32, 4>, 4>;
    for (var i = 0u; i < 4u; i++) {
        for (var j = 0u; j < 4u; j++) {
            acc[i][j] = 0.0;
        }
    }

    for (var k0 = 0u; k0 < params.mm.k; k0 += TILE_K) {
        for (var t = 0u; t < 4u; t++) {
            let e = li + t * THREADS;
            // Consecutive invocations walk the stored row, so loads coalesce.
            var mm = e / TILE_K;
            var kk = e % TILE_K;
            if (params.mm.trans_a != 0u) {
                mm = e % TILE_M;
                kk = e / TILE_M;
            }
            let gi = row0 + mm;
            let gk = k0 + kk;
            var v = 0.0;
            if (gi < params.mm.m && gk < params.mm.k) {
                let idx = select(gi * params.mm.lda + gk, gk * params.mm.lda + gi, params.mm.trans_a != 0u);
                v = load_a(a_base + idx);
            }
            tile_a[kk * TILE_M + mm] = v;
        }
        for (var t = 0u; t < 4u; t++) {
            let e = li + t * THREADS;
            var nn = e % TILE_N;
            var kk = e / TILE_N;
            if (params.mm.trans_b != 0u) {
                nn = e / TILE_K;
                kk = e % TILE_K;
            }
            let gj = col0 + nn;
            let gk = k0 + kk;
            var v = 0.0;
            if (gj < params.mm.n && gk < params.mm.k) {
                let idx = select(gk * params.mm.ldb + gj, gj * params.mm.ldb + gk, params.mm.trans_b != 0u);
                v = load_b(b_base + idx);
            }
            tile_b[kk * TILE_N + nn] = v;
        }
        extra_load(k0, li);
        workgroupBarrier();
        mac_tile(lid, &acc);
        extra_mac(li);
        workgroupBarrier();
    }
    extra_epilogue(row0, col0, wg.x == 0u, lid, &acc);

    let c_base = batch * params.mm.m * params.mm.n;
    for (var i = 0u; i < 4u; i++) {
        let gi = row0 + lid.y * 4u + i;
        if (gi < params.mm.m) {
            for (var j = 0u; j < 4u; j++) {
                let gj = col0 + lid.x * 4u + j;
                if (gj < params.mm.n) {
                    c[c_base + gi * params.mm.n + gj] = finish(acc[i][j], gj);
                }
            }
        }
    }
}
