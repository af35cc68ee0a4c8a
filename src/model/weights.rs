//! The model's weights, from Hugging Face safetensors (one file or shards) or from GGUF,
//! memory-mapped. Projections stay quantized when the file holds them quantized, or are
//! quantized at load (the QLoRA base); dense weights take the activations' dtype; norms stay
//! f32. llama.cpp's converter permutes the rows of q and k for its interleaved rotary
//! embedding; the loader puts them back in Hugging Face's order, so one model (half-split
//! rotary, PEFT's adapters as they are) comes out of both sources.

use super::config::LlamaConfig;
use crate::io::{GgufFile, GgufTensor};
use crate::ops::{MatmulOptions, QMatmulOptions, QTensor, QuantFormat};
use crate::{DType, Device, Error, Result, Tensor};
use memmap2::Mmap;
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A weight matrix `[out, in]`, dense or quantized.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quantized(QTensor),
}

impl Weight {
    /// `[out, in]`.
    pub fn shape(&self) -> [usize; 2] {
        match self {
            Weight::Dense(t) => [t.shape()[0], t.shape()[1]],
            Weight::Quantized(q) => q.shape(),
        }
    }

    /// `x·Wᵀ`, x `[tokens, in]`, in x's dtype; `quantized` is how a quantized W multiplies.
    pub fn forward(&self, x: &Tensor, quantized: QMatmulOptions) -> Result<Tensor> {
        match self {
            Weight::Dense(w) => crate::ops::matmul_with(x, w, MatmulOptions::nt()),
            Weight::Quantized(q) => crate::ops::qmatmul_with(x, q, quantized),
        }
    }

    /// The dense f32 values (a quantized weight dequantized).
    pub fn to_f32(&self) -> Result<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(DType::F32),
            Weight::Quantized(q) => q.dequantize(DType::F32),
        }
    }

    pub fn as_base(&self) -> crate::ops::lora::BaseWeight<'_> {
        match self {
            Weight::Dense(t) => crate::ops::lora::BaseWeight::Dense(t),
            Weight::Quantized(q) => crate::ops::lora::BaseWeight::Quantized(q),
        }
    }
}

/// A projection: its weight and optional bias `[out]` (in the activations' dtype).
#[derive(Debug, Clone)]
pub struct Linear {
    pub weight: Weight,
    pub bias: Option<Tensor>,
}

impl Linear {
    /// `x·Wᵀ + b`, x `[tokens, in]`.
    pub fn forward(&self, x: &Tensor, quantized: QMatmulOptions) -> Result<Tensor> {
        let y = self.weight.forward(x, quantized)?;
        match &self.bias {
            Some(b) => crate::ops::add_bias(&y, b),
            None => Ok(y),
        }
    }
}

/// The seven projections a layer has, by their Hugging Face module names.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// One decoder layer's weights.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    /// `input_layernorm`, `[hidden]` f32.
    pub attn_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    /// `post_attention_layernorm`, `[hidden]` f32.
    pub mlp_norm: Tensor,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl LayerWeights {
    /// The projection with Hugging Face's module name (`q_proj`, ..., `down_proj`).
    pub fn projection(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "q_proj" => &self.q,
            "k_proj" => &self.k,
            "v_proj" => &self.v,
            "o_proj" => &self.o,
            "gate_proj" => &self.gate,
            "up_proj" => &self.up,
            "down_proj" => &self.down,
            _ => return None,
        })
    }
}

/// The whole model's weights.
#[derive(Debug, Clone)]
pub struct ModelWeights {
    /// `[vocab, hidden]`.
    pub embed: Weight,
    pub layers: Vec<LayerWeights>,
    /// The final norm, `[hidden]` f32.
    pub norm: Tensor,
    /// `[vocab, hidden]`; `None` when tied to the embedding.
    pub lm_head: Option<Weight>,
}

