//! Fused optimizer steps: AdamW with f32 master weights and moments, global-norm clipping
//! and non-finite detection on the device, and the continual-learning penalties (EWC and
//! L2-to-anchor) folded into the same pass.
//!
//! One step reads every parameter's gradient, master weight and moments once and writes the
//! master weight, the moments and the working copy once. The update follows PyTorch's
//! `torch.optim.AdamW` (decoupled weight decay, bias correction, `lerp` for the first
//! moment), with torch's arithmetic: the per-step constants (`1 − lr·wd`, `1 − β1`, `1 − β2`,
//! `lr / (1 − β1ᵗ)`, `√(1 − β2ᵗ)`) computed in f64 from the f64 hyperparameters and rounded
//! once to f32, the elementwise update in f32 in torch's order of operations:
//!
//! ```text
//! g  = grad · clip + λ·F⊙(θ − θ*)   (EWC; λ·(θ − θ*) for L2-to-anchor)
//! θ ← θ·(1 − lr·wd)
//! m ← lerp(m, g, 1 − β1)
//! v ← β2·v + (1 − β2)·g·g
//! θ ← θ − (lr / (1 − β1ᵗ)) · m / (√v / √(1 − β2ᵗ) + ε)
//! ```
//!
//! `clip = min(1, max_norm / (‖grad‖ + 1e-6))` over the gradients of all slots; the squares
//! are summed in f64 on the CPU and CUDA, in f32 on WGSL (which has no f64), where a sum
//! past f32's range counts as non-finite. A non-finite gradient anywhere skips the step:
//! nothing is written, and the report says so.

#[cfg(feature = "cuda")]
pub(crate) mod cuda;
#[cfg(feature = "wgpu")]
pub(crate) mod wgpu;

use crate::device::Backend;
use crate::ops::SharedMut;
use crate::ops::hash::mix32;
use crate::tensor::{CpuStorage, Storage, StorageElement, with_elems};
use crate::{DType, Element, Error, Result, Tensor};
use half::bf16;
use rayon::prelude::*;

/// What protects the knowledge of earlier tasks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Penalty {
    None,
    /// Elastic weight consolidation: adds λ·F⊙(θ − θ*) to the gradient (slots need an
    /// anchor θ* and a Fisher diagonal F).
    Ewc {
        lambda: f64,
    },
    /// Adds λ·(θ − θ*) to the gradient (slots need an anchor).
    L2Anchor {
        lambda: f64,
    },
}

/// Hyperparameters of one step, in f64 as PyTorch keeps them (Python floats): every
/// per-step constant is computed from them in f64 and rounded once to the f32 the kernels
/// take. All are run-time values, so no kernel is rebuilt per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this value.
    pub max_grad_norm: Option<f64>,
    pub penalty: Penalty,
    /// Round bf16 working copies stochastically with this seed (unbiased: E[round(θ)] = θ),
    /// instead of to nearest. The random bits depend on (seed, step, parameter, element).
    pub stochastic_rounding: Option<u64>,
}

impl Default for AdamWHyper {
    /// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 1e-2.
    fn default() -> Self {
        AdamWHyper {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
            max_grad_norm: None,
            penalty: Penalty::None,
            stochastic_rounding: None,
        }
    }
}

impl AdamWHyper {
    /// `Err(InvalidArgument)` naming the first value out of range: a learning rate, weight
    /// decay or λ that is negative or not finite, a β outside [0, 1), an ε or clip norm that
    /// is not finite and positive.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            return bad(format!("learning rate must be finite and >= 0, got {}", self.lr));
        }
        for (name, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                return bad(format!("{name} must be in [0, 1), got {b}"));
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            return bad(format!("eps must be finite and > 0, got {}", self.eps));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!("weight decay must be finite and >= 0, got {}", self.weight_decay));
        }
        if let Some(n) = self.max_grad_norm {
            if !(n.is_finite() && n > 0.0) {
                return bad(format!("max_grad_norm must be finite and > 0, got {n}"));
            }
        }
        match self.penalty {
            Penalty::Ewc { lambda } | Penalty::L2Anchor { lambda } if !(lambda.is_finite() && lambda >= 0.0) => {
                bad(format!("penalty λ must be finite and >= 0, got {lambda}"))
            }
            _ => Ok(()),
        }
    }

    /// λ: 0 without a penalty.
    pub(crate) fn lambda(&self) -> f64 {
        match self.penalty {
            Penalty::None => 0.0,
            Penalty::Ewc { lambda } | Penalty::L2Anchor { lambda } => lambda,
        }
    }
}

