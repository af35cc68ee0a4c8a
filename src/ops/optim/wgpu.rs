//! WGSL launchers for the optimizer: shaders generated per group of up to 16 tensors (as
//! many as the adapter's storage-binding limit allows), so a step is one norm dispatch per
//! group, one reduction, and one step dispatch per group — not one per tensor.

use super::{ParamSlot, StepConstants, StepReport};
use crate::device::wgpu::WgpuDevice;
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input};
use crate::kernels::wgsl::{OPTIM_NORM as NORM, OPTIM_REDUCE as REDUCE, OPTIM_STEP as STEP};
use crate::{DType, Result, Tensor};
use std::fmt::Write;

/// Elements per workgroup of the norm shader (its CHUNK) and of the step shader.
const NORM_CHUNK: usize = 4096;
const STEP_CHUNK: usize = 512;
/// Tensors per generated shader (the size of its `info` array).
const MAX_GROUP: usize = 16;

/// Tensors per shader: up to 7 storage bindings each, plus one shared.
fn group_size(dev: &WgpuDevice) -> usize {
    let limit = dev.device.limits().max_storage_buffers_per_shader_stage as usize;
    (limit.saturating_sub(1) / 7).clamp(1, MAX_GROUP)
}

/// `info` (elements, first workgroup) for each tensor of a group, padded to 16 vec4s, and
/// the group's workgroup count.
/// `keys[j]` fills z (the stochastic-rounding key of tensor j).
fn info(ns: &[usize], per_workgroup: usize, keys: &[u32]) -> Result<(Vec<u32>, usize)> {
    let mut words = vec![0u32; 4 * MAX_GROUP];
    let mut first = 0usize;
    for (j, &n) in ns.iter().enumerate() {
        words[4 * j] = fits_u32("parameter elements", n)?;
        words[4 * j + 1] = fits_u32("workgroups", first)?;
        words[4 * j + 2] = keys.get(j).copied().unwrap_or(0);
        first += n.div_ceil(per_workgroup).max(1);
    }
    Ok((words, first))
}

/// `fn <name>(g: u32, li: u32, …)`: an if-chain sending workgroup g to its tensor's body.
fn route(name: &str, extra_params: &str, ret: &str, bodies: &[String]) -> String {
    let mut src = format!("fn {name}(g: u32, li: u32{extra_params}){ret} {{\n");
    for (j, body) in bodies.iter().enumerate() {
        if j + 1 < bodies.len() {
            let _ = writeln!(src, "    if (g < params.info[{}].y) {{ {body} }}", j + 1);
        } else {
            let _ = writeln!(src, "    {{ {body} }}");
        }
    }
    src + "}\n"
}

