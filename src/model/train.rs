//! The training side of the Llama model: one step gives the mean causal-LM loss of a batch
//! and the gradients of what is trained (a LoRA adapter over the frozen base, or every weight
//! of a dense base).
//!
//! The backward is explicit, as llm.c writes it: the forward keeps, per layer, what each op's
//! backward needs (the layer's input, the norms' rstd, the attention's logsumexp, each LoRA
//! projection's `x·Aᵀ`), then the layers are walked in reverse, each op's backward called in
//! turn; no autograd tape. With activation checkpointing only each layer's input is kept and
//! the layer is computed again just before its backward: the same ops on the same inputs, so
//! the gradients are the same bits.
//!
//! The loss head is the fused linear + cross-entropy, over the rows that have a target only:
//! the `[tokens, vocab]` logits never exist whole.

use super::adapter::{LoraAdapter, LoraLayer};
use super::llama::{Llama, module_path};
use super::weights::{LayerWeights, Linear, PROJECTIONS, Weight};
use crate::ops::attention::{AttentionOptions, AttentionOutput, attention, attention_backward};
use crate::ops::lora::{LoraLinear, lora_backward, lora_forward};
use crate::ops::loss::{Head, IGNORE_INDEX, LinearCrossEntropyOptions};
use crate::ops::{MatmulOptions, QMatmulOptions};
use crate::{DType, Error, Result, Tensor};
use std::collections::BTreeMap;

/// One sequence of a training batch: its token ids and, per position, the id the model should
/// predict there ([`IGNORE_INDEX`], −100, where nothing is counted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrainSequence {
    pub ids: Vec<u32>,
    pub targets: Vec<i32>,
}

impl TrainSequence {
    /// `Err(Shape)` unless there is one target per id.
    pub fn new(ids: Vec<u32>, targets: Vec<i32>) -> Result<TrainSequence> {
        if ids.len() != targets.len() {
            return Err(Error::Shape(format!("{} ids but {} targets: one target per id", ids.len(), targets.len())));
        }
        Ok(TrainSequence { ids, targets })
    }

    /// The causal language-modelling targets of `ids`: each position predicts the next id and
    /// the last predicts nothing (Hugging Face's loss with `labels = input_ids`).
    pub fn causal(ids: &[u32]) -> TrainSequence {
        let targets = ids.iter().skip(1).map(|&id| id as i32).chain(ids.first().map(|_| IGNORE_INDEX)).collect();
        TrainSequence { ids: ids.to_vec(), targets }
    }

    /// Positions whose target is counted.
    pub fn counted(&self) -> usize {
        self.targets.iter().filter(|&&t| t != IGNORE_INDEX).count()
    }
}

/// What a training step computes gradients for.
#[derive(Debug, Clone, Copy)]
pub enum Trainable<'a> {
    /// A LoRA adapter over the frozen base (dense or quantized). Its gradients are keyed by
    /// its PEFT tensor names (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
    /// The adapters loaded into the model for serving play no part.
    Lora(&'a LoraAdapter),
    /// Every weight of a dense base, keyed by its Hugging Face name
    /// (`model.layers.0.self_attn.q_proj.weight`, `model.norm.weight`, ...). Tied embeddings
    /// get one gradient, `model.embed_tokens.weight`, the sum of both uses.
    Full,
}

/// How a step runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepOptions {
    /// Keep only each layer's input and compute the layer again during the backward.
    pub checkpointing: bool,
    /// Multiplies every gradient (not the loss): `1/n` for one of n accumulated micro-batches.
    pub grad_scale: f32,
    /// Seeds the LoRA dropout masks (when the adapter's `lora_dropout` is above 0).
    pub seed: u64,
}

impl Default for StepOptions {
    fn default() -> Self {
        StepOptions { checkpointing: false, grad_scale: 1.0, seed: 0 }
    }
}