/// One parameter tensor's part in a step. `master`, `m`, `v`, `anchor` and `fisher` are
/// f32; `grad` any float dtype; `working` (the copy the model computes with) any float
/// dtype, rounded to nearest from the new master weight.
pub struct ParamSlot<'a> {
    pub master: &'a mut Tensor,
    pub m: &'a mut Tensor,
    pub v: &'a mut Tensor,
    pub grad: &'a Tensor,
    pub working: Option<&'a mut Tensor>,
    /// θ* of the penalty; slots without one are not penalised.
    pub anchor: Option<&'a Tensor>,
    /// F of EWC (required with an anchor under `Penalty::Ewc`).
    pub fisher: Option<&'a Tensor>,
}

/// What a step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// The global L2 norm of the gradients before clipping (NaN or inf when skipped).
    pub grad_norm: f32,
    /// The factor the gradients were scaled by (1 without clipping).
    pub clip_scale: f32,
    /// A gradient held NaN or inf: no state was changed.
    pub skipped: bool,
}

/// Checks the slots and returns their common device.
fn validate(slots: &[ParamSlot<'_>], h: &AdamWHyper, step: u64) -> Result<crate::Device> {
    h.validate()?;
    if step == 0 {
        return Err(Error::InvalidArgument("the step number counts from 1".into()));
    }
    let Some(first) = slots.first() else {
        return Err(Error::InvalidArgument("an optimizer step needs at least one parameter".into()));
    };
    let device = first.master.device();
    for (i, s) in slots.iter().enumerate() {
        let shape = s.master.shape();
        let mut parts: Vec<(&str, &Tensor, bool)> =
            vec![("master", &*s.master, true), ("m", &*s.m, true), ("v", &*s.v, true), ("grad", s.grad, false)];
        if let Some(w) = &s.working {
            parts.push(("working", &**w, false));
        }
        if let Some(a) = s.anchor {
            parts.push(("anchor", a, true));
        }
        if let Some(f) = s.fisher {
            parts.push(("fisher", f, true));
        }
        for (name, t, must_be_f32) in parts {
            if t.shape() != shape {
                return Err(Error::Shape(format!("parameter {i}: {name} is {:?}, master is {shape:?}", t.shape())));
            }
            if must_be_f32 && t.dtype() != DType::F32 {
                return Err(Error::DType(format!("parameter {i}: {name} must be f32, got {}", t.dtype())));
            }
            if !t.dtype().is_float() {
                return Err(Error::DType(format!("parameter {i}: {name} must be f32, f16 or bf16, got {}", t.dtype())));
            }
            if t.device() != device {
                return Err(Error::DeviceMismatch(format!(
                    "parameter {i}: {name} on {}, master on {device}",
                    t.device()
                )));
            }
        }
        if matches!(h.penalty, Penalty::Ewc { .. }) && s.anchor.is_some() && s.fisher.is_none() {
            return Err(Error::InvalidArgument(format!("parameter {i}: EWC needs a Fisher diagonal with its anchor")));
        }
        if h.stochastic_rounding.is_some() && s.working.as_ref().is_some_and(|w| w.dtype() != DType::BF16) {
            return Err(Error::Unsupported(format!(
                "parameter {i}: stochastic rounding is implemented for bf16 working copies, this one is {}",
                s.working.as_ref().map_or(DType::F32, |w| w.dtype())
            )));
        }
        if s.anchor.is_none() && s.fisher.is_some() {
            return Err(Error::InvalidArgument(format!("parameter {i}: a Fisher diagonal needs an anchor")));
        }
    }
    Ok(device)
}

crate::kernels::kernel_params! {
    /// The constants of one step that every backend's update reads (`struct AdamWParams` in
    /// `kernels/optim.cu` and `shaders/optim_step.wgsl`), derived from the hyperparameters
    /// and the step.
    pub(crate) struct AdamWParams {
        beta1: f32,
        beta2: f32,
        /// The moment weights 1 − β1 and 1 − β2.
        one_minus_beta1: f32,
        one_minus_beta2: f32,
        eps: f32,
        /// 1 − lr·wd
        decay: f32,
        /// lr / (1 − β1ᵗ)
        step_size: f32,
        /// √(1 − β2ᵗ)
        bc2_sqrt: f32,
        lambda: f32,
        /// Clip threshold; 0 for none.
        max_norm: f32,
        /// Whether the penalty multiplies by F (EWC, 1) or not (L2, 0).
        use_fisher: u32,
        pad0: u32,
    }
}

/// What every backend derives from the hyperparameters and the step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepConstants {
    /// The update's constants, as the kernels take them.
    pub adamw: AdamWParams,
    /// Stochastic rounding of bf16 working copies: the per-step key, or None.
    pub sr_key: Option<u32>,
}

