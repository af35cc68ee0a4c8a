//! The training loop of a LoRA fine-tune: batches in a seeded, length-grouped order,
//! gradient accumulation, the learning-rate schedule, AdamW with f32 master weights and
//! global-norm clipping, steps with a non-finite gradient skipped and counted, and
//! checkpoints from which a run resumes exactly.
//!
//! Everything a step depends on is a function of the checkpointed state: the data order of
//! an epoch comes from (seed, epoch), the dropout seed from (seed, step, micro-batch), the
//! learning rate from the step; the adapter, the optimizer's moments and master weights are
//! saved bit for bit. So on the CPU a resumed run's losses equal the uninterrupted run's.

use super::AdamW;
use super::data::{Example, length_grouped_batches};
use super::rng::SplitMix64;
use super::schedule::{Schedule, ScheduleKind};
use crate::model::{Llama, LoraAdapter, LoraConfig, StepOptions, TrainSequence, Trainable};
use crate::ops::optim::AdamWHyper;
use crate::{Error, Result, Tensor};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// How a run trains.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// The adapter trained: rank, alpha, target modules.
    pub lora: LoraConfig,
    /// Sequences per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps of the whole run.
    pub steps: u64,
    pub lr: f64,
    pub warmup_steps: u64,
    pub schedule: ScheduleKind,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    pub seed: u64,
    /// Recompute each layer in the backward instead of keeping its activations.
    pub checkpointing: bool,
    /// Consecutive non-finite steps after which the run stops.
    pub max_non_finite: u64,
}

impl TrainConfig {
    /// `Err` naming the first setting a run cannot use.
    pub fn validate(&self) -> Result<()> {
        self.lora.validate()?;
        if self.batch_size == 0 || self.grad_accum == 0 {
            return Err(Error::InvalidArgument("the batch size and gradient accumulation must be at least 1".into()));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(Error::InvalidArgument(format!("weight decay {} is not finite and ≥ 0", self.weight_decay)));
        }
        if self.max_grad_norm.is_some_and(|n| !(n.is_finite() && n > 0.0)) {
            return Err(Error::InvalidArgument("the clipping norm must be finite and positive".into()));
        }
        Schedule::new(self.schedule, self.lr, self.warmup_steps, self.steps).map(|_| ())
    }

    fn schedule(&self) -> Result<Schedule> {
        Schedule::new(self.schedule, self.lr, self.warmup_steps, self.steps)
    }

    fn hyper(&self) -> AdamWHyper {
        AdamWHyper {
            lr: self.lr,
            weight_decay: self.weight_decay,
            max_grad_norm: self.max_grad_norm,
            ..AdamWHyper::default()
        }
    }

    /// The settings as JSON (the LoRA part is the adapter's own `adapter_config.json`).
    pub fn to_json(&self) -> Value {
        json!({
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "steps": self.steps,
            "lr": self.lr,
            "warmup_steps": self.warmup_steps,
            "schedule": self.schedule.name(),
            "weight_decay": self.weight_decay,
            "max_grad_norm": self.max_grad_norm,
            "seed": self.seed,
            "checkpointing": self.checkpointing,
            "max_non_finite": self.max_non_finite,
            "rank": self.lora.r,
            "alpha": self.lora.lora_alpha,
            "targets": self.lora.target_modules,
        })
    }

    fn from_json(v: &Value, lora: LoraConfig) -> Result<TrainConfig> {
        let bad = |k: &str| Error::Io(format!("trainer state: {k} is missing or malformed"));
        let u = |k: &str| v.get(k).and_then(Value::as_u64).ok_or_else(|| bad(k));
        let f = |k: &str| v.get(k).and_then(Value::as_f64).ok_or_else(|| bad(k));
        let config = TrainConfig {
            lora,
            batch_size: u("batch_size")? as usize,
            grad_accum: u("grad_accum")? as usize,
            steps: u("steps")?,
            lr: f("lr")?,
            warmup_steps: u("warmup_steps")?,
            schedule: v.get("schedule").and_then(Value::as_str).ok_or_else(|| bad("schedule"))?.parse()?,
            weight_decay: f("weight_decay")?,
            max_grad_norm: match v.get("max_grad_norm") {
                Some(Value::Null) => None,
                _ => Some(f("max_grad_norm")?),
            },
            seed: u("seed")?,
            checkpointing: v.get("checkpointing").and_then(Value::as_bool).ok_or_else(|| bad("checkpointing"))?,
            max_non_finite: u("max_non_finite")?,
        };
        config.validate()?;
        Ok(config)
    }
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// Optimizer steps done (skipped ones included).
    pub step: u64,
    /// The epoch of the next micro-batch, and its index in that epoch's order.
    pub epoch: u64,
    pub batch_in_epoch: usize,
    /// Steps skipped for a non-finite gradient, in all and in a row up to now.
    pub skipped: u64,
    pub skipped_in_a_row: u64,
    /// Tokens trained on (every position of every sequence, padding not counted).
    pub tokens: u64,
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepMetrics {
    /// The step's number, from 1.
    pub step: u64,
    /// The mean loss over the step's counted targets.
    pub loss: f32,
    pub lr: f64,
    /// The global gradient norm before clipping (not finite when the step was skipped).
    pub grad_norm: f32,
    /// Tokens in the step's batches, and of them the targets counted.
    pub tokens: usize,
    pub counted: usize,
    pub seconds: f64,
    /// A gradient (or the loss) was not finite: nothing was updated.
    pub skipped: bool,
    /// Epochs done, with the fraction of the current one.
    pub epoch: f64,
}

impl StepMetrics {
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(1e-9)
    }
}

