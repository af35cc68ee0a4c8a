// The fused LoRA layer's hooks into shaders/matmul.wgsl: y = x·Wᵀ + bias + s·xa·B_loraᵀ
// with A = x [m, k] and B = Wᵀ (dense or decoded from quantized blocks).
//
// Bindings after matmul's: la = A_lora [r, k] (f32), xa [m, r] (written when computed here,
// read otherwise), lb = B_lora [n, r], bias [n] (one unused element when there is none).
// `Params` holds `lora: LoraParams` beside matmul's. The Rust side prepends
// `const XA_IN_KERNEL: bool`:
//   true   r ≤ 32: xa comes out of the same k-loop from the x tiles already staged (x read
//          once for both products); invocation li accumulates row li % 64 of the tile
//          against rank columns li / 64 + 4q; the workgroups of column 0 write it out.
//   false  xa was computed beforehand (dropout on the LoRA input, or r > 32).
// After the k-loop the delta runs as extra k-steps of 16 rank columns through mac_tile:
// tile_a[jj][row] = s·xa(row, j0 + jj), tile_b[jj][col] = B_lora(col, j0 + jj).

// The delta's rank and scale, and whether a bias joins (LoraParams in src/ops/lora/wgpu.rs).
struct LoraParams {
    rank: u32,
    scale: f32,
    has_bias: u32,
    pad0: u32,
}

@group(0) @binding(4) var<storage, read> la: array<f32>;
@group(0) @binding(5) var<storage, read_write> xa: array<f32>;
@group(0) @binding(6) var<storage, read> lb: array<f32>;
@group(0) @binding(7) var<storage, read> bias: array<f32>;

const XA_RANK: u32 = 32u;
var<workgroup> tile_la: array<f32, 512>;  // [kk][j], TILE_K × XA_RANK
var<private> xa_acc: array<f32, 8>;       // XA_RANK / 4

fn extra_load(k0: u32, li: u32) {
    if (!XA_IN_KERNEL) {
        return;
    }
    for (var t = 0u; t < 2u; t++) {
        let e = li + t * THREADS;
        let j = e / TILE_K;
        let gk = k0 + e % TILE_K;
        var v = 0.0;
        if (j < params.lora.rank && gk < params.mm.k) {
            v = la[j * params.mm.k + gk];
        }
        tile_la[(e % TILE_K) * XA_RANK + j] = v;
    }
}

fn extra_mac(li: u32) {
    if (!XA_IN_KERNEL) {
        return;
    }
    let row = li % TILE_M;
    let lj = li / TILE_M;
    for (var kk = 0u; kk < TILE_K; kk++) {
        let a = tile_a[kk * TILE_M + row];
        for (var q = 0u; q < XA_RANK / 4u; q++) {
            xa_acc[q] = fma(a, tile_la[kk * XA_RANK + lj + 4u * q], xa_acc[q]);
        }
    }
}

fn extra_epilogue(row0: u32, col0: u32, first_col: bool, lid: vec3<u32>, acc: ptr<function, array<array<f32, 4>, 4>>) {
    let li = lid.y * 16u + lid.x;
    let scale = params.lora.scale;
    let r = params.lora.rank;
    for (var j0 = 0u; j0 < r; j0 += TILE_K) {
        if (XA_IN_KERNEL) {
            let row = li % TILE_M;
            let gi = row0 + row;
            for (var q = 0u; q < XA_RANK / 4u; q++) {
                let j = li / TILE_M + 4u * q;
                if (j >= j0 && j < j0 + TILE_K) {
                    tile_a[(j - j0) * TILE_M + row] = scale * xa_acc[q];
                    if (first_col && gi < params.mm.m && j < r) {
                        xa[gi * r + j] = xa_acc[q];
                    }
                }
            }
        } else {
            for (var t = 0u; t < 4u; t++) {
                let e = li + t * THREADS;
                let gi = row0 + e / TILE_K;
                let j = j0 + e % TILE_K;
                var v = 0.0;
                if (gi < params.mm.m && j < r) {
                    v = scale * xa[gi * r + j];
                }
                tile_a[(e % TILE_K) * TILE_M + e / TILE_K] = v;
            }
        }
        for (var t = 0u; t < 4u; t++) {
            let e = li + t * THREADS;
            let gj = col0 + e / TILE_K;
            let j = j0 + e % TILE_K;
            var v = 0.0;
            if (gj < params.mm.n && j < r) {
                v = lb[gj * r + j];
            }
            tile_b[(e % TILE_K) * TILE_N + e / TILE_K] = v;
        }
        workgroupBarrier();
        mac_tile(lid, acc);
        workgroupBarrier();
    }
}

fn finish(v: f32, gj: u32) -> f32 {
    if (params.lora.has_bias != 0u) {
        return v + bias[gj];
    }
    return v;
}
