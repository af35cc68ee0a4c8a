//! WGSL launchers for the optimizer: shaders generated per group of up to 16 tensors (as
//! many as the adapter's storage-binding limit allows), so a step is one norm dispatch per
//! group, one reduction, and one step dispatch per group — not one per tensor.

use super::{AdamWParams, ParamSlot, StepConstants, StepReport};
use crate::device::wgpu::WgpuDevice;
use crate::device::wgpu::launch::{fits_u32, grid_2d, wgsl_input};
use crate::kernels::{kernel_params, wgsl};
use crate::{DType, Result, Tensor};
use std::fmt::Write;
use std::sync::Arc;

/// Elements per workgroup of the norm shader (its CHUNK) and of the step shader.
const NORM_CHUNK: usize = 4096;
const STEP_CHUNK: usize = 512;
/// Tensors per generated shader (the size of its `info` array; MAX_GROUP in
/// `shaders/optim_slots.wgsl`).
const MAX_GROUP: usize = 16;

kernel_params! {
    /// One tensor of a group (`struct SlotInfo` in `shaders/optim_slots.wgsl`).
    struct SlotInfo {
        len: u32,
        first_group: u32,
        key: u32,
        pad0: u32,
    }
}

kernel_params! {
    /// `struct OptimNormParams` in `shaders/optim_norm.wgsl`.
    struct OptimNormParams {
        info: [SlotInfo; 16],
        groups: u32,
        base: u32,
        pad0: u32,
        pad1: u32,
    }
}

kernel_params! {
    /// `struct OptimReduceParams` in `shaders/optim_reduce.wgsl`.
    struct OptimReduceParams {
        count: u32,
        pad0: u32,
        pad1: u32,
        pad2: u32,
    }
}

kernel_params! {
    /// `struct OptimStepParams` in `shaders/optim_step.wgsl`.
    struct OptimStepParams {
        adamw: AdamWParams,
        info: [SlotInfo; 16],
    }
}

kernel_params! {
    /// `struct OptimFisherParams` in `shaders/optim_fisher.wgsl`.
    struct OptimFisherParams {
        n: u32,
        groups_x: u32,
        inv_count: f32,
        pad0: u32,
    }
}

/// Tensors per shader: up to 7 storage bindings each, plus one shared.
fn group_size(dev: &WgpuDevice) -> usize {
    let limit = dev.device.limits().max_storage_buffers_per_shader_stage as usize;
    (limit.saturating_sub(1) / 7).clamp(1, MAX_GROUP)
}

/// The `info` of a group's tensors, `per_workgroup` elements to a workgroup, and the
/// group's workgroup count. `keys[j]` is tensor j's stochastic-rounding key.
fn info(ns: &[usize], per_workgroup: usize, keys: &[u32]) -> Result<([SlotInfo; MAX_GROUP], usize)> {
    let mut info = [SlotInfo::default(); MAX_GROUP];
    let mut first = 0usize;
    for (j, &n) in ns.iter().enumerate() {
        info[j] = SlotInfo {
            len: fits_u32("parameter elements", n)?,
            first_group: fits_u32("workgroups", first)?,
            key: keys.get(j).copied().unwrap_or(0),
            pad0: 0,
        };
        first += n.div_ceil(per_workgroup).max(1);
    }
    Ok((info, first))
}

/// `fn <name>(g: u32, li: u32, …)`: an if-chain sending workgroup g to its tensor's body.
fn route(name: &str, extra_params: &str, ret: &str, bodies: &[String]) -> String {
    let mut src = format!("fn {name}(g: u32, li: u32{extra_params}){ret} {{\n");
    for (j, body) in bodies.iter().enumerate() {
        if j + 1 < bodies.len() {
            let _ = writeln!(src, "    if (g < params.info[{}].first_group) {{ {body} }}", j + 1);
        } else {
            let _ = writeln!(src, "    {{ {body} }}");
        }
    }
    src + "}\n"
}

pub(crate) fn step(dev: &Arc<WgpuDevice>, slots: &mut [ParamSlot<'_>], c: &StepConstants) -> Result<StepReport> {
    let result = grad_norm(dev, slots)?;
    update(dev, slots, c, &result)?;
    let bytes = result.to_bytes()?;
    let word = |i: usize| u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]]);
    let norm = f32::from_bits(word(0)).sqrt();
    let skipped = word(1) != 0;
    Ok(StepReport { grad_norm: norm, clip_scale: if skipped { 1.0 } else { c.clip(norm) }, skipped })
}