impl StepOptions {
    pub fn checkpointing(self, checkpointing: bool) -> Self {
        StepOptions { checkpointing, ..self }
    }

    pub fn grad_scale(self, grad_scale: f32) -> Self {
        StepOptions { grad_scale, ..self }
    }

    pub fn seed(self, seed: u64) -> Self {
        StepOptions { seed, ..self }
    }
}

/// What a training step returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The mean cross-entropy over the counted targets of the whole batch.
    pub loss: f32,
    /// Targets counted.
    pub counted: usize,
    /// The gradient of `grad_scale · loss` for every trained tensor, f32, shaped like it.
    pub grads: BTreeMap<String, Tensor>,
    /// The global L2 norm of the gradients (NaN or infinite when one of them is not finite).
    pub grad_norm: f32,
    /// The trained tensors whose gradient holds a NaN or an infinity (empty when all are
    /// finite): the step reports them; what to do (skip the update) is the caller's choice.
    pub non_finite: Vec<String>,
}

/// The PEFT names of a module's two LoRA tensors.
pub fn lora_tensor_names(module: &str) -> [String; 2] {
    [format!("base_model.model.{module}.lora_A.weight"), format!("base_model.model.{module}.lora_B.weight")]
}

/// The Hugging Face names of layer `l`'s norms.
fn norm_names(l: usize) -> [String; 2] {
    [format!("model.layers.{l}.input_layernorm.weight"), format!("model.layers.{l}.post_attention_layernorm.weight")]
}

impl Llama {
    /// One training step over `batch`: the forward, the loss and the backward. Sequences may
    /// differ in length (each attends to itself only); every sequence starts at position 0.
    ///
    /// Errors: `InvalidArgument` for an empty batch, a batch with no counted target, an id or
    /// target outside the vocabulary (naming the sequence and position), a sequence longer
    /// than the model's context, a non-finite `grad_scale`, or full fine-tuning of a model
    /// with quantized weights; `Shape` for an adapter that does not fit the model (naming the
    /// tensor); `DeviceMismatch` for an adapter on another device.
    pub fn train_step(
        &self,
        batch: &[TrainSequence],
        trainable: Trainable<'_>,
        options: &StepOptions,
    ) -> Result<StepOutput> {
        on_cpu_pool(self, || Stepper::new(self, batch, Some(trainable), options)?.run())
    }

    /// The mean loss over the counted targets of `batch` and how many were counted, with
    /// `adapter` on the base (or the base alone): the step's forward without its backward,
    /// for evaluation. Errors as [`Llama::train_step`].
    pub fn eval_loss(&self, batch: &[TrainSequence], adapter: Option<&LoraAdapter>) -> Result<(f32, usize)> {
        let trainable = adapter.map(Trainable::Lora);
        on_cpu_pool(self, || Stepper::new(self, batch, trainable, &StepOptions::default())?.loss_only())
    }
}

/// Runs `f` inside rayon's pool on the CPU, so its parallel loops do not each enter it anew.
fn on_cpu_pool<T: Send>(model: &Llama, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    if model.device().is_cpu() && rayon::current_thread_index().is_none() {
        return rayon::scope(|_| f());
    }
    f()
}