impl StepConstants {
    /// The constants of step `step`, as `torch.optim.AdamW` computes them: in f64 from the
    /// hyperparameters as given (`1 − β₂` of 0.999 is 1e-3, not 1 − f32(0.999)), each
    /// rounded once to f32.
    fn new(h: &AdamWHyper, step: u64) -> StepConstants {
        let t = step as f64;
        let bias_correction1 = 1.0 - h.beta1.powf(t);
        let bias_correction2 = 1.0 - h.beta2.powf(t);
        let adamw = AdamWParams {
            beta1: h.beta1 as f32,
            beta2: h.beta2 as f32,
            one_minus_beta1: (1.0 - h.beta1) as f32,
            one_minus_beta2: (1.0 - h.beta2) as f32,
            eps: h.eps as f32,
            decay: (1.0 - h.lr * h.weight_decay) as f32,
            step_size: (h.lr / bias_correction1) as f32,
            bc2_sqrt: bias_correction2.sqrt() as f32,
            lambda: h.lambda() as f32,
            max_norm: h.max_grad_norm.unwrap_or(0.0) as f32,
            use_fisher: matches!(h.penalty, Penalty::Ewc { .. }) as u32,
            pad0: 0,
        };
        let sr_key = h
            .stochastic_rounding
            .map(|seed| mix32(seed as u32 ^ mix32((seed >> 32) as u32) ^ mix32(step as u32 ^ 0x5bd1_e995)));
        StepConstants { adamw, sr_key }
    }

    /// The stochastic-rounding key of parameter `slot` this step.
    pub(crate) fn slot_key(&self, slot: usize) -> u32 {
        self.sr_key.map_or(0, |k| mix32(k ^ mix32(slot as u32 ^ 0x9e37_79b9)))
    }

    /// The clip factor for a gradient norm.
    pub(crate) fn clip(&self, norm: f32) -> f32 {
        let max_norm = self.adamw.max_norm;
        if max_norm > 0.0 { (max_norm / (norm + 1e-6)).min(1.0) } else { 1.0 }
    }
}

/// torch.lerp: `start + w·(end − start)` for w < 0.5, `end − (end − start)·(1 − w)` otherwise.
#[inline(always)]
fn lerp(start: f32, end: f32, w: f32) -> f32 {
    if w < 0.5 { start + w * (end - start) } else { end - (end - start) * (1.0 - w) }
}

