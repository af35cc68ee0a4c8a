//! LoRA adapters in PEFT's files: `adapter_config.json` and `adapter_model.safetensors`
//! with tensors named `base_model.model.<module>.lora_A.weight` ([r, in]) and
//! `….lora_B.weight` ([out, r]), so an adapter trained here loads in PEFT and one from PEFT
//! loads here. Fields of the config kiln does not use are kept and written back, and numbers
//! are written back as they were read (an `lora_alpha` of 16 stays 16).
//!
//! The saver refuses what the loader would refuse, and the two are inverse: save, load and
//! save again gives the same bytes. An adapter folder is replaced as a whole, in one step.

use super::llama::{Llama, module_path};
use super::weights::PROJECTIONS;
use crate::{DType, Device, Error, Result, Tensor};
use serde_json::{Map, Number, Value, json};
use std::collections::BTreeMap;
use std::path::Path;

const CONFIG_FILE: &str = "adapter_config.json";
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// The parts of PEFT's `LoraConfig` kiln reads; the rest of the JSON is carried along.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub lora_alpha: f32,
    pub target_modules: Vec<String>,
    pub use_rslora: bool,
    pub lora_dropout: f32,
    /// Per-module rank overrides (keys match module names by suffix), as PEFT's `rank_pattern`.
    pub rank_pattern: BTreeMap<String, usize>,
    /// Per-module alpha overrides, as PEFT's `alpha_pattern`.
    pub alpha_pattern: BTreeMap<String, f32>,
    /// The JSON numbers as read, written back while the values are unchanged.
    numbers: BTreeMap<String, Number>,
    other: Map<String, Value>,
}

impl LoraConfig {
    pub fn new(r: usize, lora_alpha: f32, target_modules: &[&str]) -> LoraConfig {
        LoraConfig {
            r,
            lora_alpha,
            target_modules: target_modules.iter().map(|s| s.to_string()).collect(),
            use_rslora: false,
            lora_dropout: 0.0,
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            numbers: BTreeMap::new(),
            other: Map::new(),
        }
    }