/// How one projection of one layer runs in a step.
enum Projection<'a> {
    /// Frozen, no adapter.
    Frozen(&'a Linear),
    /// Frozen, with an adapter layer whose A and B are trained.
    Lora { linear: &'a Linear, layer: &'a LoraLayer, scale: f32, dropout: Option<(f32, u64)>, module: String },
    /// The weight itself (and its bias) trained.
    Full { linear: &'a Linear, module: String },
}

impl Projection<'_> {
    /// `x·Wᵀ + b (+ the LoRA delta)`, and `x·Aᵀ` when the projection has an adapter.
    fn forward(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Projection::Frozen(linear) | Projection::Full { linear, .. } => {
                Ok((linear.forward(x, QMatmulOptions::default())?, None))
            }
            Projection::Lora { linear, layer, scale, dropout, .. } => {
                let out = lora_forward(x, &lora_linear(linear, layer, *scale, *dropout))?;
                Ok((out.y, Some(out.xa)))
            }
        }
    }

    /// dx (f32) for the output gradient `dy` (f32) and the forward's input `x` and `x·Aᵀ`,
    /// with the trained tensors' gradients added to `grads`.
    fn backward(
        &self,
        dy: &Tensor,
        x: &Tensor,
        xa: Option<&Tensor>,
        grads: &mut BTreeMap<String, Tensor>,
    ) -> Result<Tensor> {
        match self {
            Projection::Frozen(linear) => input_grad(&linear.weight, dy),
            Projection::Lora { linear, layer, scale, dropout, module } => {
                let layer = lora_linear(linear, layer, *scale, *dropout);
                let xa = xa.ok_or_else(|| Error::InvalidArgument(format!("{module}: x·Aᵀ was not kept")))?;
                let g = lora_backward(dy, x, xa, &layer)?;
                let [a, b] = lora_tensor_names(module);
                grads.insert(a, g.da);
                grads.insert(b, g.db);
                Ok(g.dx)
            }
            Projection::Full { linear, module } => {
                let dw =
                    crate::ops::matmul_with(&dy.to_dtype(x.dtype())?, x, MatmulOptions::tn().out_dtype(DType::F32))?;
                grads.insert(format!("{module}.weight"), dw);
                if linear.bias.is_some() {
                    grads.insert(format!("{module}.bias"), column_sums(dy)?);
                }
                input_grad(&linear.weight, dy)
            }
        }
    }
}

/// A LoRA projection as the fused ops take it: the frozen linear with the adapter's pair.
fn lora_linear<'l>(
    linear: &'l Linear,
    layer: &'l LoraLayer,
    scale: f32,
    dropout: Option<(f32, u64)>,
) -> LoraLinear<'l> {
    LoraLinear { base: linear.weight.as_base(), bias: linear.bias.as_ref(), a: &layer.a, b: &layer.b, scale, dropout }
}

/// `dy·W` in f32, dy `[tokens, out]` f32: a dense W multiplies dy rounded to W's dtype, a
/// quantized W goes through the quantized input gradient (never dequantized whole).
fn input_grad(weight: &Weight, dy: &Tensor) -> Result<Tensor> {
    match weight {
        Weight::Dense(w) => {
            crate::ops::matmul_with(&dy.to_dtype(w.dtype())?, w, MatmulOptions::default().out_dtype(DType::F32))
        }
        Weight::Quantized(q) => crate::ops::qmatmul_input_grad(&dy.to_dtype(DType::F32)?, q),
    }
}

/// `Σ_rows dy`, `[out]` f32, for a bias's gradient: a product with a column of ones.
fn column_sums(dy: &Tensor) -> Result<Tensor> {
    let rows = dy.shape()[0];
    let ones = Tensor::full(&[rows, 1], 1.0, DType::F32, &dy.device())?;
    let sums = crate::ops::matmul_with(&ones, &dy.to_dtype(DType::F32)?, MatmulOptions::tn())?;
    sums.reshape(&[dy.shape()[1]])
}

/// What one layer's forward keeps for its backward. `[tokens, ..]` rows are the padded
/// batch's `b·s` positions.
struct LayerTrace {
    /// The layer's input, the residual stream `[tokens, d]`.
    input: Tensor,
    /// rstd of `rms_norm(input)`, the attention's input (recomputed in the backward: one
    /// elementwise pass, where keeping it would cost a `[tokens, d]` per layer).
    attn_rstd: Tensor,
    /// q and k after the rotary embedding, and v, `[b, s, heads, head_dim]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    attn: AttentionOutput,
    /// The residual stream after the attention, `input + o_proj(..)`.
    mid: Tensor,
    /// rstd of `rms_norm(mid)`, the MLP's input (recomputed likewise).
    mlp_rstd: Tensor,
    /// gate_proj's and up_proj's outputs; `swiglu(gate, up)`, down_proj's input, is
    /// recomputed in the backward.
    gate: Tensor,
    up: Tensor,
    /// `x·Aᵀ` of each projection that carries an adapter.
    xa: [Option<Tensor>; 7],
}