/// Σ g² and the non-finite flag over every gradient, as `[Σ g² (f32 bits), flag]` on the
/// device: per-workgroup partials (one dispatch per group of tensors), then one reduction.
fn grad_norm(dev: &Arc<WgpuDevice>, slots: &[ParamSlot<'_>]) -> Result<Tensor> {
    let device = slots[0].master.device();
    let norm_groups: usize = slots.iter().map(|s| s.master.elem_count().div_ceil(NORM_CHUNK).max(1)).sum();
    let partials = Tensor::empty(&[2 * norm_groups], DType::F32, &device)?;
    let mut base = 0usize;
    for chunk in slots.chunks(group_size(dev)) {
        let dtypes: Vec<DType> = chunk.iter().map(|s| s.grad.dtype()).collect();
        let pipeline = dev.pipeline(&format!("optim_norm_{dtypes:?}"), || norm_source(&dtypes))?;
        let ns: Vec<usize> = chunk.iter().map(|s| s.master.elem_count()).collect();
        let (info, groups) = info(&ns, NORM_CHUNK, &[])?;
        let params = OptimNormParams {
            info,
            groups: fits_u32("workgroups", groups)?,
            base: fits_u32("workgroups", base)?,
            ..Default::default()
        };
        let mut buffers: Vec<&wgpu::Buffer> = chunk.iter().map(|s| s.grad.wgpu_buffer()).collect::<Result<_>>()?;
        buffers.push(partials.wgpu_buffer()?);
        let (gx, gy) = grid_2d(groups);
        dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
        base += groups;
    }
    let result = Tensor::empty(&[2], DType::F32, &device)?;
    let reduce = dev.pipeline("optim_reduce", || wgsl::OPTIM_REDUCE.to_string())?;
    let params = OptimReduceParams { count: fits_u32("partials", norm_groups)?, ..Default::default() };
    dev.dispatch(&reduce, &[partials.wgpu_buffer()?, result.wgpu_buffer()?], &params, (1, 1, 1))?;
    Ok(result)
}

/// The norm shader for a group of gradients of `dtypes`.
fn norm_source(dtypes: &[DType]) -> String {
    let mut src = wgsl::OPTIM_SLOTS.to_string();
    for (j, d) in dtypes.iter().enumerate() {
        src += &wgsl_input(&format!("g{j}"), j as u32, *d, false);
    }
    let _ = writeln!(src, "@group(0) @binding({}) var<storage, read_write> partials: array<f32>;", dtypes.len());
    let _ = writeln!(src, "@group(0) @binding({}) var<uniform> params: OptimNormParams;", dtypes.len() + 1);
    let bodies: Vec<String> = (0..dtypes.len())
        .map(|j| {
            format!(
                "let start = (g - params.info[{j}].first_group) * CHUNK; \
                 let end = min(params.info[{j}].len, start + CHUNK); \
                 var acc = vec2<f32>(0.0, 0.0); \
                 for (var i = start + li; i < end; i += 256u) {{ let x = load_g{j}(i); acc.x += x * x; \
                 if (not_finite(x)) {{ acc.y = 1.0; }} }} return acc;"
            )
        })
        .collect();
    src += &route("partial", "", " -> vec2<f32>", &bodies);
    src + wgsl::OPTIM_NORM
}

/// The update, one dispatch per group of tensors, reading the norm and the flag from
/// `result` on the device.
fn update(dev: &Arc<WgpuDevice>, slots: &mut [ParamSlot<'_>], c: &StepConstants, result: &Tensor) -> Result<()> {
    let group = group_size(dev);
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
        let (info, groups) = info(&ns, STEP_CHUNK, &keys)?;
        let params = OptimStepParams { adamw: c.adamw, info };
        let mut buffers: Vec<&wgpu::Buffer> = Vec::new();
        for s in chunk.iter() {
            buffers.extend([s.master.wgpu_buffer()?, s.m.wgpu_buffer()?, s.v.wgpu_buffer()?, s.grad.wgpu_buffer()?]);
            let optional = [s.working.as_deref(), s.anchor, s.fisher];
            for t in optional.into_iter().flatten() {
                buffers.push(t.wgpu_buffer()?);
            }
        }
        buffers.push(result.wgpu_buffer()?);
        let (gx, gy) = grid_2d(groups);
        dev.dispatch(&pipeline, &buffers, &params, (gx, gy, 1))?;
    }
    Ok(())
}

/// The step shader for a group: per tensor j, bindings master, m, v, grad, then working,
/// anchor, fisher where present; then `result` and the uniform.
fn step_source(descs: &[(DType, Option<DType>, bool, bool)], stochastic: bool) -> String {
    let mut src = wgsl::OPTIM_SLOTS.to_string();
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
            (true, false) => format!("g = g + params.adamw.lambda * (theta - anchor{j}[i]);"),
            (true, true) => format!(
                "let pull = params.adamw.lambda * (theta - anchor{j}[i]); \
                 g = g + select(pull, fisher{j}[i] * pull, params.adamw.use_fisher != 0u);"
            ),
        };
        let store = match working {
            None => String::new(),
            Some(DType::F32) => format!(
                "if (2u * w < n) {{ working{j}[2u * w] = th.x; }} if (2u * w + 1u < n) {{ working{j}[2u * w + 1u] = th.y; }}"
            ),
            Some(DType::F16) => format!("if (2u * w < n) {{ working{j}[w] = pack2x16float(th); }}"),
            Some(DType::BF16) if stochastic => format!(
                "if (2u * w < n) {{ let key = params.info[{j}].key; \
                 working{j}[w] = bf16_stochastic(th.x, key, 2u * w) | (bf16_stochastic(th.y, key, 2u * w + 1u) << 16u); }}"
            ),
            Some(DType::BF16) => {
                format!("if (2u * w < n) {{ working{j}[w] = to_bf16(th.x) | (to_bf16(th.y) << 16u); }}")
            }
            // adamw_step refuses integer working copies before any shader is built.
            Some(DType::U32 | DType::I32) => String::new(),
        };
        let _ = writeln!(
            src,
            "fn slot{j}(w: u32, clip: f32) {{\n    let n = params.info[{j}].len;\n    var th = vec2<f32>(0.0, 0.0);\n    \
             for (var e = 0u; e < 2u; e++) {{\n        let i = 2u * w + e;\n        if (i < n) {{\n            \
             let theta = master{j}[i];\n            var g = load_g{j}(i) * clip;\n            {pull}\n            \
             let r = update(theta, m{j}[i], v{j}[i], g);\n            \
             master{j}[i] = r.x; m{j}[i] = r.y; v{j}[i] = r.z; th[e] = r.x;\n        }}\n    }}\n    {store}\n}}"
        );
        bodies.push(format!("slot{j}((g - params.info[{j}].first_group) * 256u + li, clip); return;"));
    }
    bind(&mut src, &mut b, "var<storage, read> result: array<u32>;".to_string());
    let _ = writeln!(src, "@group(0) @binding({b}) var<uniform> params: OptimStepParams;");
    src += &route("dispatch", ", clip: f32", "", &bodies);
    src + wgsl::OPTIM_STEP
}

