//! The Llama-style decoder: embedding → per layer (RMSNorm, q/k/v, RoPE, causal GQA
//! attention, o, residual, RMSNorm, SwiGLU MLP, residual) → final norm → logits, on the
//! weights' device, for a batch of sequences of different lengths. Any of the seven
//! projections of any layer may carry a LoRA adapter, and each sequence of a batch picks its
//! own adapter (or none): the adapters are packed per projection and applied by the batched
//! LoRA op, so one forward serves them all.
//!
//! Layer by layer, the forward keeps to ops that each have their backward (the residual
//! stream, the norms' rstd, the attention's logsumexp), so a training step can walk it back.

use super::adapter::LoraAdapter;
use super::config::LlamaConfig;
use super::weights::{self, LayerWeights, Linear, LoadOptions, ModelWeights, PROJECTIONS, Weight};
use crate::io::GgufFile;
use crate::ops::attention::{AttentionOptions, DecodeOptions, KvCache, attention, attention_decode};
use crate::ops::lora::{AdapterSet, lora_batched};
use crate::{DType, Device, Error, Result, Tensor};
use std::collections::BTreeMap;
use std::path::Path;

/// Which logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Every position of every sequence, packed: `[Σ lens, vocab]`, sequence after sequence.
    All,
    /// The last position of each sequence: `[batch, vocab]` (zeros for an empty sequence).
    Last,
}

/// A sequence of a batch: its new token ids and the adapter it runs with.
#[derive(Debug, Clone, Copy)]
pub struct Sequence<'a> {
    pub ids: &'a [u32],
    /// A loaded adapter's name, or `None` for the base model.
    pub adapter: Option<&'a str>,
}

