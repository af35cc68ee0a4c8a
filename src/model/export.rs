//! A model, with a LoRA adapter merged into its weights, written as a GGUF file that
//! llama.cpp runs: its `llama` architecture (tensor names, `llama.*` metadata, q and k rows
//! in its interleaved-rotary order), 2-D weights Q8_0, norms and biases F32, and the
//! tokenizer and chat template of the model it came from.

use super::adapter::LoraAdapter;
use super::config::LlamaConfig;
use super::llama::{Llama, module_path};
use super::tokenizer::Tokenizer;
use super::weights::{PROJECTIONS, Weight, unpermute_order};
use crate::io::{GgmlType, GgufArray, GgufFile, GgufValue, GgufWriter};
use crate::ops::{RopeLayout, RopeScaling};
use crate::{DType, Device, Error, Result, Tensor};
use rayon::prelude::*;
use serde_json::Value as Json;
use std::path::Path;

/// llama.cpp's `LLAMA_FTYPE_MOSTLY_Q8_0`.
const FILE_TYPE_MOSTLY_Q8_0: u32 = 7;
/// gguf-py's `GGML_QUANT_VERSION`.
const QUANTIZATION_VERSION: u32 = 2;
const ALIGNMENT: u32 = 32;

/// llama.cpp's names of the seven projections, in [`PROJECTIONS`]' order.
const GGUF_PROJECTIONS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// gguf-py's `TokenType`.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

/// Writes `model` with `adapter` merged (W' = W + s·B·A for every projection it adapts, s
/// its per-module scale, computed on the CPU in f32 from the base weight, dense or
/// dequantized) to `out` as a GGUF of llama.cpp's `llama` architecture, atomically (a
/// temporary beside it, then a rename). Without an adapter the base is written as it is.
///
/// - Tensors: `token_embd.weight`, `blk.N.{attn_norm, attn_q, attn_k, attn_v, attn_output,
///   ffn_norm, ffn_gate, ffn_up, ffn_down}.weight` and their biases when the model has them,
///   `output_norm.weight`, and `output.weight` when the head is not tied. Matrices are Q8_0
///   (F16 for one whose rows are not whole blocks of 32, as llama.cpp's converter falls
///   back), norms and biases F32. kiln keeps q and k in Hugging Face's row order whichever
///   file the model came from; they are written permuted as llama.cpp's converter permutes
///   them, so llama.cpp and kiln (which undoes it on load) run the same model.
/// - Metadata: `general.{architecture, name, file_type (7, Q8_0), quantization_version,
///   alignment}` and `llama.*` (context, sizes, heads, eps, rope base and dimensions, vocab
///   size, linear rope scaling; llama3 rope scaling as llama.cpp's `rope_freqs.weight`, which
///   kiln's own loader does not read).
/// - Tokenizer: when `source` (the file or folder the model was loaded from) is a GGUF file,
///   every `tokenizer.*` key of it (and its `general.name`, `basename`, `size_label`,
///   `license`); when it is a Hugging Face folder, the `tokenizer.ggml.*` keys llama.cpp's
///   converter writes for a byte-level BPE `tokenizer.json` (tokens padded to the
///   vocabulary with `[PADn]`, their types, merges, pre-tokenizer, special ids, whether BOS
///   and EOS are added) and the chat template.
///
/// Errors, with nothing written: `Shape` when a module of the adapter is not a projection of
/// the model or its A/B do not fit it; `InvalidArgument` for an adapter
/// [`LoraAdapter::validate`] refuses, a `source` that describes another model (its sizes
/// differ) or has no tokenizer, a merged weight that is not finite; `Unsupported` for a
/// partial rotary embedding, an interleaved rotary layout, a tokenizer model or
/// pre-tokenizer llama.cpp's converter would not name; `Io` from the file system.
pub fn export_gguf(model: &Llama, adapter: Option<&LoraAdapter>, source: &Path, out: &Path) -> Result<()> {
    let config = &model.config;
    check_exportable(model, adapter)?;
    let mut gguf = GgufWriter::new();
    metadata(&mut gguf, config)?;
    if source.is_dir() {
        let source_config = LlamaConfig::from_hf_file(source.join("config.json"))?;
        same_model(config, &source_config, source)?;
        let name = source.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        gguf.add_metadata("general.name", GgufValue::String(name))?;
        for (key, value) in hf_tokenizer(source, config.vocab_size)? {
            gguf.add_metadata(&key, value)?;
        }
    } else {
        let file = GgufFile::open(source)?;
        same_model(config, &LlamaConfig::from_gguf(&file)?, source)?;
        gguf_tokenizer(&mut gguf, &file, config.vocab_size)?;
    }
    tensors(&mut gguf, model, adapter)?;
    gguf.write(out)
}

