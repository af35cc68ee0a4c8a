//! The whole small model's training step against central finite differences in f64 on the
//! CPU, for LoRA and for full fine-tuning.
//!
//! The reference is a naive f64 Llama written here from Hugging Face's modeling code
//! (embedding, RMSNorm, q/k/v, half-split RoPE, causal GQA attention, o, residual, RMSNorm,
//! SwiGLU, residual, final norm, head, mean cross-entropy over the counted targets) plus
//! PEFT's LoRA delta `s·(x·Aᵀ)·Bᵀ`, reading the weights kiln loaded. It is validated twice:
//! its logits against the logits transformers and PEFT computed for the fixtures
//! (`expected.safetensors`, independent of kiln), and its loss against `train_step`'s. Then
//! each sampled entry's derivative of the f64 loss, by central differences, is compared with
//! the gradient `train_step` returns in f32.

use kiln::io::SafetensorsFile;
use kiln::model::{
    Linear, Llama, LoadOptions, LoraAdapter, PROJECTIONS, StepOptions, TrainSequence, Trainable, lora_tensor_names,
};
use kiln::ops::{RopeConfig, RopeLayout, RopeScaling};
use kiln::{Device, Tensor};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const IGNORE_INDEX: i32 = -100;

/// f32's unit roundoff.
const U32: f64 = f32::EPSILON as f64 / 2.0;

/// The bound on kiln's f32 gradients, relative to the gradient tensor's largest entry G (and
/// to the entry itself). A gradient entry is computed through a chain of rounded sums: the
/// head's sum over the 320-entry vocabulary, projections over 64 or 128 features, attention
/// over at most 12 positions, weight gradients over the batch's 22 rows, through two layers
/// forward and back: about a dozen reductions in sequence. A sum of n terms rounds to within
/// n·u of the sum of the terms' magnitudes (Higham's γ_n), and a gradient entry's terms are no
/// larger than the tensor's largest entries, so each reduction adds at most 320·u·G and a
/// dozen add at most ≈ 3840·u·G ≈ 2⁻¹²·G. A sign, index or factor error is of the order of
/// the entry itself, which for a sampled entry is typically G/10 or more.
const GRAD_TOL: f64 = 1.0 / 4096.0;

/// The central difference step. The weights are of order 0.1–1 and the loss smooth, so the
/// truncation error h²·|L'''|/6 is about 1e-9, and the f64 rounding of the loss (≈ 1e-15
/// of L ≈ 6) divided by 2h about 3e-11: both far below GRAD_TOL·G.
const FD_STEP: f64 = 1e-4;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama")
}