pub(crate) fn step(slots: &mut [ParamSlot<'_>], c: &StepConstants) -> Result<StepReport> {
    let dev = slots[0].master.wgpu_device()?.clone();
    let device = slots[0].master.device();
    let group = group_size(&dev);

    // 1. Σ g² and the non-finite flag: per-workgroup partials, then one reduction.
    let norm_groups: usize = slots.iter().map(|s| s.master.elem_count().div_ceil(NORM_CHUNK).max(1)).sum();
    let partials = Tensor::empty(&[2 * norm_groups], DType::F32, &device)?;
    let mut base = 0usize;
    for chunk in slots.chunks(group) {
        let dtypes: Vec<DType> = chunk.iter().map(|s| s.grad.dtype()).collect();
        let key = format!("optim_norm_{dtypes:?}");
        let pipeline = dev.pipeline(&key, || {
            let mut src = String::new();
            for (j, d) in dtypes.iter().enumerate() {
                src += &wgsl_input(&format!("g{j}"), j as u32, *d, false);
            }
            let _ = writeln!(src, "@group(0) @binding({}) var<storage, read_write> partials: array<f32>;", dtypes.len());
            let _ = writeln!(
                src,
                "struct Params {{ info: array<vec4<u32>, {MAX_GROUP}>, groups: u32, base: u32 }}\n\
                 @group(0) @binding({}) var<uniform> params: Params;",
                dtypes.len() + 1
            );
            let bodies: Vec<String> = (0..dtypes.len())
                .map(|j| {
                    format!(
                        "let start = (g - params.info[{j}].y) * CHUNK; let end = min(params.info[{j}].x, start + CHUNK); \
                         var acc = vec2<f32>(0.0, 0.0); \
                         for (var i = start + li; i < end; i += 256u) {{ let x = load_g{j}(i); acc.x += x * x; \
                         if (not_finite(x)) {{ acc.y = 1.0; }} }} return acc;"
                    )
                })
                .collect();
            src += &route("partial", "", " -> vec2<f32>", &bodies);
            src + NORM
        })?;
        let ns: Vec<usize> = chunk.iter().map(|s| s.master.elem_count()).collect();
        let (mut params, groups) = info(&ns, NORM_CHUNK, &[])?;
        params.extend([fits_u32("workgroups", groups)?, fits_u32("workgroups", base)?, 0, 0]);
        let mut buffers: Vec<&wgpu::Buffer> = chunk.iter().map(|s| s.grad.wgpu_buffer()).collect::<Result<_>>()?;
        buffers.push(partials.wgpu_buffer()?);
        let (gx, gy) = grid_2d(groups);
        dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
        base += groups;
    }
    let result = Tensor::empty(&[2], DType::F32, &device)?;
    let reduce = dev.pipeline("optim_reduce", || REDUCE.to_string())?;
    dev.dispatch(
        &reduce,
        &[partials.wgpu_buffer()?, result.wgpu_buffer()?],
        &[fits_u32("partials", norm_groups)?],
        (1, 1, 1),
    )?;

    // 2. The step, reading the norm and the flag from `result`.
    let stochastic = c.sr_key.is_some();
    for (g, chunk) in slots.chunks_mut(group).enumerate() {
        let descs: Vec<(DType, Option<DType>, bool, bool)> = chunk
            .iter()
            .map(|s| (s.grad.dtype(), s.working.as_ref().map(|w| w.dtype()), s.anchor.is_some(), s.fisher.is_some()))
            .collect();
        let key = format!("optim_step_{descs:?}_{stochastic}");
        let pipeline = dev.pipeline(&key, || step_source(&descs, stochastic))?;
        let ns: Vec<usize> = chunk.iter().map(|s| s.master.elem_count()).collect();
        let keys: Vec<u32> = (0..chunk.len()).map(|j| c.slot_key(g * group + j)).collect();
        let (info_words, groups) = info(&ns, STEP_CHUNK, &keys)?;
        let mut params: Vec<u32> = [c.beta1, c.beta2, c.eps, c.decay, c.step_size, c.bc2_sqrt, c.lambda, c.max_norm]
            .iter()
            .map(|v| v.to_bits())
            .collect();
        params.extend([c.use_fisher as u32, 0, 0, 0]);
        params.extend(info_words);
        let mut buffers: Vec<&wgpu::Buffer> = Vec::new();
        for s in chunk.iter() {
            buffers.extend([s.master.wgpu_buffer()?, s.m.wgpu_buffer()?, s.v.wgpu_buffer()?, s.grad.wgpu_buffer()?]);
            if let Some(w) = s.working.as_ref() {
                buffers.push(w.wgpu_buffer()?);
            }
            if let Some(a) = s.anchor {
                buffers.push(a.wgpu_buffer()?);
            }
            if let Some(f) = s.fisher {
                buffers.push(f.wgpu_buffer()?);
            }
        }
        buffers.push(result.wgpu_buffer()?);
        let (gx, gy) = grid_2d(groups);
        dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
    }

    let bytes = result.to_bytes()?;
    let word = |i: usize| u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
    let norm = f32::from_bits(word(0)).sqrt();
    let skipped = word(1) != 0;
    Ok(StepReport { grad_norm: norm, clip_scale: if skipped { 1.0 } else { c.clip(norm) }, skipped })
}

/// The step shader for a group: per tensor j, bindings master, m, v, grad, then working,
/// anchor, fisher where present; then `result` and the uniform.
fn step_source(descs: &[(DType, Option<DType>, bool, bool)], stochastic: bool) -> String {
    let mut src = String::new();
    let mut b = 0u32;
    fn bind(src: &mut String, b: &mut u32, decl: String) {
        let _ = writeln!(src, "@group(0) @binding({b}) {decl}");
        *b += 1;
    }
    let mut bodies = Vec::new();
    for (j, &(grad, working, anchor, fisher)) in descs.iter().enumerate() {
        for role in ["master", "m", "v"] {
            bind(&mut src, &mut b, format!("var<storage, read_write> {role}{j}: array<f32>;"));
        }
        src += &wgsl_input(&format!("g{j}"), b, grad, false);
        b += 1;
        if let Some(w) = working {
            let ty = if w == DType::F32 { "f32" } else { "u32" };
            bind(&mut src, &mut b, format!("var<storage, read_write> working{j}: array<{ty}>;"));
        }
        if anchor {
            bind(&mut src, &mut b, format!("var<storage, read> anchor{j}: array<f32>;"));
        }
        if fisher {
            bind(&mut src, &mut b, format!("var<storage, read> fisher{j}: array<f32>;"));
        }
        let pull = match (anchor, fisher) {
            (false, _) => String::new(),
            (true, false) => format!("g = g + params.lambda * (theta - anchor{j}[i]);"),
            (true, true) => format!(
                "let pull = params.lambda * (theta - anchor{j}[i]); \
                 g = g + select(pull, fisher{j}[i] * pull, params.use_fisher != 0u);"
            ),
        };
        let store = match working {
            None => String::new(),
            Some(DType::F32) => format!(
                "if (2u * w < n) {{ working{j}[2u * w] = th.x; }} if (2u * w + 1u < n) {{ working{j}[2u * w + 1u] = th.y; }}"
            ),
            Some(DType::F16) => format!("if (2u * w < n) {{ working{j}[w] = pack2x16float(th); }}"),
            Some(DType::BF16) if stochastic => format!(
                "if (2u * w < n) {{ let key = params.info[{j}].z; \
                 working{j}[w] = bf16_stochastic(th.x, key, 2u * w) | (bf16_stochastic(th.y, key, 2u * w + 1u) << 16u); }}"
            ),
            Some(DType::BF16) => {
                format!("if (2u * w < n) {{ working{j}[w] = to_bf16(th.x) | (to_bf16(th.y) << 16u); }}")
            }
        };
        let _ = writeln!(
            src,
            "fn slot{j}(w: u32, clip: f32) {{\n    let n = params.info[{j}].x;\n    var th = vec2<f32>(0.0, 0.0);\n    \
             for (var e = 0u; e < 2u; e++) {{\n        let i = 2u * w + e;\n        if (i < n) {{\n            \
             let theta = master{j}[i];\n            var g = load_g{j}(i) * clip;\n            {pull}\n            \
             let r = update(theta, m{j}[i], v{j}[i], g);\n            \
             master{j}[i] = r.x; m{j}[i] = r.y; v{j}[i] = r.z; th[e] = r.x;\n        }}\n    }}\n    {store}\n}}"
        );
        bodies.push(format!("slot{j}((g - params.info[{j}].y) * 256u + li, clip); return;"));
    }
    bind(&mut src, &mut b, "var<storage, read> result: array<u32>;".to_string());
    let _ = writeln!(
        src,
        "struct Params {{ beta1: f32, beta2: f32, eps: f32, decay: f32, step_size: f32, bc2_sqrt: f32, lambda: f32, \
         max_norm: f32, use_fisher: u32, pad0: u32, pad1: u32, pad2: u32, info: array<vec4<u32>, {MAX_GROUP}> }}\n\
         @group(0) @binding({b}) var<uniform> params: Params;"
    );
    src += &route("dispatch", ", clip: f32", "", &bodies);
    src + STEP
}

pub(crate) fn fisher_accumulate(fisher: &mut Tensor, grad: &Tensor, inv_count: f32) -> Result<()> {
    let dev = fisher.wgpu_device()?.clone();
    let key = format!("fisher_accumulate_{}", grad.dtype());
    let pipeline = dev.pipeline(&key, || {
        format!(
            "@group(0) @binding(0) var<storage, read_write> fisher: array<f32>;\n{}\
             struct Params {{ n: u32, groups_x: u32, inv: f32 }}\n@group(0) @binding(2) var<uniform> params: Params;\n\
             @compute @workgroup_size(256)\nfn main(@builtin(workgroup_id) wg: vec3<u32>, \
             @builtin(local_invocation_index) li: u32) {{\n    let i = (wg.y * params.groups_x + wg.x) * 256u + li;\n    \
             if (i < params.n) {{ let g = load_g(i); fisher[i] = fisher[i] + (g * g - fisher[i]) * params.inv; }}\n}}\n",
            wgsl_input("g", 1, grad.dtype(), false)
        )
    })?;
    let n = fisher.elem_count();
    let (gx, gy) = grid_2d(n.div_ceil(256));
    let params = [fits_u32("elements", n)?, gx, inv_count.to_bits()];
    dev.dispatch(&pipeline, &[fisher.wgpu_buffer()?, grad.wgpu_buffer()?], &params, (gx, gy, 1))
}