    fn pattern<'a, T>(map: &'a BTreeMap<String, T>, module: &str) -> Option<&'a T> {
        map.iter().filter(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}"))).map(|(_, v)| v).next()
    }

    /// The rank `module` is configured with.
    pub fn rank_for(&self, module: &str) -> usize {
        Self::pattern(&self.rank_pattern, module).copied().unwrap_or(self.r)
    }

    /// The scale s of `module`: alpha / r, or alpha / √r with rsLoRA.
    pub fn scale_for(&self, module: &str) -> f32 {
        let alpha = Self::pattern(&self.alpha_pattern, module).copied().unwrap_or(self.lora_alpha);
        let r = self.rank_for(module) as f32;
        if self.use_rslora { alpha / r.sqrt() } else { alpha / r }
    }

    /// `Err` naming the first value PEFT's files cannot hold or kiln cannot use: a rank of 0,
    /// a non-finite alpha or scale, a dropout outside [0, 1).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("LoRA config: {m}")));
        if self.r == 0 {
            return bad("r must be at least 1".into());
        }
        if !self.lora_alpha.is_finite() {
            return bad(format!("lora_alpha {} is not finite", self.lora_alpha));
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(format!("lora_dropout {} is outside [0, 1)", self.lora_dropout));
        }
        if let Some((k, _)) = self.rank_pattern.iter().find(|(_, r)| **r == 0) {
            return bad(format!("rank_pattern gives {k} a rank of 0"));
        }
        if let Some((k, a)) = self.alpha_pattern.iter().find(|(_, a)| !a.is_finite()) {
            return bad(format!("alpha_pattern gives {k} the alpha {a}"));
        }
        Ok(())
    }

    fn from_json(text: &str) -> Result<LoraConfig> {
        let bad = |m: String| Error::Io(format!("{CONFIG_FILE}: {m}"));
        let mut map: Map<String, Value> = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut numbers = BTreeMap::new();
        match map.remove("peft_type") {
            None => {}
            Some(Value::String(t)) if t == "LORA" => {}
            Some(other) => return Err(bad(format!("peft_type {other} is not \"LORA\""))),
        }
        let r = match map.remove("r") {
            Some(v) => positive_int(&v).ok_or_else(|| bad(format!("`r` must be a positive integer, got {v}")))?,
            None => return Err(bad("`r` is missing".into())),
        };
        let lora_alpha = match map.remove("lora_alpha") {
            Some(Value::Number(n)) => {
                let a = f32_of(&n).ok_or_else(|| bad(format!("`lora_alpha` {n} is not a finite f32")))?;
                numbers.insert("lora_alpha".to_string(), n);
                a
            }
            Some(v) => return Err(bad(format!("`lora_alpha` must be a number, got {v}"))),
            None => return Err(bad("`lora_alpha` is missing".into())),
        };
        let target_modules = match map.remove("target_modules") {
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    Value::String(s) => Ok(s),
                    other => Err(bad(format!("target_modules holds {other}, not a string"))),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Value::String(s)) => vec![s],
            Some(Value::Null) | None => Vec::new(),
            Some(other) => return Err(bad(format!("target_modules is {other}"))),
        };
        let use_rslora = match map.remove("use_rslora") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => b,
            Some(other) => return Err(bad(format!("`use_rslora` must be true or false, got {other}"))),
        };
        let lora_dropout = match map.remove("lora_dropout") {
            None | Some(Value::Null) => 0.0,
            Some(Value::Number(n)) => {
                let p = f32_of(&n).filter(|p| (0.0..1.0).contains(p));
                let p = p.ok_or_else(|| bad(format!("`lora_dropout` {n} is outside [0, 1)")))?;
                numbers.insert("lora_dropout".to_string(), n);
                p
            }
            Some(other) => return Err(bad(format!("`lora_dropout` must be a number, got {other}"))),
        };
        let entries = |key: &str, v: Option<Value>| -> Result<Vec<(String, Number)>> {
            match v {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Object(m)) => m
                    .into_iter()
                    .map(|(k, v)| match v {
                        Value::Number(n) => Ok((k, n)),
                        other => Err(bad(format!("{key} gives {k} {other}, not a number"))),
                    })
                    .collect(),
                Some(other) => Err(bad(format!("{key} must be an object, got {other}"))),
            }
        };
        let mut rank_pattern = BTreeMap::new();
        for (k, n) in entries("rank_pattern", map.remove("rank_pattern"))? {
            let r = positive_int(&Value::Number(n.clone()))
                .ok_or_else(|| bad(format!("rank_pattern gives {k} the rank {n}, not a positive integer")))?;
            rank_pattern.insert(k, r);
        }
        let mut alpha_pattern = BTreeMap::new();
        for (k, n) in entries("alpha_pattern", map.remove("alpha_pattern"))? {
            let a = f32_of(&n).ok_or_else(|| bad(format!("alpha_pattern gives {k} {n}, not a finite f32")))?;
            numbers.insert(format!("alpha_pattern.{k}"), n);
            alpha_pattern.insert(k, a);
        }
        Ok(LoraConfig {
            r,
            lora_alpha,
            target_modules,
            use_rslora,
            lora_dropout,
            rank_pattern,
            alpha_pattern,
            numbers,
            other: map,
        })
    }

    /// The number `value` as JSON: as it was read under `key` when the value is unchanged,
    /// else an integer when it is one, else f32's shortest decimal.
    fn number(&self, key: &str, value: f32) -> Value {
        if let Some(n) = self.numbers.get(key).filter(|n| f32_of(n) == Some(value)) {
            return Value::Number(n.clone());
        }
        if value.fract() == 0.0 && value.abs() < (1u64 << 53) as f32 {
            return json!(value as i64);
        }
        format!("{value}").parse::<f64>().ok().and_then(Number::from_f64).map_or(Value::Null, Value::Number)
    }

    fn to_json(&self) -> Result<String> {
        self.validate()?;
        let mut map = self.other.clone();
        map.insert("peft_type".into(), json!("LORA"));
        map.insert("r".into(), json!(self.r));
        map.insert("lora_alpha".into(), self.number("lora_alpha", self.lora_alpha));
        map.insert("target_modules".into(), json!(self.target_modules));
        map.insert("use_rslora".into(), json!(self.use_rslora));
        map.insert("lora_dropout".into(), self.number("lora_dropout", self.lora_dropout));
        map.insert("rank_pattern".into(), json!(self.rank_pattern));
        let alphas: Map<String, Value> = self
            .alpha_pattern
            .iter()
            .map(|(k, a)| (k.clone(), self.number(&format!("alpha_pattern.{k}"), *a)))
            .collect();
        map.insert("alpha_pattern".into(), Value::Object(alphas));
        map.entry("bias").or_insert(json!("none"));
        map.entry("task_type").or_insert(json!("CAUSAL_LM"));
        map.entry("fan_in_fan_out").or_insert(json!(false));
        serde_json::to_string_pretty(&Value::Object(map)).map_err(|e| Error::Io(format!("{CONFIG_FILE}: {e}")))
    }
}