/// Called with each step's accumulated gradients before the optimizer sees them (clipping
/// comes after): gradient surgery, projections, or a test's fault.
pub type GradHook<'h> = dyn FnMut(u64, &mut BTreeMap<String, Tensor>) -> Result<()> + 'h;

/// A LoRA fine-tune in progress: the adapter, its optimizer, the data and the position.
#[derive(Debug)]
pub struct Trainer {
    config: TrainConfig,
    adapter: LoraAdapter,
    optimizer: AdamW,
    schedule: Schedule,
    examples: Vec<Example>,
    data_hash: u64,
    progress: Progress,
    /// The current epoch's batches (indices into `examples`).
    order: Vec<Vec<usize>>,
}

/// The files of a checkpoint folder.
const STATE_FILE: &str = "trainer_state.json";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
const ADAPTER_FILES: [&str; 2] = ["adapter_config.json", "adapter_model.safetensors"];
const STATE_FORMAT: &str = "kiln.trainer.v1";

impl Trainer {
    /// A new run: a fresh adapter (PEFT's initialisation, seeded) over `model`.
    pub fn new(model: &Llama, config: TrainConfig, examples: Vec<Example>) -> Result<Trainer> {
        config.validate()?;
        let adapter = LoraAdapter::init(config.lora.clone(), model, config.seed)?;
        let named = adapter.tensors();
        let params: Vec<(&str, &Tensor)> = named.iter().map(|(n, t)| (n.as_str(), *t)).collect();
        let optimizer = AdamW::new(&params, config.hyper())?;
        Self::assemble(config, adapter, optimizer, examples, Progress::default())
    }

    fn assemble(
        config: TrainConfig,
        adapter: LoraAdapter,
        optimizer: AdamW,
        examples: Vec<Example>,
        progress: Progress,
    ) -> Result<Trainer> {
        if examples.is_empty() {
            return Err(Error::InvalidArgument("there are no training examples".into()));
        }
        if let Some(i) = examples.iter().position(|e| e.counted() == 0) {
            return Err(Error::InvalidArgument(format!("training example {i} has no counted target")));
        }
        let names: Vec<String> = adapter.tensors().into_iter().map(|(n, _)| n).collect();
        let bound: Vec<&str> = optimizer.params().iter().map(|p| p.name.as_str()).collect();
        if names.iter().map(String::as_str).ne(bound.iter().copied()) {
            return Err(Error::InvalidArgument("the optimizer's parameters are not the adapter's tensors".into()));
        }
        let data_hash = hash_examples(&examples);
        let mut trainer = Trainer {
            schedule: config.schedule()?,
            config,
            adapter,
            optimizer,
            examples,
            data_hash,
            progress,
            order: Vec::new(),
        };
        trainer.order = trainer.epoch_order(progress.epoch);
        Ok(trainer)
    }

    pub fn config(&self) -> &TrainConfig {
        &self.config
    }

    pub fn adapter(&self) -> &LoraAdapter {
        &self.adapter
    }

    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// Training examples.
    pub fn examples_len(&self) -> usize {
        self.examples.len()
    }

    /// Micro-batches in one pass over the data.
    pub fn batches_per_epoch(&self) -> usize {
        self.examples.len().div_ceil(self.config.batch_size)
    }

    /// Whether every step of the run is done.
    pub fn finished(&self) -> bool {
        self.progress.step >= self.config.steps
    }