/// One step's state: the batch laid out as the kernels want it and what is trained.
struct Stepper<'a> {
    model: &'a Llama,
    /// `None` for a forward alone (evaluation): every projection frozen.
    trainable: Option<Trainable<'a>>,
    options: StepOptions,
    b: usize,
    s: usize,
    lens: Vec<usize>,
    /// Padded `[b·s]` ids and `[b, s]` positions.
    ids: Tensor,
    positions: Tensor,
    /// The padded rows that have a target, and those targets.
    rows: Tensor,
    targets: Tensor,
    counted: usize,
    /// `[layer][projection]`.
    projections: Vec<Vec<Projection<'a>>>,
}

impl<'a> Stepper<'a> {
    fn new(
        model: &'a Llama,
        batch: &[TrainSequence],
        trainable: Option<Trainable<'a>>,
        options: &StepOptions,
    ) -> Result<Stepper<'a>> {
        let c = &model.config;
        let device = model.device();
        if batch.is_empty() {
            return Err(Error::InvalidArgument("a training step needs at least one sequence".into()));
        }
        if !options.grad_scale.is_finite() {
            return Err(Error::InvalidArgument(format!("grad_scale {} is not finite", options.grad_scale)));
        }
        for (i, seq) in batch.iter().enumerate() {
            if seq.ids.len() != seq.targets.len() {
                return Err(Error::Shape(format!(
                    "sequence {i}: {} ids but {} targets",
                    seq.ids.len(),
                    seq.targets.len()
                )));
            }
            if let Some((pos, id)) = seq.ids.iter().enumerate().find(|&(_, &id)| id as usize >= c.vocab_size) {
                return Err(Error::InvalidArgument(format!(
                    "sequence {i}, position {pos}: token id {id} is past the vocabulary of {}",
                    c.vocab_size
                )));
            }
            if let Some((pos, t)) = seq
                .targets
                .iter()
                .enumerate()
                .find(|&(_, &t)| t != IGNORE_INDEX && (t < 0 || t as usize >= c.vocab_size))
            {
                return Err(Error::InvalidArgument(format!(
                    "sequence {i}, position {pos}: target {t} is outside the vocabulary of {} and is not {IGNORE_INDEX}",
                    c.vocab_size
                )));
            }
            if seq.ids.len() > c.max_sequence() {
                return Err(Error::InvalidArgument(format!(
                    "sequence {i} has {} positions, past the {} the model's context holds",
                    seq.ids.len(),
                    c.max_sequence()
                )));
            }
        }
        let counted: usize = batch.iter().map(TrainSequence::counted).sum();
        if counted == 0 {
            return Err(Error::InvalidArgument(
                "no sequence of the batch has a counted target (every target is -100): the loss is undefined".into(),
            ));
        }
        let projections = Self::projections(model, trainable, options.seed)?;