fn load(name: &str) -> Llama {
    Llama::load(fixtures().join(name), &LoadOptions::new(&Device::Cpu)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn adapter(name: &str) -> LoraAdapter {
    LoraAdapter::load_peft(fixtures().join(name), &Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn values(t: &Tensor) -> Vec<f64> {
    t.to_vec_f32().unwrap().into_iter().map(f64::from).collect()
}

/// Hugging Face's module path of projection `p` (an index into PROJECTIONS) of layer `l`.
fn module_path(l: usize, p: usize) -> String {
    let group = if p >= 4 { "mlp" } else { "self_attn" };
    format!("model.layers.{l}.{group}.{}", PROJECTIONS[p])
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// splitmix64: the sampled entries, the same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

struct Lora {
    /// `[rank, in]`.
    a: Vec<f64>,
    /// `[out, rank]`.
    b: Vec<f64>,
    rank: usize,
    scale: f64,
}

/// One projection `[out, in]` with its bias and LoRA adapter.
struct Projection {
    w: Vec<f64>,
    bias: Option<Vec<f64>>,
    lora: Option<Lora>,
    out: usize,
    inp: usize,
}

impl Projection {
    fn new(linear: &Linear, lora: Option<Lora>) -> Projection {
        let [out, inp] = linear.weight.shape();
        Projection {
            w: values(&linear.weight.to_f32().unwrap()),
            bias: linear.bias.as_ref().map(values),
            lora,
            out,
            inp,
        }
    }

    /// `x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` for x `[n, in]`.
    fn apply(&self, x: &[f64], n: usize) -> Vec<f64> {
        let mut y = vec![0.0; n * self.out];
        for t in 0..n {
            let row = &x[t * self.inp..(t + 1) * self.inp];
            let xa: Vec<f64> = match &self.lora {
                Some(l) => (0..l.rank).map(|k| dot(&l.a[k * self.inp..(k + 1) * self.inp], row)).collect(),
                None => Vec::new(),
            };
            for o in 0..self.out {
                let mut v = dot(&self.w[o * self.inp..(o + 1) * self.inp], row);
                if let Some(b) = &self.bias {
                    v += b[o];
                }
                if let Some(l) = &self.lora {
                    v += l.scale * dot(&l.b[o * l.rank..(o + 1) * l.rank], &xa);
                }
                y[t * self.out + o] = v;
            }
        }
        y
    }
}

struct Layer {
    attn_norm: Vec<f64>,
    mlp_norm: Vec<f64>,
    /// In PROJECTIONS order.
    projections: Vec<Projection>,
}

/// The f64 reference model.
struct Reference {
    vocab: usize,
    d: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    eps: f64,
    inv_freq: Vec<f64>,
    embed: Vec<f64>,
    layers: Vec<Layer>,
    norm: Vec<f64>,
    /// `None` when tied to the embedding.
    head: Option<Vec<f64>>,
}

/// Hugging Face's inverse frequencies (`_compute_default_rope_parameters`, and
/// `_compute_llama3_parameters` / linear scaling), in f64.
fn inv_freq(rope: &RopeConfig, head_dim: usize) -> Vec<f64> {
    assert_eq!(rope.layout, RopeLayout::HalfSplit, "the reference rotates half-split heads");
    assert!(rope.rotary_dim.is_none_or(|r| r == head_dim), "the reference rotates whole heads");
    let base = rope.theta;
    let plain = (0..head_dim / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / head_dim as f64));
    match rope.scaling {
        RopeScaling::None => plain.collect(),
        RopeScaling::Linear { factor } => plain.map(|f| f / factor).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            let old = original_max_position_embeddings as f64;
            let (low_wavelen, high_wavelen) = (old / low_freq_factor, old / high_freq_factor);
            plain
                .map(|f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

impl Reference {
    fn new(model: &Llama, adapter: Option<&LoraAdapter>) -> Reference {
        let c = &model.config;
        let w = &model.weights;
        let layers = w
            .layers
            .iter()
            .enumerate()
            .map(|(l, layer)| Layer {
                attn_norm: values(&layer.attn_norm),
                mlp_norm: values(&layer.mlp_norm),
                projections: (0..PROJECTIONS.len())
                    .map(|p| {
                        let module = module_path(l, p);
                        let lora = adapter.and_then(|a| a.layers.get(&module).map(|ll| (a, ll))).map(|(a, ll)| Lora {
                            a: values(&ll.a),
                            b: values(&ll.b),
                            rank: ll.a.shape()[0],
                            scale: a.scale(&module) as f64,
                        });
                        Projection::new(layer.projection(PROJECTIONS[p]).unwrap(), lora)
                    })
                    .collect(),
            })
            .collect();
        Reference {
            vocab: c.vocab_size,
            d: c.hidden_size,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            eps: c.rms_norm_eps as f64,
            inv_freq: inv_freq(&c.rope, c.head_dim),
            embed: values(&w.embed.to_f32().unwrap()),
            layers,
            norm: values(&w.norm),
            head: w.lm_head.as_ref().map(|h| values(&h.to_f32().unwrap())),
        }
    }

    fn rms_norm(&self, x: &[f64], weight: &[f64]) -> Vec<f64> {
        x.chunks(self.d)
            .flat_map(|row| {
                let rstd = 1.0 / (dot(row, row) / self.d as f64 + self.eps).sqrt();
                row.iter().zip(weight).map(move |(v, g)| g * (v * rstd))
            })
            .collect()
    }

    /// `rotate_half`: feature i pairs with i + head_dim/2; token t is at position t.
    fn rope(&self, x: &mut [f64], n: usize, heads: usize) {
        let half = self.head_dim / 2;
        for t in 0..n {
            for h in 0..heads {
                let v = &mut x[(t * heads + h) * self.head_dim..(t * heads + h + 1) * self.head_dim];
                for i in 0..half {
                    let (sin, cos) = (t as f64 * self.inv_freq[i]).sin_cos();
                    let (x1, x2) = (v[i], v[i + half]);
                    v[i] = x1 * cos - x2 * sin;
                    v[i + half] = x2 * cos + x1 * sin;
                }
            }
        }
    }

    /// Causal attention of q `[n, heads, hd]` over k, v `[n, kv_heads, hd]`; q head h reads
    /// kv head h / (heads / kv_heads), as `repeat_kv` lays them out.
    fn attention(&self, q: &[f64], k: &[f64], v: &[f64], n: usize) -> Vec<f64> {
        let hd = self.head_dim;
        let group = self.heads / self.kv_heads;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut out = vec![0.0; n * self.heads * hd];
        for t in 0..n {
            for h in 0..self.heads {
                let kv = h / group;
                let qv = &q[(t * self.heads + h) * hd..][..hd];
                let scores: Vec<f64> =
                    (0..=t).map(|s| dot(qv, &k[(s * self.kv_heads + kv) * hd..][..hd]) * scale).collect();
                let max = scores.iter().fold(f64::NEG_INFINITY, |m, &s| m.max(s));
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = weights.iter().sum();
                let o = &mut out[(t * self.heads + h) * hd..][..hd];
                for (s, p) in weights.iter().enumerate() {
                    let vv = &v[(s * self.kv_heads + kv) * hd..][..hd];
                    for (oi, vi) in o.iter_mut().zip(vv) {
                        *oi += p / sum * vi;
                    }
                }
            }
        }
        out
    }

    /// The final norm's output `[n, d]` for one sequence.
    fn hidden(&self, ids: &[u32]) -> Vec<f64> {
        let (n, d) = (ids.len(), self.d);
        let mut h: Vec<f64> = ids.iter().flat_map(|&id| self.embed[id as usize * d..][..d].iter().copied()).collect();
        for layer in &self.layers {
            let p = &layer.projections;
            let x = self.rms_norm(&h, &layer.attn_norm);
            let mut q = p[0].apply(&x, n);
            let mut k = p[1].apply(&x, n);
            let v = p[2].apply(&x, n);
            self.rope(&mut q, n, self.heads);
            self.rope(&mut k, n, self.kv_heads);
            let o = p[3].apply(&self.attention(&q, &k, &v, n), n);
            h.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let x = self.rms_norm(&h, &layer.mlp_norm);
            let gate = p[4].apply(&x, n);
            let up = p[5].apply(&x, n);
            let act: Vec<f64> = gate.iter().zip(&up).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let down = p[6].apply(&act, n);
            h.iter_mut().zip(&down).for_each(|(a, b)| *a += b);
        }
        self.rms_norm(&h, &self.norm)
    }

    fn logits_row(&self, x: &[f64]) -> Vec<f64> {
        let head = self.head.as_ref().unwrap_or(&self.embed);
        head.chunks(self.d).map(|w| dot(w, x)).collect()
    }

    /// `[n, vocab]` logits of one sequence.
    fn logits(&self, ids: &[u32]) -> Vec<f64> {
        self.hidden(ids).chunks(self.d).flat_map(|x| self.logits_row(x)).collect()
    }

    /// The mean cross-entropy over the batch's counted targets, and the largest logit's
    /// magnitude on those rows.
    fn loss(&self, batch: &[TrainSequence]) -> (f64, f64) {
        let (mut total, mut counted, mut largest) = (0.0, 0usize, 0f64);
        for seq in batch {
            let hidden = self.hidden(&seq.ids);
            for (x, &target) in hidden.chunks(self.d).zip(&seq.targets) {
                if target == IGNORE_INDEX {
                    continue;
                }
                let logits = self.logits_row(x);
                let max = logits.iter().fold(f64::NEG_INFINITY, |m, &l| m.max(l));
                let lse = max + logits.iter().map(|l| (l - max).exp()).sum::<f64>().ln();
                total += lse - logits[target as usize];
                counted += 1;
                largest = logits.iter().fold(largest, |m, l| m.max(l.abs()));
            }
        }
        (total / counted as f64, largest)
    }

    /// The tensor with kiln's gradient name (Hugging Face's or PEFT's).
    fn tensor_mut(&mut self, name: &str) -> &mut Vec<f64> {
        match name {
            "model.embed_tokens.weight" => return &mut self.embed,
            "model.norm.weight" => return &mut self.norm,
            "lm_head.weight" => return self.head.as_mut().expect("lm_head of a tied model"),
            _ => {}
        }
        let hf = name.strip_prefix("base_model.model.").unwrap_or(name);
        let rest = hf.strip_prefix("model.layers.").unwrap_or_else(|| panic!("unknown tensor {name}"));
        let (l, tail) = rest.split_once('.').unwrap();
        let layer = &mut self.layers[l.parse::<usize>().unwrap()];
        match tail {
            "input_layernorm.weight" => return &mut layer.attn_norm,
            "post_attention_layernorm.weight" => return &mut layer.mlp_norm,
            _ => {}
        }
        let (module, kind) = match tail.strip_suffix(".bias") {
            Some(module) => (module, "bias"),
            None => {
                let module = tail.strip_suffix(".weight").unwrap_or_else(|| panic!("unknown tensor {name}"));
                match module.rsplit_once('.') {
                    Some((m, half @ ("lora_A" | "lora_B"))) => (m, half),
                    _ => (module, "weight"),
                }
            }
        };
        let projection = module.rsplit('.').next().unwrap();
        let p = PROJECTIONS.iter().position(|&q| q == projection).unwrap_or_else(|| panic!("unknown tensor {name}"));
        let proj = &mut layer.projections[p];
        match kind {
            "weight" => &mut proj.w,
            "bias" => proj.bias.as_mut().unwrap_or_else(|| panic!("{name}: no bias")),
            "lora_A" => &mut proj.lora.as_mut().unwrap_or_else(|| panic!("{name}: no adapter")).a,
            _ => &mut proj.lora.as_mut().unwrap_or_else(|| panic!("{name}: no adapter")).b,
        }
    }

    /// ∂loss/∂(entry `index` of tensor `name`) by central differences.
    fn finite_difference(&mut self, batch: &[TrainSequence], name: &str, index: usize) -> f64 {
        let original = self.tensor_mut(name)[index];
        self.tensor_mut(name)[index] = original + FD_STEP;
        let plus = self.loss(batch).0;
        self.tensor_mut(name)[index] = original - FD_STEP;
        let minus = self.loss(batch).0;
        self.tensor_mut(name)[index] = original;
        (plus - minus) / (2.0 * FD_STEP)
    }
}

/// The fixtures' three prompts (7, 12 and 3 tokens), the middle one with explicit targets
/// that leave its first four positions and one in the middle uncounted.
fn batch() -> Vec<TrainSequence> {
    let expected = SafetensorsFile::open(fixtures().join("expected.safetensors")).unwrap();
    let ids: Vec<Vec<u32>> = (0..3)
        .map(|i| {
            let (dtype, _, bytes) = expected.raw(&format!("ids.{i}")).unwrap();
            assert_eq!(dtype, "I64");
            bytes.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32).collect()
        })
        .collect();
    let middle = &ids[1];
    let targets = (0..middle.len())
        .map(|j| match j {
            0..4 | 7 => IGNORE_INDEX,
            _ if j + 1 < middle.len() => middle[j + 1] as i32,
            _ => IGNORE_INDEX,
        })
        .collect();
    vec![
        TrainSequence::causal(&ids[0]),
        TrainSequence::new(middle.clone(), targets).unwrap(),
        TrainSequence::causal(&ids[2]),
    ]
}

/// `layers.*.self_attn.q_proj.lora_A`: a gradient name with its layer index and prefixes
/// dropped, to report the worst error per kind.
fn kind_of(name: &str) -> String {
    let hf = name.strip_prefix("base_model.model.").unwrap_or(name);
    let hf = hf.strip_prefix("model.").unwrap_or(hf);
    let hf = hf.strip_suffix(".weight").unwrap_or(hf);
    match hf.strip_prefix("layers.") {
        Some(rest) => format!("layers.*.{}", rest.split_once('.').unwrap().1),
        None => hf.to_string(),
    }
}

/// The entries sampled from a gradient tensor of `shape`: `per_tensor` of them, and for the
/// embedding as many in rows the batch uses as in rows it does not.
fn sample(rng: &mut Rng, name: &str, shape: &[usize], batch: &[TrainSequence], per_tensor: usize) -> Vec<usize> {
    let len: usize = shape.iter().product();
    if name != "model.embed_tokens.weight" {
        return (0..per_tensor).map(|_| rng.below(len)).collect();
    }
    let (rows, cols) = (shape[0], shape[1]);
    let used: BTreeSet<usize> = batch.iter().flat_map(|s| s.ids.iter().map(|&id| id as usize)).collect();
    let unused: Vec<usize> = (0..rows).filter(|r| !used.contains(r)).collect();
    let used: Vec<usize> = used.into_iter().collect();
    let mut entries = Vec::new();
    for _ in 0..per_tensor {
        entries.push(used[rng.below(used.len())] * cols + rng.below(cols));
        entries.push(unused[rng.below(unused.len())] * cols + rng.below(cols));
    }
    entries
}

#[derive(Default)]
struct Worst {
    entries: usize,
    /// max |kiln − fd| / G.
    of_largest: f64,
    /// max |kiln − fd| / tolerance.
    of_tolerance: f64,
    /// max |kiln − fd| / |fd| over entries with |fd| ≥ G/100.
    relative: f64,
    /// max |fd| over the sampled entries.
    largest_fd: f64,
    /// Entries whose sign flipped would fall outside the tolerance.
    sign_sensitive: usize,
}

/// Runs one step of `trainable` on `model` and checks its loss against the reference and
/// its gradients against finite differences of the reference's loss.
fn check_step(what: &str, model: &Llama, lora: Option<&LoraAdapter>, per_tensor: usize, seed: u64) {
    let batch = batch();
    let trainable = match lora {
        Some(a) => Trainable::Lora(a),
        None => Trainable::Full,
    };
    let step = model.train_step(&batch, trainable, &StepOptions::default()).unwrap();
    let mut reference = Reference::new(model, lora);

    // (a) The loss: the logits' f32 error is within 2⁻¹³ of the largest logit (see
    // reference_logits_match_transformers), and a cross-entropy (logsumexp minus one logit)
    // moves by at most twice that.
    let (loss, largest_logit) = reference.loss(&batch);
    let counted: usize = batch.iter().map(TrainSequence::counted).sum();
    assert_eq!(step.counted, counted, "{what}: counted targets");
    let loss_tol = largest_logit / 4096.0 + 2.0 * U32 * loss;
    let loss_err = (step.loss as f64 - loss).abs();
    println!("{what}: loss kiln {} reference {loss:.9} |diff| {loss_err:.3e} (tol {loss_tol:.3e})", step.loss);
    assert!(loss_err <= loss_tol, "{what}: loss {} but the f64 reference gives {loss} (tol {loss_tol:e})", step.loss);
    assert!(step.non_finite.is_empty(), "{what}: non-finite gradients {:?}", step.non_finite);

    // Every trained tensor has a gradient, and nothing else does.
    let want: BTreeSet<String> = match lora {
        Some(a) => a.layers.keys().flat_map(|m| lora_tensor_names(m)).collect(),
        None => {
            let mut names: BTreeSet<String> =
                ["model.embed_tokens.weight", "model.norm.weight"].map(String::from).into_iter().collect();
            if model.weights.lm_head.is_some() {
                names.insert("lm_head.weight".into());
            }
            for (l, layer) in model.weights.layers.iter().enumerate() {
                names.insert(format!("model.layers.{l}.input_layernorm.weight"));
                names.insert(format!("model.layers.{l}.post_attention_layernorm.weight"));
                for (p, projection) in PROJECTIONS.iter().enumerate() {
                    names.insert(format!("{}.weight", module_path(l, p)));
                    if layer.projection(projection).unwrap().bias.is_some() {
                        names.insert(format!("{}.bias", module_path(l, p)));
                    }
                }
            }
            names
        }
    };
    let got: BTreeSet<String> = step.grads.keys().cloned().collect();
    assert_eq!(got, want, "{what}: the gradients' names");

    // (b) Sampled entries against central differences.
    let mut rng = Rng(seed);
    let mut kinds: BTreeMap<String, Worst> = BTreeMap::new();
    let mut failures = Vec::new();
    for (name, grad) in &step.grads {
        let g = values(grad);
        assert_eq!(g.len(), reference.tensor_mut(name).len(), "{what}: {name}: size");
        let largest = g.iter().fold(0f64, |m, v| m.max(v.abs()));
        let worst = kinds.entry(kind_of(name)).or_default();
        let (mut largest_fd, mut sign_sensitive) = (0f64, 0usize);
        for index in sample(&mut rng, name, grad.shape(), &batch, per_tensor) {
            let fd = reference.finite_difference(&batch, name, index);
            let err = (g[index] - fd).abs();
            let tol = GRAD_TOL * (largest + fd.abs());
            largest_fd = largest_fd.max(fd.abs());
            worst.entries += 1;
            worst.of_largest = worst.of_largest.max(err / largest.max(f64::MIN_POSITIVE));
            worst.of_tolerance = worst.of_tolerance.max(err / tol.max(f64::MIN_POSITIVE));
            if fd.abs() >= largest / 100.0 {
                worst.relative = worst.relative.max(err / fd.abs());
            }
            worst.largest_fd = worst.largest_fd.max(fd.abs());
            if 2.0 * fd.abs() > tol {
                sign_sensitive += 1;
                worst.sign_sensitive += 1;
            }
            // Written so that a NaN gradient fails too.
            if err.is_nan() || err > tol {
                failures.push(format!(
                    "{name}[{index}] (shape {:?}): kiln {} finite differences {fd:.9e} |diff| {err:.3e} tol {tol:.3e} (largest |grad| {largest:.3e})",
                    grad.shape(),
                    g[index]
                ));
            }
        }
        // The check has teeth: most sampled entries are large enough against the tolerance
        // that a wrong sign there would fail (the embedding's rows the batch does not use
        // have no gradient in an untied model, hence half).
        assert!(
            2 * sign_sensitive >= per_tensor,
            "{what}: {name}: only {sign_sensitive} sampled entries are large enough to tell a sign error"
        );
        // A LoRA tensor's loss must move with it (B is not zero in the fixtures, so A's
        // gradient is not zero either).
        if lora.is_some() {
            assert!(
                largest_fd > 1e-6,
                "{what}: perturbing {name} does not change the loss (largest |fd| {largest_fd:e})"
            );
        }
    }
    println!(
        "{what}: {:<40} {:>7} {:>12} {:>12} {:>12} {:>10} {:>14}",
        "kind", "entries", "err/max|g|", "err/|fd|", "err/tol", "max|fd|", "sign-sensitive"
    );
    for (kind, w) in &kinds {
        println!(
            "{what}: {kind:<40} {:>7} {:>12.3e} {:>12.3e} {:>12.3e} {:>10.3e} {:>14}",
            w.entries, w.of_largest, w.relative, w.of_tolerance, w.largest_fd, w.sign_sensitive
        );
    }
    assert!(failures.is_empty(), "{what}: {} entries out of tolerance:\n{}", failures.len(), failures.join("\n"));
}

/// The f64 reference against transformers' (and PEFT's) f32 logits, independently of kiln:
/// the f32 logits are within 2⁻¹³ of the largest logit (the bound tests/model.rs derives), and
/// that bound is what a naive f64 model must meet for the loss checks to mean anything.
#[test]
fn reference_logits_match_transformers() {
    let expected = SafetensorsFile::open(fixtures().join("expected.safetensors")).unwrap();
    let batch = batch();
    for (model_name, adapter_name, key) in [
        ("tiny", None, "tiny"),
        ("tiny", Some("adapter-tiny"), "tiny.adapter"),
        ("tiny", Some("adapter-tiny-rs"), "tiny.adapter_rs"),
        ("tiny-bias", None, "tiny_bias"),
        ("tiny-bias", Some("adapter-tiny-bias"), "tiny_bias.adapter"),
    ] {
        let model = load(model_name);
        let lora = adapter_name.map(adapter);
        let reference = Reference::new(&model, lora.as_ref());
        assert_eq!(reference.vocab, model.config.vocab_size);
        for (i, seq) in batch.iter().enumerate() {
            let want = values(&expected.tensor(&format!("{key}.logits.{i}"), &Device::Cpu).unwrap());
            let got = reference.logits(&seq.ids);
            assert_eq!(got.len(), want.len(), "{key}.logits.{i}");
            let scale = want.iter().fold(0f64, |m, v| m.max(v.abs()));
            let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0f64, f64::max);
            for (j, (g, w)) in got.iter().zip(&want).enumerate() {
                let tol = scale / 8192.0 + w.abs() / 8192.0;
                assert!((g - w).abs() <= tol, "{key}.logits.{i}[{j}]: reference {g}, transformers {w} (tol {tol:e})");
            }
            println!("{key}.logits.{i}: worst |reference - transformers| {worst:.3e} of largest {scale:.3}");
        }
    }
}

#[test]
fn lora_gradients_match_finite_differences() {
    let model = load("tiny");
    let lora = adapter("adapter-tiny");
    assert!(model.config.tie_word_embeddings);
    check_step("tiny + adapter-tiny", &model, Some(&lora), 8, 0x5EED_0001);
}

#[test]
fn full_gradients_match_finite_differences() {
    check_step("tiny, full", &load("tiny"), None, 12, 0x5EED_0002);
}

/// Biases on q, k, v and o, an untied head and llama3 rope scaling; bf16 weights read into
/// f32 exactly.
#[test]
fn lora_gradients_match_finite_differences_with_biases() {
    let model = load("tiny-bias");
    assert!(model.config.qkv_bias && model.config.o_bias && !model.config.tie_word_embeddings);
    check_step("tiny-bias + adapter-tiny-bias", &model, Some(&adapter("adapter-tiny-bias")), 8, 0x5EED_0003);
}

#[test]
fn full_gradients_match_finite_differences_with_biases() {
    check_step("tiny-bias, full", &load("tiny-bias"), None, 8, 0x5EED_0004);
}