impl ModelWeights {
    /// The output head: `lm_head`, or the embedding when tied.
    pub fn head(&self) -> &Weight {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every dense weight under its Hugging Face name (the names of a full fine-tuning
    /// step's gradients), in a fixed order, for an optimizer to update in place. Quantized
    /// weights are frozen and left out.
    pub fn dense_mut(&mut self) -> Vec<(String, &mut Tensor)> {
        let mut out = Vec::new();
        if let Weight::Dense(t) = &mut self.embed {
            out.push(("model.embed_tokens.weight".to_string(), t));
        }
        for (l, layer) in self.layers.iter_mut().enumerate() {
            out.push((format!("model.layers.{l}.input_layernorm.weight"), &mut layer.attn_norm));
            out.push((format!("model.layers.{l}.post_attention_layernorm.weight"), &mut layer.mlp_norm));
            let projections = [
                ("self_attn.q_proj", &mut layer.q),
                ("self_attn.k_proj", &mut layer.k),
                ("self_attn.v_proj", &mut layer.v),
                ("self_attn.o_proj", &mut layer.o),
                ("mlp.gate_proj", &mut layer.gate),
                ("mlp.up_proj", &mut layer.up),
                ("mlp.down_proj", &mut layer.down),
            ];
            for (name, linear) in projections {
                if let Weight::Dense(t) = &mut linear.weight {
                    out.push((format!("model.layers.{l}.{name}.weight"), t));
                }
                if let Some(bias) = &mut linear.bias {
                    out.push((format!("model.layers.{l}.{name}.bias"), bias));
                }
            }
        }
        out.push(("model.norm.weight".to_string(), &mut self.norm));
        if let Some(Weight::Dense(t)) = &mut self.lm_head {
            out.push(("lm_head.weight".to_string(), t));
        }
        out
    }
}

/// How weights are loaded.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// The activations' dtype (f32 or bf16; f16 too), which dense projections take.
    pub dtype: DType,
    /// Quantize dense projections at load (the QLoRA base). Weights the file holds
    /// quantized stay as they are; embeddings, the head and the norms are not quantized.
    pub quantize: Option<QuantFormat>,
    /// How quantized projections multiply: [`QMatmulOptions::int8_activations`] rounds the
    /// activations to 8 bits per block on the CPU's decoding path, as llama.cpp does (faster,
    /// not exact); off by default. The output head always multiplies exactly.
    pub quantized_matmul: QMatmulOptions,
}

impl LoadOptions {
    pub fn new(device: &Device) -> LoadOptions {
        LoadOptions { device: *device, dtype: DType::F32, quantize: None, quantized_matmul: QMatmulOptions::default() }
    }

    /// Allows 8-bit activations in quantized products (see the field).
    pub fn int8_activations(self, on: bool) -> LoadOptions {
        LoadOptions { quantized_matmul: QMatmulOptions { int8_activations: on }, ..self }
    }

    pub fn dtype(self, dtype: DType) -> LoadOptions {
        LoadOptions { dtype, ..self }
    }