/// The checks that need no weight read: the adapter fits, the rotary embedding is one
/// llama.cpp's `llama` runs.
fn check_exportable(model: &Llama, adapter: Option<&LoraAdapter>) -> Result<()> {
    let c = &model.config;
    if c.rope.layout != RopeLayout::HalfSplit {
        return Err(Error::Unsupported(
            "exporting a model whose weights are in the interleaved rotary layout: kiln's loaders give the half-split \
             one"
            .into(),
        ));
    }
    if c.rope.rotary_dim_for(c.head_dim)? != c.head_dim {
        return Err(Error::Unsupported(format!(
            "exporting a partial rotary embedding ({} of {} features) as llama.cpp's llama architecture",
            c.rope.rotary_dim_for(c.head_dim)?,
            c.head_dim
        )));
    }
    let Some(adapter) = adapter else { return Ok(()) };
    adapter.validate()?;
    let mut known = 0;
    for (l, layer) in model.weights.layers.iter().enumerate() {
        for (p, name) in PROJECTIONS.iter().enumerate() {
            let module = module_path(l, p);
            if adapter.layers.contains_key(&module) {
                let shape = layer.projection(name).map(|lin| lin.weight.shape()).unwrap_or_default();
                adapter.check_fits(&module, shape)?;
                known += 1;
            }
        }
    }
    if known != adapter.layers.len() {
        let stray = adapter
            .layers
            .keys()
            .find(|m| {
                !(0..model.weights.layers.len()).any(|l| (0..PROJECTIONS.len()).any(|p| module_path(l, p) == **m))
            })
            .cloned()
            .unwrap_or_default();
        return Err(Error::Shape(format!(
            "the adapter adapts {stray}, which is not a projection of this model ({} layers)",
            model.weights.layers.len()
        )));
    }
    Ok(())
}

/// `Err` unless `source` describes the model being exported.
fn same_model(model: &LlamaConfig, source: &LlamaConfig, path: &Path) -> Result<()> {
    let sizes = |c: &LlamaConfig| [c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads];
    if sizes(model) != sizes(source) || model.num_kv_heads != source.num_kv_heads {
        return Err(Error::InvalidArgument(format!(
            "{} describes another model (vocab, hidden, intermediate, layers, heads {:?}; the model has {:?})",
            path.display(),
            sizes(source),
            sizes(model)
        )));
    }
    Ok(())
}

fn metadata(gguf: &mut GgufWriter, c: &LlamaConfig) -> Result<()> {
    let u32_of = |what: &str, v: usize| {
        u32::try_from(v).map_err(|_| Error::InvalidArgument(format!("{what} {v} does not fit GGUF's u32")))
    };
    let mut put = |key: &str, value: GgufValue| gguf.add_metadata(key, value);
    put("general.architecture", GgufValue::String("llama".into()))?;
    put("general.file_type", GgufValue::U32(FILE_TYPE_MOSTLY_Q8_0))?;
    put("general.quantization_version", GgufValue::U32(QUANTIZATION_VERSION))?;
    put("general.alignment", GgufValue::U32(ALIGNMENT))?;
    for (key, v) in [
        ("vocab_size", c.vocab_size),
        ("context_length", c.max_position_embeddings),
        ("embedding_length", c.hidden_size),
        ("block_count", c.num_layers),
        ("feed_forward_length", c.intermediate_size),
        ("attention.head_count", c.num_heads),
        ("attention.head_count_kv", c.num_kv_heads),
        ("attention.key_length", c.head_dim),
        ("attention.value_length", c.head_dim),
        ("rope.dimension_count", c.head_dim),
    ] {
        put(&format!("llama.{key}"), GgufValue::U32(u32_of(key, v)?))?;
    }
    put("llama.attention.layer_norm_rms_epsilon", GgufValue::F32(c.rms_norm_eps))?;
    put("llama.rope.freq_base", GgufValue::F32(c.rope.theta as f32))?;
    if let RopeScaling::Linear { factor } = c.rope.scaling {
        put("llama.rope.scaling.type", GgufValue::String("linear".into()))?;
        put("llama.rope.scaling.factor", GgufValue::F32(factor as f32))?;
    }
    Ok(())
}

