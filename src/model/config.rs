//! The model's hyperparameters, from a Hugging Face `config.json` (Llama, Mistral and
//! Qwen2 names) or from GGUF metadata (`llama.*` keys).

use crate::io::{GgufFile, GgufValue};
use crate::ops::{RopeConfig, RopeScaling};
use crate::{Error, Result};
use serde_json::{Map, Value};
use std::path::Path;

/// A Llama-style decoder's shape and constants.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `general.architecture` or `model_type` (`llama`, `mistral`, `qwen2`).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    /// The rotary embedding as the weights expect it: Hugging Face's half-split layout.
    pub rope: RopeConfig,
    /// The longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// The output head is the token embedding.
    pub tie_word_embeddings: bool,
    /// Biases on q, k and v.
    pub qkv_bias: bool,
    /// A bias on o (Llama's `attention_bias` sets both; Qwen2 has q/k/v biases only).
    pub o_bias: bool,
    /// Biases on the MLP's three projections (`mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// Tokens that end a generation.
    pub eos_token_ids: Vec<u32>,
    /// Mistral's (and Qwen2's, when `use_sliding_window`) attention window. The kernels
    /// attend to the whole prefix, so sequences stop at this length (an `Err` past it).
    pub sliding_window: Option<usize>,
}

impl LlamaConfig {
    /// `Err(InvalidArgument)` naming the field for sizes that are zero or do not fit
    /// together (heads a multiple of kv heads, an even head dim, an eps > 0, ...).
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(format!("model config: {m}")));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(format!("{name} is 0"));
            }
        }
        if self.vocab_size > u32::MAX as usize {
            return bad(format!("vocab_size {} does not fit u32 token ids", self.vocab_size));
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) || self.head_dim > crate::ops::attention::MAX_HEAD_DIM {
            return bad(format!(
                "head_dim {} must be even and at most {}",
                self.head_dim,
                crate::ops::attention::MAX_HEAD_DIM
            ));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return bad(format!("rms_norm_eps {} must be finite and > 0", self.rms_norm_eps));
        }
        if let Some(id) = self
            .bos_token_id
            .into_iter()
            .chain(self.eos_token_ids.iter().copied())
            .find(|&id| id as usize >= self.vocab_size)
        {
            return bad(format!("special token id {id} is past the vocabulary of {}", self.vocab_size));
        }
        self.rope.validate().map_err(|e| Error::InvalidArgument(format!("model config: rope: {e}")))?;
        self.rope.rotary_dim_for(self.head_dim)?;
        Ok(())
    }

    /// Reads a Hugging Face `config.json`. `Err` naming the file and the field when one is
    /// missing, of the wrong type, or inconsistent.
    pub fn from_hf_file(path: impl AsRef<Path>) -> Result<LlamaConfig> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
        Self::from_hf_json(&text).map_err(|e| e.context(&path.display().to_string()))
    }

    /// Parses the text of a Hugging Face `config.json`.
    pub fn from_hf_json(text: &str) -> Result<LlamaConfig> {
        let root: Value = serde_json::from_str(text).map_err(|e| Error::Io(format!("config.json: {e}")))?;
        let Value::Object(map) = &root else {
            return Err(Error::Io("config.json is not a JSON object".into()));
        };
        // Multimodal configs nest the language model's fields.
        let map = match map.get("text_config") {
            Some(Value::Object(inner)) => inner,
            _ => map,
        };
        let j = Json(map);
        let architecture = j.str("model_type")?.unwrap_or("llama").to_string();
        if !["llama", "mistral", "qwen2"].contains(&architecture.as_str()) {
            return Err(Error::Unsupported(format!(
                "config.json: model_type {architecture:?}; kiln reads llama, mistral and qwen2"
            )));
        }
        let hidden_size = j.required_usize("hidden_size")?;
        let num_heads = j.required_usize("num_attention_heads")?;
        let head_dim = match j.usize("head_dim")? {
            Some(d) => d,
            None if num_heads > 0 && hidden_size.is_multiple_of(num_heads) => hidden_size / num_heads,
            None => {
                return Err(Error::InvalidArgument(format!(
                    "config.json: hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads} \
                     and head_dim is not given"
                )));
            }
        };
        let attention_bias = j.bool("attention_bias")?;
        let qwen2 = architecture == "qwen2";
        let config = LlamaConfig {
            vocab_size: j.required_usize("vocab_size")?,
            hidden_size,
            intermediate_size: j.required_usize("intermediate_size")?,
            num_layers: j.required_usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads: j.usize("num_key_value_heads")?.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: j.f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope: hf_rope(&j)?,
            max_position_embeddings: j.usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: j.bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: attention_bias.unwrap_or(qwen2),
            o_bias: attention_bias.unwrap_or(false) && !qwen2,
            mlp_bias: j.bool("mlp_bias")?.unwrap_or(false),
            bos_token_id: j.token("bos_token_id")?.first().copied(),
            eos_token_ids: j.token("eos_token_id")?,
            sliding_window: match architecture.as_str() {
                "mistral" => j.usize("sliding_window")?,
                "qwen2" if j.bool("use_sliding_window")?.unwrap_or(false) => j.usize("sliding_window")?,
                _ => None,
            },
            architecture,
        };
        config.validate()?;
        Ok(config)
    }

    /// Reads the `llama.*` (or `qwen2.*`, `mistral.*`) keys of a GGUF file, as llama.cpp's
    /// converter writes them. The rotary layout stays half-split: the loader undoes the
    /// converter's q/k row permutation.
    pub fn from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
        let context = |e: Error| e.context(&file.path().display().to_string());
        let architecture = file.get_str("general.architecture").map_err(context)?.to_string();
        if !["llama", "mistral", "qwen2"].contains(&architecture.as_str()) {
            return Err(Error::Unsupported(format!(
                "{}: general.architecture {architecture:?}; kiln reads llama, mistral and qwen2",
                file.path().display()
            )));
        }
        let key = |k: &str| format!("{architecture}.{k}");
        let uint = |k: &str| gguf_uint(file, &key(k)).map_err(context);
        let required = |k: &str| {
            uint(k)?.ok_or_else(|| Error::InvalidArgument(format!("{}: {} is missing", file.path().display(), key(k))))
        };
        let hidden_size = required("embedding_length")?;
        let num_heads = required("attention.head_count")?;
        let vocab_size = match uint("vocab_size")? {
            Some(v) => v,
            None => match file.get("tokenizer.ggml.tokens") {
                Some(GgufValue::Array(a)) => a.len(),
                _ => {
                    return Err(Error::InvalidArgument(format!(
                        "{}: neither {} nor tokenizer.ggml.tokens gives the vocabulary size",
                        file.path().display(),
                        key("vocab_size")
                    )));
                }
            },
        };
        let head_dim = match uint("attention.key_length")? {
            Some(d) => d,
            None if num_heads > 0 => hidden_size / num_heads,
            None => 0,
        };
        let theta = gguf_float(file, &key("rope.freq_base")).map_err(context)?.unwrap_or(10000.0);
        let mut rope = RopeConfig::new(theta);
        if let Some(dims) = uint("rope.dimension_count")? {
            if dims != head_dim {
                rope = rope.with_rotary_dim(dims);
            }
        }
        match file.get(&key("rope.scaling.type")) {
            None => {}
            Some(GgufValue::String(t)) if t == "none" => {}
            Some(GgufValue::String(t)) if t == "linear" => {
                let factor = gguf_float(file, &key("rope.scaling.factor")).map_err(context)?.unwrap_or(1.0);
                rope = rope.with_scaling(RopeScaling::Linear { factor });
            }
            Some(other) => {
                return Err(Error::Unsupported(format!(
                    "{}: {} = {other:?} is a rope scaling kiln does not read from GGUF",
                    file.path().display(),
                    key("rope.scaling.type")
                )));
            }
        }
        if file.tensor_info("rope_freqs.weight").is_ok() {
            return Err(Error::Unsupported(format!(
                "{}: rope_freqs.weight (llama3 rope scaling stored as a tensor) is not read; load the Hugging Face \
                 model instead",
                file.path().display()
            )));
        }
        let eos = gguf_uint(file, "tokenizer.ggml.eos_token_id").map_err(context)?;
        let eot = gguf_uint(file, "tokenizer.ggml.eot_token_id").map_err(context)?;
        let mut eos_token_ids: Vec<u32> = eos.into_iter().chain(eot).map(|v| v as u32).collect();
        eos_token_ids.dedup();
        let qwen2 = architecture == "qwen2";
        let config = LlamaConfig {
            vocab_size,
            hidden_size,
            intermediate_size: required("feed_forward_length")?,
            num_layers: required("block_count")?,
            num_heads,
            num_kv_heads: uint("attention.head_count_kv")?.unwrap_or(num_heads),
            head_dim,
            rms_norm_eps: gguf_float(file, &key("attention.layer_norm_rms_epsilon")).map_err(context)?.unwrap_or(1e-5)
                as f32,
            rope,
            max_position_embeddings: uint("context_length")?.unwrap_or(2048),
            tie_word_embeddings: file.tensor_info("output.weight").is_err(),
            qkv_bias: file.tensor_info("blk.0.attn_q.bias").is_ok() || qwen2,
            o_bias: file.tensor_info("blk.0.attn_output.bias").is_ok(),
            mlp_bias: file.tensor_info("blk.0.ffn_up.bias").is_ok(),
            bos_token_id: gguf_uint(file, "tokenizer.ggml.bos_token_id").map_err(context)?.map(|v| v as u32),
            eos_token_ids,
            sliding_window: uint("attention.sliding_window")?,
            architecture,
        };
        config.validate().map_err(context)?;
        Ok(config)
    }

    /// The longest sequence the model runs as trained: the context, or the attention window
    /// when that is shorter.
    pub fn max_sequence(&self) -> usize {
        self.sliding_window.map_or(self.max_position_embeddings, |w| w.min(self.max_position_embeddings))
    }

    /// Query heads per key/value head.
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// An unsigned integer of any of GGUF's integer types, `None` when absent.
fn gguf_uint(file: &GgufFile, key: &str) -> Result<Option<usize>> {
    let v = match file.get(key) {
        None => return Ok(None),
        Some(GgufValue::U8(v)) => *v as i128,
        Some(GgufValue::U16(v)) => *v as i128,
        Some(GgufValue::U32(v)) => *v as i128,
        Some(GgufValue::U64(v)) => *v as i128,
        Some(GgufValue::I8(v)) => *v as i128,
        Some(GgufValue::I16(v)) => *v as i128,
        Some(GgufValue::I32(v)) => *v as i128,
        Some(GgufValue::I64(v)) => *v as i128,
        Some(other) => return Err(Error::InvalidArgument(format!("{key} is {other:?}, not an integer"))),
    };
    usize::try_from(v).map(Some).map_err(|_| Error::InvalidArgument(format!("{key} = {v} is not a size")))
}

