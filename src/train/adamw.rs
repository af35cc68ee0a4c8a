//! `AdamW`: the fused step of `ops::optim` with the state it needs kept per parameter —
//! f32 master weights, moments, the step count, and for continual learning an anchor θ* and
//! a Fisher diagonal — saved to and loaded from safetensors so a run resumes exactly.

use crate::ops::optim::{AdamWHyper, ParamSlot, Penalty, StepReport, adamw_step, fisher_accumulate};
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// One parameter's optimizer state.
#[derive(Debug, Clone)]
pub struct ParamState {
    pub name: String,
    /// The f32 master weight the updates accumulate in.
    pub master: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    /// θ* of the penalty (set by [`AdamW::set_anchor`]).
    pub anchor: Option<Tensor>,
    /// The running mean of squared gradients (EWC's F), and how many samples it holds.
    pub fisher: Option<Tensor>,
    pub fisher_samples: u64,
}

/// AdamW over a list of named parameters, all on one device.
#[derive(Debug, Clone)]
pub struct AdamW {
    pub hyper: AdamWHyper,
    steps: u64,
    params: Vec<ParamState>,
}

/// The state file's format: v2 keeps the f64 hyperparameters' bits; v1 (f32 bits) still loads.
const FORMAT: &str = "kiln.adamw.v2";
const FORMAT_V1: &str = "kiln.adamw.v1";

impl AdamW {
    /// State for `params` (any float dtype): f32 master copies and zero moments on the
    /// parameters' device. `Err` for an empty list, duplicate names, mixed devices or
    /// hyperparameters [`AdamWHyper::validate`] refuses.
    pub fn new(params: &[(&str, &Tensor)], hyper: AdamWHyper) -> Result<AdamW> {
        hyper.validate()?;
        let Some((_, first)) = params.first() else {
            return Err(Error::InvalidArgument("AdamW needs at least one parameter".into()));
        };
        let device = first.device();
        let mut states = Vec::with_capacity(params.len());
        for (name, p) in params {
            if p.device() != device {
                return Err(Error::DeviceMismatch(format!(
                    "parameter {name} on {}, the first on {device}",
                    p.device()
                )));
            }
            check_name(name)?;
            if states.iter().any(|s: &ParamState| s.name == *name) {
                return Err(Error::InvalidArgument(format!("parameter names must be unique: {name:?} twice")));
            }
            states.push(ParamState {
                name: name.to_string(),
                master: p.to_dtype(DType::F32)?.copy()?,
                m: Tensor::zeros(p.shape(), DType::F32, &device)?,
                v: Tensor::zeros(p.shape(), DType::F32, &device)?,
                anchor: None,
                fisher: None,
                fisher_samples: 0,
            });
        }
        Ok(AdamW { hyper, steps: 0, params: states })
    }

    /// State resumed from moments another optimizer left: per parameter its current value,
    /// and `moments[i]` = (exp_avg, exp_avg_sq) of parameter i (any float dtype, the
    /// parameter's shape and device), after `steps` steps. The parameters' values become the
    /// master weights. `Err` as [`AdamW::new`], for moments that do not fit, a second moment
    /// with a negative or NaN element, or a step count at its end.
    pub fn with_moments(
        params: &[(&str, &Tensor)],
        moments: &[(&Tensor, &Tensor)],
        steps: u64,
        hyper: AdamWHyper,
    ) -> Result<AdamW> {
        if moments.len() != params.len() {
            return Err(Error::InvalidArgument(format!(
                "{} parameters but {} pairs of moments",
                params.len(),
                moments.len()
            )));
        }
        let mut opt = AdamW::new(params, hyper)?;
        for (p, (m, v)) in opt.params.iter_mut().zip(moments) {
            for (what, t) in [("exp_avg", m), ("exp_avg_sq", v)] {
                if t.shape() != p.master.shape() || t.device() != p.master.device() {
                    return Err(Error::Shape(format!(
                        "{what} of {} is {:?} on {}, the parameter {:?} on {}",
                        p.name,
                        t.shape(),
                        t.device(),
                        p.master.shape(),
                        p.master.device()
                    )));
                }
            }
            p.m = m.to_dtype(DType::F32)?.copy()?;
            p.v = v.to_dtype(DType::F32)?.copy()?;
            check_second_moment(&p.name, &p.v)?;
        }
        opt.steps = steps;
        opt.validate()?;
        Ok(opt)
    }