/// The tokenizer keys (and a few `general.*` ones) of a GGUF source, copied.
fn gguf_tokenizer(gguf: &mut GgufWriter, file: &GgufFile, vocab_size: usize) -> Result<()> {
    let tokens = file.get_str_array("tokenizer.ggml.tokens")?;
    if tokens.len() != vocab_size {
        return Err(Error::InvalidArgument(format!(
            "{}: tokenizer.ggml.tokens holds {} tokens for a vocabulary of {vocab_size}",
            file.path().display(),
            tokens.len()
        )));
    }
    let carried = ["general.name", "general.basename", "general.size_label", "general.license"];
    for (key, value) in file.metadata() {
        if key.starts_with("tokenizer.") || carried.contains(&key.as_str()) {
            gguf.add_metadata(key, value.clone())?;
        }
    }
    if file.get("general.name").is_none() {
        let name = file.path().file_stem().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        gguf.add_metadata("general.name", GgufValue::String(name))?;
    }
    Ok(())
}

/// The `tokenizer.ggml.*` keys llama.cpp's converter writes for a Hugging Face byte-level
/// BPE tokenizer (its `_set_vocab_gpt2` and gguf-py's `SpecialVocab`).
fn hf_tokenizer(dir: &Path, vocab_size: usize) -> Result<Vec<(String, GgufValue)>> {
    let path = dir.join("tokenizer.json");
    let bad = |m: String| Error::InvalidArgument(format!("{}: {m}", path.display()));
    let text = std::fs::read(&path).map_err(|e| Error::Io(format!("reading {}: {e}", path.display())))?;
    let json: Json = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
    let model = &json["model"];
    if model["type"].as_str() != Some("BPE") {
        return Err(Error::Unsupported(format!(
            "{}: a {} tokenizer model; kiln exports byte-level BPE tokenizers (llama.cpp's gpt2)",
            path.display(),
            model["type"]
        )));
    }
    let pre = pre_tokenizer_name(&json["pre_tokenizer"]).ok_or_else(|| {
        Error::Unsupported(format!(
            "{}: the pre-tokenizer {} is not one kiln can name for llama.cpp (gpt-2, smollm, llama-bpe, qwen2); \
             export from a GGUF of the model instead",
            path.display(),
            json["pre_tokenizer"]
        ))
    })?;

    // id → (token, added token's (special, normalized) when it is one).
    let mut by_id: Vec<Option<(String, Option<bool>)>> = vec![None; vocab_size];
    let mut place = |id: Option<u64>, token: &str, special: Option<bool>| -> Result<()> {
        let id = id.ok_or_else(|| bad(format!("token {token:?} has no integer id")))? as usize;
        let slot = by_id.get_mut(id).ok_or_else(|| {
            bad(format!("token {token:?} has the id {id}, past the model's vocabulary of {vocab_size}"))
        })?;
        *slot = Some((token.to_string(), special));
        Ok(())
    };
    let vocab = model["vocab"].as_object().ok_or_else(|| bad("model.vocab is not an object".into()))?;
    for (token, id) in vocab {
        place(id.as_u64(), token, None)?;
    }
    for added in json["added_tokens"].as_array().map(Vec::as_slice).unwrap_or_default() {
        let content = added["content"].as_str().ok_or_else(|| bad(format!("added token {added} has no content")))?;
        place(added["id"].as_u64(), content, Some(added["special"].as_bool().unwrap_or(false)))?;
    }
    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (id, entry) in by_id.into_iter().enumerate() {
        match entry {
            None => {
                tokens.push(format!("[PAD{id}]"));
                types.push(TOKEN_UNUSED);
            }
            Some((token, None)) => {
                tokens.push(token);
                types.push(TOKEN_NORMAL);
            }
            Some((token, Some(special))) if special || looks_special(&token) => {
                tokens.push(token);
                types.push(TOKEN_CONTROL);
            }
            Some((token, Some(_))) => {
                // llama.cpp takes user-defined tokens pre-normalized: sentencepiece's space
                // marker spelled as a space.
                tokens.push(token.replace('\u{2581}', " "));
                types.push(TOKEN_USER_DEFINED);
            }
        }
    }
    let merges = model["merges"]
        .as_array()
        .ok_or_else(|| bad("model.merges is not a list".into()))?
        .iter()
        .map(|m| match m {
            Json::String(s) => Ok(s.clone()),
            Json::Array(pair) => match pair.as_slice() {
                [Json::String(a), Json::String(b)] => Ok(format!("{a} {b}")),
                _ => Err(bad(format!("merge {m} is not two tokens"))),
            },
            other => Err(bad(format!("merge {other} is not a string or a pair"))),
        })
        .collect::<Result<Vec<String>>>()?;

    let tokenizer = Tokenizer::from_hf_dir(dir)?;
    let mut keys = vec![
        ("tokenizer.ggml.model".to_string(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::Array(GgufArray::String(tokens))),
        ("tokenizer.ggml.token_type".to_string(), GgufValue::Array(GgufArray::I32(types))),
        ("tokenizer.ggml.merges".to_string(), GgufValue::Array(GgufArray::String(merges))),
    ];
    for (name, key) in [
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("sep_token", "seperator_token_id"),
        ("pad_token", "padding_token_id"),
        ("cls_token", "cls_token_id"),
        ("mask_token", "mask_token_id"),
    ] {
        let id = tokenizer.special_tokens().iter().find(|(n, _)| n == name).and_then(|(_, t)| tokenizer.token_to_id(t));
        if let Some(id) = id.filter(|&id| (id as usize) < vocab_size) {
            keys.push((format!("tokenizer.ggml.{key}"), GgufValue::U32(id)));
        }
    }
    // What the tokenizer adds around a text, seen by encoding one.
    let plain = tokenizer.encode("a", false)?;
    let with = tokenizer.encode("a", true)?;
    let add_bos =
        tokenizer.bos_id().is_some() && with.len() > plain.len() && with.first() == tokenizer.bos_id().as_ref();
    let add_eos = with.len() > plain.len() && with.last().is_some_and(|id| tokenizer.eos_ids().contains(id));
    keys.push(("tokenizer.ggml.add_bos_token".to_string(), GgufValue::Bool(add_bos)));
    keys.push(("tokenizer.ggml.add_eos_token".to_string(), GgufValue::Bool(add_eos)));
    if let Some(template) = tokenizer.chat_template() {
        keys.push(("tokenizer.chat_template".to_string(), GgufValue::String(template.to_string())));
    }
    Ok(keys)
}

/// The converter's `does_token_look_special`, for added tokens not marked special.
fn looks_special(token: &str) -> bool {
    ["<pad>", "<mask>", "<cls>", "<sep>"].contains(&token)
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<\u{ff5c}") && token.ends_with("\u{ff5c}>"))
        || (token.starts_with("<start_of_") && token.ends_with('>'))
        || (token.starts_with("<end_of_") && token.ends_with('>'))
}

/// llama.cpp's name of a `tokenizer.json` pre-tokenizer it knows, by its structure.
fn pre_tokenizer_name(pre: &Json) -> Option<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let byte_level = |p: &Json, regex: bool| {
        p["type"].as_str() == Some("ByteLevel") && p["use_regex"].as_bool().unwrap_or(true) == regex
    };
    if byte_level(pre, true) {
        return Some("gpt-2");
    }
    let parts = pre["pretokenizers"].as_array().filter(|_| pre["type"].as_str() == Some("Sequence"))?;
    match parts.as_slice() {
        [digits, bl] if digits["type"] == "Digits" && digits["individual_digits"] == true && byte_level(bl, true) => {
            Some("smollm")
        }
        [split, bl] if split["type"] == "Split" && byte_level(bl, false) => match split["pattern"]["Regex"].as_str() {
            Some(LLAMA3) => Some("llama-bpe"),
            Some(QWEN2) => Some("qwen2"),
            _ => None,
        },
        _ => None,
    }
}