fn gguf_float(file: &GgufFile, key: &str) -> Result<Option<f64>> {
    match file.get(key) {
        None => Ok(None),
        Some(GgufValue::F32(v)) => Ok(Some(*v as f64)),
        Some(GgufValue::F64(v)) => Ok(Some(*v)),
        Some(_) => gguf_uint(file, key).map(|v| v.map(|v| v as f64)),
    }
}

/// Typed reads of a config.json object, each `Err` naming the field.
struct Json<'a>(&'a Map<String, Value>);

impl Json<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.0.get(key).filter(|v| !v.is_null())
    }

    fn wrong(key: &str, what: &str, v: &Value) -> Error {
        Error::InvalidArgument(format!("config.json: `{key}` must be {what}, got {v}"))
    }

    fn usize(&self, key: &str) -> Result<Option<usize>> {
        self.get(key)
            .map(|v| v.as_u64().and_then(|n| usize::try_from(n).ok()).ok_or_else(|| Self::wrong(key, "a size", v)))
            .transpose()
    }

    fn required_usize(&self, key: &str) -> Result<usize> {
        self.usize(key)?.ok_or_else(|| Error::InvalidArgument(format!("config.json: `{key}` is missing")))
    }

    fn f64(&self, key: &str) -> Result<Option<f64>> {
        self.get(key).map(|v| v.as_f64().ok_or_else(|| Self::wrong(key, "a number", v))).transpose()
    }

    fn bool(&self, key: &str) -> Result<Option<bool>> {
        self.get(key).map(|v| v.as_bool().ok_or_else(|| Self::wrong(key, "true or false", v))).transpose()
    }

    fn str(&self, key: &str) -> Result<Option<&str>> {
        self.get(key).map(|v| v.as_str().ok_or_else(|| Self::wrong(key, "a string", v))).transpose()
    }

    /// A token id or a list of them.
    fn token(&self, key: &str) -> Result<Vec<u32>> {
        let id = |v: &Value| {
            v.as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| Self::wrong(key, "a token id or a list of them", v))
        };
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items.iter().map(id).collect(),
            Some(v) => Ok(vec![id(v)?]),
        }
    }
}

