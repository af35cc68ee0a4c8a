//! LoRA adapters in PEFT's files: `adapter_config.json` and `adapter_model.safetensors`
//! with tensors named `base_model.model.<module>.lora_A.weight` ([r, in]) and
//! `….lora_B.weight` ([out, r]), so an adapter trained here loads in PEFT and one from PEFT
//! loads here. Fields of the config kiln does not use are kept and written back.

use crate::{Device, Error, Result, Tensor};
use serde_json::{Map, Value, json};
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

    fn from_json(text: &str) -> Result<LoraConfig> {
        let bad = |m: String| Error::Io(format!("{CONFIG_FILE}: {m}"));
        let mut map: Map<String, Value> = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        match map.remove("peft_type").as_ref().and_then(Value::as_str) {
            Some("LORA") | None => {}
            Some(other) => return Err(bad(format!("peft_type {other:?} is not LORA"))),
        }
        let r = map
            .remove("r")
            .and_then(|v| v.as_u64())
            .filter(|&r| r > 0)
            .ok_or_else(|| bad("`r` must be a positive integer".into()))?;
        let lora_alpha = map
            .remove("lora_alpha")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| bad("`lora_alpha` must be a number".into()))?;
        let target_modules = match map.remove("target_modules") {
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|v| v.as_str().map(str::to_string).ok_or_else(|| bad("target_modules must be strings".into())))
                .collect::<Result<Vec<_>>>()?,
            Some(Value::String(s)) => vec![s],
            Some(Value::Null) | None => Vec::new(),
            Some(other) => return Err(bad(format!("target_modules is {other}"))),
        };
        let use_rslora = map.remove("use_rslora").and_then(|v| v.as_bool()).unwrap_or(false);
        let lora_dropout = map.remove("lora_dropout").and_then(|v| v.as_f64()).unwrap_or(0.0) as f32;
        let numbers = |v: Option<Value>| -> Result<BTreeMap<String, f64>> {
            match v {
                None | Some(Value::Null) => Ok(BTreeMap::new()),
                Some(Value::Object(m)) => m
                    .into_iter()
                    .map(|(k, v)| {
                        v.as_f64()
                            .map(|x| (k.clone(), x))
                            .ok_or_else(|| bad(format!("pattern entry {k} is not a number")))
                    })
                    .collect(),
                Some(other) => Err(bad(format!("a pattern must be an object, got {other}"))),
            }
        };
        let rank_pattern = numbers(map.remove("rank_pattern"))?.into_iter().map(|(k, v)| (k, v as usize)).collect();
        let alpha_pattern = numbers(map.remove("alpha_pattern"))?.into_iter().map(|(k, v)| (k, v as f32)).collect();
        Ok(LoraConfig {
            r: r as usize,
            lora_alpha: lora_alpha as f32,
            target_modules,
            use_rslora,
            lora_dropout,
            rank_pattern,
            alpha_pattern,
            other: map,
        })
    }

    fn to_json(&self) -> String {
        let mut map = self.other.clone();
        map.insert("peft_type".into(), json!("LORA"));
        map.insert("r".into(), json!(self.r));
        map.insert("lora_alpha".into(), json!(self.lora_alpha));
        map.insert("target_modules".into(), json!(self.target_modules));
        map.insert("use_rslora".into(), json!(self.use_rslora));
        map.insert("lora_dropout".into(), json!(self.lora_dropout));
        map.insert("rank_pattern".into(), json!(self.rank_pattern));
        map.insert("alpha_pattern".into(), json!(self.alpha_pattern));
        map.entry("bias").or_insert(json!("none"));
        map.entry("task_type").or_insert(json!("CAUSAL_LM"));
        map.entry("fan_in_fan_out").or_insert(json!(false));
        serde_json::to_string_pretty(&Value::Object(map)).unwrap_or_default()
    }
}

/// One adapted module: A [r, in] and B [out, r].
#[derive(Debug, Clone)]
pub struct LoraLayer {
    pub a: Tensor,
    pub b: Tensor,
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