/// Every tensor, merged, permuted and encoded.
fn tensors(gguf: &mut GgufWriter, model: &Llama, adapter: Option<&LoraAdapter>) -> Result<()> {
    let c = &model.config;
    let w = &model.weights;
    add_matrix(gguf, "token_embd.weight", dense(&w.embed)?, c.vocab_size, c.hidden_size)?;
    for (l, layer) in w.layers.iter().enumerate() {
        gguf.add_tensor(&format!("blk.{l}.attn_norm.weight"), &host_f32(&layer.attn_norm)?, GgmlType::F32)?;
        gguf.add_tensor(&format!("blk.{l}.ffn_norm.weight"), &host_f32(&layer.mlp_norm)?, GgmlType::F32)?;
        for (p, hf) in PROJECTIONS.iter().enumerate() {
            let linear = layer.projection(hf).ok_or_else(|| Error::InvalidArgument(format!("no projection {hf}")))?;
            let [rows, cols] = linear.weight.shape();
            let module = module_path(l, p);
            let mut values = dense(&linear.weight)?;
            if let Some(lora) = adapter.and_then(|a| a.layers.get(&module).map(|layer| (a, layer))) {
                let (a, layer) = lora;
                merge(
                    &mut values,
                    rows,
                    cols,
                    &host_f32(&layer.a)?.to_vec_f32()?,
                    &host_f32(&layer.b)?.to_vec_f32()?,
                    a.scale(&module),
                );
                if let Some(i) = values.iter().position(|v| !v.is_finite()) {
                    return Err(Error::InvalidArgument(format!(
                        "{module}: the merged weight holds {} at row {}, column {}",
                        values[i],
                        i / cols,
                        i % cols
                    )));
                }
            }
            // llama.cpp's converter permutes q by the query heads and k by the kv heads.
            let heads = match p {
                0 => Some(c.num_heads),
                1 => Some(c.num_kv_heads),
                _ => None,
            };
            let gguf_name = format!("blk.{l}.{}", GGUF_PROJECTIONS[p]);
            if let Some(heads) = heads {
                values = to_llama_cpp_rows(&values, rows, cols, heads)?;
            }
            add_matrix(gguf, &format!("{gguf_name}.weight"), values, rows, cols)?;
            if let Some(bias) = &linear.bias {
                let mut b = host_f32(bias)?.to_vec_f32()?;
                if let Some(heads) = heads {
                    b = to_llama_cpp_rows(&b, rows, 1, heads)?;
                }
                gguf.add_tensor(
                    &format!("{gguf_name}.bias"),
                    &Tensor::from_slice(&b, &[rows], &Device::Cpu)?,
                    GgmlType::F32,
                )?;
            }
        }
    }
    gguf.add_tensor("output_norm.weight", &host_f32(&w.norm)?, GgmlType::F32)?;
    if let Some(head) = &w.lm_head {
        add_matrix(gguf, "output.weight", dense(head)?, c.vocab_size, c.hidden_size)?;
    }
    if let RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } =
        c.rope.scaling
    {
        let factors = llama3_rope_factors(
            c.rope.theta,
            c.head_dim,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        );
        gguf.add_tensor(
            "rope_freqs.weight",
            &Tensor::from_slice(&factors, &[factors.len()], &Device::Cpu)?,
            GgmlType::F32,
        )?;
    }
    Ok(())
}