    pub fn quantize(self, format: Option<QuantFormat>) -> LoadOptions {
        LoadOptions { quantize: format, ..self }
    }
}

/// Where a raw weight comes from, before it takes its final form.
enum Raw {
    Dense(Tensor),
    Quantized(QTensor),
}

/// Reads named tensors from a checkpoint in one of the two formats.
trait Source {
    /// The file a tensor would be read from, for messages.
    fn describe(&self) -> String;
    /// Tensor `hf_name` (Hugging Face's name), or `None` when absent; `rows` reorders q/k.
    fn read(&self, hf_name: &str, permute_heads: Option<usize>) -> Result<Option<Raw>>;
}

/// The GGUF name of a Hugging Face tensor name.
fn gguf_name(hf: &str) -> Option<String> {
    let simple = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some(s.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let (module, kind) = tail.rsplit_once('.')?;
    let g = match module {
        "input_layernorm" => "attn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "post_attention_layernorm" => "ffn_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// The row order that undoes llama.cpp's q/k permutation (`convert_hf_to_gguf.py`'s
/// `permute`: within each head, rows `[0, hd/2)` and `[hd/2, hd)` interleaved). Row
/// `h·hd + t·hd/2 + j` of Hugging Face's weight is row `h·hd + 2j + t` of the file.
pub fn unpermute_order(rows: usize, heads: usize) -> Result<Vec<usize>> {
    if heads == 0 || !rows.is_multiple_of(heads) || !(rows / heads).is_multiple_of(2) {
        return Err(Error::Shape(format!("{rows} rows do not split into {heads} heads of an even size")));
    }
    let hd = rows / heads;
    let half = hd / 2;
    Ok((0..rows)
        .map(|r| {
            let (h, i) = (r / hd, r % hd);
            let (t, j) = (i / half, i % half);
            h * hd + 2 * j + t
        })
        .collect())
}

struct GgufSource<'a> {
    file: &'a GgufFile,
    device: Device,
}

impl Source for GgufSource<'_> {
    fn describe(&self) -> String {
        self.file.path().display().to_string()
    }

    fn read(&self, hf_name: &str, permute_heads: Option<usize>) -> Result<Option<Raw>> {
        let Some(name) = gguf_name(hf_name) else { return Ok(None) };
        let Ok(info) = self.file.tensor_info(&name) else { return Ok(None) };
        let loaded = match permute_heads {
            Some(heads) => {
                let order = unpermute_order(info.shape().first().copied().unwrap_or(0), heads)
                    .map_err(|e| Error::Shape(format!("{}: {name}: {e}", self.describe())))?;
                self.file.load_rows(&name, &order, &self.device)?
            }
            None => self.file.load(&name, &self.device)?,
        };
        Ok(Some(match loaded {
            GgufTensor::Dense(t) => Raw::Dense(t),
            GgufTensor::Quantized(q) => Raw::Quantized(q),
        }))
    }
}

/// Hugging Face safetensors: `model.safetensors`, or the shards `model.safetensors.index.json`
/// lists, each memory-mapped.
struct SafetensorsSource {
    /// Tensor name → index of its file.
    index: BTreeMap<String, usize>,
    files: Vec<Shard>,
    device: Device,
}

/// One memory-mapped safetensors file and its header, parsed once.
struct Shard {
    path: PathBuf,
    map: Mmap,
    /// Where the data starts: past the 8-byte length and the header.
    data_start: usize,
    header: safetensors::tensor::Metadata,
}

impl SafetensorsSource {
    fn open(dir: &Path, device: &Device) -> Result<SafetensorsSource> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let names: Vec<PathBuf> = if index_path.is_file() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|e| Error::Io(format!("reading {}: {e}", index_path.display())))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::Io(format!("{}: {e}", index_path.display())))?;
            let Some(map) = json.get("weight_map").and_then(|m| m.as_object()) else {
                return Err(Error::Io(format!("{}: no `weight_map` object", index_path.display())));
            };
            let mut shards: Vec<String> = Vec::new();
            for (name, file) in map {
                let Some(file) = file.as_str().filter(|f| !f.contains('/') && !f.contains('\\') && *f != "..") else {
                    return Err(Error::Io(format!("{}: {name} maps to {file}, not a file name", index_path.display())));
                };
                if !shards.iter().any(|s| s == file) {
                    shards.push(file.to_string());
                }
            }
            shards.sort();
            shards.into_iter().map(|s| dir.join(s)).collect()
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(Error::Io(format!(
                "{} holds neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        };
        let mut files: Vec<Shard> = Vec::new();
        let mut index = BTreeMap::new();
        for (i, path) in names.into_iter().enumerate() {
            let file = std::fs::File::open(&path).map_err(|e| Error::Io(format!("opening {}: {e}", path.display())))?;
            // SAFETY: the map is read-only; a file truncated underneath would fault, as with
            // any memory-mapped reader, and the file is only read while the model loads.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::Io(format!("mapping {}: {e}", path.display())))?;
            // Checked whole once (offsets inside the file), then read through its header.
            let invalid = |e: safetensors::SafeTensorError| {
                Error::Io(format!("{} is not a valid safetensors file: {e}", path.display()))
            };
            SafeTensors::deserialize(&map).map_err(invalid)?;
            let (header_len, header) = SafeTensors::read_metadata(&map).map_err(invalid)?;
            for name in header.tensors().keys() {
                if let Some(other) = index.insert(name.clone(), i) {
                    return Err(Error::Io(format!(
                        "tensor {name} is in both {} and {}",
                        files[other].path.display(),
                        path.display()
                    )));
                }
            }
            files.push(Shard { path, map, data_start: 8 + header_len, header });
        }
        Ok(SafetensorsSource { index, files, device: *device })
    }
}

impl Source for SafetensorsSource {
    fn describe(&self) -> String {
        match self.files.as_slice() {
            [shard] => shard.path.display().to_string(),
            _ => format!(
                "{} shards in {}",
                self.files.len(),
                self.files[0].path.parent().unwrap_or(Path::new(".")).display()
            ),
        }
    }

    fn read(&self, hf_name: &str, _permute_heads: Option<usize>) -> Result<Option<Raw>> {
        let Some(&i) = self.index.get(hf_name) else { return Ok(None) };
        let shard = &self.files[i];
        let Some(info) = shard.header.info(hf_name) else { return Ok(None) };
        let dtype = match info.dtype {
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            other => {
                return Err(Error::DType(format!(
                    "{}: {hf_name} is {other:?}; kiln reads f32, f16 and bf16 weights",
                    shard.path.display()
                )));
            }
        };
        // `deserialize` checked at open that every tensor's bytes lie inside the file.
        let (start, end) = info.data_offsets;
        let data = shard
            .map
            .get(shard.data_start + start..shard.data_start + end)
            .ok_or_else(|| Error::Io(format!("{}: {hf_name}'s bytes lie outside the file", shard.path.display())))?;
        Tensor::from_le_bytes(data, &info.shape, dtype, &self.device).map(|t| Some(Raw::Dense(t)))
    }
}

/// Loads the weights of `config` from a GGUF file.
pub(crate) fn load_gguf(file: &GgufFile, config: &LlamaConfig, options: &LoadOptions) -> Result<ModelWeights> {
    // llama.cpp permutes q and k for the architectures it rotates interleaved.
    let permuted = matches!(config.architecture.as_str(), "llama" | "mistral");
    let source = GgufSource { file, device: options.device };
    load(&source, config, options, permuted)
}

/// Loads the weights of `config` from a Hugging Face model folder.
pub(crate) fn load_safetensors(dir: &Path, config: &LlamaConfig, options: &LoadOptions) -> Result<ModelWeights> {
    let source = SafetensorsSource::open(dir, &options.device)?;
    load(&source, config, options, false)
}

fn load(source: &dyn Source, c: &LlamaConfig, options: &LoadOptions, permuted: bool) -> Result<ModelWeights> {
    if !options.dtype.is_float() {
        return Err(Error::DType(format!("model activations must be a float dtype, got {}", options.dtype)));
    }
    let (q_out, kv_out) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
    let required = |name: &str, heads: Option<usize>| -> Result<Raw> {
        source.read(name, heads.filter(|_| permuted))?.ok_or_else(|| {
            Error::InvalidArgument(format!("{}: the checkpoint has no tensor {name}", source.describe()))
        })
    };
    let check = |name: &str, shape: &[usize], expected: &[usize]| -> Result<()> {
        if shape != expected {
            return Err(Error::Shape(format!(
                "{}: {name} is {shape:?}, but the config makes it {expected:?}",
                source.describe()
            )));
        }
        Ok(())
    };
    let vector = |name: &str, len: usize, dtype: DType| -> Result<Tensor> {
        match required(name, None)? {
            Raw::Dense(t) => {
                check(name, t.shape(), &[len])?;
                t.to_dtype(dtype)
            }
            Raw::Quantized(_) => {
                Err(Error::DType(format!("{}: {name} is quantized; a vector must be dense", source.describe())))
            }
        }
    };
    let matrix =
        |name: &str, shape: [usize; 2], heads: Option<usize>, quantize: Option<QuantFormat>| -> Result<Weight> {
            match required(name, heads)? {
                Raw::Quantized(q) => {
                    check(name, &q.shape(), &shape)?;
                    Ok(Weight::Quantized(q))
                }
                Raw::Dense(t) => {
                    check(name, t.shape(), &shape)?;
                    match quantize {
                        Some(format) => {
                            let host = t.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
                            let q = QTensor::quantize(&host, format).map_err(|e| {
                                Error::InvalidArgument(format!("{}: quantizing {name}: {e}", source.describe()))
                            })?;
                            Ok(Weight::Quantized(q.to_device(&options.device)?))
                        }
                        None => Ok(Weight::Dense(t.to_dtype(options.dtype)?)),
                    }
                }
            }
        };
    let linear = |prefix: &str, shape: [usize; 2], heads: Option<usize>, bias: bool| -> Result<Linear> {
        let weight = matrix(&format!("{prefix}.weight"), shape, heads, options.quantize)?;
        let bias = if bias {
            let name = format!("{prefix}.bias");
            Some(match required(&name, heads)? {
                Raw::Dense(t) => {
                    check(&name, t.shape(), &[shape[0]])?;
                    t.to_dtype(options.dtype)?
                }
                Raw::Quantized(_) => {
                    return Err(Error::DType(format!(
                        "{}: {name} is quantized; a bias must be dense",
                        source.describe()
                    )));
                }
            })
        } else {
            None
        };
        Ok(Linear { weight, bias })
    };
    let embed = matrix("model.embed_tokens.weight", [c.vocab_size, c.hidden_size], None, None)?;
    // No capacity from the config: a hostile layer count fails at its first missing tensor.
    let mut layers = Vec::new();
    for i in 0..c.num_layers {
        let p = format!("model.layers.{i}");
        let (h, f) = (c.hidden_size, c.intermediate_size);
        layers.push(LayerWeights {
            attn_norm: vector(&format!("{p}.input_layernorm.weight"), h, DType::F32)?,
            q: linear(&format!("{p}.self_attn.q_proj"), [q_out, h], Some(c.num_heads), c.qkv_bias)?,
            k: linear(&format!("{p}.self_attn.k_proj"), [kv_out, h], Some(c.num_kv_heads), c.qkv_bias)?,
            v: linear(&format!("{p}.self_attn.v_proj"), [kv_out, h], None, c.qkv_bias)?,
            o: linear(&format!("{p}.self_attn.o_proj"), [h, q_out], None, c.o_bias)?,
            mlp_norm: vector(&format!("{p}.post_attention_layernorm.weight"), h, DType::F32)?,
            gate: linear(&format!("{p}.mlp.gate_proj"), [f, h], None, c.mlp_bias)?,
            up: linear(&format!("{p}.mlp.up_proj"), [f, h], None, c.mlp_bias)?,
            down: linear(&format!("{p}.mlp.down_proj"), [h, f], None, c.mlp_bias)?,
        });
    }
    let norm = vector("model.norm.weight", c.hidden_size, DType::F32)?;
    let lm_head = if c.tie_word_embeddings {
        None
    } else {
        Some(matrix("lm_head.weight", [c.vocab_size, c.hidden_size], None, None)?)
    };
    Ok(ModelWeights { embed, layers, norm, lm_head })
}