/// θ rounded stochastically to bf16: add 16 random bits below the kept ones and truncate,
/// so θ rounds up with probability equal to its distance from the lower neighbour. NaN
/// stays NaN.
#[inline(always)]
pub(crate) fn bf16_stochastic(theta: f32, key: u32, index: u32) -> half::bf16 {
    let bits = theta.to_bits();
    if (bits & 0x7fff_ffff) > 0x7f80_0000 {
        return half::bf16::from_bits(((bits >> 16) | 0x40) as u16);
    }
    let r = mix32(index.wrapping_mul(0x9e37_79b1) ^ key) & 0xffff;
    half::bf16::from_bits((bits.wrapping_add(r) >> 16) as u16)
}

/// The gradient an element's update uses: clipped, plus the penalty's pull toward the
/// anchor when the slot has one.
#[inline(always)]
fn effective_grad(c: &StepConstants, grad: f32, clip: f32, theta: f32, anchor: Option<(f32, f32)>) -> f32 {
    let g = grad * clip;
    match anchor {
        Some((a, f)) => {
            let pull = c.adamw.lambda * (theta - a);
            g + if c.adamw.use_fisher != 0 { f * pull } else { pull }
        }
        None => g,
    }
}

/// One element of the update: returns (θ, m, v). The reference every kernel follows, in the
/// same order of f32 operations, which is torch's: `exp_avg.lerp_(g, 1 − β₁)`,
/// `exp_avg_sq.mul_(β₂).addcmul_(g, g, value=1 − β₂)` (the value times g, then times g),
/// `denom = √v / √bc₂ + ε`, `θ.addcdiv_(m, denom, value=−lr / bc₁)`.
#[inline(always)]
fn update(c: &StepConstants, theta: f32, m: f32, v: f32, g: f32) -> (f32, f32, f32) {
    let c = &c.adamw;
    let theta = theta * c.decay;
    let m = lerp(m, g, c.one_minus_beta1);
    let v = v * c.beta2 + c.one_minus_beta2 * g * g;
    let denom = v.sqrt() / c.bc2_sqrt + c.eps;
    (theta - c.step_size * (m / denom), m, v)
}

/// One fused AdamW step over every slot (see the module docs). `step` is the 1-based count
/// of steps taken including this one. Parameters, moments and working copies are updated in
/// place (a tensor whose storage is shared is copied first).
///
/// Errors: `InvalidArgument` for a negative or non-finite learning rate, betas outside
/// [0, 1), eps ≤ 0, step 0, an EWC anchor without a Fisher diagonal; `Shape`, `DType` and
/// `DeviceMismatch` for slots whose tensors disagree (the message names the parameter).
pub fn adamw_step(slots: &mut [ParamSlot<'_>], h: &AdamWHyper, step: u64) -> Result<StepReport> {
    let device = validate(slots, h, step)?;
    let c = StepConstants::new(h, step);
    // Tensors updated in place must own their storage before any kernel writes them.
    for s in slots.iter_mut() {
        s.master.storage_mut()?;
        s.m.storage_mut()?;
        s.v.storage_mut()?;
        if let Some(w) = s.working.as_mut() {
            w.storage_mut()?;
        }
    }
    match device.backend()? {
        Backend::Cpu => cpu_step(slots, &c),
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => cuda::step(&dev, slots, &c),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(dev) => wgpu::step(&dev, slots, &c),
    }
}

/// A tensor's host storage; `Err(DeviceMismatch)` naming it when it is not on the CPU.
fn host<'a>(t: &'a Tensor, what: &str) -> Result<&'a CpuStorage> {
    t.storage().as_cpu().ok_or_else(|| Error::DeviceMismatch(format!("{what} is on {}, not the CPU", t.device())))
}

fn f32s<'a>(t: &'a Tensor, what: &str) -> Result<&'a [f32]> {
    f32::slice_of(host(t, what)?).ok_or_else(|| Error::DType(format!("{what} must be f32, got {}", t.dtype())))
}