    /// State resumed from PyTorch's `torch.optim.AdamW`, its moments saved to safetensors by
    /// these lines (parameters in `model.parameters()` order, all trainable):
    ///
    /// ```python
    /// from safetensors.torch import save_file
    /// names = [n for n, p in model.named_parameters() if p.requires_grad]
    /// state = optimizer.state_dict()["state"]
    /// tensors = {}
    /// for i, name in enumerate(names):
    ///     tensors[f"{name}.exp_avg"] = state[i]["exp_avg"].float().contiguous()
    ///     tensors[f"{name}.exp_avg_sq"] = state[i]["exp_avg_sq"].float().contiguous()
    /// save_file(tensors, "moments.safetensors", metadata={"step": str(int(state[0]["step"]))})
    /// ```
    ///
    /// `params` are the model's parameters by those names, with their current values; the
    /// hyperparameters are torch's (`lr`, `betas`, `eps`, `weight_decay`), which the file
    /// does not hold. `Err` naming what is missing or does not fit.
    pub fn from_torch_moments(params: &[(&str, &Tensor)], path: impl AsRef<Path>, hyper: AdamWHyper) -> Result<AdamW> {
        let file = crate::io::SafetensorsFile::open(path.as_ref())?;
        let steps = file
            .metadata()?
            .get("step")
            .ok_or_else(|| Error::Io(format!("{}: no \"step\" in the metadata", path.as_ref().display())))?
            .parse::<u64>()
            .map_err(|_| Error::Io(format!("{}: the step is not a count", path.as_ref().display())))?;
        let device = params.first().map_or(Device::Cpu, |(_, p)| p.device());
        let moments = params
            .iter()
            .map(|(name, _)| {
                Ok((
                    file.tensor(&format!("{name}.exp_avg"), &device)?,
                    file.tensor(&format!("{name}.exp_avg_sq"), &device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let pairs: Vec<(&Tensor, &Tensor)> = moments.iter().map(|(m, v)| (m, v)).collect();
        AdamW::with_moments(params, &pairs, steps, hyper)
    }

    /// Steps taken (skipped steps are not counted).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    pub fn params(&self) -> &[ParamState] {
        &self.params
    }

    /// One fused step. `grads[i]` belongs to parameter i; `working` is either empty or one
    /// tensor per parameter (the model's own copy, any float dtype), rewritten from the new
    /// master weights in the same pass. The penalty applies to parameters with an anchor.
    pub fn step(&mut self, grads: &[&Tensor], working: &mut [&mut Tensor]) -> Result<StepReport> {
        if grads.len() != self.params.len() || !(working.is_empty() || working.len() == self.params.len()) {
            return Err(Error::InvalidArgument(format!(
                "{} parameters, but {} gradients and {} working copies",
                self.params.len(),
                grads.len(),
                working.len()
            )));
        }
        let use_penalty = self.hyper.penalty != Penalty::None;
        let mut working = working.iter_mut();
        let mut slots: Vec<ParamSlot<'_>> = self
            .params
            .iter_mut()
            .zip(grads)
            .map(|(p, g)| ParamSlot {
                master: &mut p.master,
                m: &mut p.m,
                v: &mut p.v,
                grad: g,
                working: working.next().map(|w| &mut **w),
                anchor: if use_penalty { p.anchor.as_ref() } else { None },
                fisher: if use_penalty && p.anchor.is_some() { p.fisher.as_ref() } else { None },
            })
            .collect();
        let step =
            self.steps.checked_add(1).ok_or_else(|| Error::InvalidArgument("the step count is at its end".into()))?;
        let report = adamw_step(&mut slots, &self.hyper, step)?;
        if !report.skipped {
            self.steps += 1;
        }
        Ok(report)
    }

    /// Adds one sample of gradients to every parameter's Fisher diagonal (a running mean).
    pub fn accumulate_fisher(&mut self, grads: &[&Tensor]) -> Result<()> {
        if grads.len() != self.params.len() {
            return Err(Error::InvalidArgument(format!("{} parameters, {} gradients", self.params.len(), grads.len())));
        }
        for (p, g) in self.params.iter_mut().zip(grads) {
            if p.fisher.is_none() {
                p.fisher = Some(Tensor::zeros(p.master.shape(), DType::F32, &p.master.device())?);
                p.fisher_samples = 0;
            }
            if let Some(f) = p.fisher.as_mut() {
                fisher_accumulate(f, g, p.fisher_samples + 1)?;
                p.fisher_samples += 1;
            }
        }
        Ok(())
    }

    /// Makes the current master weights the anchor θ* the penalty pulls toward (the end of
    /// a task in continual learning).
    pub fn set_anchor(&mut self) -> Result<()> {
        for p in &mut self.params {
            p.anchor = Some(p.master.copy()?);
        }
        Ok(())
    }

    /// `Err` for a state that [`AdamW::step`] would refuse or [`AdamW::load`] could not read
    /// back: hyperparameters out of range, names that are empty, repeated or hold a line
    /// break, a step count at its end, an EWC anchor without its Fisher diagonal.
    pub fn validate(&self) -> Result<()> {
        self.hyper.validate()?;
        if self.steps == u64::MAX {
            return Err(Error::InvalidArgument("the step count is at its end".into()));
        }
        let mut names: Vec<&str> = Vec::with_capacity(self.params.len());
        for p in &self.params {
            check_name(&p.name)?;
            if names.contains(&p.name.as_str()) {
                return Err(Error::InvalidArgument(format!("parameter {:?} appears twice", p.name)));
            }
            names.push(&p.name);
            if matches!(self.hyper.penalty, Penalty::Ewc { .. }) && p.anchor.is_some() && p.fisher.is_none() {
                return Err(Error::InvalidArgument(format!("parameter {:?} has an EWC anchor but no Fisher", p.name)));
            }
        }
        if names.is_empty() {
            return Err(Error::InvalidArgument("AdamW needs at least one parameter".into()));
        }
        Ok(())
    }

    /// Writes the whole state (hyperparameters, step count, per parameter master, moments,
    /// anchor, Fisher) to a safetensors file, atomically. `Err` (nothing written) for what
    /// [`AdamW::validate`] refuses. The same state always gives the same bytes.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let bytes = self.to_bytes()?;
        crate::fs::write_file(path, &bytes).map_err(|e| Error::Io(format!("writing {}: {e}", path.display())))
    }

    /// The bytes [`AdamW::save`] writes (a safetensors file), for a caller that writes them
    /// with other files (a checkpoint).
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        self.validate()?;
        let mut tensors: Vec<(String, &Tensor)> = Vec::new();
        let mut meta = HashMap::new();
        for p in &self.params {
            tensors.push((format!("{}.master", p.name), &p.master));
            tensors.push((format!("{}.exp_avg", p.name), &p.m));
            tensors.push((format!("{}.exp_avg_sq", p.name), &p.v));
            if let Some(a) = &p.anchor {
                tensors.push((format!("{}.anchor", p.name), a));
            }
            if let Some(f) = &p.fisher {
                tensors.push((format!("{}.fisher", p.name), f));
                meta.insert(format!("fisher_samples.{}", p.name), p.fisher_samples.to_string());
            }
        }
        let h = &self.hyper;
        let (penalty, lambda) = match h.penalty {
            Penalty::None => ("none", 0.0),
            Penalty::Ewc { lambda } => ("ewc", lambda),
            Penalty::L2Anchor { lambda } => ("l2_anchor", lambda),
        };
        let order: Vec<&str> = self.params.iter().map(|p| p.name.as_str()).collect();
        for (k, v) in [
            ("format", FORMAT.to_string()),
            ("params", order.join("\n")),
            ("step", self.steps.to_string()),
            ("lr", h.lr.to_bits().to_string()),
            ("beta1", h.beta1.to_bits().to_string()),
            ("beta2", h.beta2.to_bits().to_string()),
            ("eps", h.eps.to_bits().to_string()),
            ("weight_decay", h.weight_decay.to_bits().to_string()),
            ("max_grad_norm", h.max_grad_norm.map_or("none".to_string(), |n| n.to_bits().to_string())),
            ("penalty", penalty.to_string()),
            ("lambda", lambda.to_bits().to_string()),
            ("stochastic_rounding", h.stochastic_rounding.map_or("none".to_string(), |s| s.to_string())),
        ] {
            meta.insert(k.to_string(), v);
        }
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        crate::io::to_bytes(&named, &meta)
    }

    /// Reads a state written by [`AdamW::save`] onto `device`. `Err` naming what is wrong for
    /// a missing, truncated or foreign file, tensors whose shapes or dtypes do not fit, or a
    /// second moment with a negative or NaN element.
    pub fn load(path: impl AsRef<Path>, device: &Device) -> Result<AdamW> {
        let path = path.as_ref();
        Self::from_file(&crate::io::SafetensorsFile::open(path)?, path, device)
    }

    /// [`AdamW::load`] from the file `path` already read.
    pub(crate) fn from_file(file: &crate::io::SafetensorsFile, path: &Path, device: &Device) -> Result<AdamW> {
        let meta = file.metadata()?;
        let get = |k: &str| meta.get(k).ok_or_else(|| Error::Io(format!("optimizer state lacks {k:?}")));
        let v1 = match get("format")?.as_str() {
            FORMAT => false,
            FORMAT_V1 => true,
            other => return Err(Error::Io(format!("not a kiln AdamW state (format {other:?})"))),
        };
        // A hyperparameter's bits: f64 in v2, f32 (exactly widened) in v1.
        let bits = |k: &str| -> Result<f64> {
            let bad = || Error::Io(format!("bad value for {k}"));
            let text = get(k)?;
            if v1 {
                text.parse::<u32>().map(|b| f32::from_bits(b) as f64).map_err(|_| bad())
            } else {
                text.parse::<u64>().map(f64::from_bits).map_err(|_| bad())
            }
        };
        let lambda = bits("lambda")?;
        let penalty = match get("penalty")?.as_str() {
            "none" => Penalty::None,
            "ewc" => Penalty::Ewc { lambda },
            "l2_anchor" => Penalty::L2Anchor { lambda },
            other => return Err(Error::Io(format!("unknown penalty {other:?}"))),
        };
        let max_grad_norm = match get("max_grad_norm")?.as_str() {
            "none" => None,
            _ => Some(bits("max_grad_norm")?),
        };
        let hyper = AdamWHyper {
            lr: bits("lr")?,
            beta1: bits("beta1")?,
            beta2: bits("beta2")?,
            eps: bits("eps")?,
            weight_decay: bits("weight_decay")?,
            max_grad_norm,
            penalty,
            stochastic_rounding: match meta.get("stochastic_rounding").map(String::as_str) {
                None | Some("none") => None,
                Some(seed) => Some(seed.parse::<u64>().map_err(|_| Error::Io("bad stochastic-rounding seed".into()))?),
            },
        };
        let steps = get("step")?.parse::<u64>().map_err(|_| Error::Io("bad step count".into()))?;
        let mut params = Vec::new();
        for name in get("params")?.split('\n') {
            let master = file.checked(&format!("{name}.master"), DType::F32, None, device)?;
            let shape = master.shape().to_vec();
            let load = |suffix: &str| file.checked(&format!("{name}.{suffix}"), DType::F32, Some(&shape), device);
            let optional = |suffix: &str| -> Result<Option<Tensor>> {
                if file.contains(&format!("{name}.{suffix}"))? { load(suffix).map(Some) } else { Ok(None) }
            };
            let fisher = optional("fisher")?;
            let fisher_samples = match (&fisher, meta.get(&format!("fisher_samples.{name}"))) {
                (Some(_), Some(n)) => {
                    n.parse::<u64>().map_err(|_| Error::Io(format!("bad Fisher count for {name}")))?
                }
                (Some(_), None) => return Err(Error::Io(format!("Fisher of {name} has no sample count"))),
                (None, _) => 0,
            };
            let v = load("exp_avg_sq")?;
            check_second_moment(name, &v).map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
            params.push(ParamState {
                name: name.to_string(),
                m: load("exp_avg")?,
                v,
                anchor: optional("anchor")?,
                fisher,
                fisher_samples,
                master,
            });
        }
        let opt = AdamW { hyper, steps, params };
        opt.validate().map_err(|e| Error::Io(format!("{}: {e}", path.display())))?;
        Ok(opt)
    }
}

/// `Err` unless every element of a second moment (a running mean of g²) is ≥ 0 or +∞: a
/// negative or NaN one is a corrupted state, whose next step would write NaN weights.
fn check_second_moment(name: &str, v: &Tensor) -> Result<()> {
    let values = v.to_vec_f32()?;
    match values.iter().position(|x| x.is_nan() || *x < 0.0) {
        Some(i) => Err(Error::InvalidArgument(format!("exp_avg_sq of {name} holds {} at {i}", values[i]))),
        None => Ok(()),
    }
}

/// `Err` unless `name` can name a parameter in a state file: not empty, no line break (the
/// file lists the names one per line).
fn check_name(name: &str) -> Result<()> {
    if name.is_empty() || name.contains(['\n', '\r']) {
        return Err(Error::InvalidArgument(format!("parameter name {name:?}: must be non-empty and on one line")));
    }
    Ok(())
}