pub(crate) fn fisher_accumulate(
    dev: &Arc<WgpuDevice>,
    fisher: &mut Tensor,
    grad: &Tensor,
    inv_count: f32,
) -> Result<()> {
    let key = format!("fisher_accumulate_{}", grad.dtype());
    let pipeline =
        dev.pipeline(&key, || format!("{}{}", wgsl_input("g", 1, grad.dtype(), false), wgsl::OPTIM_FISHER))?;
    let n = fisher.elem_count();
    let (gx, gy) = grid_2d(n.div_ceil(256));
    let params = OptimFisherParams { n: fits_u32("elements", n)?, groups_x: gx, inv_count, pad0: 0 };
    dev.dispatch(&pipeline, &[fisher.wgpu_buffer()?, grad.wgpu_buffer()?], &params, (gx, gy, 1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::mirror::{Lang, assert_mirrored};

    #[test]
    fn parameters_mirror_the_shaders() {
        assert_mirrored::<SlotInfo>(wgsl::OPTIM_SLOTS, Lang::Wgsl);
        assert_mirrored::<OptimNormParams>(wgsl::OPTIM_NORM, Lang::Wgsl);
        assert_mirrored::<OptimReduceParams>(wgsl::OPTIM_REDUCE, Lang::Wgsl);
        assert_mirrored::<AdamWParams>(wgsl::OPTIM_STEP, Lang::Wgsl);
        assert_mirrored::<OptimStepParams>(wgsl::OPTIM_STEP, Lang::Wgsl);
        assert_mirrored::<OptimFisherParams>(wgsl::OPTIM_FISHER, Lang::Wgsl);
        assert!(wgsl::OPTIM_SLOTS.contains(&format!("const MAX_GROUP: u32 = {MAX_GROUP}u;")));
    }
}