fn f32s_mut<'a>(t: &'a mut Tensor, what: &str) -> Result<&'a mut [f32]> {
    match t.storage_mut()? {
        Storage::Cpu(CpuStorage::F32(v)) => Ok(v),
        _ => Err(Error::DType(format!("{what} must be an f32 tensor on the CPU"))),
    }
}

/// Elements per CPU task.
const CPU_CHUNK: usize = 1 << 14;

/// Σ g² (in f64) and whether any g is not finite, over every gradient.
fn cpu_grad_norm(slots: &[ParamSlot<'_>]) -> Result<(f64, bool)> {
    fn of<T: Element>(g: &[T]) -> (f64, bool) {
        g.par_chunks(CPU_CHUNK)
            .map(|chunk| {
                let mut buf = vec![0f32; chunk.len()];
                T::slice_to_f32(chunk, &mut buf);
                let sum: f64 = buf.iter().map(|&x| (x as f64) * (x as f64)).sum();
                (sum, buf.iter().any(|x| !x.is_finite()))
            })
            .reduce(|| (0.0, false), |a, b| (a.0 + b.0, a.1 || b.1))
    }
    let mut total = (0f64, false);
    for s in slots {
        let (sum, bad) = with_elems!(host(s.grad, "a gradient")?, g => of(g));
        total = (total.0 + sum, total.1 || bad);
    }
    Ok(total)
}

fn cpu_step(slots: &mut [ParamSlot<'_>], c: &StepConstants) -> Result<StepReport> {
    let (sumsq, nonfinite) = cpu_grad_norm(slots)?;
    let norm = sumsq.sqrt() as f32;
    if nonfinite {
        return Ok(StepReport { grad_norm: norm, clip_scale: 1.0, skipped: true });
    }
    let clip = c.clip(norm);
    for (slot, s) in slots.iter_mut().enumerate() {
        let grad = host(s.grad, "a gradient")?;
        let pins = Pins {
            anchor: s.anchor.map(|a| f32s(a, "an anchor")).transpose()?,
            fisher: s.fisher.map(|f| f32s(f, "a Fisher diagonal")).transpose()?,
        };
        let key = c.sr_key.map(|_| c.slot_key(slot));
        // The working copy, written chunk by chunk in the same pass; chunks are disjoint.
        let working = match s.working.as_mut() {
            None => None,
            Some(w) => Some(
                w.storage_mut()?
                    .as_cpu_mut()
                    .ok_or_else(|| Error::DeviceMismatch("the working copy is not on the CPU".into()))?,
            ),
        };
        let state = (f32s_mut(s.master, "a master weight")?, f32s_mut(s.m, "m")?, f32s_mut(s.v, "v")?);
        with_elems!(grad, g => match working {
            None => update_slot::<_, f32>(c, state, g, &pins, clip, None, key),
            Some(w) => with_elems!(w, w => update_slot(c, state, g, &pins, clip, Some(SharedMut(w.as_mut_ptr())), key)),
        });
    }
    Ok(StepReport { grad_norm: norm, clip_scale: clip, skipped: false })
}

/// The penalty's anchor θ* and Fisher diagonal F of one parameter, where it has them.
struct Pins<'a> {
    anchor: Option<&'a [f32]>,
    fisher: Option<&'a [f32]>,
}

/// One parameter's update on the CPU, in parallel chunks: θ, m and v in place, the working
/// copy (of W, as long as θ) rounded from the new θ, stochastically when `key` is set.
fn update_slot<G: Element, W: Element>(
    c: &StepConstants,
    (theta, m, v): (&mut [f32], &mut [f32], &mut [f32]),
    grad: &[G],
    pins: &Pins<'_>,
    clip: f32,
    working: Option<SharedMut<W>>,
    key: Option<u32>,
) {
    theta
        .par_chunks_mut(CPU_CHUNK)
        .zip(m.par_chunks_mut(CPU_CHUNK))
        .zip(v.par_chunks_mut(CPU_CHUNK))
        .enumerate()
        .for_each(|(k, ((t, mm), vv))| {
            let start = k * CPU_CHUNK;
            let mut g = vec![0f32; t.len()];
            G::slice_to_f32(&grad[start..start + t.len()], &mut g);
            for (i, gi) in g.iter_mut().enumerate() {
                let pin = pins.anchor.map(|a| (a[start + i], pins.fisher.map_or(1.0, |f| f[start + i])));
                *gi = effective_grad(c, *gi, clip, t[i], pin);
            }
            update_chunk(c, t, mm, vv, &g);
            if let Some(p) = working {
                // SAFETY: the working copy has as many elements as θ, and this task alone
                // writes elements start..start + t.len().
                let out = unsafe { std::slice::from_raw_parts_mut(p.ptr().add(start), t.len()) };
                match key {
                    // `validate` admits stochastic rounding for bf16 working copies only.
                    Some(key) if W::DTYPE == DType::BF16 => {
                        let out: &mut [bf16] = bytemuck::cast_slice_mut(out);
                        for (i, (o, &x)) in out.iter_mut().zip(t.iter()).enumerate() {
                            *o = bf16_stochastic(x, key, (start + i) as u32);
                        }
                    }
                    _ => W::slice_from_f32(t, out),
                }
            }
        });
}

/// [`update`] over a chunk, compiled for AVX2 where the processor has it (the same f32
/// operations in the same order; only the vector width changes).
fn update_chunk(c: &StepConstants, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
    #[inline(always)]
    fn body(c: &StepConstants, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
        for (((t, mm), vv), &gi) in theta.iter_mut().zip(m.iter_mut()).zip(v.iter_mut()).zip(g) {
            (*t, *mm, *vv) = update(c, *t, *mm, *vv, gi);
        }
    }
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        unsafe fn wide(c: &StepConstants, theta: &mut [f32], m: &mut [f32], v: &mut [f32], g: &[f32]) {
            body(c, theta, m, v, g)
        }
        if std::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2.
            unsafe { wide(c, theta, m, v, g) };
            return;
        }
    }
    body(c, theta, m, v, g)
}