    /// Why the run cannot go on, if it cannot: too many non-finite steps in a row.
    pub fn stop_reason(&self) -> Option<String> {
        let p = &self.progress;
        (p.skipped_in_a_row > self.config.max_non_finite).then(|| {
            format!(
                "{} steps in a row had a non-finite gradient (the limit is {}): the training diverged; \
                 lower the learning rate or check the data",
                p.skipped_in_a_row, self.config.max_non_finite
            )
        })
    }

    fn epoch_order(&self, epoch: u64) -> Vec<Vec<usize>> {
        let lens: Vec<usize> = self.examples.iter().map(Example::len).collect();
        length_grouped_batches(&lens, self.config.batch_size, self.config.seed, epoch)
    }

    /// The next micro-batch, moving on to the next epoch when this one is done.
    fn next_batch(&mut self) -> Vec<usize> {
        if self.progress.batch_in_epoch >= self.order.len() {
            self.progress.epoch += 1;
            self.progress.batch_in_epoch = 0;
            self.order = self.epoch_order(self.progress.epoch);
        }
        self.progress.batch_in_epoch += 1;
        self.order[self.progress.batch_in_epoch - 1].clone()
    }

    /// One optimizer step: `grad_accum` micro-batches, their gradients weighted by their
    /// share of the counted targets (so the step's gradient is the mean over all of them, as
    /// one big batch gives), `hook`, then AdamW at the schedule's rate. A step whose loss or
    /// gradient is not finite changes nothing but the position and is reported `skipped`.
    pub fn step(&mut self, model: &Llama, hook: Option<&mut GradHook<'_>>) -> Result<StepMetrics> {
        if self.finished() {
            return Err(Error::InvalidArgument(format!("the run's {} steps are done", self.config.steps)));
        }
        let start = Instant::now();
        let step = self.progress.step;
        let lr = self.schedule.lr(step);
        let batches: Vec<Vec<usize>> = (0..self.config.grad_accum).map(|_| self.next_batch()).collect();
        let counted_of = |b: &Vec<usize>| b.iter().map(|&i| self.examples[i].counted()).sum::<usize>();
        let counted: usize = batches.iter().map(counted_of).sum();
        let tokens: usize = batches.iter().flatten().map(|&i| self.examples[i].len()).sum();

        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        for (k, batch) in batches.iter().enumerate() {
            let sequences = batch
                .iter()
                .map(|&i| TrainSequence::new(self.examples[i].ids.clone(), self.examples[i].targets.clone()))
                .collect::<Result<Vec<_>>>()?;
            let share = counted_of(batch) as f64 / counted as f64;
            let options = StepOptions::default()
                .checkpointing(self.config.checkpointing)
                .grad_scale(share as f32)
                .seed(SplitMix64::stream(self.config.seed, step * self.config.grad_accum as u64 + k as u64).next_u64());
            let out = model.train_step(&sequences, Trainable::Lora(&self.adapter), &options)?;
            loss_sum += out.loss as f64 * share;
            for (name, g) in out.grads {
                let sum = match grads.remove(&name) {
                    Some(acc) => crate::ops::add(&acc, &g)?,
                    None => g,
                };
                grads.insert(name, sum);
            }
        }
        if let Some(hook) = hook {
            hook(step, &mut grads)?;
        }
        let loss = loss_sum as f32;
        let names: Vec<String> = self.optimizer.params().iter().map(|p| p.name.clone()).collect();
        let ordered = names
            .iter()
            .map(|n| grads.get(n).ok_or_else(|| Error::InvalidArgument(format!("no gradient for {n}"))))
            .collect::<Result<Vec<&Tensor>>>()?;
        self.optimizer.hyper.lr = lr;
        let (grad_norm, skipped) = if loss.is_finite() {
            let mut working: Vec<&mut Tensor> = self.adapter.tensors_mut().into_iter().map(|(_, t)| t).collect();
            let report = self.optimizer.step(&ordered, &mut working)?;
            (report.grad_norm, report.skipped)
        } else {
            (f32::NAN, true)
        };
        let p = &mut self.progress;
        p.step += 1;
        p.tokens += tokens as u64;
        if skipped {
            p.skipped += 1;
            p.skipped_in_a_row += 1;
        } else {
            p.skipped_in_a_row = 0;
        }
        let epoch = p.epoch as f64 + p.batch_in_epoch as f64 / self.order.len().max(1) as f64;
        Ok(StepMetrics {
            step: p.step,
            loss,
            lr,
            grad_norm,
            tokens,
            counted,
            seconds: start.elapsed().as_secs_f64(),
            skipped,
            epoch,
        })
    }