/// The divisor of each rotary frequency under llama3 scaling, as llama.cpp's converter
/// computes `rope_freqs` (1 for short wavelengths, `factor` for long ones, interpolated
/// between).
fn llama3_rope_factors(theta: f64, head_dim: usize, factor: f64, low: f64, high: f64, original: u32) -> Vec<f32> {
    let original = original as f64;
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..head_dim / 2)
        .map(|i| {
            let freq = 1.0 / theta.powf((2 * i) as f64 / head_dim as f64);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// A weight's f32 values on the host, row-major `[out, in]`.
fn dense(w: &Weight) -> Result<Vec<f32>> {
    w.to_f32()?.to_device(&Device::Cpu)?.to_vec_f32()
}

fn host_f32(t: &Tensor) -> Result<Tensor> {
    t.to_device(&Device::Cpu)?.to_dtype(DType::F32)
}

/// `w += scale·B·A`, w `[rows, cols]`, A `[r, cols]`, B `[rows, r]`.
fn merge(w: &mut [f32], rows: usize, cols: usize, a: &[f32], b: &[f32], scale: f32) {
    let r = b.len() / rows.max(1);
    w.par_chunks_mut(cols).enumerate().for_each(|(o, row)| {
        let mut delta = vec![0f32; cols];
        for k in 0..r {
            let coef = b[o * r + k];
            for (d, &x) in delta.iter_mut().zip(&a[k * cols..(k + 1) * cols]) {
                *d += coef * x;
            }
        }
        for (v, d) in row.iter_mut().zip(delta) {
            *v += scale * d;
        }
    });
}

/// Hugging Face's q/k rows in llama.cpp's order: row `r` goes to row `order[r]`, the order
/// kiln's loader reads them back with.
fn to_llama_cpp_rows(values: &[f32], rows: usize, cols: usize, heads: usize) -> Result<Vec<f32>> {
    let order = unpermute_order(rows, heads)?;
    let mut out = vec![0f32; values.len()];
    for (r, &to) in order.iter().enumerate() {
        out[to * cols..(to + 1) * cols].copy_from_slice(&values[r * cols..(r + 1) * cols]);
    }
    Ok(out)
}

/// A matrix as Q8_0, or F16 when its rows are not whole blocks (the converter's fallback).
fn add_matrix(gguf: &mut GgufWriter, name: &str, values: Vec<f32>, rows: usize, cols: usize) -> Result<()> {
    let t = Tensor::from_slice(&values, &[rows, cols], &Device::Cpu)?;
    let ty = if cols.is_multiple_of(32) { GgmlType::Q8_0 } else { GgmlType::F16 };
    gguf.add_tensor(name, &t, ty)
}