/// A JSON number that is a whole number from 1 up, as usize.
fn positive_int(v: &Value) -> Option<usize> {
    v.as_u64().filter(|&r| r > 0).and_then(|r| usize::try_from(r).ok())
}

/// A JSON number as f32, when it is finite there too.
fn f32_of(n: &Number) -> Option<f32> {
    n.as_f64().map(|v| v as f32).filter(|v| v.is_finite())
}

/// SplitMix64's finaliser: well-spread seeds from neighbouring integers.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One adapted module: A [r, in] and B [out, r].
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub a: Tensor,
    pub b: Tensor,
}

impl LoraLayer {
    /// `(r, in, out)`, or `Err(Shape)` naming the module unless A is [r, in] and B [out, r]
    /// with r ≥ 1.
    fn dims(&self, module: &str) -> Result<(usize, usize, usize)> {
        match (self.a.shape(), self.b.shape()) {
            (&[r, inp], &[out, br]) if r == br && r > 0 => Ok((r, inp, out)),
            _ => Err(Error::Shape(format!(
                "{PREFIX}{module}: lora_A {:?} and lora_B {:?} must be [r, in] and [out, r] with r ≥ 1",
                self.a.shape(),
                self.b.shape()
            ))),
        }
    }
}

/// A LoRA adapter: its config and one A/B pair per adapted module, keyed by the module's
/// path in the model (`model.layers.0.self_attn.q_proj`).
#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub config: LoraConfig,
    pub layers: BTreeMap<String, LoraLayer>,
}

impl LoraAdapter {
    /// The scale s of `module`.
    pub fn scale(&self, module: &str) -> f32 {
        self.config.scale_for(module)
    }