    /// Writes the checkpoint folder `dir` as a whole (the previous one stays until the new
    /// one is complete): the adapter in PEFT's format, the optimizer state, and the position.
    pub fn save_checkpoint(&self, dir: &Path) -> Result<()> {
        let p = &self.progress;
        let state = json!({
            "format": STATE_FORMAT,
            "step": p.step,
            "epoch": p.epoch,
            "batch_in_epoch": p.batch_in_epoch,
            "skipped": p.skipped,
            "skipped_in_a_row": p.skipped_in_a_row,
            "tokens": p.tokens,
            "data_hash": format!("{:016x}", self.data_hash),
            "examples": self.examples.len(),
            "config": self.config.to_json(),
        });
        let state = serde_json::to_vec_pretty(&state).map_err(|e| Error::Io(format!("trainer state: {e}")))?;
        let optimizer = self.optimizer.to_bytes()?;
        let adapter = self.adapter.peft_files()?;
        let mut files: Vec<(&str, &[u8])> = adapter.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        files.push((OPTIMIZER_FILE, &optimizer));
        files.push((STATE_FILE, &state));
        crate::fs::write_dir(dir, &files).map_err(|e| Error::Io(format!("writing {}: {e}", dir.display())))
    }

    /// The run saved in the checkpoint folder `dir`, over `model`, with `examples` (the same
    /// data it was trained on: `Err` when they differ). All files come from one version of
    /// the folder.
    pub fn resume(model: &Llama, dir: &Path, examples: Vec<Example>) -> Result<Trainer> {
        let names = [ADAPTER_FILES[0], ADAPTER_FILES[1], OPTIMIZER_FILE, STATE_FILE];
        let [config_text, weights, optimizer, state]: [Vec<u8>; 4] = crate::fs::read_dir_files(dir, &names)
            .map_err(|e| Error::Io(format!("reading the checkpoint {}: {e}", dir.display())))?
            .try_into()
            .map_err(|_| Error::Io(format!("reading the checkpoint {}: a file is missing", dir.display())))?;
        let device = model.device();
        let adapter = LoraAdapter::from_peft_files(dir, config_text, weights, device)?;
        let optimizer_path = dir.join(OPTIMIZER_FILE);
        let optimizer = AdamW::from_file(
            &crate::io::SafetensorsFile::from_bytes(optimizer, &optimizer_path)?,
            &optimizer_path,
            device,
        )?;
        let state: Value = serde_json::from_slice(&state)
            .map_err(|e| Error::Io(format!("{}: not JSON: {e}", dir.join(STATE_FILE).display())))?;
        let bad = |k: &str| Error::Io(format!("{}: {k} is missing or malformed", dir.join(STATE_FILE).display()));
        if state.get("format").and_then(Value::as_str) != Some(STATE_FORMAT) {
            return Err(bad("format"));
        }
        let u = |k: &str| state.get(k).and_then(Value::as_u64).ok_or_else(|| bad(k));
        let progress = Progress {
            step: u("step")?,
            epoch: u("epoch")?,
            batch_in_epoch: u("batch_in_epoch")? as usize,
            skipped: u("skipped")?,
            skipped_in_a_row: u("skipped_in_a_row")?,
            tokens: u("tokens")?,
        };
        let config = TrainConfig::from_json(state.get("config").ok_or_else(|| bad("config"))?, adapter.config.clone())?;
        let saved_hash = state.get("data_hash").and_then(Value::as_str).ok_or_else(|| bad("data_hash"))?;
        let hash = format!("{:016x}", hash_examples(&examples));
        if saved_hash != hash {
            return Err(Error::InvalidArgument(format!(
                "the checkpoint {} was trained on other data (hash {saved_hash}, these examples {hash}): \
                 resume with the same data and settings",
                dir.display()
            )));
        }
        let trainer = Self::assemble(config, adapter, optimizer, examples, progress)?;
        if trainer.progress.batch_in_epoch > trainer.order.len() || trainer.progress.step > trainer.config.steps {
            return Err(bad("step"));
        }
        Ok(trainer)
    }
}

/// A fingerprint of the tokenized data: ids, targets and order.
fn hash_examples(examples: &[Example]) -> u64 {
    let mut h = SplitMix64::new(examples.len() as u64).next_u64();
    let mut mix = |v: u64| h = SplitMix64::new(h ^ v).next_u64();
    for e in examples {
        mix(e.ids.len() as u64);
        e.ids.iter().for_each(|&id| mix(id as u64));
        e.targets.iter().for_each(|&t| mix(t as u32 as u64));
    }
    h
}