/// The rotary embedding from `rope_parameters` (transformers 5) or `rope_theta` and
/// `rope_scaling` (earlier files), with `partial_rotary_factor`.
fn hf_rope(j: &Json<'_>) -> Result<RopeConfig> {
    let params = match (j.get("rope_parameters"), j.get("rope_scaling")) {
        (Some(Value::Object(p)), _) => Some(p),
        (None, Some(Value::Object(p))) => Some(p),
        (None, None) => None,
        (Some(v), _) => return Err(Json::wrong("rope_parameters", "an object", v)),
        (None, Some(v)) => return Err(Json::wrong("rope_scaling", "an object", v)),
    };
    let p = params.map(Json);
    let theta = match p.as_ref().map(|p| p.f64("rope_theta")).transpose()?.flatten() {
        Some(t) => t,
        None => j.f64("rope_theta")?.unwrap_or(10000.0),
    };
    let mut rope = RopeConfig::new(theta);
    if let Some(factor) = j.f64("partial_rotary_factor")? {
        let head_dim = match j.usize("head_dim")? {
            Some(d) => d,
            None => j.required_usize("hidden_size")? / j.required_usize("num_attention_heads")?.max(1),
        };
        rope = rope.with_rotary_dim((head_dim as f64 * factor) as usize);
    }
    let Some(p) = p else { return Ok(rope) };
    let kind = match (p.str("rope_type")?, p.str("type")?) {
        (Some(t), _) | (None, Some(t)) => t,
        (None, None) => "default",
    };
    let need = |key: &str| {
        p.f64(key)?.ok_or_else(|| Error::InvalidArgument(format!("config.json: rope_type {kind:?} needs `{key}`")))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: need("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_max_position_embeddings: u32::try_from(need("original_max_position_embeddings")? as u64).map_err(
                |_| Error::InvalidArgument("config.json: original_max_position_embeddings is too large".into()),
            )?,
        },
        other => {
            return Err(Error::Unsupported(format!(
                "config.json: rope_type {other:?}; kiln reads default, linear and llama3"
            )));
        }
    };
    Ok(rope.with_scaling(scaling))
}