        let b = batch.len();
        let lens: Vec<usize> = batch.iter().map(|s| s.ids.len()).collect();
        let s = lens.iter().copied().max().unwrap_or(0);
        let mut ids = vec![0u32; b * s];
        let mut positions = vec![0u32; b * s];
        let (mut rows, mut targets) = (Vec::with_capacity(counted), Vec::with_capacity(counted));
        for (i, seq) in batch.iter().enumerate() {
            ids[i * s..i * s + seq.ids.len()].copy_from_slice(&seq.ids);
            for (j, p) in positions[i * s..(i + 1) * s].iter_mut().enumerate() {
                *p = j as u32;
            }
            for (j, &t) in seq.targets.iter().enumerate().filter(|(_, t)| **t != IGNORE_INDEX) {
                rows.push((i * s + j) as u32);
                targets.push(t);
            }
        }
        Ok(Stepper {
            model,
            trainable,
            options: *options,
            b,
            s,
            lens,
            ids: Tensor::from_slice(&ids, &[b * s], device)?,
            positions: Tensor::from_slice(&positions, &[b, s], device)?,
            rows: Tensor::from_slice(&rows, &[counted], device)?,
            targets: Tensor::from_slice(&targets, &[counted], device)?,
            counted,
            projections,
        })
    }

    /// Each layer's seven projections as the step runs them; `Err` when the adapter does not
    /// fit the model or full fine-tuning meets a quantized weight.
    fn projections(model: &'a Llama, trainable: Option<Trainable<'a>>, seed: u64) -> Result<Vec<Vec<Projection<'a>>>> {
        let device = model.device();
        if let Some(Trainable::Lora(adapter)) = trainable {
            adapter.validate()?;
            let known: Vec<String> = (0..model.config.num_layers)
                .flat_map(|l| (0..PROJECTIONS.len()).map(move |p| module_path(l, p)))
                .collect();
            for (module, layer) in &adapter.layers {
                if !known.contains(module) {
                    return Err(Error::Shape(format!(
                        "the adapter adapts {module}, which is not a projection of this {}-layer model",
                        model.config.num_layers
                    )));
                }
                for (half, t) in [("lora_A", &layer.a), ("lora_B", &layer.b)] {
                    if t.device() != *device {
                        return Err(Error::DeviceMismatch(format!(
                            "{module}.{half} is on {}, the model on {device}",
                            t.device()
                        )));
                    }
                }
            }
        }
        if let Some(Trainable::Full) = trainable {
            let quantized = model.projections().into_iter().find(|(_, l)| matches!(l.weight, Weight::Quantized(_)));
            let embed_quantized = matches!(model.weights.embed, Weight::Quantized(_));
            let head_quantized = matches!(model.weights.head(), Weight::Quantized(_));
            if let Some(name) = quantized.map(|(n, _)| n).or_else(|| {
                embed_quantized.then(|| "model.embed_tokens".to_string()).or(head_quantized.then(|| "lm_head".into()))
            }) {
                return Err(Error::InvalidArgument(format!(
                    "full fine-tuning needs a dense model, but {name} is quantized (train a LoRA adapter over it)"
                )));
            }
        }
        model
            .weights
            .layers
            .iter()
            .enumerate()
            .map(|(l, weights)| {
                (0..PROJECTIONS.len())
                    .map(|p| {
                        let linear = projection(weights, p)?;
                        let module = module_path(l, p);
                        Ok(match trainable {
                            None => Projection::Frozen(linear),
                            Some(Trainable::Full) => Projection::Full { linear, module },
                            Some(Trainable::Lora(adapter)) => match adapter.layers.get(&module) {
                                None => Projection::Frozen(linear),
                                Some(layer) => {
                                    adapter.check_fits(&module, linear.weight.shape())?;
                                    let p_drop = adapter.config.lora_dropout;
                                    let dropout = (p_drop > 0.0).then(|| (p_drop, dropout_seed(seed, l, p)));
                                    Projection::Lora { linear, layer, scale: adapter.scale(&module), dropout, module }
                                }
                            },
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// The forward and the loss, keeping nothing for a backward.
    fn loss_only(self) -> Result<(f32, usize)> {
        let model = self.model;
        let mut h = self.embed()?;
        for l in 0..model.config.num_layers {
            h = self.layer_forward(l, &h)?.1;
        }
        let final_norm = crate::ops::rms_norm(&h, &model.weights.norm, model.config.rms_norm_eps)?;
        let picked = crate::ops::embedding(&final_norm.y, &self.rows)?;
        let loss = crate::ops::linear_cross_entropy(
            &picked,
            self.head(),
            &self.targets,
            LinearCrossEntropyOptions::default(),
        )?;
        Ok((loss.loss.to_vec_f32()?[0], self.counted))
    }

    fn embed(&self) -> Result<Tensor> {
        match &self.model.weights.embed {
            Weight::Dense(t) => crate::ops::embedding(t, &self.ids),
            Weight::Quantized(q) => crate::ops::qembedding(q, &self.ids, self.model.dtype()),
        }
    }

    fn head(&self) -> Head<'a> {
        match self.model.weights.head() {
            Weight::Dense(w) => Head::Dense(w),
            Weight::Quantized(q) => Head::Quantized(q),
        }
    }

    fn run(self) -> Result<StepOutput> {
        let model = self.model;
        let c = &model.config;
        let mut grads = BTreeMap::new();

        // Forward: the trace of every layer, or only each layer's input when checkpointing.
        let mut h = self.embed()?;
        let mut traces: Vec<Option<LayerTrace>> = Vec::with_capacity(c.num_layers);
        let mut inputs: Vec<Tensor> = Vec::with_capacity(c.num_layers);
        for l in 0..c.num_layers {
            let (trace, out) = self.layer_forward(l, &h)?;
            inputs.push(h);
            // Checkpointing keeps the last layer's trace: its backward comes first, so it is
            // the one layer's worth of activations the backward holds anyway.
            let keep = !self.options.checkpointing || l + 1 == c.num_layers;
            traces.push(keep.then_some(trace));
            h = out;
        }

        // The loss over the rows with a target, and its gradient into the final norm.
        let last = model.weights.norm.clone();
        let final_norm = crate::ops::rms_norm(&h, &last, c.rms_norm_eps)?;
        let picked = crate::ops::embedding(&final_norm.y, &self.rows)?;
        let full = matches!(self.trainable, Some(Trainable::Full));
        let head = self.head();
        let mut loss_options = LinearCrossEntropyOptions::default().grad_scale(self.options.grad_scale);
        if full {
            loss_options = loss_options.head_grad();
        }
        let loss = crate::ops::linear_cross_entropy(&picked, head, &self.targets, loss_options)?;
        let loss_value = loss.loss.to_vec_f32()?[0];
        // grad_scale entered with the loss's gradient, so every gradient below carries it.
        // Rows without a target get a zero gradient: the scatter-add of the gathered rows.
        let d_normed = crate::ops::embedding_backward(&loss.dh, &self.rows, self.b * self.s)?;
        let final_grads = crate::ops::rms_norm_backward(&d_normed.to_dtype(h.dtype())?, &h, &last, &final_norm.rstd)?;
        let mut dh = final_grads.dx.to_dtype(DType::F32)?;
        if full {
            grads.insert("model.norm.weight".to_string(), final_grads.dw.to_dtype(DType::F32)?);
        }
        drop((h, final_norm, picked));

        // Backward, layer by layer in reverse.
        for l in (0..c.num_layers).rev() {
            let trace = match traces[l].take() {
                Some(trace) => trace,
                None => self.layer_forward(l, &inputs[l])?.0,
            };
            dh = self.layer_backward(l, trace, &dh, &mut grads)?;
        }

        if full {
            let mut d_embed = crate::ops::embedding_backward(&dh, &self.ids, c.vocab_size)?;
            let d_head = loss.dw.map(|t| t.to_dtype(DType::F32)).transpose()?;
            match (model.weights.lm_head.is_some(), d_head) {
                (true, Some(d_head)) => {
                    grads.insert("lm_head.weight".to_string(), d_head);
                }
                (false, Some(d_head)) => d_embed = crate::ops::add(&d_embed, &d_head)?,
                (_, None) => {}
            }
            grads.insert("model.embed_tokens.weight".to_string(), d_embed);
        }

        let (grad_norm, non_finite) = check_finite(&grads)?;
        Ok(StepOutput { loss: loss_value, counted: self.counted, grads, grad_norm, non_finite })
    }

    /// Layer `l` forward from its input `h` `[tokens, d]`: its trace and its output.
    fn layer_forward(&self, l: usize, h: &Tensor) -> Result<(LayerTrace, Tensor)> {
        let c = &self.model.config;
        let weights = &self.model.weights.layers[l];
        let projections = &self.projections[l];
        let (b, s) = (self.b, self.s);
        let mut xa: [Option<Tensor>; 7] = Default::default();

        let attn_norm = crate::ops::rms_norm(h, &weights.attn_norm, c.rms_norm_eps)?;
        let mut project = |p: usize, x: &Tensor| -> Result<Tensor> {
            let (y, saved) = projections[p].forward(x)?;
            xa[p] = saved;
            Ok(y)
        };
        let q = project(0, &attn_norm.y)?.reshape(&[b, s, c.num_heads, c.head_dim])?;
        let k = project(1, &attn_norm.y)?.reshape(&[b, s, c.num_kv_heads, c.head_dim])?;
        let v = project(2, &attn_norm.y)?.reshape(&[b, s, c.num_kv_heads, c.head_dim])?;
        let q = crate::ops::rope(&q, &self.positions, &c.rope)?;
        let k = crate::ops::rope(&k, &self.positions, &c.rope)?;
        let attn = attention(&q, &k, &v, &self.attention_options())?;
        let o = project(3, &attn.o.reshape(&[b * s, c.num_heads * c.head_dim])?)?;
        let mid = crate::ops::add_rms_norm(h, &o, &weights.mlp_norm, c.rms_norm_eps)?;
        let gate = project(4, &mid.y)?;
        let up = project(5, &mid.y)?;
        let act = crate::ops::swiglu(&gate, &up)?;
        let down = project(6, &act)?;
        let out = crate::ops::add(&mid.h, &down)?;
        let trace = LayerTrace {
            input: h.clone(),
            attn_rstd: attn_norm.rstd,
            q,
            k,
            v,
            attn,
            mid: mid.h,
            mlp_rstd: mid.rstd,
            gate,
            up,
            xa,
        };
        Ok((trace, out))
    }

    /// Layer `l` backward: the gradient of its input from that of its output (both f32
    /// `[tokens, d]`), with the trained tensors' gradients added to `grads`.
    fn layer_backward(
        &self,
        l: usize,
        t: LayerTrace,
        d_out: &Tensor,
        grads: &mut BTreeMap<String, Tensor>,
    ) -> Result<Tensor> {
        let c = &self.model.config;
        let weights = &self.model.weights.layers[l];
        let projections = &self.projections[l];
        let (b, s) = (self.b, self.s);
        let act_dtype = t.input.dtype();
        let full = matches!(self.trainable, Some(Trainable::Full));
        let [attn_norm_name, mlp_norm_name] = norm_names(l);

        // out = mid + down(swiglu(gate(mlp_in), up(mlp_in))), mlp_in = rms_norm(mid): the
        // same ops on the same inputs as the forward, so the same bits.
        let mlp_in = crate::ops::rms_norm(&t.mid, &weights.mlp_norm, c.rms_norm_eps)?.y;
        let act = crate::ops::swiglu(&t.gate, &t.up)?;
        let d_act = projections[6].backward(d_out, &act, t.xa[6].as_ref(), grads)?;
        drop(act);
        let (d_gate, d_up) = crate::ops::swiglu_backward(&d_act.to_dtype(act_dtype)?, &t.gate, &t.up)?;
        let d_mlp_in = crate::ops::add(
            &projections[4].backward(&d_gate.to_dtype(DType::F32)?, &mlp_in, t.xa[4].as_ref(), grads)?,
            &projections[5].backward(&d_up.to_dtype(DType::F32)?, &mlp_in, t.xa[5].as_ref(), grads)?,
        )?;
        let mlp_norm =
            crate::ops::rms_norm_backward(&d_mlp_in.to_dtype(act_dtype)?, &t.mid, &weights.mlp_norm, &t.mlp_rstd)?;
        let d_mid = crate::ops::add(d_out, &mlp_norm.dx.to_dtype(DType::F32)?)?;
        if full {
            grads.insert(mlp_norm_name, mlp_norm.dw.to_dtype(DType::F32)?);
        }

        // mid = input + o(attention(rope(q(attn_in)), rope(k(attn_in)), v(attn_in))).
        let o_in = t.attn.o.reshape(&[b * s, c.num_heads * c.head_dim])?;
        let d_o = projections[3].backward(&d_mid, &o_in, t.xa[3].as_ref(), grads)?;
        drop((mlp_in, t.gate, t.up));
        let d_o = d_o.reshape(&[b, s, c.num_heads, c.head_dim])?.to_dtype(act_dtype)?;
        let ag = attention_backward(&t.q, &t.k, &t.v, &t.attn, &d_o, &self.attention_options())?;
        drop((t.attn, t.q, t.k, t.v, d_o));
        let dq = crate::ops::rope_backward(&ag.dq, &self.positions, &c.rope)?;
        let dk = crate::ops::rope_backward(&ag.dk, &self.positions, &c.rope)?;
        let rows = |x: Tensor| -> Result<Tensor> {
            let n = x.elem_count() / (b * s);
            x.reshape(&[b * s, n])
        };
        let attn_in = crate::ops::rms_norm(&t.input, &weights.attn_norm, c.rms_norm_eps)?.y;
        let dx_q = projections[0].backward(&rows(dq)?, &attn_in, t.xa[0].as_ref(), grads)?;
        let dx_k = projections[1].backward(&rows(dk)?, &attn_in, t.xa[1].as_ref(), grads)?;
        let dx_v = projections[2].backward(&rows(ag.dv)?, &attn_in, t.xa[2].as_ref(), grads)?;
        let d_attn_in = crate::ops::add(&crate::ops::add(&dx_q, &dx_k)?, &dx_v)?;
        let attn_norm =
            crate::ops::rms_norm_backward(&d_attn_in.to_dtype(act_dtype)?, &t.input, &weights.attn_norm, &t.attn_rstd)?;
        if full {
            grads.insert(attn_norm_name, attn_norm.dw.to_dtype(DType::F32)?);
        }
        crate::ops::add(&d_mid, &attn_norm.dx.to_dtype(DType::F32)?)
    }

    fn attention_options(&self) -> AttentionOptions {
        AttentionOptions { causal: true, scale: None, seq_lens: Some(self.lens.clone()) }
    }
}

/// Projection `p` (an index into [`PROJECTIONS`]) of a layer.
fn projection(weights: &LayerWeights, p: usize) -> Result<&Linear> {
    weights
        .projection(PROJECTIONS[p])
        .ok_or_else(|| Error::InvalidArgument(format!("the layer has no {}", PROJECTIONS[p])))
}

/// The dropout seed of projection `p` of layer `l` in a step seeded `seed`.
fn dropout_seed(seed: u64, l: usize, p: usize) -> u64 {
    let counter = (l * PROJECTIONS.len() + p) as u64;
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ counter.wrapping_mul(0xBF58_476D_1CE4_E5B9).rotate_left(31)
}

/// The global L2 norm of the gradients and the names of those holding a non-finite value.
fn check_finite(grads: &BTreeMap<String, Tensor>) -> Result<(f32, Vec<String>)> {
    let mut sum = 0f64;
    let mut bad = Vec::new();
    for (name, g) in grads {
        let values = g.to_vec_f32()?;
        if values.iter().any(|v| !v.is_finite()) {
            bad.push(name.clone());
        }
        sum += values.iter().map(|&v| v as f64 * v as f64).sum::<f64>();
    }
    Ok((sum.sqrt() as f32, bad))
}