impl<'a> Sequence<'a> {
    pub fn new(ids: &'a [u32]) -> Sequence<'a> {
        Sequence { ids, adapter: None }
    }

    pub fn with_adapter(self, adapter: Option<&'a str>) -> Sequence<'a> {
        Sequence { adapter, ..self }
    }
}

/// The key/value caches of every layer for a batch of sequences: decoding state.
#[derive(Debug, Clone)]
pub struct KvState {
    layers: Vec<KvCache>,
}

impl KvState {
    /// Positions held per sequence.
    pub fn lens(&self) -> &[usize] {
        self.layers[0].lens()
    }

    /// Positions each sequence can hold.
    pub fn capacity(&self) -> usize {
        self.layers[0].shape()[1]
    }

    pub fn batch(&self) -> usize {
        self.layers[0].shape()[0]
    }

    /// Drops the positions of sequence b past `len` in every layer.
    pub fn truncate(&mut self, b: usize, len: usize) -> Result<()> {
        self.layers.iter_mut().try_for_each(|c| c.truncate(b, len))
    }
}

/// The adapters of one projection of one layer, packed for the batched op, and which entry
/// of the pack each loaded adapter is (`None`: it leaves this projection alone).
#[derive(Debug, Clone)]
struct PackedProjection {
    set: AdapterSet,
    entry_of: Vec<Option<i32>>,
}

/// A Llama-style model on one device.
#[derive(Debug, Clone)]
pub struct Llama {
    pub config: LlamaConfig,
    pub weights: ModelWeights,
    dtype: DType,
    device: Device,
    quantized_matmul: crate::ops::QMatmulOptions,
    /// Loaded adapters by name, in loading order.
    adapters: Vec<(String, LoraAdapter)>,
    /// `[layer][projection]`, rebuilt when an adapter loads or unloads.
    packed: Vec<[Option<PackedProjection>; 7]>,
}

impl Llama {
    /// A model from a GGUF file, or from a Hugging Face folder (`config.json` and
    /// safetensors), by what `path` is.
    pub fn load(path: impl AsRef<Path>, options: &LoadOptions) -> Result<Llama> {
        let path = path.as_ref();
        if path.is_dir() { Self::from_hf_dir(path, options) } else { Self::from_gguf(&GgufFile::open(path)?, options) }
    }

    /// A model from a Hugging Face folder: `config.json` and `model.safetensors` (or shards
    /// with `model.safetensors.index.json`).
    pub fn from_hf_dir(dir: impl AsRef<Path>, options: &LoadOptions) -> Result<Llama> {
        let dir = dir.as_ref();
        let config = LlamaConfig::from_hf_file(dir.join("config.json"))?;
        let weights = weights::load_safetensors(dir, &config, options)?;
        Ok(Self::new(config, weights, options))
    }

    /// A model from a GGUF file's metadata and tensors.
    pub fn from_gguf(file: &GgufFile, options: &LoadOptions) -> Result<Llama> {
        let config = LlamaConfig::from_gguf(file)?;
        let weights = weights::load_gguf(file, &config, options)?;
        Ok(Self::new(config, weights, options))
    }

    fn new(config: LlamaConfig, weights: ModelWeights, options: &LoadOptions) -> Llama {
        let packed = (0..config.num_layers).map(|_| Default::default()).collect();
        Llama {
            config,
            weights,
            dtype: options.dtype,
            device: options.device,
            quantized_matmul: options.quantized_matmul,
            adapters: Vec::new(),
            packed,
        }
    }

    /// The activations' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Loads `adapter` under `name` (replacing an adapter of that name), without touching the
    /// base. `Err`, with nothing changed, when a module it adapts is not one of the model's
    /// projections or its shapes do not fit.
    pub fn load_adapter(&mut self, name: &str, adapter: LoraAdapter) -> Result<()> {
        adapter.validate()?;
        for module in adapter.layers.keys() {
            let (layer, projection) = self.module(module).ok_or_else(|| {
                Error::Shape(format!(
                    "adapter {name}: {module} is not a projection of this model (model.layers.{{0..{}}}.self_attn.\
                     {{q,k,v,o}}_proj or .mlp.{{gate,up,down}}_proj)",
                    self.config.num_layers
                ))
            })?;
            let weight = self.weights.layers[layer].projection(projection).map(|l| l.weight.shape());
            adapter.check_fits(module, weight.unwrap_or_default())?;
        }
        let adapter = LoraAdapter {
            config: adapter.config,
            layers: adapter
                .layers
                .into_iter()
                .map(|(m, l)| {
                    Ok((
                        m,
                        super::adapter::LoraLayer { a: l.a.to_device(&self.device)?, b: l.b.to_device(&self.device)? },
                    ))
                })
                .collect::<Result<_>>()?,
        };
        let mut adapters = self.adapters.clone();
        match adapters.iter_mut().find(|(n, _)| n == name) {
            Some(slot) => slot.1 = adapter,
            None => adapters.push((name.to_string(), adapter)),
        }
        self.packed = self.pack(&adapters)?;
        self.adapters = adapters;
        Ok(())
    }

    /// Unloads adapter `name`. `Err` when no adapter has that name.
    pub fn unload_adapter(&mut self, name: &str) -> Result<LoraAdapter> {
        let i = self
            .adapters
            .iter()
            .position(|(n, _)| n == name)
            .ok_or_else(|| Error::InvalidArgument(format!("no adapter named {name:?} is loaded")))?;
        let mut adapters = self.adapters.clone();
        let (_, removed) = adapters.remove(i);
        self.packed = self.pack(&adapters)?;
        self.adapters = adapters;
        Ok(removed)
    }

    /// The loaded adapters' names, in loading order.
    pub fn adapter_names(&self) -> Vec<&str> {
        self.adapters.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// `(layer, projection)` of a module path `model.layers.{i}.self_attn.q_proj`.
    fn module(&self, module: &str) -> Option<(usize, &'static str)> {
        let rest = module.strip_prefix("model.layers.")?;
        let (layer, _) = rest.split_once('.')?;
        let layer: usize = layer.parse().ok().filter(|&l| l < self.config.num_layers)?;
        let p = (0..PROJECTIONS.len()).find(|&p| module == module_path(layer, p))?;
        Some((layer, PROJECTIONS[p]))
    }

    fn pack(&self, adapters: &[(String, LoraAdapter)]) -> Result<Vec<[Option<PackedProjection>; 7]>> {
        let mut packed: Vec<[Option<PackedProjection>; 7]> =
            (0..self.config.num_layers).map(|_| Default::default()).collect();
        for (layer, slots) in packed.iter_mut().enumerate() {
            for (p, slot) in slots.iter_mut().enumerate() {
                let module = module_path(layer, p);
                let mut members = Vec::new();
                let mut entry_of = Vec::new();
                for (_, adapter) in adapters {
                    match adapter.layers.get(&module) {
                        Some(l) => {
                            entry_of.push(Some(members.len() as i32));
                            members.push((&l.a, &l.b, adapter.scale(&module)));
                        }
                        None => entry_of.push(None),
                    }
                }
                if !members.is_empty() {
                    *slot = Some(PackedProjection { set: AdapterSet::new(&members)?, entry_of });
                }
            }
        }
        Ok(packed)
    }

    /// An empty decoding state for `batch` sequences of up to `capacity` positions each.
    pub fn new_state(&self, batch: usize, capacity: usize) -> Result<KvState> {
        let c = &self.config;
        let layers = (0..c.num_layers)
            .map(|_| KvCache::new(batch, capacity, c.num_kv_heads, c.head_dim, self.dtype, &self.device))
            .collect::<Result<Vec<_>>>()?;
        Ok(KvState { layers })
    }

    /// The forward pass over a batch of sequences. Without a state, each sequence starts at
    /// position 0 and attends to itself (a whole prompt, or a training batch). With one, the
    /// ids are each sequence's next tokens: their keys and values are appended to the state
    /// and they attend to everything the state holds (prefill, then decoding one token at a
    /// time). Returns f32 logits as `which` says.
    ///
    /// Errors: `InvalidArgument` for a token id past the vocabulary (naming the sequence and
    /// position), an adapter that is not loaded, or a sequence that would pass the state's
    /// capacity or the model's context; `Shape` when the batch does not match the state.
    pub fn forward(&self, batch: &[Sequence<'_>], state: Option<&mut KvState>, which: Logits) -> Result<Tensor> {
        // On the CPU, the whole pass runs on one of rayon's workers: each op's parallel loop
        // is then split among the workers directly, instead of handed over from an outside
        // thread and waited for (a sleep and a wake-up per op, hundreds per token).
        if self.device.is_cpu() && rayon::current_thread_index().is_none() {
            return rayon::scope(|_| self.forward_on_worker(batch, state, which));
        }
        self.forward_on_worker(batch, state, which)
    }

    fn forward_on_worker(&self, batch: &[Sequence<'_>], state: Option<&mut KvState>, which: Logits) -> Result<Tensor> {
        let c = &self.config;
        let b = batch.len();
        let lens: Vec<usize> = batch.iter().map(|s| s.ids.len()).collect();
        let s = lens.iter().copied().max().unwrap_or(0);
        let past: Vec<usize> = match &state {
            Some(st) => {
                if st.batch() != b {
                    return Err(Error::Shape(format!("a batch of {b} sequences for a state of {}", st.batch())));
                }
                st.lens().to_vec()
            }
            None => vec![0; b],
        };
        for (i, seq) in batch.iter().enumerate() {
            if let Some((pos, &id)) = seq.ids.iter().enumerate().find(|&(_, &id)| id as usize >= c.vocab_size) {
                return Err(Error::InvalidArgument(format!(
                    "sequence {i}, position {pos}: token id {id} is past the vocabulary of {}",
                    c.vocab_size
                )));
            }
            let end = past[i] + seq.ids.len();
            let limit = state.as_ref().map_or(c.max_sequence(), |st| st.capacity().min(c.max_sequence()));
            if end > limit {
                let what = if state.as_ref().is_some_and(|st| st.capacity() < c.max_sequence()) {
                    "cache holds"
                } else if c.max_sequence() < c.max_position_embeddings {
                    "model's attention window holds (kiln attends to the whole prefix)"
                } else {
                    "model's context holds"
                };
                return Err(Error::InvalidArgument(format!(
                    "sequence {i} would reach {end} positions, past the {limit} the {what}"
                )));
            }
        }
        let adapter_of: Vec<Option<usize>> = batch
            .iter()
            .map(|seq| match seq.adapter {
                None => Ok(None),
                Some(name) => self.adapters.iter().position(|(n, _)| n == name).map(Some).ok_or_else(|| {
                    Error::InvalidArgument(format!(
                        "adapter {name:?} is not loaded (loaded: {:?})",
                        self.adapter_names()
                    ))
                }),
            })
            .collect::<Result<_>>()?;
        if b == 0 || s == 0 {
            let rows = match which {
                Logits::All => 0,
                Logits::Last => b,
            };
            return Tensor::zeros(&[rows, c.vocab_size], DType::F32, &self.device);
        }

        // Padded [b, s] ids and positions; padding rows are computed and never read.
        let mut ids = vec![0u32; b * s];
        let mut positions = vec![0u32; b * s];
        for (i, seq) in batch.iter().enumerate() {
            ids[i * s..i * s + seq.ids.len()].copy_from_slice(seq.ids);
            for (j, p) in positions[i * s..(i + 1) * s].iter_mut().enumerate() {
                *p = (past[i] + j) as u32;
            }
        }
        let ids_t = Tensor::from_slice(&ids, &[b * s], &self.device)?;
        let positions = Tensor::from_slice(&positions, &[b, s], &self.device)?;
        let row_adapters: Vec<Option<usize>> = (0..b * s).map(|r| adapter_of[r / s]).collect();
        let step = Step { b, s, lens: &lens, positions: &positions, row_adapters: &row_adapters };

        let mut h = match &self.weights.embed {
            Weight::Dense(t) => crate::ops::embedding(t, &ids_t)?,
            Weight::Quantized(q) => crate::ops::qembedding(q, &ids_t, self.dtype)?,
        };
        let mut state = state;
        let mut normed = crate::ops::rms_norm(&h, &self.weights.layers[0].attn_norm, c.rms_norm_eps)?.y;
        for (l, layer) in self.weights.layers.iter().enumerate() {
            let cache = state.as_deref_mut().map(|st| &mut st.layers[l]);
            let attn = self.attention_block(l, layer, &normed, &step, cache)?;
            let mid = crate::ops::add_rms_norm(&h, &attn, &layer.mlp_norm, c.rms_norm_eps)?;
            let mlp = self.mlp_block(l, layer, &mid.y, &step)?;
            let next_norm = match self.weights.layers.get(l + 1) {
                Some(next) => &next.attn_norm,
                None => &self.weights.norm,
            };
            let out = crate::ops::add_rms_norm(&mid.h, &mlp, next_norm, c.rms_norm_eps)?;
            h = out.h;
            normed = out.y;
        }

        // The rows whose logits are wanted, gathered before the head.
        let rows: Vec<u32> = match which {
            Logits::All => (0..b).flat_map(|i| (0..lens[i]).map(move |j| (i * s + j) as u32)).collect(),
            Logits::Last => (0..b).map(|i| (i * s + lens[i].max(1) - 1) as u32).collect(),
        };
        let picked = crate::ops::embedding(&normed, &Tensor::from_slice(&rows, &[rows.len()], &self.device)?)?;
        // The head stays exact: near ties between logits decide the tokens.
        let logits = self.weights.head().forward(&picked, Default::default())?.to_dtype(DType::F32)?;
        if which == Logits::Last && lens.contains(&0) {
            let mut host = logits.to_vec::<f32>()?;
            for (i, _) in lens.iter().enumerate().filter(|(_, l)| **l == 0) {
                host[i * c.vocab_size..(i + 1) * c.vocab_size].fill(0.0);
            }
            return Tensor::from_slice(&host, &[b, c.vocab_size], &self.device);
        }
        Ok(logits)
    }

    /// A projection of layer `l` with each row's adapter: `x·Wᵀ + b` and, for rows whose
    /// adapter adapts it, `s·(x·Aᵀ)·Bᵀ`.
    fn project(&self, l: usize, p: usize, linear: &Linear, x: &Tensor, step: &Step<'_>) -> Result<Tensor> {
        let y = linear.forward(x, self.quantized_matmul)?;
        let Some(packed) = &self.packed[l][p] else { return Ok(y) };
        let entries: Vec<i32> =
            step.row_adapters.iter().map(|a| a.and_then(|a| packed.entry_of[a]).unwrap_or(-1)).collect();
        if entries.iter().all(|&e| e < 0) {
            return Ok(y);
        }
        lora_batched(x, &y, &packed.set, &entries)
    }

    fn attention_block(
        &self,
        l: usize,
        layer: &LayerWeights,
        x: &Tensor,
        step: &Step<'_>,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, s) = (step.b, step.s);
        let q = self.project(l, 0, &layer.q, x, step)?.reshape(&[b, s, c.num_heads, c.head_dim])?;
        let k = self.project(l, 1, &layer.k, x, step)?.reshape(&[b, s, c.num_kv_heads, c.head_dim])?;
        let v = self.project(l, 2, &layer.v, x, step)?.reshape(&[b, s, c.num_kv_heads, c.head_dim])?;
        let q = crate::ops::rope(&q, step.positions, &c.rope)?;
        let k = crate::ops::rope(&k, step.positions, &c.rope)?;
        let o = match cache {
            None => {
                let options = AttentionOptions { causal: true, scale: None, seq_lens: Some(step.lens.to_vec()) };
                attention(&q, &k, &v, &options)?.o
            }
            Some(cache) => {
                let fresh = cache.lens().iter().all(|&n| n == 0);
                cache.append(&k, &v, Some(step.lens))?;
                if fresh {
                    // A first prompt attends to itself alone: the causal forward kernels.
                    let options = AttentionOptions { causal: true, scale: None, seq_lens: Some(step.lens.to_vec()) };
                    attention(&q, &k, &v, &options)?.o
                } else {
                    attention_decode(&q, cache, &DecodeOptions { scale: None, q_lens: Some(step.lens.to_vec()) })?.o
                }
            }
        };
        self.project(l, 3, &layer.o, &o.reshape(&[b * s, c.num_heads * c.head_dim])?, step)
    }

    fn mlp_block(&self, l: usize, layer: &LayerWeights, x: &Tensor, step: &Step<'_>) -> Result<Tensor> {
        let g = self.project(l, 4, &layer.gate, x, step)?;
        let u = self.project(l, 5, &layer.up, x, step)?;
        self.project(l, 6, &layer.down, &crate::ops::swiglu(&g, &u)?, step)
    }

    /// The adapters loaded, by name.
    pub fn adapters(&self) -> &[(String, LoraAdapter)] {
        &self.adapters
    }

    /// Every projection's weight by module path, for tools that walk the model.
    pub fn projections(&self) -> BTreeMap<String, &Linear> {
        let mut out = BTreeMap::new();
        for (l, layer) in self.weights.layers.iter().enumerate() {
            for (p, name) in PROJECTIONS.iter().enumerate() {
                if let Some(linear) = layer.projection(name) {
                    out.insert(module_path(l, p), linear);
                }
            }
        }
        out
    }
}

/// Hugging Face's path of projection `p` (an index into [`PROJECTIONS`]) of `layer`:
/// `model.layers.{layer}.self_attn.q_proj`, ..., `model.layers.{layer}.mlp.down_proj`.
pub(super) fn module_path(layer: usize, p: usize) -> String {
    let group = if p >= 4 { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{group}.{}", PROJECTIONS[p])
}

/// One forward call's shape, shared by the layers.
struct Step<'a> {
    b: usize,
    s: usize,
    lens: &'a [usize],
    positions: &'a Tensor,
    /// Each padded row's adapter (an index into the loaded adapters).
    row_adapters: &'a [Option<usize>],
}