/// Accumulates a diagonal Fisher estimate in place: `F ← F + (g² − F) / count`, the running
/// mean of squared gradients after `count` samples (count ≥ 1, this one included).
/// `fisher` is f32; `grad` any float dtype of the same shape on the same device.
pub fn fisher_accumulate(fisher: &mut Tensor, grad: &Tensor, count: u64) -> Result<()> {
    crate::ops::floats("fisher_accumulate", &[fisher, grad])?;
    if count == 0 {
        return Err(Error::InvalidArgument("the Fisher sample count starts at 1".into()));
    }
    if fisher.dtype() != DType::F32 {
        return Err(Error::DType(format!("the Fisher diagonal is f32, got {}", fisher.dtype())));
    }
    if fisher.shape() != grad.shape() {
        return Err(Error::Shape(format!("Fisher {:?} and gradient {:?} differ", fisher.shape(), grad.shape())));
    }
    crate::ops::same_device("fisher_accumulate", &[fisher, grad])?;
    let inv = 1.0 / count as f32;
    fisher.storage_mut()?; // updated in place: own the storage first
    match fisher.device().backend()? {
        Backend::Cpu => {
            let g = host(grad, "the gradient")?.to_f32_vec()?;
            let f = f32s_mut(fisher, "the Fisher diagonal")?;
            f.par_iter_mut().zip(g.par_iter()).for_each(|(f, &g)| *f += (g * g - *f) * inv);
            Ok(())
        }
        #[cfg(feature = "cuda")]
        Backend::Cuda(dev) => cuda::fisher_accumulate(&dev, fisher, grad, inv),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu(dev) => wgpu::fisher_accumulate(&dev, fisher, grad, inv),
    }
}