    /// `Err` naming the tensor and the shapes unless `module` is adapted with A [r, in] and
    /// B [out, r] for a base weight of `[out, in]`.
    pub fn check_fits(&self, module: &str, weight_shape: [usize; 2]) -> Result<()> {
        let layer =
            self.layers.get(module).ok_or_else(|| Error::Shape(format!("the adapter has no layer {module}")))?;
        let [out, inp] = weight_shape;
        if layer.a.shape()[1] != inp || layer.b.shape()[0] != out {
            return Err(Error::Shape(format!(
                "{PREFIX}{module}.lora_A.weight {:?} / lora_B.weight {:?} do not fit the model's weight [{out}, {inp}]",
                layer.a.shape(),
                layer.b.shape()
            )));
        }
        Ok(())
    }

    /// Writes `adapter_config.json` and `adapter_model.safetensors` into `dir` (created if
    /// needed), each through a temporary file and a rename.
    pub fn save_peft(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let mut tensors: Vec<(String, &Tensor)> = Vec::new();
        for (module, layer) in &self.layers {
            tensors.push((format!("{PREFIX}{module}.lora_A.weight"), &layer.a));
            tensors.push((format!("{PREFIX}{module}.lora_B.weight"), &layer.b));
        }
        let meta = [("format".to_string(), "pt".to_string())].into_iter().collect();
        let named: Vec<(&str, &Tensor)> = tensors.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        crate::io::save(dir.join(WEIGHTS_FILE), &named, &meta)?;
        crate::fs::write_atomically(&dir.join(CONFIG_FILE), self.config.to_json().as_bytes())
            .map_err(|e| Error::Io(format!("writing {}: {e}", dir.join(CONFIG_FILE).display())))
    }

    /// Reads a PEFT LoRA adapter from `dir` onto `device`. `Err` naming the file or tensor
    /// for a malformed config, a tensor without its pair, ranks that disagree with the
    /// config, or shapes that are not [r, in] / [out, r].
    pub fn load_peft(dir: impl AsRef<Path>, device: &Device) -> Result<LoraAdapter> {
        let dir = dir.as_ref();
        let text = std::fs::read_to_string(dir.join(CONFIG_FILE))
            .map_err(|e| Error::Io(format!("reading {}: {e}", dir.join(CONFIG_FILE).display())))?;
        let config = LoraConfig::from_json(&text)?;
        let file = crate::io::SafetensorsFile::open(dir.join(WEIGHTS_FILE))?;
        let mut halves: BTreeMap<String, (Option<Tensor>, Option<Tensor>)> = BTreeMap::new();
        for name in file.names()? {
            let module_of =
                |suffix: &str| name.strip_suffix(suffix).map(|m| m.strip_prefix(PREFIX).unwrap_or(m).to_string());
            if let Some(module) = module_of(".lora_A.weight") {
                halves.entry(module).or_default().0 = Some(file.tensor(&name, device)?);
            } else if let Some(module) = module_of(".lora_B.weight") {
                halves.entry(module).or_default().1 = Some(file.tensor(&name, device)?);
            }
        }
        let mut layers = BTreeMap::new();
        for (module, pair) in halves {
            let (Some(a), Some(b)) = pair else {
                return Err(Error::Io(format!("{PREFIX}{module}: lora_A and lora_B must both be present")));
            };
            let (&[r, _], &[_, br]) = (a.shape(), b.shape()) else {
                return Err(Error::Shape(format!(
                    "{PREFIX}{module}: lora_A {:?} and lora_B {:?} must both be matrices",
                    a.shape(),
                    b.shape()
                )));
            };
            if br != r || r != config.rank_for(&module) {
                return Err(Error::Shape(format!(
                    "{PREFIX}{module}: lora_A {:?} and lora_B {:?} disagree with each other or with rank {}",
                    a.shape(),
                    b.shape(),
                    config.rank_for(&module)
                )));
            }
            layers.insert(module, LoraLayer { a, b });
        }
        if layers.is_empty() {
            return Err(Error::Io(format!("{} holds no LoRA tensors", dir.join(WEIGHTS_FILE).display())));
        }
        Ok(LoraAdapter { config, layers })
    }
}