    /// A new adapter for `model`, initialised as PEFT initialises one by default: for every
    /// projection `target_modules` names (a module path or its last parts, `q_proj` or
    /// `self_attn.q_proj`, as PEFT matches them; `all-linear` for all seven), lora_A
    /// `[r, in]` uniform in `[-1/√in, 1/√in)` (PyTorch's `kaiming_uniform_` with a = √5) and
    /// lora_B `[out, r]` zero, so the adapted model starts as the base. f32 on the model's
    /// device; r per module from `rank_pattern`. The same `seed` gives the same values on
    /// every device. `Err` for a config [`LoraConfig::validate`] refuses or one that targets
    /// no projection of the model.
    pub fn init(config: LoraConfig, model: &Llama, seed: u64) -> Result<LoraAdapter> {
        config.validate()?;
        let all_linear = config.target_modules.iter().any(|t| t == "all-linear");
        let targeted = |module: &str| {
            all_linear || config.target_modules.iter().any(|t| module == t || module.ends_with(&format!(".{t}")))
        };
        let mut layers = BTreeMap::new();
        for (l, weights) in model.weights.layers.iter().enumerate() {
            for (p, name) in PROJECTIONS.iter().enumerate() {
                let module = module_path(l, p);
                if !targeted(&module) {
                    continue;
                }
                let linear = weights
                    .projection(name)
                    .ok_or_else(|| Error::InvalidArgument(format!("the model has no projection {module}")))?;
                let [out, inp] = linear.weight.shape();
                let r = config.rank_for(&module);
                let bound = 1.0 / (inp as f32).sqrt();
                let module_seed = mix(seed ^ mix((l * PROJECTIONS.len() + p) as u64 + 1));
                let a = Tensor::rand(&[r, inp], -bound, bound, module_seed, DType::F32, model.device())?;
                let b = Tensor::zeros(&[out, r], DType::F32, model.device())?;
                layers.insert(module, LoraLayer { a, b });
            }
        }
        if layers.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "target_modules {:?} names no projection of the model ({})",
                config.target_modules,
                PROJECTIONS.join(", ")
            )));
        }
        let adapter = LoraAdapter { config, layers };
        adapter.validate()?;
        Ok(adapter)
    }

    /// Every tensor with its PEFT name (`base_model.model.<module>.lora_A.weight`, then
    /// `….lora_B.weight`), modules in the order of their paths: the names the training step's
    /// gradients are keyed by, in an order that stays fixed, for an optimizer to bind to.
    pub fn tensors(&self) -> Vec<(String, &Tensor)> {
        self.layers
            .iter()
            .flat_map(|(module, layer)| {
                [
                    (format!("{PREFIX}{module}.lora_A.weight"), &layer.a),
                    (format!("{PREFIX}{module}.lora_B.weight"), &layer.b),
                ]
            })
            .collect()
    }

    /// [`LoraAdapter::tensors`], mutable, in the same order.
    pub fn tensors_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        self.layers
            .iter_mut()
            .flat_map(|(module, layer)| {
                [
                    (format!("{PREFIX}{module}.lora_A.weight"), &mut layer.a),
                    (format!("{PREFIX}{module}.lora_B.weight"), &mut layer.b),
                ]
            })
            .collect()
    }

    /// `Err` naming the tensor and the shapes unless `module` is adapted with A [r, in] and
    /// B [out, r] for a base weight of `[out, in]`.
    pub fn check_fits(&self, module: &str, weight_shape: [usize; 2]) -> Result<()> {
        let layer =
            self.layers.get(module).ok_or_else(|| Error::Shape(format!("the adapter has no layer {module}")))?;
        let (_, inp, out) = layer.dims(module)?;
        if [out, inp] != weight_shape {
            return Err(Error::Shape(format!(
                "{PREFIX}{module}.lora_A.weight {:?} / lora_B.weight {:?} do not fit the model's weight {weight_shape:?}",
                layer.a.shape(),
                layer.b.shape()
            )));
        }
        Ok(())
    }

    /// `Err` for what [`LoraAdapter::load_peft`] would refuse: no layer, a config it cannot
    /// hold, a pair that is not [r, in] / [out, r] with r the config's rank for the module.
    pub fn validate(&self) -> Result<()> {
        self.config.validate()?;
        if self.layers.is_empty() {
            return Err(Error::InvalidArgument("a LoRA adapter needs at least one layer".into()));
        }
        for (module, layer) in &self.layers {
            let (r, ..) = layer.dims(module)?;
            if r != self.config.rank_for(module) {
                return Err(Error::Shape(format!(
                    "{PREFIX}{module}: lora_A {:?} and lora_B {:?} have rank {r}, but the config gives it rank {}",
                    layer.a.shape(),
                    layer.b.shape(),
                    self.config.rank_for(module)
                )));
            }
        }
        Ok(())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into the folder `dir`,
    /// which is replaced as a whole in one step: a reader or a crash sees the previous
    /// adapter or this one, never a mix. `Err` (and nothing written) for what
    /// [`LoraAdapter::validate`] refuses.
    pub fn save_peft(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let files = self.peft_files()?;
        let files: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        crate::fs::write_dir(dir, &files).map_err(|e| Error::Io(format!("writing {}: {e}", dir.display())))
    }

    /// The files [`LoraAdapter::save_peft`] writes, by name, for a caller that writes them
    /// into a folder of its own (a checkpoint). `Err` for what [`LoraAdapter::validate`] refuses.
    pub fn peft_files(&self) -> Result<Vec<(&'static str, Vec<u8>)>> {
        self.validate()?;
        let config = self.config.to_json()?;
        let names = self.tensors();
        let named: Vec<(&str, &Tensor)> = names.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let weights = crate::io::to_bytes(&named, &meta)?;
        Ok(vec![(CONFIG_FILE, config.into_bytes()), (WEIGHTS_FILE, weights)])
    }

    /// Reads a PEFT LoRA adapter from `dir` onto `device`. `Err` naming the file or tensor
    /// for a malformed config, a tensor without its pair, two tensors for one half of a
    /// module, ranks that disagree with the config, or shapes that are not [r, in] /
    /// [out, r]. Both files come from one version of the folder, even while a writer
    /// replaces it.
    pub fn load_peft(dir: impl AsRef<Path>, device: &Device) -> Result<LoraAdapter> {
        let dir = dir.as_ref();
        let [text, weights]: [Vec<u8>; 2] = crate::fs::read_dir_files(dir, &[CONFIG_FILE, WEIGHTS_FILE])
            .map_err(|e| Error::Io(format!("reading {}: {e}", dir.display())))?
            .try_into()
            .map_err(|_| Error::Io(format!("reading {}: a file is missing", dir.display())))?;
        Self::from_peft_files(dir, text, weights, device)
    }

    /// An adapter from the bytes of the two files [`LoraAdapter::peft_files`] names, read
    /// from the folder `dir` (named in errors).
    pub fn from_peft_files(dir: &Path, text: Vec<u8>, weights: Vec<u8>, device: &Device) -> Result<LoraAdapter> {
        let file = crate::io::SafetensorsFile::from_bytes(weights, &dir.join(WEIGHTS_FILE))?;
        let text = String::from_utf8(text).map_err(|_| Error::Io(format!("{CONFIG_FILE} is not UTF-8")))?;
        let config = LoraConfig::from_json(&text)?;
        // Per module, its lora_A and lora_B with the names they came under.
        type Half = Option<(String, Tensor)>;
        let mut halves: BTreeMap<String, [Half; 2]> = BTreeMap::new();
        for name in file.names()? {
            let module_of =
                |suffix: &str| name.strip_suffix(suffix).map(|m| m.strip_prefix(PREFIX).unwrap_or(m).to_string());
            let (module, slot) = match (module_of(".lora_A.weight"), module_of(".lora_B.weight")) {
                (Some(m), _) => (m, 0),
                (_, Some(m)) => (m, 1),
                _ => continue,
            };
            let half = &mut halves.entry(module.clone()).or_default()[slot];
            if let Some((first, _)) = half {
                return Err(Error::Io(format!("{first} and {name} both hold {module}'s lora_{}", ["A", "B"][slot])));
            }
            *half = Some((name.clone(), file.tensor(&name, device)?));
        }
        let mut layers = BTreeMap::new();
        for (module, pair) in halves {
            let [Some((_, a)), Some((_, b))] = pair else {
                return Err(Error::Io(format!("{PREFIX}{module}: lora_A and lora_B must both be present")));
            };
            layers.insert(module, LoraLayer { a, b });
        }
        if layers.is_empty() {
            return Err(Error::Io(format!("{} holds no LoRA tensors", dir.join(WEIGHTS_FILE).display())));
        }
        let adapter = LoraAdapter { config, layers };
        adapter.validate()?;
        Ok(adapter)
    }
}
